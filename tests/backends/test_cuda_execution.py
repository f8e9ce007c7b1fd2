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


def test_symbolic_batch_runs_at_several_batches(tmp_path, rng):
    model = zoo.transformer_encoder(layers=1, batch="N")
    art, rt = build_and_load(model, tmp_path)
    assert "cuda_graph" not in art.executable.as_text()
    (name,) = rt.models
    for batch in (1, 3, 2):
        x = rng.standard_normal((batch, 32, 128)).astype("float32")
        check(rt.run(name, hidden=x), ort_outputs(model, {"hidden": x})[0], rtol=2e-3, scale_atol=2e-3)


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
