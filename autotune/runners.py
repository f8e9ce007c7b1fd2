"""Where tuning candidates are measured: this machine, RPC servers behind a tracker, or each local GPU.

Requires: a TVM target; for ``rpc_tracker``, a running tracker (``python -m
tvm.exec.rpc_tracker``) with servers registered under ``rpc_key`` (``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key KEY``; GPU servers with ``--no-fork``,
see below).
Guarantees: ``measuring(...)`` yields a MetaSchedule runner and the number of
devices it measures on in parallel, or raises ``SmeltError`` naming what is missing.
Candidates are built locally in any case. Remote devices go through TVM's tracker
protocol. ``devices`` (local GPUs) gets one MetaSchedule ``LocalRunner`` per GPU,
its worker process seeing only that GPU, and candidates dealt round-robin. GPU
runners are asynchronous: ``run`` returns at once, so MetaSchedule searches and
builds the next task while the GPUs measure (``asynchronous(runner)`` says so). A CPU
is measured synchronously: builds running beside a CPU measurement would skew it.

Why not ``LocalRunner`` alone: its ``run`` waits for every candidate before it returns,
so candidates dealt to two of them were still measured one after the other, and
nothing overlapped the measurement.

Why not loopback RPC servers for local GPUs: TVM's ``rpc_server`` forks a process per
session, and on the H200 every forked session failed with
``cudaErrorInitializationError``; with ``--no-fork`` each session is a fresh Python
process, a few seconds per candidate. Pinned local workers start once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

from ..errors import SmeltError

log = logging.getLogger(__name__)

_VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SmeltError(f"RPC tracker address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def registered_servers(host: str, port: int, key: str) -> int:
    """How many servers the tracker at ``host:port`` holds under ``key``."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as e:
        raise SmeltError(f"cannot reach the RPC tracker at {host}:{port}: {e}") from None
    return sum(1 for s in summary.get("server_info", []) if s["key"].split(":", 1)[-1] == key)


def measuring(target: tvm.target.Target, *, rpc_tracker: str | None = None, rpc_key: str | None = None,
              devices: Sequence[int] | None = None, timeout: float = 60.0) -> tuple[object, int]:
    """(runner, parallel devices) for ``target``; see the module docstring."""
    if devices and rpc_tracker:
        raise SmeltError("give either --devices (local GPUs) or --rpc-tracker (remote devices), not both")
    if rpc_tracker:
        if not rpc_key:
            raise SmeltError("--rpc-tracker needs --rpc-key: the key the devices registered under")
        host, port = parse_address(rpc_tracker)
        n = registered_servers(host, port, rpc_key)
        if n == 0:
            raise SmeltError(f"the RPC tracker at {host}:{port} has no server under key {rpc_key!r}; start one "
                             f"with: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {rpc_key}")
        log.info("measuring on %d device(s) under key %r at %s:%d", n, rpc_key, host, port)
        return _rpc_runner(host, port, rpc_key, n, timeout), n
    elif devices:
        kind = target.kind.name
        if kind not in _VISIBLE:
            raise SmeltError(f"--devices lists GPUs; target {kind!r} measures on this machine's CPU "
                             f"(use --rpc-tracker for several CPU machines)")
        log.info("one measuring worker per device: %s", ", ".join(map(str, devices)))
        return PerDeviceRunner(_VISIBLE[kind], devices, timeout), len(devices)
    if target.kind.name in _VISIBLE:
        return PerDeviceRunner(None, [None], timeout), 1
    return ms.runner.LocalRunner(timeout_sec=timeout), 1


def asynchronous(runner) -> bool:
    """Whether ``runner.run`` returns before its candidates are measured."""
    return isinstance(runner, (PerDeviceRunner, ms.runner.RPCRunner))


def _pin(var: str, device: int) -> None:
    """Worker initializer: this process sees only ``device`` (set before anything touches the GPU)."""
    os.environ[var] = str(device)


@derived_object
class PerDeviceRunner(PyRunner):
    """Deals candidates round-robin to one ``LocalRunner`` per GPU, each fed by its own thread.

    ``visible_var`` None: one unpinned worker (the GPU this process sees).
    """

    def __init__(self, visible_var: str | None, devices: Sequence[int | None], timeout: float = 60.0):
        super().__init__()
        self.runners = [ms.runner.LocalRunner(
            timeout_sec=timeout, initializer=functools.partial(_pin, visible_var, d) if visible_var else None)
            for d in devices]
        self.feeders = [ThreadPoolExecutor(1, thread_name_prefix=f"smelt-measure-{d}") for d in devices]
        self.next = 0

    def run(self, runner_inputs):
        futures = []
        for inp in runner_inputs:
            k = self.next
            self.next = (k + 1) % len(self.runners)
            futures.append(_Pending(self.feeders[k].submit(self.runners[k].run, [inp])))
        return futures


@derived_object
class _Pending(PyRunnerFuture):
    """A candidate queued on one device's feeder thread."""

    def __init__(self, future):
        super().__init__()
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        try:
            return self.future.result()[0].result()
        except Exception as e:  # noqa: BLE001 - LocalRunner reports errors in its result; this is a last guard
            return RunnerResult(None, f"measuring failed: {e}")


def _rpc_runner(host: str, port: int, key: str, workers: int, timeout: float):
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=int(timeout))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=workers)
