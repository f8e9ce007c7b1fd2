"""``smelt.bench``: one model through smelt and its peers in one process, side by side.

For each model: smelt without tuning records and, when records apply, with them;
onnxruntime on the same ONNX file (CPU, or CUDA when the target is cuda and ORT has it);
torch eager and ``torch.compile`` for PyTorch models. Every runner gets the same random
inputs (fixed seed), then ``repeat`` timed calls, the runners taking turns in blocks
(so a burst of load on a shared machine meets them all); the result is the median in
milliseconds. Each output is checked against the reference (onnxruntime for
ONNX, torch eager for PyTorch): the largest deviation relative to the reference's largest
magnitude. ``profile=True`` adds smelt's time per kernel (a run's kernel calls recorded by
the VM's instrumentation, CUDA graphs off so every kernel is seen, each replayed on its
arguments: ``_profile``): the top kernels, their share, how often a run calls each (one
kernel serves every layer of its shape) and their shapes.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import tvm

from . import backends
from .artifact import load
from .compiler import CompileOptions, compile
from .errors import BackendError, SmeltError

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """One runner on one model: median ms, and its error against the reference."""

    runner: str
    ms: float
    rel_err: float | None = None
    note: str = ""


@dataclass
class KernelTime:
    """One kernel in ``bench``'s profile: its time per run, summed over its calls."""

    kernel: str
    ms: float  # per run
    share: float  # of all kernel time
    calls: int = 1  # per run
    shapes: str = ""  # its arguments at the first call, outputs last: "1x7x7x160 float32, ..."
    bytes: int = 0  # of those arguments, read or written once per call

    def gbps(self) -> float:
        """Bytes of its arguments per second, in GB/s: against the memory's, how near its bound a kernel runs."""
        return self.bytes * self.calls / (self.ms * 1e6) if self.ms > 0 else 0.0


@dataclass
class BenchResult:
    """``bench``'s result for one model; ``ratios`` are peer ms / smelt ms (above 1: smelt faster)."""

    model: str
    target: str
    build: str = "float32"  # smelt's precision and quantization scheme, if any ("float16, fp8")
    timings: list[Timing] = field(default_factory=list)
    profile: list[KernelTime] = field(default_factory=list)  # slowest first
    tuned_kernels: int = 0
    kernels: int = 0

    def best_smelt(self) -> Timing:
        return min((t for t in self.timings if t.runner.startswith("smelt")), key=lambda t: t.ms)

    def ratios(self) -> dict[str, float]:
        best = self.best_smelt().ms
        return {t.runner: t.ms / best for t in self.timings if not t.runner.startswith("smelt")}

    def to_json(self) -> dict:
        return {**asdict(self), "ratios": self.ratios()}


@dataclass
class _Runner:
    """One runner ready to time: ``call`` runs the model once and returns its seconds (None: it failed)."""

    label: str
    call: Callable[[], float] | None
    rel_err: float | None = None
    note: str = ""


def _wall(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Callable[[], float]:
    def call() -> float:
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t
    return call


SETTLE_S = 0.05


def time_in_turns(calls: dict[str, Callable[[], object]], repeat: int = 30) -> dict[str, float]:
    """Median ms of each of ``calls`` ({label: run once}), timed as ``smelt bench`` times its
    runners: taking turns, each turn after a pause and an untimed call (see ``_interleaved``)."""
    return {t.runner: t.ms for t in _interleaved([_Runner(k, _wall(fn)) for k, fn in calls.items()], repeat)}


def _interleaved(runners: list[_Runner], repeat: int, rounds: int = 4) -> list[Timing]:
    """Median ms of ``repeat`` calls per runner, the runners taking turns in ``rounds`` blocks.

    On a shared machine load comes in bursts of seconds; timed one after another, a burst
    slowed whichever runner it met (ResNet-18 on the 2-core CPU: smelt 31 to 54 ms between
    runs a minute apart). Taking turns, every runner meets the same bursts. Turns are
    blocks, not single calls, each after a pause (``SETTLE_S``) and an untimed call: a
    runner's thread pool spins on the cores for a while after its last call
    (onnxruntime's by default, TVM's too), and a call that started right after another
    runner's met those threads: with turns of one call, smelt on 2 threads measured 4x
    slower than alone, and an MLP whose call takes 0.03 ms took 2.5 ms.
    """
    live = [r for r in runners if r.call is not None]
    times: dict[str, list[float]] = {r.label: [] for r in live}
    for i in range(rounds):
        block = repeat // rounds + (1 if i < repeat % rounds else 0)
        for r in live:
            time.sleep(SETTLE_S)  # the last runner's pool stops spinning
            r.call()  # untimed: warms up
            times[r.label] += [r.call() for _ in range(block)]
    return [Timing(r.label, 1e3 * statistics.median(times[r.label]) if r.call is not None else float("nan"),
                   r.rel_err, r.note) for r in runners]


def random_inputs(specs, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``specs`` (static shapes): standard normal floats, small non-negative integers."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in specs:
        if not all(isinstance(d, int) for d in t.shape):
            raise SmeltError(f"input {t.name} has symbolic shape {t.shape}; fix it with input_shapes / --input-shape")
        if t.dtype.startswith(("float", "bfloat")):
            out[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
        elif t.dtype == "bool":
            out[t.name] = np.ones(t.shape, bool)
        else:
            out[t.name] = rng.integers(0, 2, t.shape).astype(t.dtype)
    return out


def _rel(got, ref) -> float:
    got, ref = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, (tuple, list)) else (ref,))
    worst = 0.0
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        worst = max(worst, float(np.abs(g - r).max(initial=0.0)) / max(float(np.abs(r).max(initial=0.0)), 1e-30))
    return worst


def _require_device(target: str) -> None:
    """Raises before any compile where this machine has no ``target`` device to time on."""
    if not tvm.runtime.device(backends.get(target).device_type, 0).exist:
        raise BackendError(f"bench times on this machine, which has no {target} device 0; "
                           f"build for another machine with `smelt compile --target {target}`")


def bench(model, target: str = "cpu", *, name: str = "model", tune_log_dir: str | None = "tune_logs",
          repeat: int = 20, profile: bool = False, peers: bool = True, input_shapes: dict | None = None,
          options: CompileOptions | None = None) -> BenchResult:
    """Time ``model`` (an ONNX path or ``ModelProto``, a ``.pt2`` path, or ``(module, args)``)."""
    opts = options or CompileOptions()
    result = BenchResult(name, target, opts.pipeline.precision +
                         (f", {opts.quantize.to_json()['scheme']}" if opts.quantize is not None else ""))
    _require_device(target)

    def build(log_dir, graphs=True):
        o = replace(opts, tune_log_dir=log_dir,
                    target=replace(opts.target, kind=target, cuda_graph=opts.target.cuda_graph and graphs))
        return compile([model], target, names=[name], input_shapes=input_shapes, options=o)

    with tempfile.TemporaryDirectory(prefix="smelt-bench-") as tmp:
        # One compile when no record applies: the records' compile then is the untuned one.
        first = build(tune_log_dir)
        tuned = first if first.report.tuned_kernels else None
        untuned = build(None) if tuned is not None else first
        result.kernels, result.tuned_kernels = untuned.report.kernels, first.report.tuned_kernels
        rt = load(untuned.save(Path(tmp) / "untuned"))
        info = rt.models[name]
        feeds = random_inputs(info.inputs)
        ref, ref_name = _reference(model, feeds, info)
        runners = [_smelt_runner("smelt untuned", rt, name, feeds, ref)]
        if tuned is not None:
            runners.append(_smelt_runner("smelt tuned", load(tuned.save(Path(tmp) / "tuned")), name, feeds, ref,
                                         f"{tuned.report.tuned_kernels} of {tuned.report.kernels} kernels tuned"))
        if peers:
            runners += _peers(model, feeds, target, ref, opts.pipeline.precision)
        result.timings = _interleaved(runners, repeat)
        if profile:  # every kernel must be a VM call: rebuild if CUDA graphs would hide them
            backend = backends.get(target)
            graphs = backend.pass_config(untuned.options.target) != \
                backend.pass_config(replace(untuned.options.target, cuda_graph=False))
            prt = load(build(None, graphs=False).save(Path(tmp) / "profile")) if graphs else rt
            result.profile = _profile(prt, name, feeds, repeat)
    log.info("bench %s: reference %s", name, ref_name)
    return result


def _smelt_runner(label: str, rt, name: str, feeds: dict, ref, note: str = "") -> _Runner:
    y = rt.run(name, **feeds)
    return _Runner(label, rt.timer(name, **feeds), _rel(y, ref) if ref is not None else None, note)


def _reference(model, feeds, info):
    """Reference outputs: onnxruntime for ONNX, torch eager for PyTorch (None when neither runs)."""
    kind = _kind(model)
    try:
        if kind == "onnx":
            from .examples.reference import ort_outputs

            return ort_outputs(str(model) if isinstance(model, Path) else model, feeds), "onnxruntime"
        if kind == "torch":
            import torch

            module, args = _torch_module(model)
            with torch.no_grad():
                out = module(*[torch.from_numpy(feeds[t.name]) for t in info.inputs])
            out = out if isinstance(out, (tuple, list)) else (out,)
            return [o.detach().numpy() for o in out], "torch eager"
    except ImportError as e:
        log.warning("no reference to check against: %s", e)
    return None, ""


def _kind(model) -> str:
    if isinstance(model, (str, Path)):
        return "torch" if str(model).endswith(".pt2") else "onnx"
    if isinstance(model, tuple) or type(model).__name__ == "ExportedProgram":
        return "torch"
    return "onnx"


def _torch_module(model):
    import torch

    if isinstance(model, tuple):
        return model[0].eval(), model[1]
    ep = torch.export.load(str(model)) if isinstance(model, (str, Path)) else model
    return ep.module(), ep.example_inputs[0] if ep.example_inputs else ()


_SHORT = {"float32": "", "float16": " fp16", "bfloat16": " bf16"}


def _peers(model, feeds, target, ref, precision: str = "float32") -> list[_Runner]:
    """onnxruntime (float32: a 16-bit ONNX model would be another model) for an ONNX model;
    torch eager and torch.compile for a torch one, in ``precision``, and on CUDA also
    torch.compile's ``reduce-overhead`` mode (CUDA graphs, as smelt's artifacts run)."""
    out = []
    if _kind(model) == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return out
        data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        providers = ["CPUExecutionProvider"]
        if target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider"]
        sess = ort.InferenceSession(data, providers=providers)
        y = sess.run(None, feeds)
        same = providers == ["CPUExecutionProvider"]  # the reference itself
        out.append(_Runner(f"onnxruntime ({providers[0].replace('ExecutionProvider', '')})",
                           _wall(lambda: sess.run(None, feeds)), None if same else _rel(tuple(y), ref),
                           "reference" if same else ""))
        return out
    import torch

    module, _ = _torch_module(model)
    device = "cuda" if target == "cuda" and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, precision)
    module = copy.deepcopy(module).to(device=device, dtype=dtype)  # the caller's module stays
    args = [torch.from_numpy(v).to(device=device, dtype=dtype if v.dtype.kind == "f" else None) for v in feeds.values()]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    modes = [("torch eager", None), ("torch.compile", "default")] + \
        ([("torch.compile reduce-overhead", "reduce-overhead")] if device == "cuda" else [])
    for label, mode in modes:
        label += _SHORT[precision]
        try:
            fn = module if mode is None else torch.compile(module, mode=mode)
            with torch.no_grad():
                y = fn(*args)
            y = y if isinstance(y, (tuple, list)) else (y,)
            same = label == "torch eager" and device == "cpu"  # float32 only: the reference itself
            out.append(_Runner(label, _wall(_no_grad(fn, args), sync),
                               None if same else _rel(tuple(o.float().cpu().numpy() for o in y), ref),
                               "reference" if same else ""))
        except Exception as e:  # torch.compile needs a C compiler and may fail on some modules
            out.append(_Runner(label, None, None, f"failed: {str(e).splitlines()[0][:120]}"))
    return out


def _no_grad(fn, args):
    import torch

    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def _describe(args) -> tuple[str, int]:
    """Arguments as ``1x7x7x160 float32`` (tensors) or their value (scalars), in order, and the
    tensors' bytes."""
    parts, nbytes = [], 0
    for a in args:
        shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
        if shape is None or dtype is None:
            parts.append(str(a))
            continue
        dims = [int(d) for d in shape]
        parts.append(f"{'x'.join(map(str, dims))} {dtype}")
        nbytes += math.prod(dims) * getattr(dtype, "itemsize", 0)
    return ", ".join(parts), nbytes


def _profile(rt, name: str, feeds: dict, repeat: int) -> list[KernelTime]:
    """Each kernel's time per run, slowest first: one instrumented run records every kernel, how
    often a run calls it and its arguments at the first call; each is then replayed on those
    arguments, ``repeat`` calls back to back (median, device synchronized after each), times
    its calls per run.

    Why replayed: timed inside a run, each kernel came after the instrument's Python and a
    device sync, and a CPU kernel then paid for waking the idle thread pool: the three kernels
    of a 0.02 ms MLP measured about 2 ms each. The replay times a kernel as the run meets it
    warm; its data are what later kernels left, which matters only to data-dependent ones.
    """
    args = rt.device_args(name, feeds)
    seen: dict[str, list] = {}  # symbol -> [function, arguments, calls per run]

    def instrument(func, symbol, before, _ret, *call_args):
        if before and not symbol.startswith("vm.builtin."):
            seen.setdefault(symbol, [func, call_args, 0])[2] += 1
        return 0

    rt.vm[name](*args)  # warm-up, uninstrumented
    rt.vm.set_instrument(instrument)
    try:
        rt.vm[name](*args)
    finally:
        rt.vm.set_instrument(lambda *_: 0)
    per_run = {}
    for symbol, (func, call_args, calls) in seen.items():
        func(*call_args)
        rt.device.sync()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            func(*call_args)
            rt.device.sync()
            samples.append(time.perf_counter() - start)
        per_run[symbol] = statistics.median(samples) * calls
    total = sum(per_run.values()) or 1.0
    return sorted((KernelTime(k, 1e3 * v, v / total, seen[k][2], *_describe(seen[k][1])) for k, v in per_run.items()),
                  key=lambda r: -r.ms)
