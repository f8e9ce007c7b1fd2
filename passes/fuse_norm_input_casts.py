"""FuseNormInputCasts: a norm or mean of a float16 tensor cast to float32 reads the float16 tensor itself.

Requires: a Relax module before ``LegalizeOps``.
Guarantees: ``nn.layer_norm(astype(x, "float32"), gamma, beta)``, ``nn.rms_norm(astype(x,
"float32"), gamma)`` and ``mean(astype(x, "float32"))`` with ``x`` float16 or bfloat16 become
one ``call_te`` kernel computing TVM's own ``topi.nn.layer_norm`` / ``rms_norm`` / legalized
mean of ``x`` cast inside it. The numbers are the
same (the cast is exact); the cast is gone as an op of its own (its binding dies unless
something else reads it). ``FuseOps`` then still fuses the norm's consumers (the cast back
to float16) into the kernel.
Why: TVM's ``FuseOps`` fuses a norm (kOutEWiseFusable) with what follows it, never with what
precedes it, and ToMixedPrecision keeps norms in float32 behind a cast. When the op before
is a cuBLASLt GEMM, nothing else takes the cast: BERT-base fp16 at batch 16 on an H200 ran
24 of them at 5 us each, 8 % of its kernel time. A CNN's global average pool is a mean kept in
float32 the same way (ResNet-50 at batch 32: a 5 us cast of 12.8 MB before it).
Where: the CUDA backend's pre-legalize passes, after ``ConvertConvLayout`` (a mean turned into
a kernel before it would stay NCHW behind a transpose) and before ``DispatchCublasLt`` (which
is not affected: the casts it takes are those after a GEMM); ``WarpRowReduction``,
``SmallReduction`` or dlight's reduction rules schedule the kernel (the cast is inlined into
the reads).
"""

from __future__ import annotations

import tvm
from tvm import relax, topi
from tvm.relax.transform.legalize_ops.statistical import _te_mean

from .explain import Explainer
from .mutate import mutator_pass

HALF = ("float16", "bfloat16")


def _layer_norm(x, gamma, beta, axis, epsilon):
    return topi.nn.layer_norm(topi.cast(x, "float32"), gamma, beta, axis=axis, epsilon=epsilon)


def _rms_norm(x, gamma, axis, epsilon):
    return topi.nn.rms_norm(topi.cast(x, "float32"), gamma, axis=axis, epsilon=epsilon)


def _mean(x, axis, keepdims):
    # LegalizeOps' own mean (sum, then divide by the count), of the cast input
    return _te_mean(topi.cast(x, "float32"), axis, keepdims)


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or \
                call.op.name not in ("relax.nn.layer_norm", "relax.nn.rms_norm", "relax.mean"):
            return call
        x = call.args[0]
        src = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if not (isinstance(src, relax.Call) and isinstance(src.op, tvm.ir.Op) and src.op.name == "relax.astype"
                and str(src.attrs.dtype) == "float32" and str(src.args[0].ty.dtype) in HALF):
            return call
        self.explain.fired(call, f"reads the {src.args[0].ty.dtype} input, cast inside the kernel")
        if call.op.name == "relax.mean":
            axis = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
            return self.builder_.call_te(_mean, src.args[0], axis, bool(call.attrs.keepdims), primfunc_name_hint="mean")
        axes, eps = [int(a) for a in call.attrs.axes], float(call.attrs.epsilon)
        if call.op.name == "relax.nn.layer_norm":
            return self.builder_.call_te(_layer_norm, src.args[0], call.args[1], call.args[2], axes, eps,
                                         primfunc_name_hint="layer_norm")
        return self.builder_.call_te(_rms_norm, src.args[0], call.args[1], axes, eps, primfunc_name_hint="rms_norm")


FuseNormInputCasts = mutator_pass("FuseNormInputCasts", _Fuser, __doc__)
