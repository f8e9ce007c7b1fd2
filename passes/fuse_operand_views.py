"""FuseOperandViews: transposes, slices and reshapes of a matmul's operands are read inside the matmul.

Requires: a Relax module; ``matmul(a, b)`` whose operands are static-shaped chains of
``reshape``, ``permute_dims``, ``strided_slice`` (unit strides or not), ``squeeze`` and
``expand_dims`` over some tensor, at least one of them a ``permute_dims`` or
``strided_slice``; ``b`` 2-D or with the same batch dimensions as ``a``.
Guarantees: such a matmul becomes one ``call_te`` kernel (``matmul``, marked TVM's
kOutEWiseFusable so its epilogue still fuses) that takes the chains' source tensors and
reads them through the views' index maps; a ``permute_dims`` swapping ``b``'s last two
axes becomes the NT form (``b[..., j, k]``), so the source's contiguous axis stays the
reduction axis. The same products are summed in the same order: the numbers do not change.
The views themselves become dead unless something else reads them.
Why: attention exported from PyTorch splits the fused q/k/v projection with reshape,
permute and three slices, transposes k, and transposes the context back before the output
projection: in BERT-base, five copy kernels per layer (0.43 of 2.54 ms at batch 16 on an
H200). TVM's ``FuseOps`` fuses injective ops into a matmul neither before nor after it.
Schedules read operands through their producers (TensorCoreMatmul inlines them into the
shared-memory copies), so the copies vanish into the loads.
Where: the CUDA backend's pre-legalize passes (after ``SplitKMatmul``).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi

from .explain import Explainer
from .mutate import OUT_EWISE_FUSABLE, mutate_functions, static_ints, static_shape

_VIEWS = {"relax.reshape", "relax.permute_dims", "relax.strided_slice", "relax.squeeze", "relax.expand_dims"}


def _ints(e) -> list[int] | None:
    """The integers of a strided_slice argument (a tuple of them), else None."""
    fields = getattr(e, "fields", None)
    return None if fields is None else static_ints(fields)


def _view(call: relax.Call, shape: list[int]):
    """A function of one ``te.Tensor`` computing ``call`` (a view op with output ``shape``), or None."""
    name = call.op.name
    if name in ("relax.reshape", "relax.squeeze", "relax.expand_dims"):
        return lambda t: topi.reshape(t, shape)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        axes = None if axes is None else [int(a) for a in axes]
        return lambda t: topi.transpose(t, axes)
    # strided_slice(x, axes, begin, end, strides): out[i] = x[i with i[axis] = begin + i[axis] * stride]
    axes, begin = _ints(call.args[1]), _ints(call.args[2])
    strides = _ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes or [])
    if axes is None or begin is None or strides is None or min(begin, default=0) < 0:
        return None
    offset = {a: (b, s) for a, b, s in zip(axes, begin, strides)}

    def slice_(t):
        def at(*i):
            return t[tuple(offset[d][0] + x * offset[d][1] if d in offset else x for d, x in enumerate(i))]
        return te.compute(shape, at, name="T_strided_slice")
    return slice_


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def _chain(self, e: relax.Expr):
        """(source, [view functions from the source to ``e``], [op names])."""
        views, names = [], []
        while isinstance(e, relax.Var):
            bound = self.lookup_binding(e)
            if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op) or \
                    bound.op.name not in _VIEWS:
                break
            shape, src_shape = static_shape(bound), static_shape(bound.args[0])
            fn = _view(bound, shape) if shape is not None and src_shape is not None else None
            if fn is None:
                break
            views.append((fn, bound))
            names.append(bound.op.name.removeprefix("relax."))
            e = bound.args[0]
        return e, views[::-1], names[::-1]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return call
        a, b = call.args
        sa, sb, out = static_shape(a), static_shape(b), static_shape(call)
        if sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2 or \
                (len(sb) > 2 and sb[:-2] != sa[:-2]):
            return call
        (a_src, a_views, a_names), (b_src, b_views, b_names) = self._chain(a), self._chain(b)
        swap_last_two = [*range(len(sb) - 2), len(sb) - 1, len(sb) - 2]
        nt = bool(b_views) and b_views[-1][1].op.name == "relax.permute_dims" and \
            b_views[-1][1].attrs.axes is not None and [int(x) for x in b_views[-1][1].attrs.axes] == swap_last_two
        if nt:
            b_views, b_names = b_views[:-1], b_names[:-1] + ["(NT)"]
        if not {"permute_dims", "strided_slice"} & set(a_names + b_names):
            return call
        out_dtype = str(call.attrs.out_dtype)
        out_dtype = str(a.ty.dtype) if out_dtype in ("", "void", "None") else out_dtype

        def kernel(x, y):
            for fn, _ in a_views:
                x = fn(x)
            for fn, _ in b_views:
                y = fn(y)
            k = te.reduce_axis((0, sa[-1]), "k")

            def at(*i):
                batch, row, col = i[:-2], i[-2], i[-1]
                yb = batch if len(sb) > 2 else ()
                yi = (*yb, col, k) if nt else (*yb, k, col)
                return te.sum(x[(*batch, row, k)].astype(out_dtype) * y[yi].astype(out_dtype), axis=k)
            return te.compute(out, at, name="matmul")

        self.explain.fired(call, f"a: {' -> '.join(a_names) or '-'}; b: {' -> '.join(b_names) or '-'}")
        return self.builder_.call_te(kernel, a_src, b_src, primfunc_name_hint="matmul",
                                     primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})


@tvm.transform.module_pass(opt_level=0, name="FuseOperandViews")
class FuseOperandViews:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("FuseOperandViews")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(mutate_functions(_Fuser(mod, self.explain), mod))
