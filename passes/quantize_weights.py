"""QuantizeWeights: weight-only int8 or int4 for matmuls, dequantized inside the kernel.

Requires: the quantize phase, after ``ToMixedPrecision`` when a precision is asked for
(this pass then sees float16/bfloat16 weights and activations); weights bound as
constants; functions whose body is one dataflow block.
Guarantees: every ``matmul`` whose second operand is a float constant ``W[K, N]`` (or a
batch ``W[..., K, N]`` that the activation batches alike: horizontally fused layers)
becomes one TIR kernel ``decode_matmul`` reading the quantized weight and its scales:
symmetric, one scale per group of ``group_size`` consecutive rows of K and per column
(``w = q x scale``); int8 stored as int8, int4 stored two per byte along K (offset 8,
so a byte holds q+8 of rows 2i and 2i+1). The kernel has two blocks, the decode and the
reduction, so a schedule may inline the decode into the reduction (a GEMV reads each
weight byte once) or keep it; the activation is never quantized and no calibration is
needed. The kernel takes the activation, so ``FoldConstant`` cannot fold the weight
back to float, and ``FuseOps`` fuses the epilogue (bias, activation) into it. Matmuls
it does not handle are listed in ``report["skipped"]`` with the reason; a K that
``group_size`` does not divide gets one group per column (per-channel), logged.

TVM 0.27 has per-axis ``quantize``/``dequantize`` but no group-wise scales and no
rewrite that keeps the weight in its packed form up to the kernel; MLC-LLM's
group quantization needs its own model definitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx

from ..errors import SmeltError
from .calibration import rel_error
from .mutate import rebind_in, static_ints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightOnly:
    """``quantize=`` of ``smelt.compile``: weight-only int8 (``bits=8``) or int4 (``bits=4``) for
    matmuls, with one scale per ``group_size`` rows of the weight and per output column."""

    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise SmeltError(f"weight-only bits {self.bits}: expected 4 or 8")
        if self.group_size < 1:
            raise SmeltError(f"group size {self.group_size}: expected a positive number of rows")

    @property
    def scheme(self) -> str:
        return f"w{self.bits}"

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size}


def quantize_groups(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w[..., K, N]`` in groups of ``group`` rows of K: (q int8 in
    [-2^(bits-1), 2^(bits-1)-1], scales float32 ``[..., K / group, N]``)."""
    *lead, k, n = w.shape
    top = 2 ** (bits - 1) - 1
    g = w.astype(np.float32).reshape(*lead, k // group, group, n)
    scale = np.abs(g).max(axis=-2) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(g / scale[..., None, :]), -top - 1, top).astype(np.int8)
    return q.reshape(w.shape), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values ``q[..., K, N]`` (in [-8, 7]) as bytes ``[..., ceil(K/2), N]``: row 2i in
    the low nibble, row 2i+1 in the high one, each stored as q + 8."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.shape[-2] % 2:
        u = np.concatenate([u, np.full(u.shape[:-2] + (1, u.shape[-1]), 8, np.uint8)], axis=-2)
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 4)).astype(np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weight that ``q`` (int8 values, unpacked) and ``scale`` stand for."""
    group = q.shape[-2] // scale.shape[-2]
    return q.astype(np.float32) * np.repeat(scale, group, axis=-2)


def _decode_matmul(x: te.Tensor, q: te.Tensor, s: te.Tensor, bits: int, k: int, group: int, out_dtype: str):
    """TE: ``x @ decode(q, s)`` for ``q`` of shape ``[..., K', N]`` (its leading dims match
    the last batch dims of ``x``); the decode is its own stage (see the module docstring)."""
    wdt = x.dtype
    first = len(x.shape) - len(q.shape)  # x's dims before the weight's batch dims
    if bits == 8:
        def decode(*i):
            *b, r, c = i
            return q[i].astype(wdt) * s[(*b, r // group, c)].astype(wdt)
    else:
        def decode(*i):
            *b, r, c = i
            byte = q[(*b, r // 2, c)]
            v = tirx.bitwise_and(tirx.shift_right(byte, ((r % 2) * 4).astype("uint8")), tirx.const(15, "uint8"))
            return (v.astype("int8") - tirx.const(8, "int8")).astype(wdt) * s[(*b, r // group, c)].astype(wdt)
    w = te.compute((*q.shape[:-2], k, q.shape[-1]), decode, name="decode")
    red = te.reduce_axis((0, k), name="k")
    return te.compute(
        (*x.shape[:-1], q.shape[-1]),
        lambda *i: te.sum(x[(*i[:-1], red)].astype(out_dtype) * w[(*i[first:-2], red, i[-1])].astype(out_dtype),
                          axis=red),
        name="matmul")


def _weight(e: relax.Expr) -> np.ndarray | None:
    """The value of a constant float weight, seen through a cast (mixed precision)."""
    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.astype":
        e = e.args[0]
    if isinstance(e, tvm.ir.GenericConst) and str(e.ty.dtype).startswith(("float", "bfloat")):
        return e.value.numpy()
    return None


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """See the module docstring. ``report``: scheme, group size, ``quantized`` (layer ->
    relative weight error), ``skipped`` (layer -> reason)."""

    def __init__(self, config: WeightOnly, models):
        self.config = config
        self.models = list(models)
        self.report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rep = {"scheme": self.config.scheme, "group_size": self.config.group_size, "quantized": {}, "skipped": {}}
        self.report = rep
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        names = {gv.name_hint for gv in mod.get_global_vars()}
        for m in self.models:
            if m not in names or not isinstance(mod[m], relax.Function):
                continue
            func = mod[m]
            if not (isinstance(func.body, relax.SeqExpr) and len(func.body.blocks) == 1):
                rep["skipped"][m] = "function body is not one dataflow block"
                continue
            plans = {}
            for b in func.body.blocks[0].bindings:
                v = b.value
                if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.matmul"):
                    continue
                w = _weight(v.args[1])
                if w is None:
                    continue
                plan, why = self._plan(w, v)
                name = f"{m}/matmul {b.var.name}"
                if plan is None:
                    rep["skipped"][name] = why
                else:
                    plans[b.var] = plan
                    rep["quantized"][name] = round(plan["error"], 5)
            if plans:
                out = rebind_in(out, m, lambda bb, b, value, plans=plans:
                                self._emit(bb, b, value, plans[b.var]) if b.var in plans else value)
        if not rep["quantized"]:
            log.warning("weight-only %s: no matmul with a constant weight to quantize", self.config.scheme)
        return out

    def _plan(self, w: np.ndarray, call: relax.Call) -> tuple[dict | None, str]:
        x = call.args[0]
        if not isinstance(x.ty, relax.TensorType) or x.ty.ndim < 1 or not str(x.ty.dtype).startswith(("float", "bfloat")):
            return None, "activation is not a float tensor of known rank"
        if w.ndim < 2:
            return None, f"weight of rank {w.ndim}"
        if w.ndim > 2:  # a batch of weights (horizontally fused layers): x's last batch dims must match
            n = x.ty.ndim
            batch = static_ints([x.ty.shape[i] for i in range(n - w.ndim, n - 2)]) \
                if x.ty.shape is not None and n >= w.ndim else None
            if batch != list(w.shape[:-2]):
                return None, f"batched weight {list(w.shape)} with activation of shape {x.ty.shape}"
        k, n = w.shape[-2:]
        group = self.config.group_size
        if k % group:
            log.info("weight-only: K=%d is not a multiple of group size %d; one scale per column", k, group)
            group = k
        q, scale = quantize_groups(w, self.config.bits, group)
        error = rel_error(w, dequantize(q, scale))
        stored = q if self.config.bits == 8 else pack_int4(q)
        return {"q": stored, "scale": scale.astype(w.dtype), "k": k, "group": group, "error": error}, ""

    def _emit(self, bb: relax.BlockBuilder, binding: relax.VarBinding, call: relax.Call, plan: dict) -> relax.Expr:
        out_dtype = str(binding.var.ty.dtype)
        return bb.call_te(_decode_matmul, call.args[0], relax.const(plan["q"]), relax.const(plan["scale"]),
                          self.config.bits, plan["k"], plan["group"], out_dtype, primfunc_name_hint="decode_matmul")
