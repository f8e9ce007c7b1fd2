"""Weight-only int8/int4: packing, the decode+matmul kernel, accuracy against references.

Tolerances: against onnxruntime running the same model with its weights replaced by
their dequantized values (what the kernel must compute exactly), 1e-5 of the largest
output in float32 and 1e-2 with float16 compute (measured 6e-3: activations and each
layer's output round to float16); against the float32 model (random
Gaussian weights, the hard case for 4 bits), relative L2 error within 2 % for w8 and 25 %
for w4 in groups of 32 rows over three layers (measured 0.9 % and 17 %).
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import smelt
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs
from smelt.passes.quantize_weights import dequantize, pack_int4, quantize_groups

OPTS = smelt.CompileOptions(tune_log_dir=None)


def _run(art, tmp_path, feeds, name="m"):
    return np.asarray(smelt.load(art.save(tmp_path / f"art{len(list(tmp_path.iterdir()))}")).run(name, **feeds))


def _dequantized_model(m: onnx.ModelProto, bits: int, group: int) -> onnx.ModelProto:
    """``m`` with every MatMul weight replaced by what weight-only quantization keeps of it."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for init in m.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            g = group if w.shape[0] % group == 0 else w.shape[0]
            init.CopyFrom(numpy_helper.from_array(dequantize(*quantize_groups(w, bits, g)), init.name))
    return m


@pytest.mark.parametrize("k", [64, 65])
def test_int4_packs_two_rows_per_byte_and_unpacks_exactly(k):
    w = np.random.default_rng(0).standard_normal((k, 5)).astype(np.float32)
    q, scale = quantize_groups(w, 4, k if k % 16 else 16)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == ((k // 16 if k % 16 == 0 else 1), 5)
    p = pack_int4(q)
    assert p.dtype == np.uint8 and p.shape == ((k + 1) // 2, 5)
    lo, hi = (p & 15).astype(np.int16) - 8, (p >> 4).astype(np.int16) - 8
    assert (np.stack([lo, hi], 1).reshape(-1, 5)[:k] == q).all()
    # symmetric groups: the error of each weight is at most half a step of its group's scale
    assert np.all(np.abs(dequantize(q, scale) - w) <= np.repeat(scale, k // scale.shape[0], 0) / 2 + 1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_matches_the_dequantized_model_and_shrinks_weights(tmp_path, bits):
    m = zoo.mlp(batch=4, dims=(64, 256, 128, 10))
    feeds = {"features": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    art = smelt.compile([m], names=["m"], quantize=smelt.WeightOnly(bits, group_size=32), options=OPTS)
    got = _run(art, tmp_path, feeds)
    exact = ort_outputs(_dequantized_model(m, bits, 32), feeds)[0]
    ref = ort_outputs(m, feeds)[0]
    peak = np.abs(ref).max()
    assert np.abs(got - exact).max() <= 1e-5 * peak
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"w{bits}: relative error against float32 {rel:.4f}")
    assert rel <= (0.02 if bits == 8 else 0.25)
    q = art.report.quantization
    assert q["scheme"] == f"w{bits}" and len(q["quantized"]) == 3 and not q["skipped"]
    # one kernel per layer: decode, matmul and epilogue fused; no float copy of a weight
    kernels = sorted(art.report.schedules)
    assert len(kernels) == 3 and all(re.fullmatch(r"fused_decode_matmul\d*_add\d*(_relu\d*)?", k) for k in kernels)
    fp32 = smelt.compile([m], names=["m"], options=OPTS).report.weight_bytes
    assert art.report.weight_bytes < (0.30 if bits == 8 else 0.18) * fp32


def test_float16_compute_with_int4_weights(tmp_path):
    m = zoo.mlp(batch=4, dims=(64, 128, 10))
    feeds = {"features": np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)}
    art = smelt.compile([m], names=["m"], precision="float16", quantize=smelt.WeightOnly(4, 32), options=OPTS)
    exact = ort_outputs(_dequantized_model(m, 4, 32), feeds)[0]
    assert np.abs(_run(art, tmp_path, feeds) - exact).max() <= 1e-2 * np.abs(exact).max()
    assert len(art.report.quantization["quantized"]) == 2


def test_group_size_that_does_not_divide_k_falls_back_to_one_scale_per_column(tmp_path, caplog):
    m = zoo.mlp(batch=2, dims=(48, 33, 10))  # K = 48 and 33; groups of 32 fit neither
    feeds = {"features": np.random.default_rng(3).standard_normal((2, 48)).astype(np.float32)}
    with caplog.at_level(logging.INFO, logger="smelt.passes.quantize_weights"):
        art = smelt.compile([m], names=["m"], quantize=smelt.WeightOnly(4, 32), options=OPTS)
    assert "K=48 is not a multiple of group size 32" in caplog.text and "K=33" in caplog.text
    exact = ort_outputs(_dequantized_model(m, 4, 32), feeds)[0]
    assert np.abs(_run(art, tmp_path, feeds) - exact).max() <= 1e-5 * np.abs(exact).max()


def test_merged_models_quantize_every_entry(tmp_path):
    a, b = zoo.mlp(batch=2, seed=0), zoo.mlp(batch=2, seed=1)
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    art = smelt.compile([a, b], names=["a", "b"], merge=True, share_inputs=True, quantize=smelt.WeightOnly(8, 64),
                        options=OPTS)
    assert len(art.report.quantization["quantized"]) == 9 and not art.report.quantization["skipped"]
    rt = smelt.load(art.save(tmp_path / "merged"))
    both = rt.run_all(**{"a.features": x})
    for name, m in (("a", a), ("b", b)):
        exact = ort_outputs(_dequantized_model(m, 8, 64), {"features": x})[0]
        assert np.abs(np.asarray(both[name]) - exact).max() <= 1e-5 * np.abs(exact).max()
        assert np.abs(np.asarray(rt.run(name, features=x)) - exact).max() <= 1e-5 * np.abs(exact).max()


def test_bad_weight_only_options():
    with pytest.raises(smelt.SmeltError, match="weight-only bits 3: expected 4 or 8"):
        smelt.WeightOnly(3)
    with pytest.raises(smelt.SmeltError, match="group size 0"):
        smelt.WeightOnly(4, 0)


def test_cli_weight_only(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    (tmp_path / "m.onnx").write_bytes(zoo.mlp(batch=2).SerializeToString())
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--quantize", "w4",
                                  "--group-size", "64", "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    assert "w4 weight-only (groups of 64 rows): 3 matmuls" in r.output
    assert json.loads((out / "manifest.json").read_text())["options"]["quantize"] == {"scheme": "w4", "group_size": 64}
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"), "--quantize", "w8",
                                  "--calib", str(tmp_path / "m.onnx")])
    assert r.exit_code != 0 and "w8 needs no calibration" in r.output
