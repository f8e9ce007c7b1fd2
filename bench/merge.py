"""Compiling models together: separate vs merged, from one run.

1. ``stem``: 4 models sharing a ResNet-50 backbone with different heads. Separate: four
   artifacts, run one after another. Merged: one artifact, ``__all__`` (backbone once).
2. ``copies``: 8 same-architecture models (a ResNet-18-sized CNN; a BERT-small-sized
   encoder) with different weights on one input, batch 1. Sequential: each model's
   function in turn. Fused: ``__all__`` after horizontal fusion.
Prints latency, throughput ratio and weight bytes side by side. Outputs are checked.

Usage: python bench/merge.py [--target cpu|cuda] [--cases stem,copies] [--size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import smelt
from smelt.examples import zoo


def _ms(rt, model, feeds, number) -> float:
    return 1e3 * statistics.median(rt.time(model, number=number, repeat=5, **feeds))


def _dir_bytes(path: Path, name: str = "weights.bin") -> int:
    return (Path(path) / name).stat().st_size


def stem_case(target, arch, size, tmp: Path, number) -> dict:
    names = [f"head{i}" for i in range(4)]
    models = [zoo.resnet(50, size=size, classes=[1000, 100, 10, 2][i], seed=0, head_seed=100 + i) for i in range(4)]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype("float32")
    separate_ms, separate_bytes, refs = 0.0, 0, {}
    for name, m in zip(names, models):
        out = smelt.compile([m], target, arch=arch, names=[name]).save(tmp / f"sep-{name}")
        rt = smelt.load(out)
        separate_ms += _ms(rt, name, {"input": x}, number)
        separate_bytes += _dir_bytes(out)
        refs[name] = rt.run(name, input=x)
    one_ms = separate_ms / 4
    art = smelt.compile(models, target, arch=arch, names=names, merge=True, share_inputs=True)
    out = art.save(tmp / "merged-stem")
    rt = smelt.load(out)
    merged_ms = _ms(rt, "__all__", {"head0.input": x}, number)
    outs = rt.run_all(**{"head0.input": x})
    err = max(float(np.abs(outs[n] - refs[n]).max() / np.abs(refs[n]).max()) for n in names)
    return {"case": "4 heads on one ResNet-50 backbone", "size": size, "separate_ms": separate_ms,
            "one_model_ms": one_ms, "merged_ms": merged_ms, "merged_over_one": merged_ms / one_ms,
            "speedup": separate_ms / merged_ms, "separate_weight_bytes": separate_bytes,
            "merged_weight_bytes": _dir_bytes(out), "max_rel_err": err,
            "shared_flops": art.report.merge.get("shared_flops_fraction")}


def copies_case(kind, target, arch, tmp: Path, number, n=8) -> dict:
    if kind == "cnn":
        models = [zoo.resnet(18, size=224 if target != "cpu" else 112, classes=1000, seed=i) for i in range(n)]
        feeds_one = {"input": np.random.default_rng(0).standard_normal(
            (1, 3, 224 if target != "cpu" else 112, 224 if target != "cpu" else 112)).astype("float32")}
    else:
        models = [zoo.transformer_encoder(layers=4, seq=128, d_model=512, heads=8, ffn=2048, seed=i) for i in range(n)]
        feeds_one = {"hidden": np.random.default_rng(0).standard_normal((1, 128, 512)).astype("float32")}
    names = [f"{kind}{i}" for i in range(n)]
    art = smelt.compile(models, target, arch=arch, names=names, merge=True, share_inputs=True)
    rt = smelt.load(art.save(tmp / f"copies-{kind}"))
    sequential_ms = sum(_ms(rt, name, feeds_one, number) for name in names)
    (inp,) = feeds_one
    fused_ms = _ms(rt, "__all__", {f"{names[0]}.{inp}": feeds_one[inp]}, number)
    outs = rt.run_all(**{f"{names[0]}.{inp}": feeds_one[inp]})
    err = max(float(np.abs(outs[nm] - rt.run(nm, **feeds_one)).max() / np.abs(outs[nm]).max()) for nm in names)
    h = art.report.merge.get("horizontal", {})
    return {"case": f"{n} x {'ResNet-18-sized CNN' if kind == 'cnn' else 'BERT-small-sized encoder (4x512)'}",
            "sequential_ms": sequential_ms, "fused_ms": fused_ms, "throughput_gain": sequential_ms / fused_ms,
            "kernels": art.report.kernels, "max_rel_err": err, "horizontal": h}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--arch")
    ap.add_argument("--cases", default="stem,copies")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--number", type=int, default=0, help="runs per timing (default: 1 on cpu, 20 on gpu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    number = args.number or (1 if args.target == "cpu" else 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "stem" in args.cases:
            rows.append(stem_case(args.target, args.arch, args.size, tmp, number))
            print(json.dumps(rows[-1]), flush=True)
        if "copies" in args.cases:
            for kind in ("cnn", "encoder"):
                rows.append(copies_case(kind, args.target, args.arch, tmp, number))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\ntarget {args.target}")
    for r in rows:
        if "merged_ms" in r:
            print(f"{r['case']}: separate {r['separate_ms']:.2f} ms (one model {r['one_model_ms']:.2f} ms), merged "
                  f"{r['merged_ms']:.2f} ms = {r['merged_over_one']:.2f}x one model; weights "
                  f"{r['separate_weight_bytes'] / 1e6:.1f} MB separate vs {r['merged_weight_bytes'] / 1e6:.1f} MB merged")
        else:
            print(f"{r['case']}: sequential {r['sequential_ms']:.2f} ms, fused {r['fused_ms']:.2f} ms = "
                  f"{r['throughput_gain']:.2f}x throughput")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
