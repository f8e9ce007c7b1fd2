"""FoldBatchNorm: structure (Before/Expected), explanations, numbers before vs after, end to end.

Numerical tolerance: fp32, ``rtol=1e-5`` and ``atol=1e-5 * max|reference|`` (folding
reassociates one multiply per weight; the error is a few float32 ulps).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.ir import summarize
from smelt.passes import Explainer, FoldBatchNorm

F32 = np.float32
EPS = 1e-5


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def _stats(rng, c):
    """gamma, beta, mean, var of ``c`` channels (var well away from 0)."""
    return ((rng.random(c) + 0.5).astype(F32), _randn(rng, c, scale=0.1), _randn(rng, c, scale=0.1),
            (rng.random(c) + 0.5).astype(F32))


def _scale_shift(gamma, beta, mean, var):
    """The pass's contract: s = gamma / sqrt(var + eps), shift = beta - mean * s (float64)."""
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + EPS)
    return s, beta.astype(np.float64) - mean.astype(np.float64) * s


def _along(vec, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return vec.reshape(shape).astype(F32)


# Each case returns (Before, Expected, explanation lines). Expected is built from the
# documented formula, so a wrong scale axis, bias sign or dtype fails structural equality.

def case_conv2d(rng):
    w, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)
    w2 = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(F32)
    b2 = _along(shift, 4, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w2), padding=1)
                gv = R.add(lv, R.const(b2))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d"]


def _conv_bias_bn(rng, bias_left: bool):
    w, bias, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _randn(rng, 1, 4, 1, 1), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)
    w2 = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(F32)
    b2 = _along(shift + bias.astype(np.float64).reshape(-1) * s, 4, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.add(R.const(bias), lv) if bias_left else R.add(lv, R.const(bias))
                lv2 = R.nn.batch_norm(lv1, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv2[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w2), padding=1)
                gv = R.add(lv, R.const(b2))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d and its bias"]


def case_conv2d_bias_right(rng):
    return _conv_bias_bn(rng, bias_left=False)


def case_conv2d_bias_left(rng):
    return _conv_bias_bn(rng, bias_left=True)


def case_matmul(rng):
    w, bias, (g, b, m, v) = _randn(rng, 8, 6), _randn(rng, 6), _stats(rng, 6)
    s, shift = _scale_shift(g, b, m, v)
    w2 = (w.astype(np.float64) * s.reshape(1, -1)).astype(F32)
    b2 = _along(shift + bias.astype(np.float64) * s, 3, 2)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 5, 8), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w))
                lv1 = R.add(lv, R.const(bias))
                lv2 = R.nn.batch_norm(lv1, R.const(g), R.const(b), R.const(m), R.const(v), axis=-1,
                                      epsilon=EPS, training=False)
                gv = lv2[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 5, 8), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w2))
                gv = R.add(lv, R.const(b2))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into matmul and its bias"]


def case_matmul_float64(rng):
    """float64 stays float64 (``relax.const(array)`` would narrow the folded weight to float32)."""
    w, (g, b, m, v) = _randn(rng, 8, 6).astype(np.float64), (a.astype(np.float64) for a in _stats(rng, 6))
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float64")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w, "float64"))
                lv1 = R.nn.batch_norm(lv, R.const(g, "float64"), R.const(b, "float64"), R.const(m, "float64"),
                                      R.const(v, "float64"), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float64")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w * s.reshape(1, -1), "float64"))
                gv = R.add(lv, R.const(shift.reshape(1, -1), "float64"))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into matmul"]


def case_bn_alone(rng):
    g, b, m, v = _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.batch_norm(x, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                     epsilon=EPS, training=False)
                gv = lv[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                lv = R.multiply(x, R.const(_along(s, 4, 1)))
                gv = R.add(lv, R.const(_along(shift, 4, 1)))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: "
                              "one multiply and one add"]


def _nhwc(rng, kernel_layout: str):
    w_ohwi, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)
    o = kernel_layout.index("O")
    perm = {"OHWI": (0, 1, 2, 3), "HWIO": (1, 2, 3, 0)}[kernel_layout]
    w = np.ascontiguousarray(w_ohwi.transpose(perm))
    w2 = (w.astype(np.float64) * s.reshape([-1 if i == o else 1 for i in range(4)])).astype(F32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 8, 3), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1, data_layout="NHWC", kernel_layout=kernel_layout)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=3,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 8, 8, 3), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w2), padding=1, data_layout="NHWC", kernel_layout=kernel_layout)
                gv = R.add(lv, R.const(_along(shift, 4, 3)))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d"]


def case_nhwc_ohwi(rng):
    return _nhwc(rng, "OHWI")


def case_nhwc_hwio(rng):
    return _nhwc(rng, "HWIO")


def _grouped(rng, cin, cout, groups):
    w, (g, b, m, v) = _randn(rng, cout, cin // groups, 3, 3), _stats(rng, cout)
    s, shift = _scale_shift(g, b, m, v)
    w2 = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(F32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, cin, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1, groups=groups)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, cin, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w2), padding=1, groups=groups)
                gv = R.add(lv, R.const(_along(shift, 4, 1)))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d"]


def case_grouped(rng):
    return _grouped(rng, 4, 6, 2)


def case_depthwise(rng):
    return _grouped(rng, 4, 4, 4)


def case_conv2d_transpose(rng):
    w, (g, b, m, v) = _randn(rng, 4, 6, 3, 3), _stats(rng, 6)  # IOHW
    s, shift = _scale_shift(g, b, m, v)
    w2 = (w.astype(np.float64) * s.reshape(1, -1, 1, 1)).astype(F32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d_transpose(x, R.const(w), padding=1)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d_transpose(x, R.const(w2), padding=1)
                gv = R.add(lv, R.const(_along(shift, 4, 1)))
                R.output(gv)
            return gv

    return Before, Expected, ["FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d_transpose"]


def case_axis_mismatch(rng):
    """BatchNorm over H of an NCHW conv (H == C, so shapes agree): the conv must stay as it is."""
    w, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=2,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.multiply(lv, R.const(_along(s, 4, 2)))
                gv = R.add(lv1, R.const(_along(shift, 4, 2)))
                R.output(gv)
            return gv

    return Before, Expected, [
        "FoldBatchNorm: left nn.batch_norm: BatchNorm axis 2 is not the conv's channel axis 1",
        "FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: one multiply and one add"]


def case_matmul_axis_mismatch(rng):
    w, (g, b, m, v) = _randn(rng, 8, 6), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w))
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=0,
                                      epsilon=EPS, training=False)
                gv = lv1[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(w))
                lv1 = R.multiply(lv, R.const(_along(s, 2, 0)))
                gv = R.add(lv1, R.const(_along(shift, 2, 0)))
                R.output(gv)
            return gv

    return Before, Expected, [
        "FoldBatchNorm: left nn.batch_norm: BatchNorm axis 0 is not the matmul's output axis 1",
        "FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: one multiply and one add"]


def case_bias_not_per_channel(rng):
    """An added (4,) constant broadcasts along W, not C, although C == 4: no fold."""
    w, bias, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _randn(rng, 4), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.add(lv, R.const(bias))
                lv2 = R.nn.batch_norm(lv1, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                gv = lv2[0]
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.add(lv, R.const(bias))
                lv2 = R.multiply(lv1, R.const(_along(s, 4, 1)))
                gv = R.add(lv2, R.const(_along(shift, 4, 1)))
                R.output(gv)
            return gv

    return Before, Expected, [
        "FoldBatchNorm: left nn.batch_norm: added constant of shape (4,) is not a per-channel bias on axis 1",
        "FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: one multiply and one add"]


def case_conv_output_shared(rng):
    """The conv's output also feeds a relu: folding would compute the conv twice."""
    w, (g, b, m, v) = _randn(rng, 4, 3, 3, 3), _stats(rng, 4)
    s, shift = _scale_shift(g, b, m, v)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.nn.batch_norm(lv, R.const(g), R.const(b), R.const(m), R.const(v), axis=1,
                                      epsilon=EPS, training=False)
                lv2 = lv1[0]
                lv3 = R.nn.relu(lv)
                gv = R.add(lv2, lv3)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w), padding=1)
                lv1 = R.multiply(lv, R.const(_along(s, 4, 1)))
                lv2 = R.add(lv1, R.const(_along(shift, 4, 1)))
                lv3 = R.nn.relu(lv)
                gv = R.add(lv2, lv3)
                R.output(gv)
            return gv

    return Before, Expected, [
        "FoldBatchNorm: left nn.batch_norm: the value before it has other users: folding would compute it twice",
        "FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: one multiply and one add"]


CASES = [case_conv2d, case_conv2d_bias_right, case_conv2d_bias_left, case_matmul, case_matmul_float64,
         case_bn_alone,
         case_nhwc_ohwi, case_nhwc_hwio, case_grouped, case_depthwise, case_conv2d_transpose,
         case_axis_mismatch, case_matmul_axis_mismatch, case_bias_not_per_channel, case_conv_output_shared]
IDS = [c.__name__.removeprefix("case_") for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_structure(case, rng):
    before, expected, explained = case(rng)
    explain = Explainer("FoldBatchNorm")
    after = FoldBatchNorm(explain)(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert explain.lines() == explained


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_numbers_unchanged(case, rng, run):
    before, _, _ = case(rng)
    after = FoldBatchNorm()(before)
    ty = before["main"].params[0].ty
    x = rng.standard_normal([int(d) for d in ty.shape]).astype(str(ty.dtype))
    ref, got = run(before, x), run(after, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_training_mode_left_alone(rng):
    g, b, m, v = _stats(rng, 4)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 4, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.batch_norm(x, R.const(g), R.const(b), R.const(m), R.const(v), axis=1, training=True)
                gv = lv[0]
                R.output(gv)
            return gv

    explain = Explainer("FoldBatchNorm")
    tvm.ir.assert_structural_equal(FoldBatchNorm(explain)(Before), Before)
    assert explain.lines() == ["FoldBatchNorm: left nn.batch_norm: BatchNorm in training mode"]


# -- end to end through smelt.compile ------------------------------------------------------

def _compile_and_run(model, tmp_path, x):
    import smelt

    art = smelt.compile(model)
    rt = smelt.load(art.save(tmp_path / "art"))
    (name,) = art.models
    return art, rt.run(name, input=x)


def test_resnet18_has_no_batch_norm_left(tmp_path, rng, onnx_reference):
    """Every BatchNorm of ResNet-18 disappears into its conv: one bias add per conv, no decomposition."""
    from smelt.examples import zoo

    model = zoo.resnet(18, size=32)
    x = rng.standard_normal((1, 3, 32, 32)).astype(F32)
    art, got = _compile_and_run(model, tmp_path, x)
    before, after = art.report.ops_before_hist, art.report.ops_after_hist
    assert before["nn.batch_norm"] == before["nn.conv2d"] == 20
    assert "nn.batch_norm" not in after
    assert not {"subtract", "divide", "sqrt", "rsqrt", "multiply"} & set(after), after
    # adds after = one bias per conv + the residual adds and the classifier's bias already there
    assert after["add"] <= after["nn.conv2d"] + before["add"], (before, after)
    (ref,) = onnx_reference(model, {"input": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_conv_with_bias_then_bn_from_onnx(tmp_path, rng, onnx_reference):
    """ONNX Conv with a bias input, then BatchNorm: the importer's add(conv, reshape(b)) is folded too."""
    from onnx import TensorProto, helper

    from smelt.examples.zoo import GraphBuilder, _image_input

    g = GraphBuilder("conv_bias_bn", seed=1)
    g.op("Relu", [g.bn(g.conv("input", 3, 8, 3, bias=True), 8)])
    g.nodes[-1].output[0] = "out"
    model = g.model([_image_input(1, 16)], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16])])
    x = rng.standard_normal((1, 3, 16, 16)).astype(F32)
    art, got = _compile_and_run(model, tmp_path, x)
    assert art.report.ops_after_hist == {"nn.conv2d": 1, "add": 1, "nn.relu": 1}
    (ref,) = onnx_reference(model, {"input": x})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_several_batch_norms_explained_once_each(rng, run):
    """rewrite_call matches until nothing changes; each BatchNorm is still explained once."""
    w1, w2, w3 = _randn(rng, 4, 3, 3, 3), _randn(rng, 4, 4, 3, 3), _randn(rng, 4, 4, 3, 3)
    s1, s2, s3 = _stats(rng, 4), _stats(rng, 4), _stats(rng, 4)

    def bn(x, s):
        return R.nn.batch_norm(x, *(R.const(a) for a in s), axis=1, epsilon=EPS, training=False)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w1), padding=1)
                lv1 = bn(lv, s1)[0]
                lv2 = R.nn.conv2d(lv1, R.const(w2), padding=1)
                lv3 = bn(lv2, s2)[0]  # lv2 is also used below: not folded
                lv4 = R.nn.conv2d(R.nn.relu(lv2), R.const(w3), padding=1)
                lv5 = bn(lv4, s3)[0]
                gv = R.add(lv3, lv5)
                R.output(gv)
            return gv

    explain = Explainer("FoldBatchNorm")
    after = FoldBatchNorm(explain)(Before)
    assert explain.lines() == [
        "FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d",
        "FoldBatchNorm: left nn.batch_norm: the value before it has other users: folding would compute it twice",
        "FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d",
        "FoldBatchNorm: rewrote nn.batch_norm: no conv/matmul folded into: one multiply and one add"]
    assert dict(summarize(after).ops) == {"nn.conv2d": 3, "add": 4, "multiply": 1, "nn.relu": 1}
    x = rng.standard_normal((1, 3, 8, 8)).astype(F32)
    ref = run(Before, x)
    np.testing.assert_allclose(run(after, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
