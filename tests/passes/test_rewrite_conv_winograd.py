"""RewriteConvWinograd: which convs become Winograd F(2x2, 3x3), why the others stay, and the numbers."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.fence_expanding_broadcasts import FenceExpandingBroadcasts
from smelt.passes.rewrite_conv_winograd import RewriteConvWinograd


def _conv(x, w, **kw):
    kw = {"padding": 1, "data_layout": "NHWC", "kernel_layout": "HWIO", **kw}
    return relax.op.nn.conv2d(x, w, **kw)


def _direct_conv_nhwc(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """3x3, stride 1, pad 1, in float64."""
    h, wd = x.shape[1:3]
    xp = np.pad(x.astype("float64"), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + h, j:j + wd], w[i, j].astype("float64"))
               for i in range(3) for j in range(3))


def _calls(func: relax.Function) -> list[str]:
    """The op or kernel name of each call binding, in order."""
    out = []
    for b in func.body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.Call):
            out.append(v.args[0].name_hint if v.op.name == "relax.call_tir" else v.op.name.removeprefix("relax."))
    return out


def test_taken_and_left_with_reasons(rng):
    """A 3x3 stride-1 NHWC conv with constant weights (also behind a ``permute_dims``) is
    taken; strided, 1x1, few-channel, NCHW and non-constant-weight convs stay, each with its reason."""
    w = rng.standard_normal((3, 3, 16, 32)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float32"))
    xc = relax.Var("xc", relax.TensorType((1, 16, 8, 8), "float32"))
    wp = relax.Var("wp", relax.TensorType((3, 3, 16, 32), "float32"))
    with bb.function("main", [x, xc, wp]):
        with bb.dataflow():
            outs = [
                bb.emit(_conv(x, relax.const(w))),
                bb.emit(_conv(x, relax.op.permute_dims(relax.const(w.transpose(3, 2, 0, 1)), [2, 3, 1, 0]))),
                bb.emit(_conv(x, relax.const(w), strides=2)),
                bb.emit(_conv(x, relax.const(w[1:2, 1:2]), padding=0)),
                bb.emit(_conv(x, relax.const(w[..., :8]))),
                bb.emit(_conv(xc, relax.const(w.transpose(3, 2, 0, 1)), data_layout="NCHW", kernel_layout="OIHW")),
                bb.emit(_conv(x, wp)),
            ]
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)

    explain = Explainer("RewriteConvWinograd")
    after = RewriteConvWinograd(explain)(bb.get())
    assert explain.lines() == [
        "RewriteConvWinograd: rewrote nn.conv2d: 3x3 conv [1, 8, 8, 16] x [16, 32] as Winograd F(2x2, 3x3)",
        "RewriteConvWinograd: rewrote nn.conv2d: 3x3 conv [1, 8, 8, 16] x [16, 32] as Winograd F(2x2, 3x3)",
        "RewriteConvWinograd: left nn.conv2d: strides [2, 2], dilation [1, 1], padding [1, 1, 1, 1], groups 1: "
        "only stride 1, pad 1, no dilation, one group is rewritten",
        "RewriteConvWinograd: left nn.conv2d: kernel [1, 1]: only 3x3 is rewritten",
        "RewriteConvWinograd: left nn.conv2d: 16 -> 8 channels: below 16 the transforms cost more than they save",
        "RewriteConvWinograd: left nn.conv2d: layout NCHW/OIHW: only NHWC/HWIO is rewritten",
        "RewriteConvWinograd: left nn.conv2d: weights are not a constant: the transform is computed at compile time"]
    calls = _calls(after["main"])
    assert calls.count("winograd_input") == 2 and calls.count("matmul") == 2 and calls.count("nn.conv2d") == 5, calls
    # the output transform is the conv's own binding (no alias of it): FuseOps can fuse what follows
    assert sum(c.startswith("winograd_output") for c in calls) == 2, calls
    assert int(after["winograd_output"].attrs["op_pattern"]) == 2  # injective
    assert int(after["winograd_input"].attrs["op_pattern"]) == 8  # opaque


def _conv_bias_residual_relu(w, b, shape):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(_conv(x, relax.const(w)))
            y = bb.emit(relax.op.add(y, relax.const(b)))
            y = bb.emit(relax.op.add(y, x))
            gv = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(gv)
    return bb.get()


def test_matches_the_direct_conv_and_the_epilogue_fuses(rng, run):
    """conv + bias + residual + ReLU at 7x7 (a partial last tile): after FuseOps, three
    kernels (input transform, matmul, output transform with the whole epilogue), and the numbers
    equal a float64 direct conv to 1e-5 relative to the largest output (rounding of the
    0, +-1, +-1/2 transform coefficients)."""
    shape, c = (1, 7, 7, 16), 16
    w = rng.standard_normal((3, 3, c, c)).astype("float32")
    b = rng.standard_normal((1, 1, 1, c)).astype("float32")
    x = rng.standard_normal(shape).astype("float32")
    mod = RewriteConvWinograd()(_conv_bias_residual_relu(w, b, shape))
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        FenceExpandingBroadcasts(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    assert _calls(mod["main"]) == ["winograd_input", "matmul", "fused_winograd_output_add_add1_relu"]

    got = run(mod, x)
    want = np.maximum(_direct_conv_nhwc(x, w) + b + x, 0)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
