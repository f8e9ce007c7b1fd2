"""INT8 on this CPU: smelt against onnxruntime's quantize_static, accuracy and speed, one run.

For each zoo model (random weights, fixed seeds) and calibration method: the same
calibration batches go to smelt (``smelt.Int8``) and to ORT's ``quantize_static``
(QDQ, per-channel int8 weights, int8 activations); both are compared with
onnxruntime float32 on held-out inputs (cosine similarity, largest deviation relative
to the largest output) and timed (median ms), with the float32 runs beside them; all of a
model's runners are timed taking turns, as ``smelt bench`` does (one after another, smelt met
onnxruntime's still-spinning threads: the MLP took 8 ms instead of 0.04).
Usage: python bench/quantize.py [--models resnet18,mlp,encoder (or resnet50)] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import smelt
from smelt.benchmark import time_in_turns
from smelt.examples import zoo
from smelt.examples.reference import ort_quantize_static

MODELS = {"resnet18": lambda: zoo.resnet(18, batch=1, size=112),
          "resnet50": lambda: zoo.resnet(50, batch=1, size=224),
          "mlp": lambda: zoo.mlp(batch=16),
          "encoder": lambda: zoo.transformer_encoder(layers=2, batch=1, seq=32)}


def _shape(m):
    inp = m.graph.input[0]
    return inp.name, [d.dim_value for d in inp.type.tensor_type.shape.dim]


def _score(y, ref) -> dict:
    y, ref = np.ravel(y).astype(np.float64), np.ravel(ref).astype(np.float64)
    return {"cosine": float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref)),
            "rel_err": float(np.abs(y - ref).max() / np.abs(ref).max())}


def run(name: str, methods: list[str], tmp: Path) -> list[dict]:
    m = MODELS[name]()
    inp, shape = _shape(m)
    rng = np.random.default_rng(0)
    calib = [{inp: rng.standard_normal(shape).astype(np.float32)} for _ in range(16)]
    evals = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    path = tmp / f"{name}.onnx"
    path.write_bytes(m.SerializeToString())
    fp32 = ort.InferenceSession(str(path))
    refs = [fp32.run(None, {inp: x})[0] for x in evals]
    base = smelt.compile([str(path)], names=["m"], options=smelt.CompileOptions(tune_log_dir=None))
    rt32 = smelt.load(base.save(tmp / f"{name}_fp32", force=True))
    x0 = {inp: evals[0]}
    calls = {"ort fp32": lambda: fp32.run(None, x0), "smelt fp32": lambda: rt32.run("m", **x0)}
    rows = []
    for method in methods:
        art = smelt.compile([str(path)], names=["m"], quantize=smelt.Int8(calib=calib, method=method),
                            options=smelt.CompileOptions(tune_log_dir=None))
        rt = smelt.load(art.save(tmp / f"{name}_{method}", force=True))
        ys = [np.asarray(rt.run("m", **{inp: x})) for x in evals]
        qpath = tmp / f"{name}_{method}_ort.onnx"
        ort_quantize_static(path, qpath, calib, method)
        qs = ort.InferenceSession(str(qpath))
        os_ = [qs.run(None, {inp: x})[0] for x in evals]
        calls[f"smelt {method}"] = lambda rt=rt: rt.run("m", **x0)
        calls[f"ort {method}"] = lambda qs=qs: qs.run(None, x0)
        s_smelt, s_ort = _score(np.stack(ys), np.stack(refs)), _score(np.stack(os_), np.stack(refs))
        q = art.report.quantization
        rows.append({"model": name, "method": method, "smelt_int8_cosine": s_smelt["cosine"],
                     "smelt_int8_rel_err": s_smelt["rel_err"], "ort_int8_cosine": s_ort["cosine"],
                     "ort_int8_rel_err": s_ort["rel_err"],
                     "layers_int8": len(q["quantized"]), "layers_float32": len(q["fallback"]),
                     "weights_mb": art.report.weight_bytes / 1e6, "weights_fp32_mb": base.report.weight_bytes / 1e6})
    ms = time_in_turns(calls)  # all runners in turns: see smelt.benchmark
    for r in rows:
        r.update(ort_fp32_ms=ms["ort fp32"], smelt_fp32_ms=ms["smelt fp32"], smelt_int8_ms=ms[f"smelt {r['method']}"],
                 ort_int8_ms=ms[f"ort {r['method']}"])
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mlp,encoder")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run(name, args.methods.split(","), Path(tmp))
    print(f"\n{'model':<10}{'method':<12}{'smelt cos':>10}{'ORT cos':>10}{'smelt err':>10}{'ORT err':>10}"
          f"{'int8 layers':>12}{'smelt fp32':>11}{'smelt int8':>11}{'ORT fp32':>9}{'ORT int8':>9}  (ms)")
    for r in rows:
        print(f"{r['model']:<10}{r['method']:<12}{r['smelt_int8_cosine']:>10.5f}{r['ort_int8_cosine']:>10.5f}"
              f"{r['smelt_int8_rel_err']:>10.4f}{r['ort_int8_rel_err']:>10.4f}"
              f"{r['layers_int8']:>6}/{r['layers_int8'] + r['layers_float32']:<5}{r['smelt_fp32_ms']:>11.2f}"
              f"{r['smelt_int8_ms']:>11.2f}{r['ort_fp32_ms']:>9.2f}{r['ort_int8_ms']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
