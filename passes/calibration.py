"""Calibration for INT8: reading the user's data, observing activations, and picking their ranges.

Requires: a Relax module whose functions are one dataflow block (what smelt's
frontends produce), float32 weights bound as constants, and calibration data for the
functions to quantize: a ``.npz`` file (one array per input name, samples along the
first axis), a folder of ``<input name>.npy`` files, or a Python iterable of
``{input name: array}`` batches.
Guarantees: ``sites(func)`` lists the convolutions and matmuls with a constant weight,
in binding order (the key both calibration and quantization use). ``calibrate`` runs a
float32 copy of the module on the CPU that also returns every site's activation input,
batch by batch, and folds each into a fixed-size ``Histogram``: memory does not grow with
the amount of data (ONNX Runtime's percentile calibration kept every activation and
needed more than 256 GB on BERT). Data that does not fit the model raises ``SmeltError``
naming the input, the expected and the actual shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..errors import SmeltError
from ..ir import TensorSpec, tensor_specs
from .mutate import rebind

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
QUANTIZABLE = frozenset({"relax.nn.conv2d", "relax.matmul"})


def describe(calib) -> str:
    """Calibration data as the manifest records it: its path, or the kind of iterable it was."""
    return str(calib) if isinstance(calib, (str, Path)) else f"<{type(calib).__name__}>"


def check_method(method: str, percentile: float) -> None:
    """Raise ``SmeltError`` for a calibration method or percentile smelt does not know."""
    if method not in METHODS:
        raise SmeltError(f"calibration method {method!r}: expected one of {', '.join(METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise SmeltError(f"percentile {percentile}: expected a value in (50, 100]")


@dataclass(frozen=True)
class Site:
    """One quantizable op: ``key`` (function:ordinal), a readable ``name``, and its binding."""

    key: str
    name: str
    binding: relax.VarBinding


def sites(func_name: str, func: relax.Function) -> list[Site]:
    """Convolutions and matmuls of ``func`` whose weight (second operand) is a float32 constant."""
    out = []
    body = func.body
    if not (isinstance(body, relax.SeqExpr) and len(body.blocks) == 1):
        return out
    for b in body.blocks[0].bindings:
        v = b.value
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in QUANTIZABLE):
            continue
        w = v.args[1]
        if not isinstance(w, tvm.ir.GenericConst) or str(w.ty.dtype) != "float32" or str(v.args[0].ty.dtype) != "float32":
            continue
        op = v.op.name.rsplit(".", 1)[-1]
        out.append(Site(f"{func_name}:{len(out)}", f"{func_name}/{op} {b.var.name}", b))
    return out


class Histogram:
    """Streaming histogram of one tensor over [-R, R); R doubles (bins merge pairwise) when
    larger values arrive, so its size is fixed. Keeps the exact min and max too."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.r = 0.0
        self.min, self.max = np.inf, -np.inf
        self.zeros = 0  # exact zeros (ReLU outputs): a spike that would pull the entropy threshold down

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.zeros += int(np.count_nonzero(x == 0))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        m = max(abs(lo), abs(hi), 1e-12)
        if self.r == 0.0:
            self.r = m * (1 + 1e-6)
        while m >= self.r:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            self.counts[self.bins // 4: 3 * self.bins // 4] = merged
            self.r *= 2
        idx = ((x.astype(np.float64) + self.r) * (self.bins / (2 * self.r))).astype(np.int64)
        self.counts += np.bincount(np.clip(idx, 0, self.bins - 1), minlength=self.bins)

    @property
    def width(self) -> float:
        return 2 * self.r / self.bins

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        """The (low, high) range to quantize into, by ``method`` (see ``METHODS``)."""
        if method == "minmax" or self.counts.sum() == 0:
            return self.min, self.max
        if method == "percentile":
            cum = np.cumsum(self.counts)  # integers: the bin where the count reaches q x total, no rounding
            total = int(cum[-1])
            edges = -self.r + self.width * np.arange(1, self.bins + 1)  # right edge of each bin
            lo = edges[min(np.searchsorted(cum, math.ceil(total * (1 - percentile / 100))), self.bins - 1)] - self.width
            hi = edges[min(np.searchsorted(cum, math.ceil(total * percentile / 100)), self.bins - 1)]
            return max(self.min, lo), min(self.max, hi)
        if method == "entropy":
            half = self.bins // 2
            mags = self.counts[half:] + self.counts[:half][::-1]  # histogram of |x| over [0, R)
            mags[0] -= min(self.zeros, mags[0])
            t = _kl_threshold(mags, levels=256 if self.min >= 0 else 128) * self.width
            return max(self.min, -t), min(self.max, t)
        raise SmeltError(f"calibration method {method!r}: expected one of {', '.join(METHODS)}")


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: the number of |x| bins whose clipping to ``levels``
    quantization levels loses least information (KL divergence from the clipped histogram)."""
    hist = hist.astype(np.float64)
    n = len(hist)
    nonzero = np.nonzero(hist)[0]
    if len(nonzero) == 0 or nonzero[-1] < levels:
        return max(int(nonzero[-1]) + 1 if len(nonzero) else n, 1)
    best, best_kl = n, np.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        chunks = np.array_split(hist[:i], levels)
        q = np.concatenate([np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks])
        p /= p.sum()
        q_sum = q.sum()
        if q_sum == 0:
            continue
        q /= q_sum
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def rel_error(ref: np.ndarray, approx: np.ndarray) -> float:
    """||ref - approx|| / ||ref|| (0 for an all-zero reference)."""
    ref = np.asarray(ref, np.float32)
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - np.asarray(approx, np.float32))) / den if den > 0 else 0.0


def affine(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric int8 over [lo, hi] widened to hold 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def input_specs(func: relax.Function) -> list[TensorSpec]:
    """The model inputs of ``func`` (its first ``num_input`` parameters) as specs."""
    n = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
    return [tensor_specs(p.ty, [p.name])[0] for p in func.params[:n]]


def read_data(calib, func_name: str, specs: list[TensorSpec]) -> Iterable[dict[str, np.ndarray]]:
    """Batches ``{input name: array}`` for ``func_name`` from ``calib`` (see the module docstring)."""
    names = [t.name for t in specs]
    if isinstance(calib, (str, Path)):
        path = Path(calib)
        if path.is_dir():
            files = {f.stem: f for f in path.glob("*.npy")}
            arrays = {n: np.load(files[n]) for n in names if n in files}
        elif path.is_file():
            try:
                with np.load(path) as z:
                    arrays = {k: z[k] for k in z.files}
            except (ValueError, OSError) as e:
                raise SmeltError(f"{path}: not a .npz file of calibration arrays ({e})") from None
        else:
            raise SmeltError(f"{path}: no such calibration file or folder")
        arrays = {n: arrays.get(f"{func_name}.{n}", arrays.get(n)) for n in names}
        missing = [n for n, a in arrays.items() if a is None]
        if missing:
            raise SmeltError(f"{path}: no calibration data for input {', '.join(missing)} of model {func_name} "
                             f"(expected arrays named {', '.join(names)})")
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise SmeltError(f"{path}: the inputs of {func_name} have different sample counts: "
                             + ", ".join(f"{n} {len(a)}" for n, a in arrays.items()))
        batch = _batch_size(specs)
        total = counts.pop()
        return [{n: a[i:i + batch] for n, a in arrays.items()} for i in range(0, total - batch + 1, batch)]
    if isinstance(calib, Iterable):
        return ({names[0]: b} if isinstance(b, np.ndarray) and len(names) == 1 else b for b in calib)
    raise SmeltError(f"calibration data {type(calib).__name__}: expected a .npz path, a folder of .npy files "
                     "or an iterable of {input: array} batches")


def _batch_size(specs: list[TensorSpec]) -> int:
    """The first dimension the model fixes (its static batch), else 16."""
    dims = {t.shape[0] for t in specs if len(t.shape) and isinstance(t.shape[0], int)}
    return dims.pop() if len(dims) == 1 else 16


def check_batch(func_name: str, specs: list[TensorSpec], batch: dict, what: str = "calibration") -> list[np.ndarray]:
    """The arrays of ``batch`` in input order, converted to each input's dtype; ``SmeltError``
    naming the input, the expected and the actual shape when one is missing or does not fit."""
    if not isinstance(batch, dict):
        raise SmeltError(f"{what} batch for {func_name}: expected a dict of input arrays, got {type(batch).__name__}")
    out = []
    for t in specs:
        a = batch.get(f"{func_name}.{t.name}", batch.get(t.name))
        if a is None:
            raise SmeltError(f"{what} batch for {func_name} has no input {t.name!r} "
                             f"(it has {', '.join(map(str, batch)) or 'nothing'})")
        a = np.asarray(a)
        if a.ndim != len(t.shape) or any(isinstance(e, int) and e != d for e, d in zip(t.shape, a.shape)):
            want = "(" + ", ".join(str(e) if isinstance(e, int) else "?" for e in t.shape) + ")"
            raise SmeltError(f"{what} input {func_name}.{t.name}: expected shape {want}, got {tuple(a.shape)}")
        out.append(np.ascontiguousarray(a, dtype=t.dtype))
    return out


def observed(mod: tvm.IRModule, funcs: dict[str, list[Site]], tensors: dict | None = None) -> tvm.IRModule:
    """``mod`` whose functions in ``funcs`` return (their outputs, each site's activation input...,
    each variable of ``tensors[function]``'s (key, variable) pairs...)."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for name, ss in funcs.items():
        gv = mod.get_global_var(name)
        extra = [v for _, v in (tensors or {}).get(name, [])]
        out[gv] = rebind(name, mod[gv], taps=[s.binding.value.args[0] for s in ss] + extra)
    return out


@dataclass
class Calibration:
    """What ``calibrate`` saw, per site key: the activation's histogram, its first batch, and
    for matmuls the smoothing scale per input channel with the histogram of the smoothed
    activation (``smooth`` and ``smoothed`` are empty without ``alpha``)."""

    hists: dict[str, Histogram]
    first: dict[str, np.ndarray]
    batches: int
    smooth: dict[str, np.ndarray]
    smoothed: dict[str, Histogram]


def choose(funcs: dict[str, list[Site]], cal: Calibration, plan, max_error: float, rep: dict) -> dict[str, dict]:
    """Each site's plan (``plan(site, cal)`` -> (a dict with its estimated ``error``, or None and
    why)), filed in ``rep``'s ``quantized``, ``fallback`` (over ``max_error``) or ``skipped``;
    returns {site key: plan} of the sites to quantize."""
    plans = {}
    for ss in funcs.values():
        for s in ss:
            p, why = plan(s, cal)
            if p is None:
                rep["skipped"][s.name] = why
            elif p["error"] > max_error:
                rep["fallback"][s.name] = round(p["error"], 5)
            else:
                rep["quantized"][s.name] = round(p["error"], 5)
                plans[s.key] = p
    return plans


def rewrite_sites(mod: tvm.IRModule, funcs: dict[str, list[Site]], plans: dict[str, dict], emit,
                  rest=None) -> tvm.IRModule:
    """``mod`` with each planned site's call replaced by ``emit(builder, call, plan)`` and, with
    ``rest``, every other binding's value by ``rest(builder, binding, value)``."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for m, ss in funcs.items():
        chosen = {s.binding.var: plans[s.key] for s in ss if s.key in plans}
        if chosen:
            out[mod.get_global_var(m)] = rebind(
                m, mod[m], lambda bb, b, value, chosen=chosen: emit(bb, value, chosen[b.var]) if b.var in chosen
                else rest(bb, b, value) if rest is not None else value)
    return out


def smooth_scales(x_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel scales ``s`` for ``x @ w``: ``x / s`` and ``s * w`` give
    the same product, with activation outliers moved into the weight by ``alpha`` in [0, 1]."""
    w_absmax = np.abs(w).max(axis=1)
    s = np.power(np.maximum(x_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _cpu_executable(mod: tvm.IRModule) -> relax.VMExecutable:
    """``mod`` built for this CPU by smelt's CPU pipeline from its fuse phase on, weights kept as constants.

    Not ``tvm.compile``: TVM's own pipeline schedules nothing on CPUs, and calibrating ResNet-50
    took 4.9 s per image that way (a batch of 32 ran for minutes); smelt's default CPU schedules
    run it at onnxruntime's speed. The pass context is a clean one: the compile that calls us may
    run under the GPU backend's options (CUDA graph capture), which a CPU build cannot link.
    """
    from .. import backends  # backends import passes: imported when first needed
    from .manager import PassManager, Step
    from .pipeline import build_pipeline

    backend = backends.get("cpu")
    target = backend.target(backends.TargetOptions("cpu"))
    steps = [s for s in build_pipeline(backend, target) if s.phase in ("fuse", "schedule")]
    steps += [Step("lower", p) for p in backend.lower_passes(target)]
    mod = PassManager(steps).run(mod, target)
    with tvm.transform.PassContext(opt_level=3), target:
        return relax.build(mod, target, relax_pipeline=None)


def calibrate(mod: tvm.IRModule, funcs: dict[str, list[Site]], calib, bins: int = 2048,
              alpha: float = 0.0, tensors: dict[str, list[tuple[str, relax.Var]]] | None = None) -> Calibration:
    """Run ``calib`` through the float32 ``mod`` on this CPU and fold every site's activation
    input, and each variable of ``tensors`` (function -> [(key, variable)]), into a histogram
    under its key. With ``alpha`` > 0, a second pass over the data histograms each matmul's
    activation divided by its smoothing scales (known only after the first pass).
    An iterable serves every model: its batches are kept (inputs only) when read more than
    once, and keys may be ``model.input``."""
    if (len(funcs) > 1 or alpha > 0) and not isinstance(calib, (str, Path)) and isinstance(calib, Iterable):
        calib = list(calib)
    tensors = tensors or {}
    vm = relax.VirtualMachine(_cpu_executable(observed(mod, funcs, tensors)), tvm.cpu())
    keys = {name: [s.key for s in ss] + [k for k, _ in tensors.get(name, [])] for name, ss in funcs.items()}
    cal = Calibration({k: Histogram(bins) for ks in keys.values() for k in ks}, {}, 0, {}, {})
    absmax: dict[str, np.ndarray] = {}
    for name, ss in funcs.items():
        specs = input_specs(mod[name])

        def taps():
            seen = 0
            for batch in read_data(calib, name, specs):
                arrays = check_batch(name, specs, batch)
                outs = vm[name](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays])
                yield [t.numpy() for t in list(outs)[1:]]
                seen += 1
            if seen == 0:
                raise SmeltError(f"calibration data for {name} holds no complete batch "
                                 f"(batch size {_batch_size(specs)})")

        matmuls = [s for s in ss if s.binding.value.op.name == "relax.matmul"] if alpha > 0 else []
        smoothing = {s.key for s in matmuls}
        batches = cal.batches
        for acts in taps():
            for key, act in zip(keys[name], acts):
                cal.hists[key].add(act)
                cal.first.setdefault(key, act)
                if key in smoothing:
                    m = np.abs(act).reshape(-1, act.shape[-1]).max(axis=0)
                    absmax[key] = np.maximum(absmax[key], m) if key in absmax else m
            cal.batches += 1
        if matmuls:
            for s in matmuls:
                cal.smooth[s.key] = smooth_scales(absmax[s.key], s.binding.value.args[1].value.numpy(), alpha)
                cal.smoothed[s.key] = Histogram(bins)
            for acts in taps():
                for s, act in zip(ss, acts):
                    if s.key in cal.smooth:
                        cal.smoothed[s.key].add(act / cal.smooth[s.key])
        log.info("calibrated %s on %d batches", name, cal.batches - batches)
    return cal
