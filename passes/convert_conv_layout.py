"""ConvertConvLayout: 2-D convolutions compute in a backend's preferred layout (NHWC/HWIO on CPUs).

Requires: Relax before LegalizeOps (calls to ``relax.nn.conv2d``). Guarantees: every conv2d
takes its data in ``data_layout`` and its weights in ``kernel_layout`` (a depthwise conv,
one group per input channel, in ``depthwise_kernel_layout`` where that is given); TVM's
ConvertLayout carries the new layout through the elementwise ops, pooling and
concatenations that follow, so transposes remain only where a layout-bound op or a
model output needs the original one. ``clip`` (ReLU6, hardswish), which TVM cannot carry
a layout through, is first spelled ``minimum(maximum(x, lo), hi)``, which it can; without
that every hardswish of MobileNetV3 sat between two transposes, outside the conv's kernel.
TVM cannot carry a layout through ``nn.pad`` either (the explicit zero-point pad of INT8
convolutions): ConvertLayout leaves it between a transpose to the old layout and one back,
which is then rewritten as one pad in the new layout (its widths permuted).
Weight transposes are constants and fold away in the fuse phase. Numbers do not change.
A module without conv2d is returned as it is; where TVM's ConvertLayout fails (seen: its layout inference indexing out of bounds on
the stacked inputs of merged MLPs), the module keeps its layouts and the reason is logged.
Where: fuse phase, first, for backends that ask for it (``Backend.prelegalize_passes``).

Why NHWC/HWIO on CPUs: the output channel is then the innermost axis of both the result
and the weights, a multiple of the vector length in every common CNN, so the default
CPU schedule vectorizes it with contiguous loads; in NCHW the innermost axis is the
image width (7, 14, 28, 56), which vectors do not fit.

Why a layout of their own for depthwise convs: ``SmallReduction`` gives a GPU thread 8
neighbouring channels only where their weights at one window position are 16 contiguous
bytes (HWIO), one vector load; in OHWI, the layout of cuDNN and cuBLASLt, they lie
``kh*kw`` elements apart, 8 scalar loads, and the thread keeps one channel.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax

from ..errors import error_line
from .mutate import mutate_functions, static_ints

log = logging.getLogger(__name__)
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


@tvm.transform.module_pass(opt_level=0, name="ConvertConvLayout")
class ConvertConvLayout:
    def __init__(self, data_layout: str = "NHWC", kernel_layout: str = "HWIO",
                 depthwise_kernel_layout: str | None = None):
        self.data_layout, self.kernel_layout = data_layout, kernel_layout
        self.depthwise_kernel_layout = depthwise_kernel_layout or kernel_layout

    def _layouts(self, call: relax.Call) -> dict:
        """ConvertLayout's per-call choice (it asks for every call): the depthwise kernel layout for depthwise convs."""
        kernel = self.kernel_layout
        shape = static_ints(call.args[0].ty.shape.values) \
            if call.op.same_as(_CONV2D) and call.args[0].ty.shape is not None else None
        if shape is not None and int(call.attrs.groups) > 1 and \
                int(call.attrs.groups) == shape[str(call.attrs.data_layout).index("C")]:
            kernel = self.depthwise_kernel_layout
        return {"relax.nn.conv2d": [self.data_layout, kernel]}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not _has_conv2d(mod):
            return mod
        convert = relax.transform.ConvertLayout({"relax.nn.conv2d": [self.data_layout, self.kernel_layout]},
                                                self._layouts if self.depthwise_kernel_layout != self.kernel_layout
                                                else None)
        try:
            mod = relax.transform.CanonicalizeBindings()(convert(mutate_functions(_ClipAsMinMax(mod), mod)))
            return relax.transform.DeadCodeElimination()(mutate_functions(_PadInNewLayout(mod), mod))
        except Exception as e:  # noqa: BLE001 - TVM's layout inference; the old layout is still correct
            log.warning("convolutions stay in their layout: TVM's ConvertLayout to %s/%s failed (%s)",
                        self.data_layout, self.kernel_layout, error_line(e, last=True, with_type=True))
            return mod


@relax.expr_functor.mutator
class _ClipAsMinMax(relax.PyExprMutator):
    _clip = tvm.ir.Op.get("relax.clip")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._clip)):
            return call
        x, lo, hi = call.args
        dtype = str(x.ty.dtype)
        # The bounds are TIR immediates (IntImm/FloatImm) in TVM 0.27's Relax.
        bound = [relax.const(float(b.value), dtype) if isinstance(b, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None
                 for b in (lo, hi)]
        if None in bound:
            return call
        return relax.op.minimum(relax.op.maximum(x, bound[0]), bound[1])


@relax.expr_functor.mutator
class _PadInNewLayout(relax.PyExprMutator):
    """``permute_dims(pad(permute_dims(x, p)), q)``, q undoing p, as ``pad(x)`` with the widths permuted."""

    _pad = tvm.ir.Op.get("relax.nn.pad")
    _permute = tvm.ir.Op.get("relax.permute_dims")

    def _bound(self, expr: relax.Expr, op) -> relax.Call | None:
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        return value if isinstance(value, relax.Call) and value.op.same_as(op) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._permute)):
            return call
        pad = self._bound(call.args[0], self._pad)
        inner = self._bound(pad.args[0], self._permute) if pad is not None else None
        if inner is None or inner.attrs.axes is None or call.attrs.axes is None:
            return call
        p, q = [int(a) for a in inner.attrs.axes], [int(a) for a in call.attrs.axes]
        if [p[a] for a in q] != list(range(len(p))):
            return call
        widths = [int(w) for w in pad.attrs.pad_width]
        new = [0] * len(widths)
        for d, axis in enumerate(p):  # axis d of the padded tensor is axis p[d] of x
            new[2 * axis:2 * axis + 2] = widths[2 * d:2 * d + 2]
        return relax.op.nn.pad(inner.args[0], new, pad_value=float(pad.attrs.pad_value),
                               pad_mode=str(pad.attrs.pad_mode))


def _has_conv2d(mod: tvm.IRModule) -> bool:
    found = []
    conv = tvm.ir.Op.get("relax.nn.conv2d")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(conv):
            found.append(e)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and not found:
            relax.analysis.post_order_visit(func, visit)
    return bool(found)
