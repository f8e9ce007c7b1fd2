"""FenceExpandingBroadcasts: a squeeze-excitation's expanding multiply leaves the conv's kernel; bias adds stay."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.fence_expanding_broadcasts import FenceExpandingBroadcasts
from smelt.passes.pipeline import PipelineOptions, fuse_passes


def squeeze_excite():
    """``x * hardsigmoid(conv1x1(relu(conv1x1(mean(x)))) + b)`` in NHWC, as MobileNetV3 has it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 7, 7, 64), "float32"))
    w1 = relax.Var("w1", relax.TensorType((16, 1, 1, 64), "float32"))
    w2 = relax.Var("w2", relax.TensorType((64, 1, 1, 16), "float32"))
    b = relax.Var("b", relax.TensorType((1, 1, 1, 64), "float32"))
    with bb.function("main", [x, w1, w2, b]):
        with bb.dataflow():
            p = bb.emit(relax.op.mean(x, axis=[1, 2], keepdims=True))
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(p, w1, data_layout="NHWC", kernel_layout="OHWI")))
            s = bb.emit(relax.op.add(relax.op.nn.conv2d(h, w2, data_layout="NHWC", kernel_layout="OHWI"), b))
            s = bb.emit(relax.op.divide(relax.op.clip(relax.op.add(s, relax.const(3.0)), 0, 6), relax.const(6.0)))
            out = bb.emit_output(bb.emit(relax.op.multiply(s, x)))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _fuse(mod, fence: bool):
    passes = [p for p in fuse_passes(PipelineOptions()) if fence or "Fence" not in p.info.name]
    return tvm.transform.Sequential(passes)(mod)


def _before_fence() -> list:
    """The fuse phase up to the fence."""
    passes = fuse_passes(PipelineOptions())
    return passes[:[p.info.name for p in passes].index("FenceExpandingBroadcasts")]


def test_the_expanding_multiply_gets_a_kernel_of_its_own(rng):
    before = _fuse(squeeze_excite(), fence=False)
    assert "fused_conv2d1_add_add1_tir_clip_divide_multiply" in _kernels(before)  # what FuseOps does alone
    after = _fuse(squeeze_excite(), fence=True)
    assert _kernels(after) == {"mean", "fused_conv2d_relu", "fused_conv2d1_add_add1_tir_clip_divide", "multiply_fenced"}
    assert int(after["multiply_fenced"].attrs["op_pattern"]) == 2
    # numbers: float64 numpy; tolerance 1e-5 of the output's scale (float32 sums of 64 and 16 terms)
    x, w1, w2, b = (rng.standard_normal(s).astype("float32") for s in
                    ((2, 7, 7, 64), (16, 1, 1, 64), (64, 1, 1, 16), (1, 1, 1, 64)))
    p = x.astype("float64").mean(axis=(1, 2), keepdims=True)
    h = np.maximum(p @ w1[:, 0, 0, :].T, 0)
    s = np.clip(h @ w2[:, 0, 0, :].T + b + 3, 0, 6) / 6
    ref = s * x
    ex = tvm.compile(after, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in (x, w1, w2, b)]).numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bias_and_residual_broadcasts_are_left_alone():
    """The conv's result is the large operand of a bias add: FuseOps keeps fusing it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 7, 7, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64, 1, 1, 64), "float32"))
    b = relax.Var("b", relax.TensorType((1, 1, 1, 64), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI"), b))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(y, x))))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential(_before_fence())(bb.get())
    explain = Explainer("FenceExpandingBroadcasts")
    tvm.ir.assert_structural_equal(FenceExpandingBroadcasts(explain)(mod), mod)
    assert explain.lines() == []
    assert _kernels(_fuse(bb.get(), fence=True)) == {"fused_conv2d_add_add1_relu"}


def test_explains_what_it_fenced():
    mod = tvm.transform.Sequential(_before_fence())(squeeze_excite())
    explain = Explainer("FenceExpandingBroadcasts")
    FenceExpandingBroadcasts(explain)(mod)
    assert explain.lines() == ["FenceExpandingBroadcasts: rewrote call_tir: multiply: an operand of 128 elements "
                               "from a matmul/conv is expanded to 6272"]
