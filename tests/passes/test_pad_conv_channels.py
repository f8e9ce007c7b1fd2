"""PadConvChannels: an NHWC conv with 3 input channels reads 8, the 5 added ones zero.

Numbers: the padded and the original module, both built for the CPU, agree to 1e-6 of the
output's scale (the added products are exact zeros; only float32 accumulation order may differ).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.pad_conv_channels import PadConvChannels


def _conv(c: int, dtype: str = "float16", kernel_layout: str = "OHWI", groups: int = 1):
    rng = np.random.default_rng(0)
    shape = {"OHWI": (16, 3, 3, c // groups), "HWIO": (3, 3, c // groups, 16)}[kernel_layout]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 10, 10, c), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal(shape).astype(dtype))
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1, groups=groups, data_layout="NHWC",
                                           kernel_layout=kernel_layout, out_dtype="float32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _conv_call(mod) -> relax.Call:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.conv2d" else None)
    (call,) = found
    return call


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("kernel_layout", ["OHWI", "HWIO"])
def test_rgb_conv_reads_eight_channels(kernel_layout):
    before = _conv(3, kernel_layout=kernel_layout)
    explain = Explainer("PadConvChannels")
    after = PadConvChannels(explain)(before)
    relax.analysis.well_formed(after)
    x_shape = [int(v) for v in _conv_call(after).args[0].ty.shape.values]
    w_shape = [int(v) for v in _conv_call(after).args[1].ty.shape.values]
    assert x_shape == [2, 10, 10, 8] and w_shape[kernel_layout.index("I")] == 8
    assert explain.lines() == ["PadConvChannels: rewrote nn.conv2d: 3 input channels padded to 8 "
                               "(16-byte rows for the implicit GEMM)"]
    x = np.random.default_rng(1).standard_normal((2, 10, 10, 3)).astype("float16")
    ref, y = _run(before, x), _run(after, x)
    assert y.shape == ref.shape == (2, 5, 5, 16)
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("c, dtype, groups", [(16, "float16", 1), (3, "float32", 1), (6, "float16", 2)],
                         ids=["aligned", "float32", "grouped"])
def test_leaves_aligned_float32_and_grouped_convs(c, dtype, groups):
    before = _conv(c, dtype, groups=groups)
    tvm.ir.assert_structural_equal(PadConvChannels()(before), before)
