"""The command line through click.testing: happy paths and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from smelt import cli
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    onnx.save(zoo.mlp(batch="B"), d / "mlp.onnx")
    onnx.save(zoo.resnet(18, size=32, classes=10, width=8), d / "cnn.onnx")
    return d


@pytest.fixture(scope="module")
def artifact(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "art"
    r = CliRunner().invoke(cli.main, ["compile", str(models / "mlp.onnx"), str(models / "cnn.onnx"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_compile_prints_summary(artifact):
    out, text = artifact
    assert "2 model(s)" in text and "mlp" in text and "cnn" in text
    assert "gone: nn.batch_norm x20" in text
    assert (out / "manifest.json").is_file()


def test_run_writes_output_matching_onnxruntime(artifact, models, tmp_path, rng):
    x = rng.standard_normal((3, 64)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    r = invoke("run", artifact[0], "--model", "mlp", "--input", f"features={tmp_path / 'x.npy'}",
               "--output", tmp_path / "y.npy")
    assert r.exit_code == 0, r.output
    ref = ort_outputs(onnx.load(models / "mlp.onnx"), {"features": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-5, atol=1e-5)


def test_inspect_model_and_artifact(artifact, models):
    r = invoke("inspect", models / "cnn.onnx")
    assert r.exit_code == 0, r.output
    assert "nn.conv2d 20" in r.output and "parameters:" in r.output and "FLOPs" in r.output
    r = invoke("inspect", artifact[0], "--json")
    doc = json.loads(r.output)
    assert doc["verified"] == "ok" and set(doc["models"]) == {"mlp", "cnn"} and doc["backend"] == "cpu"


def test_targets_lists_backends():
    r = invoke("targets")
    assert r.exit_code == 0 and all(t in r.output for t in ("cpu", "cuda", "rocm", "needs:"))


def test_json_compile_and_dump_ir(models, tmp_path):
    r = invoke("compile", models / "mlp.onnx", "-o", tmp_path / "o", "--json", "--dump-ir", tmp_path / "ir",
               "--verify-each")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["manifest"]["models"]["mlp"]["inputs"][0]["shape"] == ["B", 64]
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps[0] == "00-input.py" and any("FoldBatchNorm" in d for d in dumps)


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert "Traceback" not in r.output
    assert any(all(n in ln for n in needles) for ln in lines), r.output


def test_missing_file(tmp_path):
    _one_line_error(invoke("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o"), "nope.onnx", "no such file")


def test_not_onnx_bytes(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(0).bytes(300))
    _one_line_error(invoke("compile", tmp_path / "junk.onnx", "-o", tmp_path / "o"), "junk.onnx", "ONNX")


def test_unknown_target(models, tmp_path):
    _one_line_error(invoke("compile", models / "mlp.onnx", "-t", "tpu", "-o", tmp_path / "o"), "tpu")


def test_libs_the_target_does_not_call(models, tmp_path):
    _one_line_error(invoke("compile", models / "mlp.onnx", "--libs", "cublaslt", "-o", tmp_path / "o"),
                    "--libs 'cublaslt': target cpu calls no libraries")


def test_libs_none(models, tmp_path, requires_cuda_compiler):
    r = invoke("compile", models / "mlp.onnx", "-t", "cuda", "--arch", "sm_90", "--libs", "none", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["target_options"]["libs"] == [] and "libs" not in manifest["target"]


def test_existing_output_without_force(artifact, models):
    _one_line_error(invoke("compile", models / "mlp.onnx", "-o", artifact[0]), "exists", "--force")


def test_wrong_input_shape_and_name(artifact, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 65), np.float32))
    _one_line_error(invoke("run", artifact[0], "-m", "mlp", "-i", f"features={tmp_path / 'bad.npy'}"),
                    "features", "expected shape ['B', 64], got [3, 65]")
    _one_line_error(invoke("run", artifact[0], "-m", "mlp", "-i", f"x={tmp_path / 'bad.npy'}"), "missing features")


def test_tampered_artifact(artifact, tmp_path):
    import shutil

    p = tmp_path / "copy"
    shutil.copytree(artifact[0], p)
    with open(p / "model.so", "ab") as f:
        f.write(b"x")
    _one_line_error(invoke("run", p, "-m", "mlp"), "model.so does not match its SHA-256")


def test_debug_shows_traceback(tmp_path):
    r = invoke("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert r.exit_code != 0 and r.exception is not None


def test_explain_says_why(models, tmp_path):
    r = invoke("compile", models / "cnn.onnx", "-o", tmp_path / "o", "--explain")
    assert r.exit_code == 0, r.output
    assert "FoldBatchNorm: rewrote nn.batch_norm: folded into nn.conv2d (x20)" in r.output
