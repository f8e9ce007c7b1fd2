"""FoldConstantLayout: layout and elementwise ops on constants computed once in numpy.

Requires: a Relax module with weights bound as constants.
Guarantees: ``reshape``, ``permute_dims``, ``expand_dims``, ``squeeze``, ``astype``
and ``add/subtract/multiply/divide`` whose operands are all constants (with static
shapes) are replaced by their value, of the call's exact shape and dtype (0-d stays
0-d, int64 stays int64), so patterns see constants (``permute_dims(W)`` of a torch
Linear becomes the transposed weight; ``reshape(bias)`` a constant). Binary ops fold
for float dtypes, and for integers except ``divide`` (TVM truncates, numpy does not).
Where: canonicalize phase, before FoldBatchNorm.

TVM's ``FoldConstant`` does this too but compiles and runs one kernel per call
(seconds per model); these ops are cheap in numpy, so they are folded here first.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..ir.weights import _np_dtype, exact_const
from .mutate import mutate_functions, static_ints

_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract,
           "relax.multiply": np.multiply, "relax.divide": np.divide}



def _eval(call: relax.Call, args: list[np.ndarray]) -> np.ndarray | None:
    name = call.op.name
    if name == "relax.reshape":
        shape = static_ints(call.args[1].values) if isinstance(call.args[1], relax.ShapeExpr) else None
        return None if shape is None else args[0].reshape(shape)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
    if name == "relax.expand_dims":
        return np.expand_dims(args[0], tuple(int(a) for a in call.attrs.axis))
    if name == "relax.squeeze":
        axis = call.attrs.axis
        return np.squeeze(args[0], None if axis is None else tuple(int(a) for a in axis))
    if name == "relax.astype":
        return args[0].astype(_np_dtype(str(call.attrs.dtype)))
    if name in _BINARY and len(args) == 2 and args[0].dtype == args[1].dtype:
        dtype = args[0].dtype
        if _is_float(dtype) or np.issubdtype(dtype, np.integer) and name != "relax.divide":
            # Integers wrap like TVM's; integer divide is left to TVM (trunc vs numpy's true divide).
            with np.errstate(all="ignore"):
                return np.asarray(_BINARY[name](args[0], args[1])).astype(dtype)
    return None


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float8"))


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.folded = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name not in _BINARY and call.op.name not in (
                "relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.astype"):
            return call
        operands = [self.lookup_binding(a) if isinstance(a, relax.Var) and self.lookup_binding(a) is not None else a
                    for a in call.args]
        tensors = [o for o in operands if not isinstance(o, relax.ShapeExpr)]
        if not tensors or not all(isinstance(o, tvm.ir.Constant) for o in tensors):
            return call
        value = _eval(call, [t.value.numpy() for t in tensors])
        if value is None:
            return call
        self.folded += 1
        return exact_const(value)


@tvm.transform.module_pass(opt_level=0, name="FoldConstantLayout")
def FoldConstantLayout(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """See the module docstring."""
    return mutate_functions(_Folder(mod), mod)
