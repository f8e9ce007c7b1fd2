"""summarize: op histogram, FLOPs (a multiply-add counts 2) and parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.ir import summarize


def _single(call_of_x, x_shape, w_shape, dtype="float32"):
    """A module ``main(x, w) = call_of_x(x, w)``."""
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    w = relax.Var("w", relax.TensorType(w_shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(call_of_x(x, w))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("name, build, x_shape, w_shape, flops", [
    # 2 * N*Cout*H*W * Cin*kh*kw = 2 * 16*32*32 * 3*3*3
    ("conv2d", lambda x, w: relax.op.nn.conv2d(x, w, padding=1), (1, 3, 32, 32), (16, 3, 3, 3),
     2 * 16 * 32 * 32 * 3 * 9),
    # stride 2, batch 2: output 2x16x16x16
    ("conv2d_stride", lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1), (2, 3, 32, 32), (16, 3, 3, 3),
     2 * 2 * 16 * 16 * 16 * 3 * 9),
    # groups=4: each output sees Cin/groups = 2 input channels
    ("grouped", lambda x, w: relax.op.nn.conv2d(x, w, padding=1, groups=4), (1, 8, 16, 16), (8, 2, 3, 3),
     2 * 8 * 16 * 16 * 2 * 9),
    ("nhwc_hwio", lambda x, w: relax.op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="HWIO"),
     (1, 32, 32, 3), (3, 3, 3, 16), 2 * 16 * 32 * 32 * 3 * 9),
    ("conv1d", lambda x, w: relax.op.nn.conv1d(x, w), (1, 4, 10), (6, 4, 3), 2 * 6 * 8 * 4 * 3),
    # every input element times Cout x kh x kw (IOHW kernel)
    ("conv2d_transpose", lambda x, w: relax.op.nn.conv2d_transpose(x, w, strides=2), (1, 4, 8, 8), (4, 6, 3, 3),
     2 * 4 * 8 * 8 * 6 * 9),
    # 2 * M*N*K per batch
    ("matmul", lambda x, w: relax.op.matmul(x, w), (3, 5, 8), (8, 6), 2 * 3 * 5 * 6 * 8),
    ("matvec", lambda x, w: relax.op.matmul(x, w), (8,), (8, 6), 2 * 6 * 8),
])
def test_flops_hand_computed(name, build, x_shape, w_shape, flops):
    s = summarize(_single(build, x_shape, w_shape))
    assert s.flops == flops, name
    assert not s.symbolic and s.num_ops == 1


def test_pool_reduction_elementwise_and_batch_norm():
    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), g: R.Tensor((4,), "float32")):
            with R.dataflow():
                lv = R.nn.batch_norm(x, g, g, g, g, axis=1, training=False)  # 2 * 256
                lv1 = R.nn.relu(lv[0])  # 256
                lv2 = R.nn.max_pool2d(lv1, pool_size=[2, 2], strides=[2, 2])  # 64 outputs * 4
                lv3 = R.mean(lv2, axis=[2, 3])  # 64 inputs
                gv = R.reshape(lv3, R.shape([4]))  # data movement: 0
                R.output(gv)
            return gv

    s = summarize(Mod)
    assert s.flops == 2 * 256 + 256 + 64 * 4 + 64
    assert not s.symbolic  # batch_norm's tuple output is no symbolic shape
    assert dict(s.ops) == {"nn.batch_norm": 1, "nn.relu": 1, "nn.max_pool2d": 1, "mean": 1, "reshape": 1}


def test_symbolic_dims_count_as_one():
    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor(("n", 8), "float32"), w: R.Tensor((8, 6), "float32")):
            with R.dataflow():
                gv = R.matmul(x, w)
                R.output(gv)
            return gv

    s = summarize(Mod)
    assert s.flops == 2 * 6 * 8 and s.symbolic


def test_param_counts_include_inline_constants(rng):
    from smelt.ir import Program, TensorSpec

    w = rng.standard_normal((8, 16)).astype("float32")
    t = np.ones(4, dtype="float32")

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w0: R.Tensor((8, 16), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.matmul(x, w0)
                gv = R.add(R.reshape(lv, R.shape([8, 4])), R.const(t))
                R.output(gv)
            return gv

    p = Program()
    func = Mod["main"].with_attr("params", [tvm.runtime.tensor(w)])
    info = p.add_model("m", func, [TensorSpec("x", (2, 8), "float32")])
    s = summarize(p.mod, ["m"], p.weights, info.weights)
    assert (s.params, s.param_bytes) == (8 * 16 + 4, (8 * 16 + 4) * 4)


def test_resnet50_flops():
    """ResNet-50 at 224x224: 4.1 GMAC, i.e. 8.2 GFLOP (convs and the classifier dominate)."""
    from smelt import import_models
    from smelt.examples import zoo

    program = import_models(zoo.resnet(50, size=224))
    s = summarize(program.mod, ["resnet50"], program.weights, program.models["resnet50"].weights)
    assert s.flops == pytest.approx(8.2e9, rel=0.05)
    assert s.params == pytest.approx(25.5e6, rel=0.01)
    assert s.ops["nn.conv2d"] == 53 and not s.symbolic
