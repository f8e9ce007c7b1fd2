"""Where tuning candidates are measured: this machine, RPC servers behind a tracker, or one server per local GPU.

Requires: a TVM target; for ``rpc_tracker``, a running tracker (``python -m
tvm.exec.rpc_tracker``) with servers registered under ``rpc_key`` (``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key KEY``).
Guarantees: ``measuring(...)`` yields a MetaSchedule runner and the number of
devices it measures on in parallel, and stops whatever it started on exit. With
``devices``, it starts a tracker on loopback and one ``rpc_server`` per listed GPU,
each seeing only its GPU; candidates are built locally in any case.
Uses TVM's own tracker protocol, so a remote fleet and local GPUs are the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import tvm

from ..errors import SmeltError

log = logging.getLogger(__name__)

_VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}
LOCAL_KEY = "smelt-local"


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


@contextlib.contextmanager
def measuring(target: tvm.target.Target, *, rpc_tracker: str | None = None, rpc_key: str | None = None,
              devices: Sequence[int] | None = None, timeout: float = 60.0) -> Iterator[tuple[object, int]]:
    """(runner, parallel devices) for ``target``; see the module docstring."""
    from tvm.s_tir import meta_schedule as ms

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
        yield _rpc_runner(host, port, rpc_key, n, timeout), n
    elif devices:
        kind = target.kind.name
        if kind not in _VISIBLE:
            raise SmeltError(f"--devices lists GPUs; target {kind!r} measures on this machine's CPU "
                             f"(use --rpc-tracker for several CPU machines)")
        with _local_servers(_VISIBLE[kind], devices) as (host, port):
            yield _rpc_runner(host, port, LOCAL_KEY, len(devices), timeout), len(devices)
    else:
        yield ms.runner.LocalRunner(timeout_sec=timeout), 1


def _rpc_runner(host: str, port: int, key: str, workers: int, timeout: float):
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=int(timeout))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=workers)


@contextlib.contextmanager
def _local_servers(visible_var: str, devices: Sequence[int], wait: float = 120.0):
    """A loopback tracker and one ``tvm.exec.rpc_server`` per device in ``devices``."""
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = []
    try:
        for dev in devices:
            env = {**os.environ, visible_var: str(dev)}
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                 "--tracker", f"127.0.0.1:{tracker.port}", "--key", LOCAL_KEY, "--silent"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + wait
        while registered_servers("127.0.0.1", tracker.port, LOCAL_KEY) < len(devices):
            for dev, proc in zip(devices, servers):
                if proc.poll() is not None:
                    raise SmeltError(f"the RPC server for device {dev} exited: "
                                     f"{proc.stderr.read().decode(errors='replace').strip()[-500:]}")
            if time.monotonic() > deadline:
                raise SmeltError(f"RPC servers for devices {list(devices)} did not register within {wait:.0f} s")
            time.sleep(0.5)
        log.info("one RPC server per device: %s", ", ".join(map(str, devices)))
        yield "127.0.0.1", tracker.port
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        tracker.terminate()
