"""``smelt bench``: the runners, their errors against the reference, ratios and the kernel profile.

No timing is asserted (speed is shown by running the command, not by tests); what is checked
is that every runner ran on the same inputs and agrees with the reference (relative error
<= 1e-5 for float32), and that the profile names the artifact's kernels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm

import smelt
from smelt.examples import torch_zoo, zoo


def test_onnx_model_against_onnxruntime_with_profile(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(zoo.mlp(batch=8).SerializeToString())
    r = smelt.bench(str(path), name="mlp", tune_log_dir=None, repeat=3, profile=True)
    runners = {t.runner: t for t in r.timings}
    assert set(runners) == {"smelt untuned", "onnxruntime (CPU)"}
    assert runners["smelt untuned"].rel_err <= 1e-5 and runners["onnxruntime (CPU)"].note == "reference"
    assert all(t.ms > 0 for t in r.timings) and set(r.ratios()) == {"onnxruntime (CPU)"}
    kernels = [p.kernel for p in r.profile]
    assert len(kernels) == r.kernels == 3 and all(k.startswith("fused_matmul") for k in kernels)
    assert sum(p.share for p in r.profile) == pytest.approx(1.0)
    assert r.profile == sorted(r.profile, key=lambda p: -p.ms)
    assert all(p.calls == 1 for p in r.profile)  # one call per run each
    # the MLP's layers, 64 -> 256 -> 256 -> 10 at batch 8: input, weight, bias, output
    first = next(p for p in r.profile if p.shapes.startswith("8x64 "))
    assert first.shapes.split(", ")[-1].startswith("8x256 ")
    # its float32 tensors: input 8x64, the weight as packed (64x256), bias 256, output 8x256
    assert first.bytes == 4 * (8 * 64 + 64 * 256 + 256 + 8 * 256)
    assert first.gbps() == pytest.approx(first.bytes / (first.ms * 1e6))


def test_profile_counts_a_kernel_shared_by_layers(tmp_path):
    # two encoder layers of one shape: each kernel serves both, an even number of calls per run
    path = tmp_path / "encoder.onnx"
    path.write_bytes(zoo.transformer_encoder(layers=2).SerializeToString())
    r = smelt.bench(str(path), name="encoder", tune_log_dir=None, repeat=3, profile=True, peers=False)
    assert all(p.calls >= 2 and p.calls % 2 == 0 for p in r.profile), [(p.kernel, p.calls) for p in r.profile]
    assert all(p.shapes and p.ms > 0 for p in r.profile)


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a GPU")
def test_no_gpu_is_said_before_compiling(tmp_path, monkeypatch):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(zoo.mlp().SerializeToString())
    monkeypatch.setattr(smelt.benchmark, "compile", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(smelt.SmeltError, match="no cuda device 0"):
        smelt.bench(str(path), "cuda", tune_log_dir=None)


def test_torch_model_against_eager():
    module, args = torch_zoo.mlp(batch=4)
    r = smelt.bench((module, args), name="tmlp", tune_log_dir=None, repeat=3)
    runners = {t.runner: t for t in r.timings}
    assert runners["torch eager"].note == "reference" and runners["smelt untuned"].rel_err <= 1e-5
    compiled = runners["torch.compile"]
    assert compiled.note.startswith("failed") or compiled.rel_err <= 1e-5


def test_torch_peers_run_in_smelts_precision():
    """With bfloat16, smelt and torch both compute in it; errors against float32 eager stay
    within bfloat16's (8 mantissa bits: 2e-2 of the output's scale), and the caller's module
    stays float32."""
    module, args = torch_zoo.mlp(batch=4)
    opts = smelt.CompileOptions(pipeline=smelt.PipelineOptions(precision="bfloat16"))
    r = smelt.bench((module, args), name="tmlp", tune_log_dir=None, repeat=3, options=opts)
    runners = {t.runner: t for t in r.timings}
    assert r.build == "bfloat16" and "torch eager" not in runners
    assert 0 < runners["smelt untuned"].rel_err <= 2e-2
    assert 0 < runners["torch eager bf16"].rel_err <= 2e-2
    assert next(module.parameters()).dtype == args[0].dtype  # float32


def test_cli_bench_fp8(tmp_path):
    """``smelt bench --quantize fp8 --calib``: smelt's FP8 build against onnxruntime float32."""
    from click.testing import CliRunner

    from smelt.cli import main

    m = zoo.mlp(batch=4, dims=(64, 256, 256, 16))
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", features=rng.standard_normal((16, 64)).astype(np.float32))
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m.onnx"), "--repeat", "2", "--json", "--tune-log-dir", "",
                                  "--quantize", "fp8", "--calib", str(tmp_path / "calib.npz")])
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.output)
    runners = {t["runner"]: t for t in res["timings"]}
    assert res["build"] == "float32, fp8" and 1e-3 < runners["smelt untuned"]["rel_err"] <= 0.1


def test_cli_bench_json_and_markdown(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    path = tmp_path / "m.onnx"
    path.write_bytes(zoo.mlp(batch=2).SerializeToString())
    r = CliRunner().invoke(main, ["bench", str(path), "--repeat", "2", "--json", "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.output)
    assert res["model"] == "m" and "onnxruntime (CPU)" in res["ratios"]
    r = CliRunner().invoke(main, ["bench", str(path), "--repeat", "2", "--markdown", "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("| model | smelt untuned ms | onnxruntime (CPU) ms | best smelt vs peers |")


def test_symbolic_inputs_need_a_shape(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(zoo.mlp(batch="n").SerializeToString())
    with pytest.raises(smelt.SmeltError, match="symbolic shape"):
        smelt.bench(str(path), tune_log_dir=None, repeat=1)
    r = smelt.bench(str(path), tune_log_dir=None, repeat=1, peers=False, input_shapes={"features": [3, 64]})
    assert [t.runner for t in r.timings] == ["smelt untuned"] and np.isfinite(r.timings[0].ms)


@pytest.mark.cuda
def test_cuda_profile_replays_library_and_generated_kernels(tmp_path):
    # the MLP's GEMMs go to cuBLASLt (a workspace among the arguments), the rest to generated kernels
    path = tmp_path / "mlp.onnx"
    path.write_bytes(zoo.mlp(batch=8).SerializeToString())
    r = smelt.bench(str(path), "cuda", name="mlp", tune_log_dir=None, repeat=3, profile=True, peers=False)
    assert r.timings[0].rel_err is None or r.timings[0].rel_err <= 1e-2
    # host functions of shape arithmetic (compute_symbolic_expr) take no tensors: no shapes, no bytes
    assert r.profile and all(p.ms > 0 and p.calls >= 1 and (p.shapes or p.bytes == 0) for p in r.profile)
    assert any(p.kernel.startswith("smelt_cublaslt") and p.shapes for p in r.profile)
    assert sum(p.share for p in r.profile) == pytest.approx(1.0)
