"""DropSaturatedClips: the clip to E4M3's range before a cast to float8_e4m3fn goes, where the
target's cast saturates by itself.

Requires: Relax, for a target whose casts to float8_e4m3fn saturate: CUDA's (``__nv_fp8_e4m3``
converts with ``__NV_SATFINITE``, what TVM's CUDA code calls for every such cast).
Guarantees: ``astype(minimum(maximum(x, -448), 448), "float8_e4m3fn")`` (``e4m3_clip``: in
either order, or ``clip(x, -448, 448)``) becomes ``astype(x, "float8_e4m3fn")``: the same value for every x but
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

from tvm import relax

from .epilogue_chains import op_is
from .explain import Explainer
from .mutate import mutator_pass
from .quantize_fp8 import FP8, e4m3_clip


@relax.expr_functor.mutator
class _Dropper(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def _bound(self, e: relax.Expr, op: str) -> relax.Call | None:
        v = self.lookup_binding(e) if isinstance(e, relax.Var) else None
        return v if op_is(v, op) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not op_is(call, "relax.astype") or str(call.attrs.dtype) != FP8:
            return call
        if (match := e4m3_clip(call.args[0], self._bound)) is None:
            return call
        self.explain.fired(call, "the cast to float8_e4m3fn saturates: its clip to +-448 dropped")
        return relax.op.astype(match[0], FP8)


DropSaturatedClips = mutator_pass("DropSaturatedClips", _Dropper, "See the module docstring.")
