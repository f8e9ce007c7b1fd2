"""ResNet-50 and a BERT-base encoder on a CUDA GPU: smelt vs torch eager and torch.compile.

One process, one run: compiles each model with smelt for the local GPU (fp32, no
tuning records), checks its output against torch eager on the GPU, and prints the
median latency of smelt, torch eager and torch.compile side by side.
Usage: python bench/gpu_e2e.py [--models resnet50:1,bert:1,mobilenetv3:32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import torch_models  # noqa: E402

import smelt  # noqa: E402


def torch_ms(fn, x, reps=50) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(name: str, module: torch.nn.Module, x: torch.Tensor, out_dir: Path) -> dict:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    art = smelt.compile([(module, (x,))], target="cuda", names=[name])
    compile_s = time.perf_counter() - t0
    art.save(out_dir / name, force=True)
    rt = smelt.load(out_dir / name)
    xn = x.numpy()
    y = rt.run(name, **{rt.models[name].inputs[0].name: xn})
    smelt_ms = 1e3 * statistics.median(rt.time(name, number=20, repeat=5, **{rt.models[name].inputs[0].name: xn}))

    gm, gx = module.cuda(), x.cuda()
    with torch.no_grad():
        ref = gm(gx).float().cpu().numpy()
    err = float(np.abs(y - ref).max())
    rel = err / float(np.abs(ref).max())
    eager_ms = torch_ms(gm, gx)
    compiled = torch.compile(gm)
    compiled_ms = torch_ms(compiled, gx)
    ro = torch.compile(gm, mode="reduce-overhead")
    ro_ms = torch_ms(ro, gx)
    return {"model": name, "batch": int(x.shape[0]), "compile_s": round(compile_s, 1), "max_abs_err": err,
            "rel_err": rel, "smelt_ms": smelt_ms, "torch_eager_ms": eager_ms, "torch_compile_ms": compiled_ms,
            "torch_compile_ro_ms": ro_ms, "kernels": art.report.kernels,
            "schedule_fallbacks": art.report.schedule_fallbacks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:1,bert:1",
                    help="comma-separated MODEL:BATCH, MODEL in resnet50, bert, mobilenetv3")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.models.split(","):
            m, _, batch = item.partition(":")
            batch = int(batch or 1)
            if m == "resnet50":
                module, x = torch_models.resnet50(), torch.randn(batch, 3, 224, 224)
            elif m == "mobilenetv3":
                module, x = torch_models.mobilenet_v3_large(), torch.randn(batch, 3, 224, 224)
            else:
                module, x = torch_models.bert_base(), torch.randn(batch, 128, 768)
            r = bench(m, module, x, Path(tmp))
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'model':<10}{'batch':>6}{'rel err':>10}{'smelt ms':>10}{'eager ms':>10}{'compile ms':>11}"
          f"{'c-ro ms':>9}{'compile s':>10}")
    for r in rows:
        print(f"{r['model']:<10}{r['batch']:>6}{r['rel_err']:>10.1e}{r['smelt_ms']:>10.3f}{r['torch_eager_ms']:>10.3f}"
              f"{r['torch_compile_ms']:>11.3f}{r['torch_compile_ro_ms']:>9.3f}{r['compile_s']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
