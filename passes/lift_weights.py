"""LiftWeights: large constants become trailing parameters again, for the weight store.

Requires: model functions carrying ``num_input`` (set at import).
Guarantees: every tensor constant of at least ``MIN_WEIGHT_ELEMENTS`` elements in a
Relax function is a parameter after the first ``num_input`` ones, its value in the
function's ``params`` attribute (TVM's convention); the same tensor object used twice
becomes one parameter. The compiled code then holds no weights: the artifact stores
them once, content-addressed, and the runtime passes them in.
Where: first pass of the lower phase, after fusion and scheduling.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ir.weights import lift_constants


@tvm.transform.module_pass(opt_level=0, name="LiftWeights")
def LiftWeights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """See the module docstring."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs is not None and "num_input" in func.attrs:
            out[gv] = lift_constants(func)
    return out
