"""CanonicalizeOps: one spelling for computations that frontends spell differently.

Requires: a Relax module. Guarantees: ``out_dtype`` left empty on conv/matmul ops is
set to the dtype they produce (the ONNX frontend leaves it empty, the torch frontend
writes it); commutative binary ops (add, multiply, maximum, minimum) take their
constant operand second (``b + conv(x)`` becomes ``conv(x) + b``). Numbers do not
change. Two models imported from different formats then value-number alike, so
MergeCommonStems can share their common stem, and patterns need one form only.
Where: canonicalize phase, before FoldBatchNorm and the merge phase.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .explain import Explainer
from .mutate import mutator_pass

_OUT_DTYPE_OPS = {"relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.nn.conv1d_transpose",
                  "relax.nn.conv2d_transpose", "relax.matmul"}
_COMMUTATIVE = {"relax.add", "relax.multiply", "relax.maximum", "relax.minimum"}
_NOT_FIELDS = {"get_int", "get_int_tuple", "get_str", "id_", "is_", "same_as", "keys"}


def attr_fields(attrs) -> list[str]:
    """The field names of op attributes (TVM 0.27 attribute nodes have no ``keys()``)."""
    if attrs is None:
        return []
    return [k for k in dir(attrs) if not k.startswith("_") and k not in _NOT_FIELDS and not callable(getattr(attrs, k))]


def with_attr_field(attrs, **changes):
    """A copy of op attributes ``attrs`` with some fields changed."""
    fields = {k: getattr(attrs, k) for k in attr_fields(attrs)}
    fields.update(changes)
    return tvm.ir.make_node(type(attrs).__tvm_ffi_type_info__.type_key, **fields)


@relax.expr_functor.mutator
class _Canonicalizer(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name = call.op.name
        if name in _OUT_DTYPE_OPS and call.attrs is not None and call.attrs.out_dtype is None:
            dtype = str(call.ty.dtype) if isinstance(call.ty, relax.TensorType) else None
            if dtype:
                self.explain.fired(call, f"out_dtype set to {dtype}")
                return relax.Call(call.op, call.args, with_attr_field(call.attrs, out_dtype=dtype), call.ty_args)
        if name in _COMMUTATIVE and len(call.args) == 2:
            a, b = call.args
            if isinstance(self._value(a), tvm.ir.Constant) and not isinstance(self._value(b), tvm.ir.Constant):
                self.explain.fired(call, "constant operand put second")
                return relax.Call(call.op, [b, a], call.attrs, call.ty_args)
        return call

    def _value(self, e):
        if isinstance(e, relax.Var):
            bound = self.lookup_binding(e)
            return bound if bound is not None else e
        return e


CanonicalizeOps = mutator_pass("CanonicalizeOps", _Canonicalizer, "See the module docstring.")
