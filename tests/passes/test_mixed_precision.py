"""ToMixedPrecision: float16/bfloat16 compute, float32 statistics, against onnxruntime.

Tolerance: the largest deviation over the largest reference output. float16 keeps
10 mantissa bits (roundoff 4.9e-4), bfloat16 7 (3.9e-3). Measured here: float16
4.4e-4 to 1.2e-3, bfloat16 3.5e-3 to 5.9e-3; bounds: ~4x that.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import smelt
from smelt.examples import zoo
from smelt.frontend import import_models
from smelt.passes import PassManager, PipelineOptions, Step, ToMixedPrecision, canonicalize_passes

TOL = {"float16": 5e-3, "bfloat16": 2e-2}


def _converted(model, dtype):
    p = ToMixedPrecision(dtype)
    steps = [Step("canonicalize", q) for q in canonicalize_passes(PipelineOptions())] + [Step("quantize", p)]
    return PassManager(steps).run(import_models(model).bind()), p


def _ops(mod):
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            out.append(e)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return out


def test_signature_stays_float32_and_statistics_stay_float32():
    mod, p = _converted(zoo.transformer_encoder(), "float16")
    assert set(p.report.values()) == {"converted to float16"}
    [(gv, f)] = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    assert all(str(v.ty.dtype) == "float32" for v in f.params)
    assert str(f.ret_ty.dtype) == "float32"
    calls = _ops(mod)
    for c in calls:
        if c.op.name in ("relax.nn.softmax", "relax.nn.layer_norm"):
            assert str(c.ty.dtype) == "float32", c.op.name
        if c.op.name == "relax.matmul":
            assert str(c.args[0].ty.dtype) == "float16" and str(c.ty.dtype) == "float32"  # f32 accumulation
    assert any(c.op.name == "relax.nn.softmax" for c in calls)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["mlp", "resnet18", "mobilenet", "encoder"])
def test_zoo_against_onnxruntime_float32(name, dtype, onnx_reference, tmp_path):
    model, feeds = {
        "mlp": (zoo.mlp(), {"features": (1, 64)}),
        "resnet18": (zoo.resnet(18, size=64, classes=100), {"input": (1, 3, 64, 64)}),
        "mobilenet": (zoo.mobilenet(), None),
        "encoder": (zoo.transformer_encoder(), None),
    }[name]
    art = smelt.compile(model, precision=dtype, options=smelt.CompileOptions(tune_log_dir=None))
    ref32 = smelt.compile(model, options=smelt.CompileOptions(tune_log_dir=None))
    assert art.report.weight_bytes < 0.6 * ref32.report.weight_bytes  # weights stored at half width
    rt = smelt.load(art.save(tmp_path / "a"))
    m = next(iter(art.models))
    rng = np.random.default_rng(0)
    inputs = {t.name: rng.standard_normal([int(d) if str(d).isdigit() else 1 for d in t.shape]).astype(t.dtype)
              if t.dtype.startswith("float") else rng.integers(0, 100, [int(d) for d in t.shape]).astype(t.dtype)
              for t in rt.models[m].inputs}
    got = rt.run_named(m, **inputs)
    want = onnx_reference(model, inputs)
    for g, w in zip(got.values(), want):
        assert g.dtype == np.float32
        err = float(np.abs(g - w).max()) / float(np.abs(w).max())
        assert err < TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


def test_cli_precision_is_recorded_in_the_artifact(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from smelt.cli import main

    onnx.save(zoo.mlp(), tmp_path / "mlp.onnx")
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "mlp.onnx"), "--precision", "bf16", "-o",
                                  str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert '"precision": "bfloat16"' in json.dumps(manifest)
    with pytest.raises(smelt.SmeltError, match="precision 'int3'"):
        smelt.compile(zoo.mlp(), precision="int3")
