"""RemoveIdentityOps: ops that do nothing at inference disappear.

Requires: a Relax module. Guarantees: ``nn.dropout`` (inference is the identity; its
mask output becomes unused), ``astype`` to the same dtype, ``reshape`` and
``broadcast_to`` to the same shape (static, or the same symbolic dims) and ``permute_dims`` with the identity
permutation are replaced by their input.
Where: canonicalize phase (after import, before pattern passes).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .explain import Explainer
from .mutate import mutator_pass


def _same_shape(a, b) -> bool:
    """Both tensors of one known shape (static, or the same symbolic dims)."""
    if not (isinstance(a, relax.TensorType) and isinstance(b, relax.TensorType)):
        return False
    if a.shape is None or b.shape is None or not hasattr(a.shape, "values") or not hasattr(b.shape, "values"):
        return False
    va, vb = list(a.shape.values), list(b.shape.values)
    return len(va) == len(vb) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(va, vb))


def _identity_permutation(call: relax.Call) -> bool:
    axes = call.attrs.axes
    if axes is None:  # reverses the axes: the identity for rank 0 and 1
        return 0 <= call.args[0].ty.ndim <= 1
    return [int(a) for a in axes] == list(range(len(axes)))


@relax.expr_functor.mutator
class _Remover(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name, x = call.op.name, call.args[0] if call.args else None
        if name == "relax.nn.dropout":
            self.explain.fired(call, "dropout is the identity at inference")
            return relax.Tuple([x, x])
        if name == "relax.astype" and str(x.ty.dtype) == str(call.attrs.dtype):
            self.explain.fired(call, "cast to the same dtype")
            return x
        if name in ("relax.reshape", "relax.broadcast_to") and _same_shape(x.ty, call.ty):
            self.explain.fired(call, f"{name.removeprefix('relax.')} to the same shape")
            return x
        if name == "relax.permute_dims" and _identity_permutation(call):
            self.explain.fired(call, "identity permutation")
            return x
        return call


RemoveIdentityOps = mutator_pass("RemoveIdentityOps", _Remover, "See the module docstring.")
