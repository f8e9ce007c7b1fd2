"""Untuned compile time and artifact size per model on this machine's CPU (and CUDA code
generation, which needs no GPU). One run; prints a table.

Usage: python bench/compile_times.py [--targets cpu,cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx

import smelt
from smelt.examples import zoo

MODELS = {
    "resnet50": lambda: zoo.resnet(50),
    "resnet18": lambda: zoo.resnet(18),
    "mobilenet": lambda: zoo.mobilenet(),
    "bert_base_encoder": lambda: zoo.transformer_encoder(layers=12, seq=128, d_model=768, heads=12, ffn=3072),
    "transformer_small": lambda: zoo.transformer_encoder(),
    "mlp": lambda: zoo.mlp(),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="cpu,cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = MODELS[name]()
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, path, save_as_external_data=model.ByteSize() > 1.9e9)
            for target in args.targets.split(","):
                arch = "sm_90" if target == "cuda" else None
                t0 = time.perf_counter()
                art = smelt.compile([str(path)], target=target, arch=arch)
                seconds = time.perf_counter() - t0
                out = art.save(Path(tmp) / f"{name}-{target}")
                lib = (out / "model.so").stat().st_size
                weights = (out / "weights.bin").stat().st_size
                rows.append({"model": name, "target": target, "compile_s": round(seconds, 2),
                             "phases": {k: round(v, 2) for k, v in art.report.phase_seconds.items()},
                             "onnx_bytes": path.stat().st_size, "weights_bytes": weights, "library_bytes": lib,
                             "weights_in_model": art.weights.nbytes})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<20}{'target':<7}{'compile s':>10}{'onnx MB':>9}{'weights MB':>11}{'code MB':>9}")
    for r in rows:
        print(f"{r['model']:<20}{r['target']:<7}{r['compile_s']:>10.2f}{r['onnx_bytes'] / 1e6:>9.1f}"
              f"{r['weights_bytes'] / 1e6:>11.1f}{r['library_bytes'] / 1e6:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
