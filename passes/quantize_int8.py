"""QuantizeInt8: calibrated INT8 post-training quantization of convolutions and matmuls.

Requires: the quantize phase (after merging, before legalization), float32 weights
bound as constants, calibration data for the models to quantize (``calibration``).
Guarantees: every site (a conv2d in NCHW/OIHW or a matmul with a 2-D constant weight)
whose estimated error stays under ``max_error`` computes uint8 x int8 -> int32:
activations asymmetric int8 per tensor (scale and zero point from the calibrated
range), carried as uint8 (value + 128, as x86's VNNI dot products take them), weights
symmetric int8 per output channel (within ±``weight_limit``: 127, or 63 where the backend's
int8 instruction needs 7-bit weights, x86's AVX2 ``vpmaddubsw``, as onnxruntime's
``reduce_range`` does for it). The zero-point term (zero point x the weight's channel
sum) is folded into a per-channel constant, subtracted from the int32 result before it becomes
float32 (exactly: the terms outgrow float32). Convolutions pad with the zero point (an explicit
pad) so that borders are exact, and their input channels to a multiple of 4 (meeting zero
weights) for 4-wide dot products. The
int32 result is rescaled to float32 in place, so the op's epilogue (bias, activation)
and the next site's quantize are elementwise and ``FuseOps`` fuses them into the
kernel: between quantized layers the tensors that travel are 8-bit (requantization),
not float32. Sites over ``max_error`` stay float32 and are listed in ``report`` with
their error; so are sites the pass does not handle, with the reason.

The error estimate, per site, on the first calibration batch: for a matmul, the
relative error of its output (float32 against both operands quantized); for a
convolution, sqrt(ex² + ew²) of the relative quantization errors of its activation and
weight (a first-order estimate; the exact output would need a convolution here).

TVM 0.27 has Q/DQ ops but no calibration and no rewrite to integer kernels; this pass
emits plain Relax (``astype``/``round``/``clip``, uint8 x int8 ``conv2d``/``matmul`` with
``out_dtype="int32"``), which every backend legalizes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..errors import SmeltError
from .calibration import Calibration, Site, affine, calibrate, check_method, choose, describe, rel_error, rewrite_sites, sites

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8:
    """``quantize=`` of ``smelt.compile``: calibrated INT8.

    ``calib``: a ``.npz`` path, a folder of ``<input>.npy`` files or an iterable of
    ``{input: array}`` batches; ``method``: minmax, percentile or entropy;
    ``max_error``: sites whose estimated relative error exceeds it stay float32;
    ``smooth``: SmoothQuant's migration strength alpha for matmuls (0 turns it off).
    """

    calib: object
    method: str = "minmax"
    percentile: float = 99.99
    max_error: float = 0.05
    bins: int = 2048
    smooth: float = 0.5

    def __post_init__(self):
        check_method(self.method, self.percentile)
        if not 0.0 <= self.smooth <= 1.0:
            raise SmeltError(f"smoothing alpha {self.smooth}: expected a value in [0, 1]")

    def to_json(self) -> dict:
        return {"scheme": "int8", "calib": describe(self.calib), "method": self.method, "percentile": self.percentile,
                "max_error": self.max_error, "smooth": self.smooth}


def _quantize_weight(w: np.ndarray, axis: int, limit: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``, within ±``limit``: (int8 weight, float32 scale per channel)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    scale = np.abs(w).max(axis=reduce) / float(limit)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -limit, limit).astype(np.int8)
    return q, scale


def _fake(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8")
class QuantizeInt8:
    """See the module docstring. ``report``: method, weight bits, batches, quantized sites with
    their estimated error, ``fallback`` (site -> error) and ``skipped`` (site -> reason)."""

    def __init__(self, config: Int8, models: Sequence[str], weight_limit: int = 127):
        self.config = config
        self.models = list(models)
        self.weight_limit = weight_limit
        self.report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = {gv.name_hint for gv in mod.get_global_vars()}
        funcs = {m: sites(m, mod[m]) for m in self.models if m in names and isinstance(mod[m], relax.Function)}
        funcs = {m: ss for m, ss in funcs.items() if ss}
        rep = {"scheme": "int8", "method": self.config.method, "weight_bits": int(self.weight_limit).bit_length() + 1,
               "batches": 0, "quantized": {}, "fallback": {}, "skipped": {}, "smoothed": []}
        self.report = rep
        if not funcs:
            log.warning("INT8: no convolution or matmul with a constant weight to quantize")
            return mod
        cal = calibrate(mod, funcs, self.config.calib, self.config.bins, self.config.smooth)
        rep["batches"] = cal.batches
        plans = choose(funcs, cal, self._plan, self.config.max_error, rep)
        rep["smoothed"] = [s.name for ss in funcs.values() for s in ss
                           if s.key in plans and plans[s.key]["smooth"] is not None]
        if rep["fallback"]:
            log.info("INT8: %d layers stay float32 (estimated error over %g): %s", len(rep["fallback"]),
                     self.config.max_error, ", ".join(f"{k} {v:.3g}" for k, v in rep["fallback"].items()))
        return rewrite_sites(mod, funcs, plans, _int8)

    def _plan(self, s: Site, cal: Calibration) -> tuple[dict | None, str]:
        call = s.binding.value
        w = call.args[1].value.numpy()
        if call.op.name == "relax.nn.conv2d":
            a = call.attrs
            if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
                return None, f"layout {a.data_layout}/{a.kernel_layout} (NCHW/OIHW only)"
        elif w.ndim != 2:
            return None, f"weight of rank {w.ndim} (2-D weights only)"
        if not math.isfinite(cal.hists[s.key].min):
            return None, "no finite activation seen in calibration"
        x = cal.first[s.key]
        if call.op.name == "relax.nn.conv2d":
            sx, zx = affine(*cal.hists[s.key].range(self.config.method, self.config.percentile))
            wq, sw = _quantize_weight(w, 0, self.weight_limit)
            wd = wq.astype(np.float32) * sw.reshape(-1, 1, 1, 1)
            error = math.hypot(rel_error(x, _fake(x, sx, zx)), rel_error(w, wd))
            return {"sx": sx, "zx": zx, "wq": wq, "sw": sw, "error": error, "smooth": None}, ""
        # matmul: the exact output error on the first batch, plain and smoothed; the smaller wins
        exact = x @ w
        best = None
        for smooth, hist in [(None, cal.hists[s.key]), (cal.smooth.get(s.key), cal.smoothed.get(s.key))]:
            if hist is None:
                continue
            xs, ws = (x, w) if smooth is None else (x / smooth, w * smooth[:, None])
            sx, zx = affine(*hist.range(self.config.method, self.config.percentile))
            wq, sw = _quantize_weight(ws, 1, self.weight_limit)
            error = rel_error(exact, _fake(xs, sx, zx) @ (wq.astype(np.float32) * sw))
            if best is None or error < best["error"]:
                best = {"sx": sx, "zx": zx, "wq": wq, "sw": sw, "error": error, "smooth": smooth}
        return best, ""


def _int8(bb: relax.BlockBuilder, call: relax.Call, plan: dict) -> relax.Expr:
    """The float32 result of ``call`` computed in int8 x int8 -> int32 (see the module docstring)."""
    x, sx, zx, wq, sw = call.args[0], plan["sx"], plan["zx"], plan["wq"], plan["sw"]
    # smoothing divides each input channel by its scale too: one per-channel divisor
    div = np.float32(sx) if plan["smooth"] is None else (plan["smooth"] * np.float32(sx)).astype(np.float32)
    # The int8 value q travels as q + 128 in uint8, with zero point zx + 128: the same numbers,
    # in the form x86's dot-product instructions (VNNI) multiply, unsigned by signed.
    zq = zx + 128
    xq = relax.op.add(relax.op.round(relax.op.divide(x, relax.const(div))), relax.const(np.float32(zq)))
    xq = bb.emit(relax.op.astype(relax.op.clip(xq, 0.0, 255.0), "uint8"))
    if call.op.name == "relax.nn.conv2d":
        a = call.attrs
        top, left, bottom, right = (int(p) for p in a.padding)
        # Input channels up to a multiple of 4 (an image's 3), for dot products that take 4 at
        # a time: the extra channels hold the zero point and meet zero weights, adding nothing.
        extra = -wq.shape[1] % 4 if int(a.groups) == 1 else 0
        if extra:
            wq = np.pad(wq, [(0, 0), (0, extra), (0, 0), (0, 0)])
        if top or left or bottom or right or extra:
            xq = bb.emit(relax.op.nn.pad(xq, [0, 0, 0, extra, top, bottom, left, right], pad_value=float(zq)))
        acc = bb.emit(relax.op.nn.conv2d(xq, relax.const(wq), strides=[int(s) for s in a.strides], padding=0,
                                         dilation=[int(d) for d in a.dilation], groups=int(a.groups),
                                         out_dtype="int32"))
        shape = (1, -1, 1, 1)
        zero_term = zq * wq.reshape(wq.shape[0], -1).astype(np.int64).sum(axis=1)
    else:
        acc = bb.emit(relax.op.matmul(xq, relax.const(wq), out_dtype="int32"))
        shape = (-1,)
        zero_term = zq * wq.astype(np.int64).sum(axis=0)
    # Subtracted in int32, exactly: the two terms reach 255 * 127 * K (1.5e8 for K = 4608), past
    # float32's 2^24 of exact integers, while their difference is the signal.
    out = relax.op.astype(relax.op.subtract(acc, relax.const(zero_term.astype(np.int32).reshape(shape))), "float32")
    return relax.op.multiply(out, relax.const((sx * sw).astype(np.float32).reshape(shape)))
