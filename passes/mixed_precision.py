"""ToMixedPrecision: run a model in float16 or bfloat16, keeping numerically sensitive ops in float32.

Requires: Relax functions whose body is one dataflow block (what smelt's frontends and
merge passes produce); functions of any other shape are left in float32 and named in
``report``.
Guarantees: float32 weights feed the compute as ``dtype`` (constants are converted, so
the weight store holds them at half the size); inputs stay float32 at the function
boundary and are cast once; outputs are cast back to float32, so a model's signature
does not change. Convolutions and matmuls take ``dtype`` operands and accumulate in
float32 (``out_dtype``), then round to ``dtype``; integer and FP8 ones (INT8 and FP8
quantization's, which run first) stay as they are, the op that rescales their result (INT8's
int32 cast to float32, FP8's float32 accumulator) computes in float32 (the accumulator outgrows
float16), and what follows continues in ``dtype``. ``KEEP_FLOAT32`` ops (softmax,
normalizations, reductions, exp/log/sqrt/pow/erf) read float32 operands and produce
float32; everything else runs in ``dtype``. Explicit casts in the model are kept.
Where: quantize phase (after merging, before legalization and fusion).

TVM 0.27's ``relax.transform.ToMixedPrecision`` handles float16 only and raised on
MobileNetV3 on the H200; this pass is a plain rewrite of the dataflow bindings.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from .canonicalize_ops import attr_fields, with_attr_field

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "bfloat16")

# computed in float32: statistics and transcendental functions whose range or accumulation
# exceeds what 10 (fp16) or 7 (bf16) mantissa bits hold
KEEP_FLOAT32 = frozenset({
    "relax.nn.softmax", "relax.nn.log_softmax", "relax.nn.layer_norm", "relax.nn.rms_norm",
    "relax.nn.group_norm", "relax.nn.instance_norm", "relax.nn.batch_norm", "relax.mean", "relax.sum",
    "relax.variance", "relax.std", "relax.prod", "relax.cumsum", "relax.exp", "relax.log", "relax.sqrt",
    "relax.rsqrt", "relax.power", "relax.erf", "relax.nn.adaptive_avg_pool2d", "relax.nn.avg_pool2d",
    # INT8's quantize step; TVM 0.27's CUDA code for a float16 round calls ``hnearbyint``, which CUDA lacks
    "relax.round",
})
# operands in the low precision, accumulation in float32 via out_dtype
ACCUMULATE = frozenset({"relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.matmul",
                        "relax.nn.conv2d_transpose"})
# ops whose float operands are not data (left as they are)
_LEAVE = frozenset({"relax.astype", "relax.shape_of"})


# the float types this pass converts; 8-bit floats (FP8 quantization's operands) are left like integers
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _is_float(e: relax.Expr, dtype: str | None = None) -> bool:
    ty = e.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) in _FLOATS and (dtype is None or str(ty.dtype) == dtype)


def _quantized(e: relax.Expr) -> bool:
    """``e`` is a tensor of integers or 8-bit floats (quantized operands)."""
    return isinstance(e.ty, relax.TensorType) and str(e.ty.dtype).startswith(("int", "uint", "float8"))


def _wide(v: relax.Expr) -> bool:
    """``v`` is a quantized op's float32 accumulator: ``astype`` of integers to a float type, or a
    convolution or matmul of quantized operands (FP8) accumulating in float32."""
    if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)):
        return False
    if v.op.name == "relax.astype":
        return isinstance(v.args[0].ty, relax.TensorType) and str(v.args[0].ty.dtype).startswith(("int", "uint"))
    return v.op.name in ACCUMULATE and all(_quantized(a) for a in v.args[:2]) and _is_float(v, "float32")


class _Rewriter:
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.bb = relax.BlockBuilder()
        self.env: dict = {}
        self.casts: dict = {}
        self.wide: set = set()  # float32 values cast from integers: their first op computes in float32

    def cast(self, e: relax.Expr, dtype: str) -> relax.Expr:
        if not _is_float(e) or _is_float(e, dtype):
            return e
        if isinstance(e, tvm.ir.GenericConst) and dtype == "float16":  # bfloat16: FoldConstant converts
            return relax.const(e.value.numpy().astype(np.float16))
        key = (e, dtype)
        if key not in self.casts:  # one cast per value and dtype
            self.casts[key] = self.bb.emit(relax.op.astype(e, dtype))
        return self.casts[key]

    def arg(self, e: relax.Expr) -> relax.Expr:
        if isinstance(e, relax.Var):
            return self.env.get(e, e)
        if isinstance(e, relax.Tuple):
            return relax.Tuple([self.arg(f) for f in e.fields])
        return e

    def value(self, v: relax.Expr) -> relax.Expr:
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
            name = v.op.name
            args = [self.arg(a) for a in v.args]
            if name in _LEAVE:
                return relax.Call(v.op, args, v.attrs, v.ty_args)
            # An integer accumulator (INT8's, up to 255 * 127 * K) outgrows float16 (65504) until its
            # rescale: the op that reads it as float runs in float32.
            if name in KEEP_FLOAT32 or any(isinstance(a, relax.Var) and a in self.wide for a in args):
                return relax.Call(v.op, [self.cast(a, "float32") for a in args], v.attrs, v.ty_args)
            args = [self.cast(a, self.dtype) for a in args]
            # integer convolutions and matmuls (INT8 quantization's) keep their int32 accumulator
            if name in ACCUMULATE and "out_dtype" in attr_fields(v.attrs) and all(_is_float(a) for a in args[:2]):
                acc = self.bb.emit(relax.Call(v.op, args, with_attr_field(v.attrs, out_dtype="float32"), v.ty_args))
                return relax.op.astype(acc, self.dtype)
            return relax.Call(v.op, args, v.attrs, v.ty_args)
        if isinstance(v, relax.Tuple):
            return relax.Tuple([self.arg(f) for f in v.fields])
        if isinstance(v, relax.TupleGetItem):
            return relax.TupleGetItem(self.arg(v.tuple_value), v.index)
        if isinstance(v, relax.Var):
            return self.arg(v)
        return v

    def restore(self, e: relax.Expr) -> relax.Expr:
        """``e`` with its low-precision float tensors (also inside tuples) cast back to float32."""
        if isinstance(e.ty, relax.TupleType) and not isinstance(e, relax.Tuple):
            e = relax.Tuple([self.bb.emit(relax.TupleGetItem(e, i)) for i in range(len(e.ty.fields))])
        if isinstance(e, relax.Tuple):
            return relax.Tuple([self.restore(self.bb.emit(f) if not isinstance(f, relax.Var) else f)
                                for f in e.fields])
        return self.cast(e, "float32") if _is_float(e, self.dtype) else e

    def function(self, gv_name: str, func: relax.Function) -> relax.Function | None:
        body = func.body
        if not (isinstance(body, relax.SeqExpr) and len(body.blocks) == 1
                and isinstance(body.blocks[0], relax.DataflowBlock)):
            return None
        attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else None
        with self.bb.function(gv_name, list(func.params), attrs=attrs, pure=True):
            with self.bb.dataflow():
                for b in body.blocks[0].bindings:
                    if not isinstance(b, relax.VarBinding):
                        return None
                    new = self.bb.emit(self.value(b.value))
                    if _wide(b.value):
                        self.wide.add(new)
                    # a block output leaves in float32
                    self.env[b.var] = new if isinstance(b.var, relax.DataflowVar) else \
                        self.bb.emit_output(self.restore(new))
            self.bb.emit_func_output(self.arg(body.body))
        return self.bb.get()[gv_name]


@tvm.transform.module_pass(opt_level=0, name="ToMixedPrecision")
class ToMixedPrecision:
    """See the module docstring. ``report``: per function, ``converted`` or why it stayed float32."""

    def __init__(self, dtype: str = "float16"):
        if dtype not in PRECISIONS[1:]:
            raise ValueError(f"precision {dtype!r}: expected one of {', '.join(PRECISIONS)}")
        self.dtype = dtype
        self.report: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            new = _Rewriter(self.dtype).function(gv.name_hint, func)
            if new is None:
                self.report[gv.name_hint] = "kept float32: body is not one dataflow block"
                log.warning("%s: kept in float32 (its body is not one dataflow block)", gv.name_hint)
                continue
            out[gv] = new
            self.report[gv.name_hint] = f"converted to {self.dtype}"
        return out
