"""DispatchCudnn: convolutions with their bias, residual and ReLU become cuDNN calls.

Structure on the CPU (which chains are taken, with which arguments, which are left and why);
a compile for CUDA whose artifact library exports the routine; and, on an NVIDIA GPU (marker
``cuda``), numbers of a small ResNet (7x7 stride-2 stem, 3x3 convs, a strided 1x1 shortcut)
against torch eager float32: float32 within 1e-4 of the output's scale (cuDNN's float32 path,
no TF32), float16 within 1e-2 (as the other fp16 GPU tests).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import smelt
from smelt.passes import Explainer
from smelt.passes.dispatch_cudnn import DispatchCudnn
from smelt.passes.epilogue_chains import WORKSPACE_BYTES

C, O = 16, 32


def _calls(mod, fn="main") -> list[relax.Call]:
    out = []
    relax.analysis.post_order_visit(mod[fn], lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


def _externs(mod) -> list[relax.Call]:
    return [c for c in _calls(mod) if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed"]


def _ops(mod) -> list[str]:
    return [c.op.name for c in _calls(mod) if isinstance(c.op, tvm.ir.Op)]


def _dispatch(mod):
    explain = Explainer("DispatchCudnn")
    out = DispatchCudnn(explain)(relax.transform.Normalize()(mod))
    relax.analysis.well_formed(out)  # raises on a malformed module
    return out, explain.lines()


def test_conv_bias_residual_relu_is_one_call():
    """A 3x3 stride-2 NHWC conv whose OIHW weight and bias sit behind ConvertConvLayout's
    permute_dims, with its cast, bias, residual and ReLU: one call on the OHWI weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((O, C, 3, 3)).astype("float16")
    bias = rng.standard_normal((1, O, 1, 1)).astype("float16")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 9, 9, C), "float16"))
    r = relax.Var("r", relax.TensorType((2, 5, 5, O), "float16"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            ohwi = bb.emit(relax.op.permute_dims(relax.const(w), [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.conv2d(x, ohwi, strides=2, padding=1, data_layout="NHWC", kernel_layout="OHWI",
                                           out_dtype="float32"))
            y = bb.emit(relax.op.astype(y, "float16"))
            b = bb.emit(relax.op.permute_dims(relax.const(bias), [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.relu(relax.op.add(r, relax.op.add(y, b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    out, lines = _dispatch(bb.get())
    (call,) = _externs(out)
    assert call.args[0].global_symbol == "smelt_cudnn_conv2d_residual"
    assert "relax.nn.conv2d" not in _ops(out) and "relax.nn.relu" not in _ops(out)
    xa, wa, ba, ra, *params = call.args[1].fields
    np.testing.assert_array_equal(wa.value.numpy(), w.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ba.value.numpy(), bias)
    assert [int(p.value) for p in params] == [1, 1, 2, 2, 1, 1, 1, 1]  # pads, strides, dilations, groups, relu
    y_ty, ws = call.ty.fields
    assert [int(v) for v in y_ty.shape.values] == [2, 5, 5, O] and str(y_ty.dtype) == "float16"
    assert [int(v) for v in ws.shape.values] == [WORKSPACE_BYTES]
    assert lines == ["DispatchCudnn: rewrote nn.conv2d: conv2d + bias + residual + relu to cuDNN, "
                     f"3x3 stride 2x2, {C}->{O} channels"]


def test_bare_conv_gets_a_zero_bias():
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, C), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal((O, 7, 7, C)).astype("float32"))
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w, padding=3, dilation=1, data_layout="NHWC",
                                                          kernel_layout="OHWI")))
        bb.emit_func_output(y)
    out, _ = _dispatch(bb.get())
    (call,) = _externs(out)
    assert call.args[0].global_symbol == "smelt_cudnn_conv2d"
    bias = call.args[1].fields[2].value.numpy()
    assert bias.shape == (O,) and bias.dtype == np.float32 and not bias.any()
    assert int(call.args[1].fields[-1].value) == 0  # no ReLU


@pytest.mark.parametrize("c,k,padded", [(3, 7, 4), (4, 7, 4), (3, 3, 3), (12, 7, 12)])
def test_rgb_7x7_stem_is_padded_to_four_channels(c, k, padded):
    """A 7x7 stem's 3 channels become 4 (cuDNN's first-layer kernel reads 4): x through a zero
    pad, W with a zero input channel, so the conv's result is unchanged. Others are left."""
    w = np.random.default_rng(3).standard_normal((O, k, k, c)).astype("float16")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 16, 16, c), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=2, padding=k // 2,
                                                          data_layout="NHWC", kernel_layout="OHWI")))
        bb.emit_func_output(y)
    out, lines = _dispatch(bb.get())
    (call,) = _externs(out)
    xa, wa = call.args[1].fields[:2]
    assert [int(v) for v in xa.ty.shape.values] == [2, 16, 16, padded]
    np.testing.assert_array_equal(wa.value.numpy()[..., :c], w)
    assert not wa.value.numpy()[..., c:].any() and wa.value.numpy().shape == (O, k, k, padded)
    assert ("padded to" in lines[0]) == (c != padded)
    if c != padded:
        (pad,) = [v for b in out["main"].body.blocks[0].bindings if _op(v := b.value) == "relax.nn.pad"]
        assert [int(p) for p in pad.attrs.pad_width] == [0] * 7 + [padded - c] and float(pad.attrs.pad_value) == 0


def _op(e) -> str | None:
    return e.op.name if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None


def test_what_is_left_and_why():
    """A depthwise conv, asymmetric padding, an NCHW conv and a float32 result of float16
    operands keep smelt's kernels; the reasons say so."""
    rng = np.random.default_rng(2)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, C), "float16"))
    xc = relax.Var("xc", relax.TensorType((1, C, 8, 8), "float16"))
    with bb.function("main", [x, xc]):
        with bb.dataflow():
            def w(*shape):
                return relax.const(rng.standard_normal(shape).astype("float16"))

            dw = bb.emit(relax.op.nn.conv2d(x, w(C, 3, 3, 1), padding=1, groups=C, data_layout="NHWC",
                                            kernel_layout="OHWI"))
            asym = bb.emit(relax.op.nn.conv2d(x, w(C, 3, 3, C), padding=[0, 0, 1, 1], data_layout="NHWC",
                                              kernel_layout="OHWI"))
            nchw = bb.emit(relax.op.nn.conv2d(xc, w(C, C, 3, 3), padding=1))
            wide = bb.emit(relax.op.nn.conv2d(x, w(C, 3, 3, C), padding=1, data_layout="NHWC", kernel_layout="OHWI",
                                              out_dtype="float32"))
            out = bb.emit_output(relax.Tuple([dw, asym, nchw, wide]))
        bb.emit_func_output(out)
    out, lines = _dispatch(bb.get())
    assert not _externs(out) and _ops(out).count("relax.nn.conv2d") == 4
    for why in (f"a conv of {C} groups keeps smelt's kernels", "padding [0, 0, 1, 1] is not symmetric",
                "layout NCHW/OIHW/NCHW, not NHWC/OHWI/NHWC", "the result is float32 of float16 operands"):
        assert any(why in line for line in lines), (why, lines)


def _resnet(c=16):
    """A small ResNet: 7x7 stride-2 stem on RGB, a basic block with a strided 1x1 shortcut."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv(3, c, 7, stride=2, padding=3)
            self.a, self.b = conv(c, 2 * c, 3, stride=2, padding=1), conv(2 * c, 2 * c, 3, padding=1)
            self.short = conv(c, 2 * c, 1, stride=2)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return torch.relu(self.short(x) + self.b(torch.relu(self.a(x))))

    return Net().eval()


def _compile(model, x, precision="float32", libs=None):
    opts = smelt.CompileOptions(smelt.TargetOptions("cuda", "sm_90", libs=libs), tune_log_dir=None)
    return smelt.compile([(model, (x,))], target="cuda", names=["m"], precision=precision, options=opts)


def test_artifact_library_carries_the_conv(requires_cuda_compiler, tmp_path):
    art = _compile(_resnet(), torch.randn(2, 3, 32, 32), "float16")
    taken = [line for line in art.report.explanations if line.startswith("DispatchCudnn: rewrote")]
    assert len(taken) == 4, art.report.explanations  # the stem, both 3x3 and the shortcut
    assert not any(rule == "TensorCoreMatmul" for rule in art.report.schedules.values()), art.report.schedules
    path = art.save(tmp_path / "m")
    symbols = subprocess.run(["nm", "-D", str(path / "model.so")], capture_output=True, text=True).stdout
    assert "__tvm_ffi_smelt_cudnn_conv2d" in symbols and "__tvm_ffi_smelt_cudnn_conv2d_residual" in symbols
    assert smelt.artifact.read_manifest(path)["target"]["libs"] == ["cudnn"]  # no GEMM: cuBLASLt is not needed


def test_dynamic_batch_convs_go_to_cudnn(requires_cuda_compiler):
    """An ONNX ResNet-18 with a symbolic batch: its 20 convs are cuDNN calls (cuDNN reads the
    shapes per call), chains with their bias, residual and ReLU as with a static batch."""
    from smelt.examples import zoo

    model = zoo.resnet(18, batch="N", size=32)
    art = smelt.compile([model], target="cuda", arch="sm_90", precision="float16")
    taken = [line for line in art.report.explanations if line.startswith("DispatchCudnn: rewrote")]
    assert len(taken) == 20, art.report.explanations
    assert sum("residual + relu" in line for line in taken) == 8, taken  # each basic block's second conv


def test_libs_cublaslt_alone_keeps_generated_convs(requires_cuda_compiler):
    art = _compile(_resnet(), torch.randn(2, 3, 32, 32), "float16", libs=("cublaslt",))
    assert not any("DispatchCudnn" in line for line in art.report.explanations)
    assert sum(rule == "TensorCoreMatmul" for rule in art.report.schedules.values()) >= 3


@pytest.mark.cuda
@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 1e-2)])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_torch_on_gpu(tmp_path, batch, precision, tol):
    model, x = _resnet(), torch.randn(batch, 3, 32, 32)
    rt = smelt.load(_compile(model, x, precision).save(tmp_path / "m"))
    y = rt.run("m", **{rt.models["m"].inputs[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy().astype("float64")
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
