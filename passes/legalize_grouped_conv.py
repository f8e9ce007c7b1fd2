"""LegalizeGroupedConv: a grouped convolution becomes a batched convolution over its groups.

Requires: Relax before LegalizeOps. Guarantees: ``conv2d`` in NCHW/OIHW with
``1 < groups < in_channels`` and static shapes becomes ``reshape`` of the input to
(B, G, C/G, H, W), one TE kernel computing (B, G, O/G, H', W') with the group as a
batch axis of a matmul-shaped reduction, and ``reshape`` back (both reshapes are free).
Numbers do not change. Depthwise and ordinary convolutions are left to LegalizeOps.
Where: fuse phase, first (before LegalizeOps).

TOPI's ``group_conv2d_nchw`` indexes the input channel as ``group * C/G + c``; dlight's
Matmul rule does not recognise that as a matmul, so on GPUs grouped convolutions (what
horizontal fusion of N CNNs produces) fell to slow generic schedules, and dlight's
Reduction rule miscompiled the 1×1 case. With the group as its own axis the Matmul rule
takes them like any conv.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi

from .explain import Explainer
from .mutate import mutator_pass, static_ints



def _batched_group_conv(data, weight, strides, padding, dilation, out_dtype):
    """data (B, G, Cg, H, W) x weight (G, Og, Cg, KH, KW) -> (B, G, Og, OH, OW)."""
    b, g, cg, h, w = (int(d) for d in data.shape)
    _, og, _, kh, kw = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    padded = topi.nn.pad(data, [0, 0, 0, pt, pl], [0, 0, 0, pb, pr], name="pad_temp") if any(padding) else data
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    rc, rh, rw = te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    return te.compute(
        (b, g, og, oh, ow),
        lambda n, gi, o, y, x: te.sum(
            padded[n, gi, rc, y * sh + rh * dh, x * sw + rw * dw].astype(out_dtype)
            * weight[gi, o, rc, rh, rw].astype(out_dtype), axis=[rc, rh, rw]),
        name="batched_group_conv2d")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        a = call.attrs
        groups = int(a.groups)
        data, weight = call.args
        dshape, wshape = static_ints(data.ty.shape.values), static_ints(weight.ty.shape.values)
        if groups <= 1 or dshape is None or wshape is None:
            return call
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCHW", "OIHW", "NCHW"):
            self.explain.skip(call, f"layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW is rewritten")
            return call
        b, c, h, w = dshape
        o, cg, kh, kw = wshape
        if groups == c:
            return call  # depthwise: LegalizeOps' own kernel is the better one
        bb = self.builder_
        out_dtype = str(a.out_dtype) if a.out_dtype is not None else str(call.ty.dtype)
        pad = [int(p) for p in a.padding]
        pad = pad * 2 if len(pad) == 2 else pad
        data5 = bb.emit(relax.op.reshape(data, (b, groups, c // groups, h, w)))
        weight5 = bb.emit(relax.op.reshape(weight, (groups, o // groups, cg, kh, kw)))
        out5 = bb.emit(bb.call_te(_batched_group_conv, data5, weight5, [int(s) for s in a.strides], pad,
                                  [int(d) for d in a.dilation], out_dtype, primfunc_name_hint="batched_group_conv2d"))
        oh, ow = (int(d) for d in call.ty.shape.values[2:])
        self.explain.fired(call, f"{groups} groups as a batch axis")
        return relax.op.reshape(out5, (b, o, oh, ow))


LegalizeGroupedConv = mutator_pass("LegalizeGroupedConv", _Rewriter, "See the module docstring.")
