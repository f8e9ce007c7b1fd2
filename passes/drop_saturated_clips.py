"""DropSaturatedClips: the clip to E4M3's range before a cast to float8_e4m3fn goes, where the
target's cast saturates by itself.

Requires: Relax, for a target whose casts to float8_e4m3fn saturate: CUDA's (``__nv_fp8_e4m3``
converts with ``__NV_SATFINITE``, what TVM's CUDA code calls for every such cast).
Guarantees: ``astype(minimum(maximum(x, -448), 448), "float8_e4m3fn")`` (in either order, or
``clip(x, -448, 448)``) becomes ``astype(x, "float8_e4m3fn")``: the same value for every x but
NaN (which the clip turned into -448, the cast keeps as NaN). The clip's own bindings stay for
any other use; dead ones go with dead code elimination.
Where: the CUDA backend's pre-legalize passes, after the library dispatches (DispatchCutlassConv
folds such a clip into its epilogue and needs to see it), so it touches the quantizations left
to TVM's kernels.
Why: QuantizeFp8 clips because TVM's LLVM cast wraps out-of-range values; on the GPU the clip is
a float16 minimum and maximum per element, which TVM's CUDA code computes with a compare and a
select each: half the instructions of ResNet-50's FP8 space-to-depth stem kernel (48 elements a
thread; its cubin 15.4 -> 12.3 KB without them).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .explain import Explainer
from .mutate import mutator_pass
from .quantize_fp8 import E4M3_MAX, FP8


def _bound(call: relax.Call, lookup) -> tuple[str, float] | None:
    """("min"/"max", bound) of a ``minimum``/``maximum`` with a scalar constant, else None."""
    for _, c in (call.args, call.args[::-1]):
        c = lookup(c) if isinstance(c, relax.Var) else c
        if isinstance(c, tvm.ir.Constant) and c.value.numpy().size == 1:
            return call.op.name.removeprefix("relax."), float(c.value.numpy().reshape(()))
    return None


@relax.expr_functor.mutator
class _Dropper(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def _value(self, e: relax.Expr):
        return self.lookup_binding(e) if isinstance(e, relax.Var) else e

    def _unclipped(self, e: relax.Expr) -> relax.Expr | None:
        """The operand that ``e`` clips to [-448, 448], else None."""
        v = self._value(e)
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)):
            return None
        if v.op.name == "relax.clip":
            lo, hi = (float(p.value) for p in v.args[1:3])
            return v.args[0] if (lo, hi) == (-E4M3_MAX, E4M3_MAX) else None
        seen = {}
        while isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                v.op.name in ("relax.minimum", "relax.maximum") and len(seen) < 2:
            bound = _bound(v, self._value)
            if bound is None or bound[0] in seen:
                return None
            seen[bound[0]] = bound[1]
            e = next(a for a in v.args if not isinstance(self._value(a), tvm.ir.Constant))
            v = self._value(e)
        return e if seen == {"minimum": E4M3_MAX, "maximum": -E4M3_MAX} else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype" and str(call.attrs.dtype) == FP8):
            return call
        x = self._unclipped(call.args[0])
        if x is None:
            return call
        self.explain.fired(call, "the cast to float8_e4m3fn saturates: its clip to +-448 dropped")
        return relax.op.astype(x, FP8)


DropSaturatedClips = mutator_pass("DropSaturatedClips", _Dropper, "See the module docstring.")
