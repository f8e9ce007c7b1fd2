"""Vendor-algorithm timing on and off (``SMELT_VENDOR_TIMING``), same artifacts, on a CUDA GPU.

smelt's cuBLASLt and cuDNN routines time the heuristic's candidate algorithms on a problem's
first call (backends/cuda_timer.h); ``SMELT_VENDOR_TIMING=0`` keeps the heuristic's first. This
compiles ResNet-50, MobileNetV3-Large and BERT-base (float16) once, then times each artifact in fresh processes
that alternate off and on, ``--rounds`` times, and prints the medians side by side.
Usage: python bench/vendor_timing.py [--models resnet50:32,bert:16,resnet50:1,bert:1] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def build(models: str, out: Path) -> None:
    import torch
    import torch_models

    import smelt

    for item in models.split(","):
        name, _, batch = item.partition(":")
        batch = int(batch or 1)
        m = {"resnet50": torch_models.resnet50, "mobilenetv3": torch_models.mobilenet_v3_large,
             "bert": torch_models.bert_base}[name]()
        x = torch.randn(batch, 128, 768) if name == "bert" else torch.randn(batch, 3, 224, 224)
        art = smelt.compile([(m, (x,))], target="cuda", names=[name], precision="float16",
                            options=smelt.CompileOptions(smelt.TargetOptions("cuda"), tune_log_dir=None))
        art.save(out / item.replace(":", "_"), force=True)
        np.save(out / f"{item.replace(':', '_')}.npy", x.numpy())


def time_all(out: Path) -> dict:
    import smelt

    res = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        rt = smelt.load(d)
        name = d.name.split("_")[0]
        feeds = {rt.models[name].inputs[0].name: np.load(f"{d}.npy")}
        rt.run(name, **feeds)  # plans (and timing) happen here, before any capture
        res[d.name.replace("_", ":")] = 1e3 * statistics.median(rt.time(name, number=50, repeat=7, **feeds))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:32,bert:16,resnet50:1,bert:1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # the child: time the artifacts in this folder
    args = ap.parse_args()
    if args.time:
        print(json.dumps(time_all(Path(args.time))))
        return
    runs: dict[str, dict[str, list[float]]] = {"0": {}, "1": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build(args.models, Path(tmp))
        for _ in range(args.rounds):
            for flag in ("0", "1"):
                proc = subprocess.run([sys.executable, __file__, "--time", tmp], capture_output=True, text=True,
                                      check=True, env={**os.environ, "SMELT_VENDOR_TIMING": flag})
                for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    runs[flag].setdefault(k, []).append(v)
    rows = [{"model": k, "heuristic_ms": statistics.median(runs["0"][k]), "timed_ms": statistics.median(runs["1"][k])}
            for k in runs["0"]]
    print(f"{'model':<14}{'heuristic ms':>14}{'timed ms':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<14}{r['heuristic_ms']:>14.3f}{r['timed_ms']:>10.3f}{r['heuristic_ms'] / r['timed_ms']:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
