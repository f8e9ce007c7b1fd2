"""FoldBatchNorm: inference BatchNorm folded into the weights of the conv or matmul before it.

Requires: a Relax module whose weights are bound as constants (``Program.bind``),
BatchNorm in inference mode (``training=False``) with constant statistics.
Guarantees: ``bn(conv(x, W) [+ b])`` becomes ``conv(x, W * s) + b'`` and
``bn(matmul(x, W) [+ b])`` becomes ``matmul(x, W * s) + b'`` with
``s = gamma / sqrt(var + eps)`` and ``b' = beta + (b - mean) * s`` computed once in
numpy at compile time; the added ``b`` may be on either side and must broadcast along
the channel axis only. A BatchNorm is not folded (the Explainer says why)
when its axis is not the producer's output channel, the producer's output (or its bias
add) has other users (folding would compute it twice), or the tensors are not floats;
those, and any other inference BatchNorm with constant statistics, become one multiply
and one add. No inference ``nn.batch_norm`` with constant statistics remains.
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

from ..ir.weights import exact_const
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
    return exact_const(vec.reshape(shape).astype(dtype))


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _per_channel(shape: tuple[int, ...], ndim: int, axis: int, channels: int) -> bool:
    """Whether a tensor of ``shape`` added to an ``ndim``-d output broadcasts along ``axis`` only."""
    if len(shape) > ndim:
        return False
    padded = (1,) * (ndim - len(shape)) + tuple(shape)
    return all(d == 1 for i, d in enumerate(padded) if i != axis) and padded[axis] in (1, channels)


class _Uses:
    """How often each bound variable of a function is used, and which variable holds which value."""

    def __init__(self, func: relax.Function):
        self.count: dict = {}
        self.var_of: dict = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.var_of[binding.value] = binding.var

        def visit(e):
            if isinstance(e, relax.Var):
                self.count[e] = self.count.get(e, 0) + 1

        relax.analysis.post_order_visit(func.body, visit)

    def shared(self, value: relax.Expr) -> bool:
        var = self.var_of.get(value)
        return var is not None and self.count.get(var, 0) > 1


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
        bias_add = is_op("relax.add")(producer_op, b) | is_op("relax.add")(b, producer_op)
        with_bias = producer_op | bias_add
        bn = is_op("relax.nn.batch_norm")(with_bias, *stats)
        folded_pattern = TupleGetItemPattern(bn, 0)
        plain_call = is_op("relax.nn.batch_norm")(wildcard(), *stats)
        plain_bn = TupleGetItemPattern(plain_call, 0)
        uses: _Uses

        def fold(expr, m):
            bn_call = m[bn]
            if bool(bn_call.attrs.training):
                return expr  # to_affine records why it is left
            prod = m[producer_op]
            out_ndim, dtype = prod.ty.ndim, str(prod.ty.dtype)
            weight = _np(m[w])
            if out_ndim < 1 or not _is_float(dtype) or not _is_float(str(weight.dtype)):
                self.explain.skip(bn_call, f"{prod.op.name.removeprefix('relax.')} output {dtype}"
                                           f"[rank {out_ndim}] with {weight.dtype} weight is not a float tensor")
                return expr
            top = m[with_bias]
            has_bias = not top.same_as(prod)
            if uses.shared(prod) or has_bias and uses.shared(top):
                self.explain.skip(bn_call, "the value before it has other users: folding would compute it twice")
                return expr
            axis = _channel_axis(bn_call, out_ndim)
            scale, shift = _bn_scale_shift(bn_call, [_np(m[s]) for s in stats])
            if prod.op.name == "relax.matmul":
                if axis != out_ndim - 1:
                    self.explain.skip(bn_call, f"BatchNorm axis {axis} is not the matmul's output axis {out_ndim - 1}")
                    return expr
                if weight.ndim < 2:
                    self.explain.skip(bn_call, "matmul with a vector weight")
                    return expr
                new_w = weight * scale.reshape([1] * (weight.ndim - 1) + [-1])
            else:
                out_c = str(prod.attrs.out_layout or prod.attrs.data_layout).find("C")
                if out_c != axis:
                    self.explain.skip(bn_call, f"BatchNorm axis {axis} is not the conv's channel axis {out_c}")
                    return expr
                if "transpose" in prod.op.name and int(prod.attrs.groups) != 1:
                    self.explain.skip(bn_call, "grouped transposed conv")
                    return expr
                o = str(prod.attrs.kernel_layout).find("O")
                if o < 0 or weight.shape[o] != scale.size:
                    self.explain.skip(bn_call, f"kernel layout {prod.attrs.kernel_layout} of shape {weight.shape} "
                                               f"has no output-channel axis of size {scale.size}")
                    return expr
                shape = [1] * weight.ndim
                shape[o] = scale.size
                new_w = weight * scale.reshape(shape)
            bias = shift
            if has_bias:
                old = _np(m[b])
                if not _per_channel(old.shape, out_ndim, axis, scale.size):
                    self.explain.skip(bn_call, f"added constant of shape {old.shape} is not a per-channel bias "
                                               f"on axis {axis}")
                    return expr
                bias = shift + old.astype(np.float64).reshape(-1) * scale
            new_prod = relax.Call(prod.op, [prod.args[0], exact_const(new_w.astype(weight.dtype))], prod.attrs)
            self.explain.fired(bn_call, f"folded into {prod.op.name.removeprefix('relax.')}"
                                        f"{' and its bias' if has_bias else ''}")
            return relax.op.add(new_prod, _bcast(bias, out_ndim, axis, dtype))

        def to_affine(expr, m):
            bn_call = m[plain_call]
            if bool(bn_call.attrs.training):
                self.explain.skip(bn_call, "BatchNorm in training mode")
                return expr
            data = bn_call.args[0]
            ndim, dtype = data.ty.ndim, str(data.ty.dtype)
            if ndim < 1 or not _is_float(dtype):
                self.explain.skip(bn_call, f"input {dtype}[rank {ndim}] is not a float tensor of known rank")
                return expr
            axis = _channel_axis(bn_call, ndim)
            scale, shift = _bn_scale_shift(bn_call, [_np(m[s]) for s in stats])
            self.explain.fired(bn_call, "no conv/matmul folded into: one multiply and one add")
            return relax.op.add(relax.op.multiply(data, _bcast(scale, ndim, axis, dtype)),
                                _bcast(shift, ndim, axis, dtype))

        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                uses = _Uses(func)
                func = rewrite_call(folded_pattern, fold, func)
                func = rewrite_call(plain_bn, to_affine, func)
                out[gv] = func
        return out
