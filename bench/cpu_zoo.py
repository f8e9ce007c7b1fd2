"""The CPU zoo through ``smelt.bench``: smelt (untuned, and tuned where records apply) beside onnxruntime.

One process, one run per model: each model is built in code (ONNX, fixed seeds), compiled
for the local CPU, checked against onnxruntime and timed (median of ``--repeat`` calls after
a warm-up), with the top kernels of smelt's profile. Prints the markdown table of
``smelt bench --markdown`` and writes every result with ``--json``.
Usage: python bench/cpu_zoo.py [--models resnet50,resnet18,mobilenet,detector,bert_base,minilm,encoder,mlp]
       [--repeat 20] [--tune-log-dir tune_logs] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import onnx

import smelt
from smelt.cli import format_bench
from smelt.examples import zoo

MODELS = {
    "resnet50": lambda d: zoo.resnet(depth=50, size=224),
    "resnet18": lambda d: zoo.resnet(depth=18, size=224),
    "mobilenet": lambda d: zoo.mobilenet(size=224),
    "detector": lambda d: zoo.detector(size=320),
    "bert_base": lambda d: zoo.transformer_encoder(layers=12, seq=128, d_model=768, heads=12, ffn=3072),
    "minilm": lambda d: onnx.load(_minilm(d)),
    "encoder": lambda d: zoo.transformer_encoder(),
    "mlp": lambda d: zoo.mlp(batch=8),
}


def _minilm(d: Path) -> Path:
    from smelt.examples.minilm import export_onnx

    return export_onnx(d / "minilm.onnx", batch=1, seq=128)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tune-log-dir", default="tune_logs")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name not in MODELS:
                sys.exit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(MODELS[name](Path(tmp)), path)
            r = smelt.bench(str(path), "cpu", name=name, tune_log_dir=args.tune_log_dir, repeat=args.repeat,
                            profile=True)
            results.append(r)
            print("\n".join(format_bench([r], top=5)), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps([asdict(x) for x in results], indent=1))
    print("\n".join(format_bench(results, markdown=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
