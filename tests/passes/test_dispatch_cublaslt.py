"""DispatchCublasLt: weight GEMMs with their bias, residual and ReLU become cuBLASLt calls.

Structure on the CPU (which chains are taken, which are left and why); a compile for CUDA
whose artifact library exports the GEMM routine; and, on an NVIDIA GPU (marker ``cuda``),
numbers against torch eager float32: float32 GEMMs within 1e-4 of the output's scale
(cuBLASLt's float32 path, no TF32), float16 within 1e-2 (as the other fp16 GPU tests).
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
from smelt.passes.dispatch_cublaslt import DispatchCublasLt
from smelt.passes.epilogue_chains import WORKSPACE_BYTES

M, K, N = 32, 64, 48


def _const(rng, *shape, dtype="float32"):
    return relax.const(rng.standard_normal(shape).astype(dtype))


def _calls(mod, fn="main") -> list[relax.Call]:
    out = []
    relax.analysis.post_order_visit(mod[fn], lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


def _extern_names(mod) -> list[str]:
    return [c.args[0].global_symbol for c in _calls(mod) if isinstance(c.op, tvm.ir.Op)
            and c.op.name == "relax.call_dps_packed"]


def _ops(mod) -> list[str]:
    return [c.op.name for c in _calls(mod) if isinstance(c.op, tvm.ir.Op)]


def _dispatch(mod):
    explain = Explainer("DispatchCublasLt")
    out = DispatchCublasLt(explain)(mod)
    relax.analysis.well_formed(out)  # raises on a malformed module
    return out, explain.lines()


def test_linear_bias_residual_relu_is_one_call():
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, M // 2, K), "float16"))
    r = relax.Var("r", relax.TensorType((2, M // 2, N), "float16"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, _const(rng, K, N, dtype="float16"), out_dtype="float32"))
            y = bb.emit(relax.op.astype(y, "float16"))
            y = bb.emit(relax.op.add(y, _const(rng, N, dtype="float16")))
            y = bb.emit(relax.op.add(r, y))
            y = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(y)
    out, lines = _dispatch(bb.get())
    assert _extern_names(out) == ["smelt_cublaslt_matmul_bias_residual"]
    assert "relax.matmul" not in _ops(out) and "relax.nn.relu" not in _ops(out)
    call = next(c for c in _calls(out) if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed")
    trans_b, epilogue, alpha = (a.value for a in call.args[1].fields[-3:])
    assert (trans_b, epilogue, alpha) == (0, 1, 1.0)
    d, ws = call.ty.fields
    assert [int(v) for v in d.shape.values] == [2, M // 2, N] and str(d.dtype) == "float16"
    assert [int(v) for v in ws.shape.values] == [WORKSPACE_BYTES]
    assert lines == ["DispatchCublasLt: rewrote matmul: matmul + bias + residual + relu to cuBLASLt, K=64 N=48"]


def test_symbolic_leading_dims_and_reshape():
    """x [n, 8, K] with a symbolic n: the matmul, its bias and a reshape to [n * 8, N] are one call
    writing the reshape's symbolic shape; a reshape that moves N off the last axis ends the chain."""
    rng = np.random.default_rng(4)
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 8, K), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, _const(rng, K, N, dtype="float16")))
            y = bb.emit(relax.op.add(y, _const(rng, N, dtype="float16")))
            y = bb.emit(relax.op.reshape(y, (n * 8, N)))
            y = bb.emit(relax.op.reshape(y, (n * 8 * N // 2, 2)))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    out, lines = _dispatch(bb.get())
    assert _extern_names(out) == ["smelt_cublaslt_matmul_bias"]
    call = next(c for c in _calls(out) if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed")
    d, _ = call.ty.fields
    tvm.ir.assert_structural_equal(d.shape, relax.ShapeExpr([n * 8, N]))
    assert _ops(out).count("relax.reshape") == 1
    assert lines == [f"DispatchCublasLt: rewrote matmul: matmul + bias to cuBLASLt, K={K} N={N}"]


def test_transposed_weight_and_float32():
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(x, relax.op.permute_dims(_const(rng, N, K)))))
        bb.emit_func_output(y)
    out, lines = _dispatch(bb.get())
    assert _extern_names(out) == ["smelt_cublaslt_matmul"]
    call = next(c for c in _calls(out) if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed")
    assert int(call.args[1].fields[2].value) == 1  # trans_b
    assert "(weight transposed)" in lines[0]


def test_what_is_left_and_why():
    """Attention's matmul of two activations, an int8 matmul, and a matmul whose result has a
    second user stay; the sum of two weight matmuls is one call with the other as residual."""
    rng = np.random.default_rng(2)
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((4, 16, 8), "float16"))
    k = relax.Var("k", relax.TensorType((4, 8, 16), "float16"))
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [q, k, x]):
        with bb.dataflow():
            att = bb.emit(relax.op.matmul(q, k))
            a = bb.emit(relax.op.matmul(x, _const(rng, K, N)))
            b = bb.emit(relax.op.matmul(x, _const(rng, K, N)))
            s = bb.emit(relax.op.add(a, b))
            c = bb.emit(relax.op.matmul(x, _const(rng, K, N)))
            twice = bb.emit(relax.op.add(relax.op.nn.relu(c), c))
            out = bb.emit_output(relax.Tuple([att, s, twice]))
        bb.emit_func_output(out)
    out, lines = _dispatch(bb.get())
    assert sorted(_extern_names(out)) == ["smelt_cublaslt_matmul", "smelt_cublaslt_matmul",
                                          "smelt_cublaslt_matmul_residual"]
    assert _ops(out).count("relax.matmul") == 1  # attention's
    assert "relax.nn.relu" in _ops(out)  # c has two users: its epilogue stays
    assert any("left matmul: B is computed" in line for line in lines), lines


def test_pointwise_conv_is_a_gemm():
    """A 1x1 NHWC conv (weights and bias behind ConvertConvLayout's permute_dims) with bias,
    residual and ReLU is one call on the [N, K] weight; a 3x3 and a strided 1x1 conv stay."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, K, 1, 1)).astype("float16")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 4, K), "float16"))
    r = relax.Var("r", relax.TensorType((2, 4, 4, N), "float16"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            ohwi = bb.emit(relax.op.permute_dims(relax.const(w), [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.conv2d(x, ohwi, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32"))
            y = bb.emit(relax.op.astype(y, "float16"))
            bias = bb.emit(relax.op.permute_dims(_const(rng, 1, N, 1, 1, dtype="float16"), [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.relu(relax.op.add(r, relax.op.add(y, bias))))
            w3 = _const(rng, N, 3, 3, N, dtype="float16")
            z = bb.emit(relax.op.nn.conv2d(y, w3, padding=1, data_layout="NHWC", kernel_layout="OHWI"))
            z = bb.emit(relax.op.nn.conv2d(z, _const(rng, N, 1, 1, N, dtype="float16"), strides=2,
                                           data_layout="NHWC", kernel_layout="OHWI"))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    # The nested add/relu are bound one per variable, as the importers leave them.
    mod = relax.transform.Normalize()(bb.get())
    out, lines = _dispatch(mod)
    assert _extern_names(out) == ["smelt_cublaslt_matmul_bias_residual"]
    assert _ops(out).count("relax.nn.conv2d") == 2
    call = next(c for c in _calls(out) if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed")
    a, weight, bias_arg = call.args[1].fields[:3]
    np.testing.assert_array_equal(weight.value.numpy(), w.reshape(N, K))
    assert int(call.args[1].fields[-3].value) == 1  # trans_b: the weight is [N, K]
    assert [int(v) for v in call.ty.fields[0].shape.values] == [2, 4, 4, N]
    assert f"DispatchCublasLt: rewrote nn.conv2d: conv2d + bias + residual + relu to cuBLASLt, " \
        f"K={K} N={N} (weight transposed)" in lines, lines
    assert any("a 3x3 kernel is no plain GEMM" in line for line in lines), lines
    assert any("a strided, padded, dilated or grouped 1x1 conv" in line for line in lines), lines


def _mlp(d=256, hidden=512):
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

        def forward(self, x):
            return torch.relu(x + self.down(torch.relu(self.up(x))))

    return Block().eval()


def _bottleneck(c=64, mid=32):
    """ResNet's bottleneck: two 1x1 convs (cuBLASLt, one with the residual) around a 3x3."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv(c, mid, 1), conv(mid, mid, 3, padding=1), conv(mid, c, 1)

        def forward(self, x):
            return torch.relu(x + self.c(torch.relu(self.b(torch.relu(self.a(x))))))

    return Block().eval()


def test_bottleneck_compiles_its_pointwise_convs_to_calls(requires_cuda_compiler):
    art = _compile(_bottleneck(), torch.randn(2, 64, 8, 8), "float16", libs=("cublaslt",))
    taken = [line for line in art.report.explanations if line.startswith("DispatchCublasLt: rewrote nn.conv2d")]
    assert len(taken) == 2, art.report.explanations
    assert sum(rule == "TensorCoreMatmul" for rule in art.report.schedules.values()) == 1  # the 3x3


def _compile(model, x, precision="float32", libs=None):
    opts = smelt.CompileOptions(smelt.TargetOptions("cuda", "sm_90", libs=libs), tune_log_dir=None)
    return smelt.compile([(model, (x,))], target="cuda", names=["m"], precision=precision, options=opts)


def test_symbolic_batch_gemms_are_calls(requires_cuda_compiler):
    """An ONNX MLP with a symbolic batch: its three GEMMs are cuBLASLt calls (the routine reads M
    per call), as with a static one; the result keeps the symbolic shape."""
    from smelt.examples import zoo

    art = smelt.compile([zoo.mlp(batch="N")], target="cuda", arch="sm_90", precision="float16")
    taken = [line for line in art.report.explanations if line.startswith("DispatchCublasLt: rewrote")]
    assert taken == ["DispatchCublasLt: rewrote matmul: matmul + bias + relu to cuBLASLt, K=64 N=256",
                     "DispatchCublasLt: rewrote matmul: matmul + bias + relu to cuBLASLt, K=256 N=256",
                     "DispatchCublasLt: rewrote matmul: matmul + bias to cuBLASLt, K=256 N=10"], taken


def test_artifact_library_carries_the_gemm(requires_cuda_compiler, tmp_path):
    art = _compile(_mlp(), torch.randn(4, 32, 256), "float16")
    assert any(line.startswith("DispatchCublasLt: rewrote") for line in art.report.explanations)
    path = art.save(tmp_path / "m")
    symbols = subprocess.run(["nm", "-D", str(path / "model.so")], capture_output=True, text=True).stdout
    assert "__tvm_ffi_smelt_cublaslt_matmul_bias" in symbols
    # cuDNN is a default library too, but the MLP has no conv: the artifact neither links nor loads it.
    assert smelt.artifact.read_manifest(path)["target"]["libs"] == ["cublaslt"]
    assert "__tvm_ffi_smelt_cudnn_conv2d" not in symbols


def test_libs_none_keeps_generated_kernels(requires_cuda_compiler):
    art = _compile(_mlp(), torch.randn(4, 32, 256), "float16", libs=())
    assert not any("DispatchCublasLt" in line for line in art.report.explanations)
    assert sum(rule == "TensorCoreMatmul" for rule in art.report.schedules.values()) == 2


def test_unknown_lib_is_an_error():
    with pytest.raises(smelt.SmeltError, match="--libs 'cublas': target cuda calls one of cublaslt, cudnn, cutlass"):
        _compile(_mlp(), torch.randn(4, 32, 256), libs=("cublas",))


@pytest.mark.cuda
@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 1e-2)])
@pytest.mark.parametrize("name", ["mlp", "bottleneck"])
def test_matches_torch_on_gpu(tmp_path, name, precision, tol):
    model, x = (_mlp(), torch.randn(4, 32, 256)) if name == "mlp" else (_bottleneck(), torch.randn(4, 64, 14, 14))
    rt = smelt.load(_compile(model, x, precision, libs=("cublaslt",)).save(tmp_path / "m"))
    y = rt.run("m", **{rt.models["m"].inputs[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy().astype("float64")
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
