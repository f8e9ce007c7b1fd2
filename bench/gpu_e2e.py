"""ResNet-50 and a BERT-base encoder on a CUDA GPU: smelt vs torch eager and torch.compile.

One process, one run: compiles each model with smelt for the local GPU without
tuning records and, with ``--tune-log-dir``, again with them; checks each output
against torch eager float32 on the GPU, and prints the median latency of smelt
(untuned, tuned), torch eager and torch.compile side by side. ``--precision float16``
compiles smelt with ``precision="float16"`` and runs torch in half precision.
Usage: python bench/gpu_e2e.py [--models resnet50:1,bert:1,mobilenetv3:32] [--tune-log-dir tune_logs]
       [--precision float16] [--libs none] [--json out.json]
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
from cuda_events import cuda_ms  # noqa: E402

import smelt  # noqa: E402


def torch_ms(fn, x, reps=50) -> float:
    with torch.no_grad():
        return cuda_ms(lambda: fn(x), reps)


def smelt_run(name: str, module: torch.nn.Module, x: torch.Tensor, out_dir: Path, tune_log_dir,
              precision: str, quantize=None, libs=None) -> dict:
    t0 = time.perf_counter()
    art = smelt.compile([(module, (x,))], target="cuda", names=[name], precision=precision, quantize=quantize,
                        options=smelt.CompileOptions(smelt.TargetOptions("cuda", libs=libs), tune_log_dir=tune_log_dir))
    compile_s = time.perf_counter() - t0
    art.save(out_dir / name, force=True)
    rt = smelt.load(out_dir / name)
    xn = x.numpy()
    y = rt.run(name, **{rt.models[name].inputs[0].name: xn})
    ms = 1e3 * statistics.median(rt.time(name, number=20, repeat=5, **{rt.models[name].inputs[0].name: xn}))
    return {"y": y, "ms": ms, "compile_s": round(compile_s, 1), "kernels": art.report.kernels,
            "quantization": art.report.quantization, "weight_bytes": art.report.weight_bytes,
            "tuned_kernels": art.report.tuned_kernels, "fallbacks": art.report.schedule_fallbacks}


def bench(name: str, module: torch.nn.Module, x: torch.Tensor, out_dir: Path, tune_log_dir=None,
          precision: str = "float32", libs=None) -> dict:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    untuned = smelt_run(name, module, x, out_dir, None, precision, libs=libs)
    tuned = smelt_run(name, module, x, out_dir, tune_log_dir, precision, libs=libs) if tune_log_dir else None
    y = (tuned or untuned)["y"]
    gm, gx = module.cuda(), x.cuda()
    with torch.no_grad():
        ref = gm(gx).float().cpu().numpy()
    if precision == "float16":
        gm, gx = gm.half(), gx.half()
    err = float(np.abs(y - ref).max())
    rel = err / float(np.abs(ref).max())
    eager_ms = torch_ms(gm, gx)
    compiled = torch.compile(gm)
    compiled_ms = torch_ms(compiled, gx)
    ro = torch.compile(gm, mode="reduce-overhead")
    ro_ms = torch_ms(ro, gx)
    row = {"model": name, "batch": int(x.shape[0]), "precision": precision, "compile_s": untuned["compile_s"],
           "max_abs_err": err,
           "rel_err": rel, "smelt_ms": untuned["ms"], "torch_eager_ms": eager_ms, "torch_compile_ms": compiled_ms,
           "torch_compile_ro_ms": ro_ms, "kernels": untuned["kernels"], "schedule_fallbacks": untuned["fallbacks"]}
    if tuned:
        t_err = float(np.abs(untuned["y"] - ref).max()) / float(np.abs(ref).max())
        row.update(smelt_tuned_ms=tuned["ms"], tuned_kernels=tuned["tuned_kernels"], untuned_rel_err=t_err)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:1,bert:1",
                    help="comma-separated MODEL:BATCH, MODEL in resnet50, bert, mobilenetv3")
    ap.add_argument("--tune-log-dir", help="also compile with the tuning records in this folder")
    ap.add_argument("--precision", default="float32", choices=["float32", "float16"])
    ap.add_argument("--libs", help="vendor libraries smelt may call (default: the backend's, cublaslt,cudnn); none")
    ap.add_argument("--json")
    args = ap.parse_args()
    libs = None if args.libs is None else () if args.libs == "none" else tuple(args.libs.split(","))
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
            r = bench(m, module, x, Path(tmp), args.tune_log_dir, args.precision, libs)
            r["libs"] = args.libs or "default"
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:  # after every model: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'model':<12}{'batch':>6}{'rel err':>10}{'smelt ms':>10}{'tuned ms':>10}{'tuned':>8}{'eager ms':>10}"
          f"{'compile ms':>11}{'c-ro ms':>9}{'compile s':>10}")
    for r in rows:
        tuned = f"{r['smelt_tuned_ms']:>10.3f}{r['tuned_kernels']:>4}/{r['kernels']:<3}" if "smelt_tuned_ms" in r \
            else f"{'-':>10}{'-':>8}"
        print(f"{r['model']:<12}{r['batch']:>6}{r['rel_err']:>10.1e}{r['smelt_ms']:>10.3f}{tuned}"
              f"{r['torch_eager_ms']:>10.3f}{r['torch_compile_ms']:>11.3f}{r['torch_compile_ro_ms']:>9.3f}"
              f"{r['compile_s']:>10.1f}")


if __name__ == "__main__":
    main()
