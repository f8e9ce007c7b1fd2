"""CUDA backend on a GPU: compiled for the local GPU (``arch=None``), saved, loaded, compared to onnxruntime.

Marked ``cuda``: skipped without an NVIDIA GPU. Tolerances are relative to each
output's scale: fp32 kernels with a different summation order and nvcc/NVRTC fast
math (``__expf`` in softmax, ``erff`` in GELU) against onnxruntime's CPU kernels.
Each static-shape model runs twice with different inputs: the second call replays
the captured CUDA graph, which must read the new input, not the first one.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import smelt
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs

pytestmark = pytest.mark.cuda


def build_and_load(model, tmp_path):
    art = smelt.compile([model], target="cuda")
    dev = tvm.cuda(0)
    assert str(art.target.attrs["arch"]) == "sm_" + dev.compute_version.replace(".", "")
    return art, smelt.load(art.save(tmp_path / "art"))


def check(got, ref, rtol, scale_atol):
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=scale_atol * float(np.abs(ref).max()))


def test_resnet18_matches_onnxruntime(tmp_path, rng):
    model = zoo.resnet(18, size=32)
    art, rt = build_and_load(model, tmp_path)
    assert "vm.builtin.cuda_graph.run_or_capture" in art.executable.as_text()
    (name,) = rt.models
    for _ in range(3):  # capture, then replays
        x = rng.standard_normal((1, 3, 32, 32)).astype("float32")
        check(rt.run(name, input=x), ort_outputs(model, {"input": x})[0], rtol=1e-3, scale_atol=1e-3)


def test_transformer_encoder_matches_onnxruntime(tmp_path, rng):
    model = zoo.transformer_encoder()
    _, rt = build_and_load(model, tmp_path)
    (name,) = rt.models
    for _ in range(3):
        x = rng.standard_normal((1, 32, 128)).astype("float32")
        check(rt.run(name, hidden=x), ort_outputs(model, {"hidden": x})[0], rtol=2e-3, scale_atol=2e-3)


@pytest.mark.parametrize("name,library", [("encoder", "DispatchCublasLt"), ("resnet18", "DispatchCudnn")])
def test_symbolic_batch_runs_at_several_batches(tmp_path, rng, name, library):
    """A symbolic batch: the GEMMs (cuBLASLt) and convs (cuDNN) read it per call."""
    model, shape = (zoo.transformer_encoder(layers=1, batch="N"), (32, 128)) if name == "encoder" else \
        (zoo.resnet(18, batch="N", size=32), (3, 32, 32))
    art, rt = build_and_load(model, tmp_path)
    assert "cuda_graph.run_or_capture" not in art.executable.as_text()  # a capture replays one batch
    assert any(line.startswith(f"{library}: rewrote") for line in art.report.explanations)
    (fn,) = rt.models
    (inp,) = rt.models[fn].inputs
    for batch in (1, 3, 2):
        x = rng.standard_normal((batch, *shape)).astype("float32")
        check(rt.run(fn, **{inp.name: x}), ort_outputs(model, {inp.name: x})[0], rtol=2e-3, scale_atol=2e-3)


def test_artifact_built_without_a_gpu_compiles_when_loaded(tmp_path, rng, monkeypatch):
    """What a build machine without a GPU writes (the CUDA C, forced here through TVM's
    TVM_COMPILE_FORCE_FALLBACK) is compiled when loaded, for the arch it names."""
    model = zoo.transformer_encoder(layers=1)
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    monkeypatch.setenv("TVM_COMPILE_FORCE_FALLBACK", "1")
    art = smelt.compile([model], target="cuda", arch=arch)
    path = art.save(tmp_path / "art")
    monkeypatch.delenv("TVM_COMPILE_FORCE_FALLBACK")
    assert f"// smelt-cuda-arch: {arch}".encode() in (path / "model.so").read_bytes()
    rt = smelt.load(path)
    (name,) = rt.models
    for _ in range(2):
        x = rng.standard_normal((1, 32, 128)).astype("float32")
        check(rt.run(name, hidden=x), ort_outputs(model, {"hidden": x})[0],
              rtol=2e-3, scale_atol=2e-3)


def test_kernels_built_with_nvcc_when_nvrtc_is_missing(tmp_path, rng, monkeypatch):
    from smelt.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "_has_nvrtc", lambda: False)
    model = zoo.transformer_encoder(layers=1)
    _, rt = build_and_load(model, tmp_path)
    assert b"\x50\xed\x55\xba" in (tmp_path / "art" / "model.so").read_bytes()  # nvcc's fatbin magic
    (name,) = rt.models
    x = rng.standard_normal((1, 32, 128)).astype("float32")
    check(rt.run(name, hidden=x), ort_outputs(model, {"hidden": x})[0], rtol=2e-3, scale_atol=2e-3)


def _conv_model(cin, cout, k, stride, groups, size):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((cout, cin // groups, k, k)).astype("float32") * 0.1
    b = np.random.default_rng(2).standard_normal(cout).astype("float32")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[k // 2] * 4, group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    out = (size + 2 * (k // 2) - k) // stride + 1
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out, out])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("cin, cout, k, stride, groups, size", [
    (64, 64, 3, 1, 1, 28), (512, 512, 3, 1, 8, 14), (512, 512, 1, 1, 8, 14), (256, 512, 3, 2, 8, 28),
    (24, 24, 3, 1, 8, 56), (96, 96, 3, 1, 96, 28)])
def test_convolutions_match_onnxruntime(tmp_path, rng, cin, cout, k, stride, groups, size):
    """Plain, grouped (what horizontal fusion of 8 models makes) and depthwise convs."""
    model = _conv_model(cin, cout, k, stride, groups, size)
    art, rt = build_and_load(model, tmp_path)
    x = rng.standard_normal((1, cin, size, size)).astype("float32")
    ref = ort_outputs(model, {"x": x})[0]
    got = rt.run(next(iter(rt.models)), x=x)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err < 1e-3, f"relative error {err:.2e}; schedules {art.report.schedules}"


def test_eight_merged_cnns_match_each_model(tmp_path, rng):
    models = [zoo.resnet(18, size=64, classes=10, seed=i) for i in range(8)]
    names = [f"m{i}" for i in range(8)]
    art = smelt.compile(models, target="cuda", names=names, merge=True, share_inputs=True)
    rt = smelt.load(art.save(tmp_path / "eight"))
    x = rng.standard_normal((1, 3, 64, 64)).astype("float32")
    outs = rt.run_all(**{"m0.input": x})
    for name, model in zip(names, models):
        ref = ort_outputs(model, {"input": x})[0]
        check(outs[name], ref, rtol=1e-3, scale_atol=1e-3)


@pytest.mark.parametrize("precision,tol", [("float16", 5e-3), ("bfloat16", 2e-2)])  # as on the CPU
@pytest.mark.parametrize("name", ["resnet18", "encoder", "mobilenet", "ffn_split_k"])
def test_reduced_precision_against_onnxruntime_float32(name, precision, tol, tmp_path, rng):
    model, shape, inp = {"resnet18": (zoo.resnet(18, size=32), (1, 3, 32, 32), "input"),
                         # a BERT FFN at batch 1: its 3072-long down-projection splits K (SplitKMatmul)
                         "ffn_split_k": (zoo.mlp(batch=128, dims=(768, 3072, 768)), (128, 768), "features"),
                         "encoder": (zoo.transformer_encoder(), (1, 32, 128), "hidden"),
                         "mobilenet": (zoo.mobilenet(batch=8), (8, 3, 224, 224), "input")}[name]
    art = smelt.compile([model], target="cuda", precision=precision, options=smelt.CompileOptions(tune_log_dir=None))
    rt = smelt.load(art.save(tmp_path / "art"))
    (m,) = rt.models
    x = rng.standard_normal(shape).astype("float32")
    got, ref = rt.run(m, **{inp: x}), ort_outputs(model, {inp: x})[0]
    err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
    assert got.dtype == np.float32 and err < tol, f"{name} {precision}: relative error {err:.2e}"
