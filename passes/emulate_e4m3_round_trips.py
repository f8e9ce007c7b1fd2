"""EmulateE4M3RoundTrips: a value rounded to E4M3 and widened again is rounded in float32
arithmetic, so that targets without FP8 arithmetic keep the rounding.

Requires: a Relax module before ``LegalizeOps``.
Guarantees: ``astype(v, t)``, where ``v`` is bound to ``astype(x, "float8_e4m3fn")`` and ``t``
is no FP8 type, becomes one ``call_te`` kernel computing ``x`` rounded to E4M3 in float32 (round
to nearest even, E4M3's subnormals, saturating at ±448), cast to ``t``: the value the two casts
give where the cast rounds (ml_dtypes' values within ±448, where QuantizeFp8 clips). ``v``
stays for its other users (an FP8 conv reading it), and dies if the widening was its only one.
Why: TVM's ``FP8ComputeLegalize``, which targets without FP8 arithmetic run on every kernel,
computes each expression of an FP8 type in float32 and converts only what is stored: a round
trip to E4M3 inside one fused kernel (QuantizeFp8's projection shortcut, held in E4M3 and added
to the other conv's result) is then no rounding at all, and the CPU's FP8 graph, the reference
for the GPU's, drifts from the GPU's arithmetic by E4M3's rounding error (3 % of a ResNet
block's output).
Where: the CPU backend's pre-legalize passes. CUDA on sm_89 and newer casts in hardware.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from .explain import Explainer
from .mutate import mutator_pass
from .quantize_fp8 import E4M3_MAX, FP8


def round_e4m3(x: tvm.te.Tensor, dtype: str) -> tvm.te.Tensor:
    """``x`` rounded to the nearest E4M3 value (ties to even) in float32, cast to ``dtype``.
    E4M3 has 3 mantissa bits: a normal value of exponent e (at least -6) is a multiple of
    2^(e-3), a subnormal one of 2^-9. The exponent comes from the float32 bits, exact where a
    logarithm is not; scaling by powers of two is exact."""
    def element(*i):
        v = x(*i).astype("float32")
        a = tirx.abs(v)
        e = tirx.max(tirx.shift_right(tirx.reinterpret("int32", a), 23) - 127, -6)
        step = tirx.reinterpret("float32", tirx.shift_left(e + (127 - 3), 23))  # 2^(e-3)
        per_step = tirx.reinterpret("float32", tirx.shift_left((127 + 3) - e, 23))  # 2^(3-e)
        r = tirx.min(tirx.nearbyint(a * per_step) * step, tirx.const(E4M3_MAX, "float32"))
        return tirx.Select(v < 0, -r, r).astype(dtype)

    return tvm.te.compute(x.shape, element, name="round_e4m3")


@relax.expr_functor.mutator
class _Emulator(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype") or \
                "float8" in str(call.attrs.dtype) or not isinstance(call.args[0], relax.Var):
            return call
        src = self.lookup_binding(call.args[0])
        if not (isinstance(src, relax.Call) and isinstance(src.op, tvm.ir.Op) and src.op.name == "relax.astype"
                and str(src.attrs.dtype) == FP8):
            return call
        self.explain.fired(call, "E4M3 round trip rounded in float32")
        return self.builder_.call_te(round_e4m3, src.args[0], str(call.attrs.dtype), primfunc_name_hint="round_e4m3")


EmulateE4M3RoundTrips = mutator_pass("EmulateE4M3RoundTrips", _Emulator, __doc__)
