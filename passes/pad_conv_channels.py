"""PadConvChannels: convolutions whose input channels are not a whole 16-byte vector get zero channels.

Requires: a Relax module before ``LegalizeOps`` whose convs are NHWC with OHWI or HWIO weights
(``ConvertConvLayout``), static shapes.
Guarantees: an ungrouped float16/bfloat16 ``conv2d`` with C input channels, C not a multiple of
``multiple`` (8: one 16-byte vector of float16), reads ``pad(x)`` and ``pad(w)`` with zero
channels up to the next multiple instead. The result is the same (the added products are
exact zeros); the weight's pad is a constant expression that ``FoldConstant`` folds.
Why: an implicit GEMM's reduction axis is (KH, KW, C); with C = 3 (an RGB stem) its rows are
6 bytes apart and ``TensorCoreMatmul`` copies them element by element. ResNet-50's 7x7 stem at
batch 32 on an H200 took 0.21 ms of its 1.47 ms of kernels that way; cuDNN's took 0.06.
Padding to 8 costs 8/3 of the stem's products at tensor-core speed plus one copy of the input.
Where: the CUDA backend's pre-legalize passes, after ``ConvertConvLayout``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .explain import Explainer
from .mutate import mutator_pass, static_shape

HALF = ("float16", "bfloat16")
MULTIPLE = 8


@relax.expr_functor.mutator
class _Padder(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        a = call.attrs
        x, w = call.args
        layouts = (str(a.data_layout), str(a.kernel_layout))
        if layouts not in (("NHWC", "OHWI"), ("NHWC", "HWIO")) or int(a.groups) != 1 or \
                str(x.ty.dtype) not in HALF:
            return call
        xs, ws = static_shape(x), static_shape(w)
        c = xs[-1] if xs else None
        if c is None or ws is None or c % MULTIPLE == 0:
            return call
        extra = -c % MULTIPLE
        x_pad = [0, 0] * 3 + [0, extra]
        w_axis = layouts[1].index("I")
        w_pad = sum(([0, extra] if i == w_axis else [0, 0] for i in range(4)), [])
        self.explain.fired(call, f"{c} input channels padded to {c + extra} (16-byte rows for the implicit GEMM)")
        return relax.Call(call.op, [self.builder_.emit(relax.op.nn.pad(x, x_pad)),
                                    self.builder_.emit(relax.op.nn.pad(w, w_pad))], call.attrs, call.ty_args)


PadConvChannels = mutator_pass("PadConvChannels", _Padder, __doc__)
