"""Small rewriting helpers shared by the passes: running a ``PyExprMutator`` over every Relax
function, the pass class around an explained mutator, variable substitution in flat
dataflow bindings, rebuilding a one-block function binding by binding, and static shapes."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx

from .explain import Explainer

# TVM's OpPatternKind (relax ``op_pattern`` attribute), which FuseOps reads
BROADCAST, INJECTIVE, OUT_EWISE_FUSABLE, OPAQUE = 1, 2, 4, 8


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


def rebind(name: str, func: relax.Function, rewrite: Callable | None = None, taps=()) -> relax.Function:
    """``func`` (its body one dataflow block) emitted again binding by binding.

    ``rewrite(bb, binding, value)`` gives a binding's new value (``value`` is the old one
    with variables renamed; ``bb`` may emit helper bindings first). ``taps``, variables of
    ``func``, are returned too: the result becomes ``(result, *taps)``.
    """
    bb = relax.BlockBuilder()
    _emit_again(bb, name, func, rewrite, taps)
    return bb.get()[name]


def rebind_in(mod: tvm.IRModule, name: str, rewrite: Callable) -> tvm.IRModule:
    """``mod`` with its function ``name`` rebound as by ``rebind``; what ``rewrite`` adds
    to the module (TIR kernels of ``bb.call_te``) comes along."""
    bb = relax.BlockBuilder(mod)
    temp = f"{name}__rebound"  # the builder would rename a second function called ``name``
    _emit_again(bb, temp, mod[name], rewrite, ())
    built = bb.get()
    funcs = {gv: f for gv, f in built.functions_items() if gv.name_hint != temp}
    func = mod[name]
    symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
    new = built[temp]
    funcs[mod.get_global_var(name)] = new.with_attr("global_symbol", symbol) if symbol else \
        new.without_attr("global_symbol")
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _emit_again(bb: relax.BlockBuilder, name: str, func: relax.Function, rewrite, taps) -> None:
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else None
    env: dict = {}
    tapped = set(taps)

    def sub(e):
        return map_vars(e, lambda v: env.get(v, v))

    with bb.function(name, list(func.params), attrs=attrs, pure=True):
        with bb.dataflow():
            for b in func.body.blocks[0].bindings:
                value = sub(b.value)
                if rewrite is not None:
                    value = rewrite(bb, b, value)
                if not isinstance(b.var, relax.DataflowVar):
                    env[b.var] = bb.emit_output(value)
                elif b.var in tapped:  # leaves the block for the extra outputs
                    env[b.var] = bb.emit_output(bb.emit(value))
                else:
                    env[b.var] = bb.emit(value)
            result = sub(func.body.body)
        bb.emit_func_output(relax.Tuple([result] + [sub(t) for t in taps]) if taps else result)


def permutation(e: relax.Call) -> list[int]:
    """The axes of a ``permute_dims`` call (reversed when it names none)."""
    rank = len(static_shape(e.args[0]) or [])
    return [int(a) for a in e.attrs.axes] if e.attrs.axes is not None else list(range(rank))[::-1]


def moves_only_unit_axes(e: relax.Call) -> bool:
    """Whether a ``permute_dims`` call with a static input shape keeps the order of its axes
    of extent > 1: the elements stay in memory order, so it is a reshape."""
    shape = static_shape(e.args[0])
    if shape is None:
        return False
    moved = [a for a in permutation(e) if shape[a] != 1]
    return moved == sorted(moved)


def static_shape(e: relax.Expr) -> list[int] | None:
    """The static shape of a tensor expression, else None (not a tensor, unknown or symbolic dims)."""
    ty = e.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return static_ints(ty.shape.values)


def static_ints(values) -> list[int] | None:
    """The values as ints when all are constants (a static shape), else None."""
    out = []
    for v in values:
        if not isinstance(v, tirx.IntImm):
            return None
        out.append(int(v.value))
    return out
