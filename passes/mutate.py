"""Small rewriting helpers shared by the passes: running a ``PyExprMutator`` over every Relax
function, the pass class around an explained mutator, variable substitution in flat
dataflow bindings, and static shapes."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx

from .explain import Explainer


def mutate_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by ``mutator.visit_expr(function)``."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def mutator_pass(name: str, mutator_cls, doc: str):
    """A module pass named ``name`` running ``mutator_cls(mod, explainer)`` over every Relax
    function; the instance keeps its ``Explainer`` as ``.explain`` for ``--explain``."""

    class _Pass:
        __doc__ = doc

        def __init__(self, explain: Explainer | None = None):
            self.explain = explain or Explainer(name)

        def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            return mutate_functions(mutator_cls(mod, self.explain), mod)

    _Pass.__name__ = _Pass.__qualname__ = name
    return tvm.transform.module_pass(opt_level=0, name=name)(_Pass)


def map_vars(e: relax.Expr, fn: Callable[[relax.Var], relax.Expr]) -> relax.Expr:
    """``e`` with every variable ``v`` replaced by ``fn(v)`` (bindings of a dataflow block are flat)."""
    if isinstance(e, relax.Var):
        return fn(e)
    if isinstance(e, relax.Call):
        return relax.Call(e.op, [map_vars(a, fn) for a in e.args], e.attrs, e.ty_args)
    if isinstance(e, relax.Tuple):
        return relax.Tuple([map_vars(f, fn) for f in e.fields])
    if isinstance(e, relax.TupleGetItem):
        return relax.TupleGetItem(map_vars(e.tuple_value, fn), e.index)
    return e


def static_ints(values) -> list[int] | None:
    """The values as ints when all are constants (a static shape), else None."""
    out = []
    for v in values:
        if not isinstance(v, tirx.IntImm):
            return None
        out.append(int(v.value))
    return out
