"""FoldBatchNorm: inference BatchNorm folded into the weights of the conv or matmul before it.

Requires: a Relax module whose weights are bound as constants (``Program.bind``),
BatchNorm in inference mode (``training=False``) with constant statistics.
Guarantees: ``bn(conv(x, W) [+ b])`` becomes ``conv(x, W * s) + b'`` and
``bn(matmul(x, W) [+ b])`` becomes ``matmul(x, W * s) + b'`` with ``s = gamma / sqrt(var + eps)`` and ``b' = beta + (b - mean) * s``
computed once in numpy at compile time; any other inference BatchNorm with constant
statistics becomes one multiply and one add. No ``nn.batch_norm`` remains.
Where: canonicalize phase, after FoldConstantLayout (which turns ``reshape(bias)`` and
``permute_dims(W)`` into constants) and before fusion.

TVM ships ``FoldBatchnormToConv2D`` but it only handles bias-free NCHW/OIHW conv2d
and leaves ``divide/sqrt/multiply`` ops that need ``FoldConstant``, which compiles
and runs a kernel per op (12 s on ResNet-50 here); this pass computes in numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard

from .explain import Explainer

_CONVS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d",
          "relax.nn.conv1d_transpose", "relax.nn.conv2d_transpose")


def _np(c: tvm.ir.Constant) -> np.ndarray:
    return c.value.numpy()


def _bn_scale_shift(bn: relax.Call, stats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (a.astype(np.float64) for a in stats)
    eps = float(bn.attrs.epsilon)
    if not bool(bn.attrs.scale):
        gamma = np.ones_like(gamma)
    if not bool(bn.attrs.center):
        beta = np.zeros_like(beta)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _channel_axis(bn: relax.Call, ndim: int) -> int:
    axis = int(bn.attrs.axis)
    return axis + ndim if axis < 0 else axis


def _bcast(vec: np.ndarray, ndim: int, axis: int, dtype) -> tvm.ir.Constant:
    shape = [1] * ndim
    shape[axis] = vec.size
    return relax.const(vec.reshape(shape).astype(dtype))


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNorm")
class FoldBatchNorm:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("FoldBatchNorm")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        x, w, b = wildcard(), is_const(), is_const()
        stats = [is_const() for _ in range(4)]
        producer_op = is_op("relax.matmul")(x, w)
        for conv in _CONVS:
            producer_op = producer_op | is_op(conv)(x, w)
        with_bias = producer_op | is_op("relax.add")(producer_op, b) | is_op("relax.add")(b, producer_op)
        bn = is_op("relax.nn.batch_norm")(with_bias, *stats)
        folded_pattern = TupleGetItemPattern(bn, 0)
        plain_bn = TupleGetItemPattern(is_op("relax.nn.batch_norm")(wildcard(), *stats), 0)

        def fold(expr, m):
            bn_call = m[bn]
            if bool(bn_call.attrs.training):
                self.explain.skip(bn_call, "BatchNorm in training mode")
                return expr
            prod = m[producer_op]
            out_ndim = len(prod.ty.shape)
            axis = _channel_axis(bn_call, out_ndim)
            scale, shift = _bn_scale_shift(bn_call, [_np(m[s]) for s in stats])
            weight = _np(m[w])
            if prod.op.name == "relax.matmul":
                if axis != out_ndim - 1:
                    self.explain.skip(bn_call, f"BatchNorm axis {axis} is not the matmul's output axis")
                    return expr
                if weight.ndim < 2:
                    self.explain.skip(bn_call, "matmul with a vector weight")
                    return expr
                new_w = weight * scale.reshape([1] * (weight.ndim - 1) + [-1])
            else:
                out_c = str(prod.attrs.out_layout or prod.attrs.data_layout).index("C")
                if out_c != axis:
                    self.explain.skip(bn_call, f"BatchNorm axis {axis} is not the conv's channel axis {out_c}")
                    return expr
                o = str(prod.attrs.kernel_layout).index("O")
                shape = [1] * weight.ndim
                if "transpose" in prod.op.name and int(prod.attrs.groups) != 1:
                    self.explain.skip(bn_call, "grouped transposed conv")
                    return expr
                shape[o] = weight.shape[o]
                new_w = weight * scale.reshape(shape)
            bias = shift
            top = m[with_bias]
            if isinstance(top, relax.Call) and top.op.name == "relax.add":
                const = top.args[1] if top.args[0].same_as(prod) else top.args[0]
                old = _np(const).astype(np.float64)
                if old.size not in (1, scale.size):
                    self.explain.skip(bn_call, f"bias of shape {old.shape} is not per channel")
                    return expr
                bias = shift + old.reshape(-1) * scale
            new_prod = relax.Call(prod.op, [prod.args[0], relax.const(new_w.astype(weight.dtype))], prod.attrs)
            self.explain.fired(bn_call, f"folded into {prod.op.name.removeprefix('relax.')}")
            return relax.op.add(new_prod, _bcast(bias, out_ndim, axis, weight.dtype))

        def to_affine(expr, m):
            bn_call = expr.tuple_value
            if bool(bn_call.attrs.training):
                return expr
            data = bn_call.args[0]
            ndim = len(data.ty.shape)
            axis = _channel_axis(bn_call, ndim)
            scale, shift = _bn_scale_shift(bn_call, [a.value.numpy() for a in bn_call.args[1:]])
            dtype = str(data.ty.dtype)
            self.explain.fired(bn_call, "no conv/matmul before it: one multiply and one add")
            return relax.op.add(relax.op.multiply(data, _bcast(scale, ndim, axis, dtype)),
                                _bcast(shift, ndim, axis, dtype))

        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                func = rewrite_call(folded_pattern, fold, func)
                func = rewrite_call(plain_bn, to_affine, func)
                out[gv] = func
        return out

