"""QuantizeFp8: calibrated FP8 (E4M3) post-training quantization of GEMMs, for Hopper's tensor cores.

Requires: the quantize phase (after merging, before ToMixedPrecision and legalization), float32
weights bound as constants, calibration data for the models to quantize (``calibration``).
Guarantees: every GEMM site (a matmul with a 2-D constant weight, or a 1×1, stride-1, unpadded,
ungrouped NCHW conv2d) whose K is a multiple of 16 and N of 8 (what cuBLASLt's FP8 kernels take)
and whose estimated error stays under ``max_error`` computes float8_e4m3fn × float8_e4m3fn ->
float32: the activation is scaled per tensor into E4M3's ±448 from its calibrated range and
clipped before the cast (TVM 0.27's LLVM cast wraps out-of-range values instead of saturating),
the weight per tensor from its largest magnitude, stored as [N, K] (the operand order of
cuBLASLt's FP8 kernels), and the float32 product is multiplied by one scalar, the two scales,
which DispatchCublasLt folds into the GEMM's alpha. ToMixedPrecision leaves the FP8 operands
alone and computes that multiply in float32. Sites over ``max_error`` stay as they are, in the
compute precision, and are listed in ``report`` with their error; so are sites the pass does not
handle, with the reason. Other convolutions stay in the compute precision (no FP8 convolution
routine yet).

Per-tensor scales for both operands: cuBLASLt's FP8 GEMMs on Hopper take one scalar per operand,
and on all-MiniLM-L6-v2's real weights per-tensor E4M3 kept the embeddings' cosine to float32 at
0.99777 (per channel: 0.99798; bench/results/cpu_fp8_accuracy_minilm.json). E4M3's exponent
covers activation outliers that symmetric INT8 loses (0.95613 per tensor there), so no smoothing,
and no clipping either: smelt's FP8 MiniLM kept 0.99782 mean / 0.99737 worst with ``minmax``
ranges, 0.96454 / 0.95155 with ``percentile`` (99.99) ones, which cut the outliers off.

The error estimate, per site, on the first calibration batch: the relative error of the GEMM's
output, float32 against both operands rounded to E4M3 (with ml_dtypes, which rounds as the GPU does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from ..ir.weights import exact_const
from .calibration import Calibration, Site, calibrate, check_method, choose, describe, rel_error, rewrite_sites, sites

log = logging.getLogger(__name__)

FP8 = "float8_e4m3fn"
E4M3_MAX = 448.0
# The activation's scale is applied as a multiply in the compute precision: its inverse stays a
# float16 number (finite, and the same value in float32), so both precisions quantize alike.
_MAX_INV_SCALE = 32768.0


@dataclass(frozen=True)
class Fp8:
    """``quantize=`` of ``smelt.compile``: calibrated FP8 (E4M3) GEMMs.

    ``calib``: a ``.npz`` path, a folder of ``<input>.npy`` files or an iterable of
    ``{input: array}`` batches; ``method``: minmax, percentile or entropy (the activation's
    range); ``max_error``: GEMMs whose estimated relative error exceeds it stay unquantized.
    """

    calib: object
    method: str = "minmax"
    percentile: float = 99.99
    max_error: float = 0.1
    bins: int = 2048

    def __post_init__(self):
        check_method(self.method, self.percentile)

    def to_json(self) -> dict:
        return {"scheme": "fp8", "calib": describe(self.calib), "method": self.method, "percentile": self.percentile,
                "max_error": self.max_error}


def to_e4m3(x: np.ndarray, inv_scale: float) -> np.ndarray:
    """``x * inv_scale`` clipped to ±448 and rounded to E4M3."""
    return np.clip(np.asarray(x, np.float32) * np.float32(inv_scale), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def _gemm_operands(s: Site, x: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Why the site is no FP8 GEMM ("" if it is), its weight as [K, N] and ``x`` as rows of K."""
    call = s.binding.value
    w = call.args[1].value.numpy()
    if call.op.name == "relax.nn.conv2d":
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
            return f"layout {a.data_layout}/{a.kernel_layout} (NCHW/OIHW only)", w, None
        if w.shape[2:] != (1, 1) or int(a.groups) != 1 or any(int(v) != 1 for v in (*a.strides, *a.dilation)) \
                or any(int(p) for p in a.padding):
            return (f"a {w.shape[2]}x{w.shape[3]} conv (stride {[int(v) for v in a.strides]}, groups "
                    f"{int(a.groups)}): FP8 covers the convs that are GEMMs (1x1, stride 1, unpadded)"), w, None
        w2 = w.reshape(w.shape[0], w.shape[1]).T
        return "", w2, None if x is None else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    if w.ndim != 2:
        return f"weight of rank {w.ndim} (2-D weights only)", w, None
    return "", w, None if x is None else x.reshape(-1, x.shape[-1])


@tvm.transform.module_pass(opt_level=0, name="QuantizeFp8")
class QuantizeFp8:
    """See the module docstring. ``report``: method, batches, quantized sites with their
    estimated error, ``fallback`` (site -> error) and ``skipped`` (site -> reason)."""

    def __init__(self, config: Fp8, models: Sequence[str]):
        self.config = config
        self.models = list(models)
        self.report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rep = {"scheme": "fp8", "method": self.config.method, "batches": 0, "quantized": {}, "fallback": {},
               "skipped": {}}
        self.report = rep
        names = {gv.name_hint for gv in mod.get_global_vars()}
        funcs: dict[str, list[Site]] = {}
        for m in self.models:
            if m not in names or not isinstance(mod[m], relax.Function):
                continue
            for s in sites(m, mod[m]):
                why, w, _ = _gemm_operands(s)
                k, n = w.shape if not why else (0, 0)
                if not why and (k % 16 or n % 8):
                    why = f"K={k}, N={n}: cuBLASLt's FP8 GEMMs need K a multiple of 16 and N of 8"
                if why:
                    rep["skipped"][s.name] = why
                else:
                    funcs.setdefault(m, []).append(s)
        if not funcs:
            log.warning("FP8: no GEMM with a constant weight to quantize")
            return mod
        cal = calibrate(mod, funcs, self.config.calib, self.config.bins)
        rep["batches"] = cal.batches
        plans = choose(funcs, cal, self._plan, self.config.max_error, rep)
        if rep["fallback"]:
            log.info("FP8: %d GEMMs stay unquantized (estimated error over %g): %s", len(rep["fallback"]),
                     self.config.max_error, ", ".join(f"{k} {v:.3g}" for k, v in rep["fallback"].items()))
        return rewrite_sites(mod, funcs, plans, _fp8)

    def _plan(self, s: Site, cal: Calibration) -> tuple[dict | None, str]:
        lo, hi = cal.hists[s.key].range(self.config.method, self.config.percentile)
        amax = max(abs(lo), abs(hi))
        if not math.isfinite(amax) or amax == 0:
            return None, "no finite nonzero activation seen in calibration"
        _, w, x = _gemm_operands(s, cal.first[s.key])
        wmax = float(np.abs(w).max())
        if wmax == 0:
            return None, "an all-zero weight"
        inv_x = float(np.float16(min(E4M3_MAX / amax, _MAX_INV_SCALE)))
        inv_w = E4M3_MAX / wmax
        wq = to_e4m3(w, inv_w)
        approx = to_e4m3(x, inv_x).astype(np.float32) @ wq.astype(np.float32) / np.float32(inv_x * inv_w)
        return {"inv_x": inv_x, "wq": wq, "alpha": 1.0 / (inv_x * inv_w), "error": rel_error(x @ w, approx)}, ""


def _fp8(bb: relax.BlockBuilder, call: relax.Call, plan: dict) -> relax.Expr:
    """The float32 result of ``call`` computed from E4M3 operands (see the module docstring)."""
    x, wq = call.args[0], plan["wq"]  # wq: [K, N]
    xq = relax.op.multiply(x, relax.const(np.float32(plan["inv_x"])))
    xq = bb.emit(relax.op.astype(relax.op.clip(xq, -E4M3_MAX, E4M3_MAX), FP8))
    if call.op.name == "relax.nn.conv2d":
        w = exact_const(np.ascontiguousarray(wq.T).reshape(wq.shape[1], wq.shape[0], 1, 1))
        acc = bb.emit(relax.op.nn.conv2d(xq, w, out_dtype="float32"))
    else:  # the weight as [N, K] in memory, as cuBLASLt's FP8 kernels read it
        w = bb.emit(relax.op.permute_dims(exact_const(np.ascontiguousarray(wq.T)), [1, 0]))
        acc = bb.emit(relax.op.matmul(xq, w, out_dtype="float32"))
    return relax.op.multiply(acc, relax.const(np.float32(plan["alpha"])))
