"""RewriteConvSpaceToDepth: strided few-channel convs become stride-1 convs over 16·k channels with
the same numbers (onnxruntime's float32, max abs error <= 1e-4 of values of order 10), and which
convs stay, with the reason."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te

import smelt
from smelt.backends.short_rows import ShortRows
from smelt.passes import Explainer, RewriteConvSpaceToDepth
from smelt.passes.rewrite_conv_space_to_depth import space_to_depth
from smelt.passes.calibration import _cpu_executable
import tvm


def _conv_model(c, kh, kw, stride, pad, h, w, groups=1, out=8):
    weight = np.random.default_rng(0).standard_normal((out, c // groups, kh, kw)).astype(np.float32)
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride, stride], pads=[pad] * 4, group=groups)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out, oh, ow])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _convs(mod) -> list:
    out = []
    relax.analysis.post_order_visit(mod["m"], lambda e: out.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    return out


@pytest.mark.parametrize("c, kh, kw, stride, pad, h, w, kernel, channels", [
    (3, 7, 7, 2, 3, 64, 64, (4, 1), 64),  # ResNet's stem: 4x4 over 12 channels (padded to 16), columns too
    (3, 3, 3, 2, 1, 33, 31, (2, 1), 32),  # odd sizes: extra bottom and right padding
    (3, 4, 4, 4, 0, 32, 32, (1, 1), 48),  # a ViT-style patchify: a 1x1 conv over 48 channels
    (1, 5, 3, 2, 2, 20, 18, (3, 1), 48),  # one channel, a non-square kernel
    (6, 5, 5, 2, 2, 20, 20, (3, 3), 32),  # 24 channels padded to 32: 3 columns of them exceed 64
])
def test_same_numbers_as_onnxruntime(c, kh, kw, stride, pad, h, w, kernel, channels):
    m = _conv_model(c, kh, kw, stride, pad, h, w)
    explain = Explainer("RewriteConvSpaceToDepth")
    mod = RewriteConvSpaceToDepth(explain)(smelt.import_models([m], ["m"]).bind())
    (conv,) = _convs(mod)
    assert [int(s) for s in conv.attrs.strides] == [1, 1] and [int(p) for p in conv.attrs.padding] == [0] * 4
    assert [int(d) for d in conv.args[1].ty.shape.values[1:]] == [channels, *kernel] and explain.num_fired == 1
    x = np.random.default_rng(1).standard_normal((2, c, h, w)).astype(np.float32)
    got = relax.VirtualMachine(_cpu_executable(mod), tvm.cpu())["m"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("args, why", [
    ((6, 3, 3, 2, 1, 16, 16, 2), "groups 2"),
    ((3, 2, 2, 2, 0, 9, 9), "negative padding"),
])
def test_left_with_reason(args, why):
    explain = Explainer("RewriteConvSpaceToDepth")
    mod = RewriteConvSpaceToDepth(explain)(smelt.import_models([_conv_model(*args)], ["m"]).bind())
    (conv,) = _convs(mod)
    assert [int(s) for s in conv.attrs.strides] == [2, 2] and explain.num_fired == 0
    assert any(why in line for line in explain.lines()), explain.lines()


@pytest.mark.parametrize("args", [(16, 3, 3, 2, 1, 16, 16), (3, 3, 3, 1, 1, 16, 16)])
def test_enough_channels_or_stride_1_untouched(args):
    """16 channels fill a K-block already; a stride-1 conv has no space to move into depth."""
    explain = Explainer("RewriteConvSpaceToDepth")
    RewriteConvSpaceToDepth(explain)(smelt.import_models([_conv_model(*args)], ["m"]).bind())
    assert explain.num_fired == 0


def test_the_gpu_kernel_is_straight_line_code(requires_cuda_compiler):
    """ResNet's stem rearranged and cast to FP8, scheduled by ShortRows: each load is clamped into
    the image and masked, so the kernel has no branch (each guarded load was one: 2100
    instructions a thread)."""
    x = te.placeholder((2, 3, 64, 64), "float32", name="x")
    deep = space_to_depth(x, 2, (3, 3), 16, 4, (35, 32))
    y = te.compute((2, 35, 32, 64), lambda n, i, j, k: deep[n, k, i, j].astype("float8_e4m3fn"), name="y")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    sch = ShortRows().apply(te.create_prim_func([x, y]), target, False)
    assert sch is not None
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target)
    code = lib.mod.imports[0].inspect_source("cuda").split("__global__", 2)[2]
    assert code.count("x_ptr[") == 48 and "if (" not in code and "condval" not in code, code
