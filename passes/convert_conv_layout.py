"""ConvertConvLayout: 2-D convolutions compute in a backend's preferred layout (NHWC/HWIO on CPUs).

Requires: Relax before LegalizeOps (calls to ``relax.nn.conv2d``). Guarantees: every conv2d
takes its data in ``data_layout`` and its weights in ``kernel_layout``; TVM's
ConvertLayout carries the new layout through the elementwise ops, pooling and
concatenations that follow, so transposes remain only where a layout-bound op or a
model output needs the original one. Weight transposes are constants and fold away in
the fuse phase. Numbers do not change.
Where: fuse phase, first, for backends that ask for it (``Backend.layout_passes``).

Why NHWC/HWIO on CPUs: the output channel is then the innermost axis of both the result
and the weights, a multiple of the vector length in every common CNN, so the default
CPU schedule vectorizes it with contiguous loads; in NCHW the innermost axis is the
image width (7, 14, 28, 56), which vectors do not fit.
"""

from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="ConvertConvLayout")
class ConvertConvLayout:
    def __init__(self, data_layout: str = "NHWC", kernel_layout: str = "HWIO"):
        self.data_layout, self.kernel_layout = data_layout, kernel_layout

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        convert = relax.transform.ConvertLayout({"relax.nn.conv2d": [self.data_layout, self.kernel_layout]})
        return relax.transform.CanonicalizeBindings()(convert(mod))
