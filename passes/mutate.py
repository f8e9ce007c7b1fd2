"""Running a Relax ``PyExprMutator`` over every Relax function of a module (shared by the
mutator-based passes)."""

from __future__ import annotations

import tvm
from tvm import relax


def mutate_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by ``mutator.visit_expr(function)``."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
