"""Artifacts: several models in one, save/load round trip, integrity, input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import smelt
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A ResNet (symbolic batch), an MLP, a transformer block: compiled together, saved."""
    models = [zoo.resnet(18, batch="N", size=32, classes=10, width=16),
              zoo.mlp(batch=2),
              zoo.transformer_encoder(layers=1, seq=8, d_model=32, heads=2, ffn=64)]
    art = smelt.compile(models, target="cpu", names=["cnn", "mlp", "enc"])
    path = art.save(tmp_path_factory.mktemp("art") / "three")
    return models, art, path


def test_each_model_callable_by_name_matches_onnxruntime(three, rng):
    models, _, path = three
    rt = smelt.load(path)
    assert sorted(rt.models) == ["cnn", "enc", "mlp"]
    feeds = {"cnn": {"input": rng.standard_normal((3, 3, 32, 32)).astype("float32")},
             "mlp": {"features": rng.standard_normal((2, 64)).astype("float32")},
             "enc": {"hidden": rng.standard_normal((1, 8, 32)).astype("float32")}}
    for model, name in zip(models, ["cnn", "mlp", "enc"]):
        ref = ort_outputs(model, feeds[name])[0]
        got = rt.run(name, **feeds[name])
        # fp32, other kernels: relative to the output's scale
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_two_models_sharing_weights_store_them_once(tmp_path):
    m = zoo.mlp(batch=1)
    art = smelt.compile([m, m], target="cpu", names=["first", "second"])
    one = smelt.compile([m], target="cpu", names=["only"])
    assert art.report.weight_bytes == one.report.weight_bytes
    assert art.report.weight_bytes_offered == 2 * one.report.weight_bytes
    path = art.save(tmp_path / "shared")
    rt = smelt.load(path)
    x = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(rt.run("first", features=x), rt.run("second", features=x))
    weights = (path / "weights.bin").stat().st_size
    assert weights < 1.01 * one.weights.nbytes + 64 * len(one.weights)


def test_artifact_is_weights_plus_code(three):
    _, art, path = three
    lib = (path / "model.so").stat().st_size
    weights = (path / "weights.bin").stat().st_size
    assert weights <= art.weights.nbytes + 64 * len(art.weights)
    # code only, far below the weights
    assert lib < 2_000_000, lib


def test_manifest_records_models_target_passes_hashes(three):
    _, _, path = three
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == 1 and m["backend"] == "cpu" and m["tvm"]
    assert m["models"]["cnn"]["inputs"][0]["shape"] == ["N", 3, 32, 32]
    assert "FoldBatchNorm" in m["passes"] and "LiftWeights" in m["passes"]
    assert set(m["files"]) == {"model.so", "weights.bin"}


def test_existing_output_needs_force(three, tmp_path):
    _, art, _ = three
    out = art.save(tmp_path / "a")
    with pytest.raises(smelt.ArtifactError, match="exists"):
        art.save(out)
    art.save(out, force=True)
    assert smelt.load(out).models


def test_failed_save_leaves_nothing(three, tmp_path, monkeypatch):
    _, art, _ = three

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(art.executable, "export_library", boom, raising=False)
    with pytest.raises(OSError):
        art.save(tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def _copy(path: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(path, dest)
    return dest


def test_tampered_weights_are_refused(three, tmp_path):
    p = _copy(three[2], tmp_path / "t")
    data = bytearray((p / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (p / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(smelt.ArtifactError, match="weights.bin does not match its SHA-256"):
        smelt.load(p)


def test_version_and_target_mismatch_are_refused(three, tmp_path):
    p = _copy(three[2], tmp_path / "v")
    m = json.loads((p / "manifest.json").read_text())
    m["tvm"] = "0.1.0"
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(smelt.ArtifactError, match="built with TVM 0.1.0"):
        smelt.load(p)
    m["tvm"] = json.loads((three[2] / "manifest.json").read_text())["tvm"]
    m["target"]["mtriple"] = "aarch64-linux-gnu" if "x86_64" in m["target"]["mtriple"] else "x86_64-linux-gnu"
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(smelt.ArtifactError, match="built for"):
        smelt.load(p)


def test_not_an_artifact(tmp_path):
    with pytest.raises(smelt.ArtifactError, match="no such artifact"):
        smelt.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(smelt.ArtifactError, match="not a smelt artifact"):
        smelt.load(tmp_path / "empty")


@pytest.mark.parametrize("feeds, message", [
    ({}, "missing input"),
    ({"input": np.zeros((1, 3, 32, 32), np.float32), "extra": np.zeros(1)}, "unexpected extra"),
    ({"input": np.zeros((1, 3, 32, 32), np.float64)}, "expected dtype float32, got float64"),
    ({"input": np.zeros((1, 3, 31, 32), np.float32)}, r"expected shape \['N', 3, 32, 32\], got \[1, 3, 31, 32\]"),
    ({"input": np.zeros((3, 32, 32), np.float32)}, "expected rank 4"),
])
def test_inputs_are_checked(three, feeds, message):
    rt = smelt.load(three[2])
    with pytest.raises(smelt.InputError, match=message):
        rt.run("cnn", **feeds)


def test_unknown_model_name(three):
    rt = smelt.load(three[2])
    with pytest.raises(smelt.InputError, match="no model 'nope'.*models: cnn, mlp, enc"):
        rt.run("nope")


def test_unknown_target():
    with pytest.raises(smelt.BackendError, match="unknown target 'tpu'; known targets: cpu, cuda, rocm"):
        smelt.compile([zoo.mlp()], target="tpu")


def test_onnx_model_roundtrips_through_file(tmp_path, rng):
    m = zoo.mlp()
    onnx.save(m, tmp_path / "m.onnx")
    art = smelt.compile([str(tmp_path / "m.onnx")], target="cpu")
    assert list(art.models) == ["m"]


def _unary(op: str) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name=op.lower())], op,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_resaved_artifact_runs_new_code_in_same_process(tmp_path):
    x = np.array([-1, 2, -3, 4], np.float32)
    out = tmp_path / "same"
    smelt.compile([_unary("Relu")], names=["f"]).save(out)
    np.testing.assert_array_equal(smelt.load(out).run("f", x=x), np.maximum(x, 0))
    smelt.compile([_unary("Neg")], names=["f"]).save(out, force=True)
    np.testing.assert_array_equal(smelt.load(out).run("f", x=x), -x)


def test_input_shape_keys(tmp_path):
    m = zoo.mlp(batch="B")
    art = smelt.compile([m, m], names=["a", "b"], input_shapes={"a.features": [4, 64]})
    assert art.models["a"].inputs[0].shape == (4, 64) and art.models["b"].inputs[0].shape == ("B", 64)
    with pytest.raises(smelt.SmeltError, match="no model has such an input"):
        smelt.compile([m], names=["a"], input_shapes={"nope": [1, 64]})


@pytest.mark.parametrize("env, want", [({}, None), ({"TVM_NUM_THREADS": "1"}, 1)])
def test_cpu_thread_pool_takes_every_physical_core_unless_told(env, want):
    """TVM alone sizes its pool as half the logical CPUs (1 thread on 2 cores, no SMT)."""
    from smelt.artifact import cpu_threads

    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    code = "import smelt, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    r = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == (want or cpu_threads())
