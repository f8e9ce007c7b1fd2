"""QuantizeFp8: calibrated E4M3 GEMMs.

On the CPU the FP8 graph runs through generated code, so its numbers are checked here: against
an emulation of the same arithmetic with ml_dtypes (within 1e-3 of the output's scale: TVM's
CPU cast rounds some subnormals differently, by half a subnormal step), and end to end against
float32 (cosine >= 0.998, as per-tensor E4M3 keeps MiniLM's embeddings at 0.9978). A compile for
CUDA checks that the GEMMs become cuBLASLt FP8 calls carrying the scales as alpha; on an NVIDIA
GPU (marker ``cuda``) cuBLASLt's results match the CPU's FP8 graph within 2e-2 of the scale
(fp16 outputs and FP8 fast accumulation).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm
from tvm import relax

import smelt
from smelt.examples import zoo
from smelt.passes import ToMixedPrecision
from smelt.passes.quantize_fp8 import E4M3_MAX


def _mlp():
    """Two GEMMs FP8 takes (K 64 and 256) and a head of N=10, which cuBLASLt's FP8 kernels do not."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()


def _batches(n=8, batch=4, seed=0):
    data = np.random.default_rng(seed).standard_normal((n * batch, 64)).astype(np.float32)
    return [{"input": data[i:i + batch]} for i in range(0, n * batch, batch)]


def _compile_mlp(model, target="cpu", precision=None, **fp8):
    x = torch.zeros(4, 64)
    opts = smelt.CompileOptions(tune_log_dir=None)
    return smelt.compile([(model, (x,))], target=target, arch="sm_90" if target == "cuda" else None, names=["m"],
                         precision=precision, quantize=smelt.Fp8(calib=_batches(), **fp8), options=opts)


def _e4m3(x, inv):
    return np.clip(x * np.float32(inv), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _emulate(model, x, calib) -> np.ndarray:
    """The MLP in FP8 as QuantizeFp8 specifies it: minmax activation scales from ``calib`` run in
    float32, per-tensor weight scales, E4M3 rounding of both operands; the head in float32."""
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    amax = [0.0, 0.0]
    for batch in calib:
        h = torch.from_numpy(batch["input"])
        with torch.no_grad():
            for i, lin in enumerate(layers[:2]):
                amax[i] = max(amax[i], float(h.abs().max()))
                h = torch.relu(lin(h))
    h = x
    for i, lin in enumerate(layers):
        w, b = lin.weight.detach().numpy().T, lin.bias.detach().numpy()
        if i < 2:
            inv_x = float(np.float16(E4M3_MAX / amax[i]))
            inv_w = E4M3_MAX / float(np.abs(w).max())
            h = (_e4m3(h, inv_x) @ _e4m3(w, inv_w)) * np.float32(1.0 / (inv_x * inv_w)) + b
            h = np.maximum(h, 0)
        else:
            h = h @ w + b
    return h


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fp8_mlp_matches_an_e4m3_emulation(tmp_path):
    model = _mlp()
    art = _compile_mlp(model)
    q = art.report.quantization
    assert q["scheme"] == "fp8" and q["batches"] == 8 and len(q["quantized"]) == 2, q
    assert list(q["skipped"].values()) == ["K=128, N=10: cuBLASLt's FP8 GEMMs need K a multiple of 16 and N of 8"]
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    y = np.asarray(smelt.load(art.save(tmp_path / "m")).run("m", input=x))
    ref = _emulate(model, x, _batches())
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()
    with torch.no_grad():
        exact = model(torch.from_numpy(x)).numpy()
    assert _cos(y, exact) >= 0.998
    assert np.abs(y - exact).max() > 1e-3 * np.abs(exact).max()  # FP8 did happen


def test_layers_over_the_error_limit_stay_unquantized(tmp_path):
    model = _mlp()
    art = _compile_mlp(model, max_error=0.0)
    q = art.report.quantization
    assert not q["quantized"] and len(q["fallback"]) == 2 and all(v > 0 for v in q["fallback"].values())
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    y = np.asarray(smelt.load(art.save(tmp_path / "m")).run("m", input=x))
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_resnet50_fp8_with_float16_against_onnxruntime(tmp_path):
    """With ``convs="gemm"``, ResNet-50's 1x1 convs and classifier in FP8, the rest in float16: 3x3
    and strided convs are skipped with the reason (every conv but the stem: test_dispatch_cutlass_conv.py)."""
    m = zoo.resnet(50, batch=1, size=64)
    name = m.graph.input[0].name
    rng = np.random.default_rng(0)
    calib = [{name: rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(4)]
    art = smelt.compile([m], names=["m"], precision="float16", quantize=smelt.Fp8(calib=calib, convs="gemm"),
                        options=smelt.CompileOptions(tune_log_dir=None))
    q = art.report.quantization
    assert len(q["quantized"]) == 34 and not q["fallback"], q  # 33 1x1 convs of stride 1 and the classifier
    reasons = set(q["skipped"].values())
    assert any(r.startswith("a 3x3 conv (stride [1, 1])") for r in reasons), reasons
    assert any(r.startswith("a 1x1 conv (stride [2, 2])") for r in reasons), reasons
    x = np.random.default_rng(9).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x})[0]
    y = np.asarray(smelt.load(art.save(tmp_path / "m")).run("m", **{name: x}))
    assert _cos(y, ref) >= 0.998
    assert np.abs(y - ref).max() <= 0.1 * np.abs(ref).max()


class _Projection(torch.nn.Module):
    """A ResNet block whose shortcut is a conv: relu(conv3x3(x) + conv1x1(x)), 16 -> 32 channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(16, 32, 1)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def test_a_projection_shortcut_is_held_in_e4m3(tmp_path):
    """The conv shortcut's result is rounded to E4M3 with its own calibrated scale (conv_shortcuts),
    so that on Hopper its conv writes FP8 and the other conv reads it as an FP8 residual: the
    output matches that arithmetic emulated in numpy."""
    model = _Projection().eval()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)} for _ in range(3)]
    art = smelt.compile([(model, (torch.zeros(2, 16, 8, 8),))], names=["m"], quantize=smelt.Fp8(calib=calib),
                        options=smelt.CompileOptions(tune_log_dir=None))
    q = art.report.quantization
    assert len(q["quantized"]) == 2 and len(q["fp8_shortcuts"]) == 1, q
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    y = np.asarray(smelt.load(art.save(tmp_path / "m")).run("m", x=x))

    def conv(v, layer):
        with torch.no_grad():
            return torch.nn.functional.conv2d(torch.from_numpy(v), torch.from_numpy(layer.weight.numpy()), None,
                                              padding=layer.padding).numpy()

    def fp8_conv(v, layer, inv_x):
        w = layer.weight.detach().numpy()
        inv_w = E4M3_MAX / float(np.abs(w).max())
        with torch.no_grad():
            acc = torch.nn.functional.conv2d(torch.from_numpy(_e4m3(v, inv_x)), torch.from_numpy(_e4m3(w, inv_w)),
                                             None, padding=layer.padding).numpy()
        return acc * np.float32(1.0 / (inv_x * inv_w)) + layer.bias.detach().numpy()[:, None, None]

    def inverse(amax):
        return float(np.float16(E4M3_MAX / amax))

    inv_x = inverse(max(float(np.abs(b["x"]).max()) for b in calib))
    shortcut_amax = max(float(np.abs(conv(b["x"], model.shortcut) +
                                     model.shortcut.bias.detach().numpy()[:, None, None]).max()) for b in calib)
    inv_s = inverse(shortcut_amax)
    ref = np.maximum(fp8_conv(x, model.body, inv_x) + _e4m3(fp8_conv(x, model.shortcut, inv_x), inv_s) / inv_s, 0)
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()
    with torch.no_grad():
        assert _cos(y, model(torch.from_numpy(x)).numpy()) >= 0.998


def test_float16_keeps_the_fp8_accumulator_in_float32():
    """E4M3 products summed over K outgrow float16 (448² per product) before their scale applies:
    ToMixedPrecision leaves the FP8 operands alone and rescales in float32."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    w = np.ones((32, 16), np.float32).astype(ml_dtypes.float8_e4m3fn)
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.astype(relax.op.clip(x, -E4M3_MAX, E4M3_MAX), "float8_e4m3fn"))
            acc = bb.emit(relax.op.matmul(q, relax.const(tvm.runtime.tensor(w)), out_dtype="float32"))
            y = bb.emit(relax.op.multiply(acc, relax.const(np.float32(1e-3))))
            y = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(y)
    out = ToMixedPrecision("float16")(bb.get())
    calls = {}
    relax.analysis.post_order_visit(out["main"], lambda e: calls.setdefault(e.op.name, []).append(e)
                                    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    (matmul,), (multiply,), (relu,) = calls["relax.matmul"], calls["relax.multiply"], calls["relax.nn.relu"]
    assert [str(a.ty.dtype) for a in matmul.args] == ["float8_e4m3fn"] * 2
    assert str(matmul.ty.dtype) == "float32" and str(multiply.ty.dtype) == "float32"
    assert str(relu.ty.dtype) == "float16"


def test_fp8_gemms_become_cublaslt_calls_with_their_scales(requires_cuda_compiler, tmp_path):
    art = _compile_mlp(_mlp(), target="cuda", precision="float16")
    lines = [line for line in art.report.explanations if line.startswith("DispatchCublasLt: rewrote")]
    fp8 = [line for line in lines if " in FP8, alpha " in line]
    assert len(fp8) == 2 and all("matmul + bias + relu to cuBLASLt" in line for line in fp8), lines
    assert any("K=128 N=10" in line and "FP8" not in line for line in lines), lines
    assert len(lines) == 3 and "smelt_cublaslt_matmul_bias" in art.executable.as_text()
    path = art.save(tmp_path / "m")  # links the routine (its FP8 path included)
    assert smelt.artifact.read_manifest(path)["target"]["libs"] == ["cublaslt"]


def test_fp8_options_are_checked():
    with pytest.raises(smelt.SmeltError, match="calibration method 'kl'"):
        smelt.Fp8(calib="x.npz", method="kl")
    with pytest.raises(smelt.SmeltError, match="Fp8\\(convs='1x1'\\): expected one of all, gemm"):
        smelt.Fp8(calib="x.npz", convs="1x1")
    with pytest.raises(smelt.SmeltError, match="FP8 quantization of merged models"):
        smelt.compile([zoo.mlp(), zoo.mlp(seed=1)], names=["a", "b"], merge=True,
                      quantize=smelt.Fp8(calib=_batches()))


@pytest.mark.parametrize("target,arch,why", [
    ("cuda", "sm_80", "FP8 \\(E4M3\\) needs an NVIDIA GPU of sm_89 or newer \\(Ada, Hopper\\), not sm_80"),
    ("rocm", "gfx942", "smelt's FP8 is NVIDIA's E4M3 .*AMD's MI300 multiplies E4M3FNUZ"),
])
def test_targets_without_e4m3_are_a_clear_error(target, arch, why):
    with pytest.raises(smelt.SmeltError, match=f"--quantize fp8 for target {target}: {why}"):
        smelt.compile([(_mlp(), (torch.zeros(4, 64),))], target=target, arch=arch, names=["m"],
                      quantize=smelt.Fp8(calib=_batches()), options=smelt.CompileOptions(tune_log_dir=None))


def test_cli_quantize_fp8(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    m = zoo.mlp(batch=4)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    name = m.graph.input[0].name
    np.savez(tmp_path / "calib.npz", **{name: np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)})
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--quantize", "fp8",
                                  "--calib", str(tmp_path / "calib.npz"), "--fp8-convs", "gemm", "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    assert "fp8 (minmax, 4 calibration batches): 2 layers" in r.output, r.output
    quantize = json.loads((out / "manifest.json").read_text())["options"]["quantize"]
    assert quantize["scheme"] == "fp8" and quantize["convs"] == "gemm"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"), "--quantize", "fp8"])
    assert r.exit_code != 0 and "--quantize fp8 needs --calib" in r.output


def test_cli_fp8_stem(tmp_path):
    """--fp8-stem: the 3-channel stem becomes a 16-channel FP8 conv; the output stays close to
    onnxruntime's float32 (cosine >= 0.99: two FP8 convs on random weights)."""
    from click.testing import CliRunner

    from smelt.cli import main

    m = zoo.resnet(18, batch=2, size=32)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    name = m.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", **{name: x})
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--quantize", "fp8",
                                  "--calib", str(tmp_path / "calib.npz"), "--fp8-stem", "--explain",
                                  "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    assert "RewriteConvSpaceToDepth: rewrote nn.conv2d: 7x7 stride 2 over 3 channels as 4x1 stride 1 over 64" \
        in r.output, r.output
    assert json.loads((out / "manifest.json").read_text())["options"]["quantize"]["stem"] is True
    y = np.asarray(smelt.load(out).run("m", **{name: x[:2]}))
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x[:2]})[0]
    assert _cos(y, ref) >= 0.99


@pytest.mark.cuda
def test_cublaslt_fp8_matches_the_cpu_graph(tmp_path):
    model = _mlp()
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    cpu = np.asarray(smelt.load(_compile_mlp(model).save(tmp_path / "cpu")).run("m", input=x))
    gpu_art = _compile_mlp(model, target="cuda", precision="float16")
    assert sum(" in FP8, alpha " in line for line in gpu_art.report.explanations) == 2
    gpu = np.asarray(smelt.load(gpu_art.save(tmp_path / "gpu")).run("m", input=x))
    assert np.abs(gpu - cpu).max() <= 2e-2 * np.abs(cpu).max()
