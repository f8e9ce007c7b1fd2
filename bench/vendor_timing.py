"""Vendor routines with and without a setting (``--env``) on a GPU. Routines time candidates
on a problem's first call (backends/cuda_timer.h); the default ``SMELT_VENDOR_TIMING=0`` turns
that off. Models compile once (float16, ``--quantize fp8``), then run in fresh processes, each
side in turn: median ms, error vs torch fp32; stderr passes through
(SMELT_VENDOR_TIMING=2 SMELT_CUTLASS_VERBOSE=1: times, choices).
Usage: python bench/vendor_timing.py [--models resnet50:32,bert:16] [--rounds 2] [--quantize fp8]
       [--env SMELT_CUTLASS_CANDIDATES=27] [--json F]
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


def build(models: str, out: Path, fp8: bool) -> None:
    import torch
    import torch_models
    from gpu_kernels import random_calib

    import smelt

    for item in models.split(","):
        name, _, batch = item.partition(":")
        m = getattr(torch_models, {"mobilenetv3": "mobilenet_v3_large", "bert": "bert_base"}.get(name, name))()
        x = torch.randn(int(batch or 1), *((128, 768) if name == "bert" else (3, 224, 224)))
        stem = out / item.replace(":", "_")
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            np.save(f"{stem}.ref.npy", m.cuda().eval()(x.cuda()).float().cpu().numpy())
        m.cpu()
        quantize = smelt.Fp8(calib=random_calib(name, m, x), method="minmax") if fp8 else None
        art = smelt.compile([(m, (x,))], target="cuda", names=[name], precision="float16", quantize=quantize,
                            options=smelt.CompileOptions(smelt.TargetOptions("cuda"), tune_log_dir=None))
        art.save(stem, force=True)
        np.save(f"{stem}.npy", x.numpy())


def time_all(out: Path) -> dict:
    import smelt

    res = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        rt = smelt.load(d)
        name = d.name.split("_")[0]
        feeds = {rt.models[name].inputs[0].name: np.load(f"{d}.npy")}
        y, ref = np.asarray(rt.run(name, **feeds)), np.load(f"{d}.ref.npy")  # timing happens here
        ms = 1e3 * statistics.median(rt.time(name, number=50, repeat=7, **feeds))
        res[d.name.replace("_", ":")] = ms, float(np.abs(y - ref).max() / np.abs(ref).max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:32,bert:16,resnet50:1,bert:1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quantize", choices=["fp8"])
    ap.add_argument("--env", default="SMELT_VENDOR_TIMING=0", help="NAME=VALUE[,NAME=VALUE]")
    ap.add_argument("--json")
    ap.add_argument("--time", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        print(json.dumps(time_all(Path(args.time))))
        return
    env = dict(kv.split("=", 1) for kv in args.env.split(","))
    runs = {"env": {}, "plain": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build(args.models, Path(tmp), args.quantize == "fp8")
        for _ in range(args.rounds):
            for side in runs:
                proc = subprocess.run([sys.executable, __file__, "--time", tmp], capture_output=True, text=True,
                                      check=True, env={**os.environ, **(env if side == "env" else {})})
                sys.stderr.write(f"{side}:\n{proc.stderr}")
                for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    runs[side].setdefault(k, []).append(v)
    rows = {k: {s: [statistics.median(c) for c in zip(*runs[s][k])] for s in runs} for k in runs["env"]}
    print(f"model, ms and error with {args.env}, and without")
    for k, r in rows.items():
        print(f"{k:<14}{r['env'][0]:>8.3f}{r['env'][1]:>8.4f}{r['plain'][0]:>8.3f}{r['plain'][1]:>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": args.env, "ms_err": rows}, indent=1))


if __name__ == "__main__":
    main()
