"""Precision and quantization on a CUDA GPU: smelt fp32, fp16, bf16, INT8, FP8, w8 and w4 beside
torch eager fp32 and torch.compile fp16, one process, one run per model.

Each smelt variant is compiled without tuning records (default schedules), checked
against torch eager float32 on the GPU (largest deviation relative to the largest
output) and timed (median ms); INT8 and FP8 are calibrated on 4 batches of random inputs of the
model's own shape, the same for every variant (minmax). Rows are printed as JSON lines as they
finish, then as a table.
Usage: python bench/gpu_quantize.py [--models resnet50:1,bert:1] [--variants fp32,fp16,bf16,int8,fp8-fp16,w8,w4]
       [--json out.json] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import torch_models  # noqa: E402
from gpu_e2e import smelt_run, torch_ms  # noqa: E402
from gpu_kernels import random_calib  # noqa: E402

import smelt  # noqa: E402

VARIANTS = {  # name -> (precision, quantize factory taking calibration batches)
    "fp32": ("float32", None),
    "fp16": ("float16", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", lambda calib: smelt.Int8(calib=calib, method="minmax")),
    "int8-fp16": ("float16", lambda calib: smelt.Int8(calib=calib, method="minmax")),
    # weight GEMMs on cuBLASLt's FP8 kernels, convs on CUTLASS's (activations FP8 between them),
    # on Hopper the stem too (RewriteConvSpaceToDepth), the rest in float16
    "fp8-fp16": ("float16", lambda calib: smelt.Fp8(calib=calib, method="minmax")),
    # the same with the stem in float16 on cuDNN
    "fp8-f16stem": ("float16", lambda calib: smelt.Fp8(calib=calib, method="minmax", stem=False)),
    # FP8 for the GEMMs only (matmuls, 1x1 convs, with float16 results), the other convs in float16
    "fp8gemm-fp16": ("float16", lambda calib: smelt.Fp8(calib=calib, method="minmax", convs="gemm")),
    "w8": ("float32", lambda calib: smelt.WeightOnly(8, 128)),
    "w4-fp16": ("float16", lambda calib: smelt.WeightOnly(4, 128)),
}


def model(name: str, batch: int):
    if name == "resnet50":
        return torch_models.resnet50(), torch.randn(batch, 3, 224, 224)
    if name == "mobilenetv3":
        return torch_models.mobilenet_v3_large(), torch.randn(batch, 3, 224, 224)
    return torch_models.bert_base(), torch.randn(batch, 128, 768)


def run(name: str, batch: int, variants: list[str], out_dir: Path, emit, compiled: bool = True) -> None:
    module, x = model(name, batch)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gm, gx = module.cuda().eval(), x.cuda()
    with torch.no_grad():
        ref = gm(gx).float().cpu().numpy()
    peak = float(np.abs(ref).max())
    base = {"model": name, "batch": batch}
    emit({**base, "variant": "torch eager fp32", "ms": torch_ms(gm, gx)})
    half, hx = gm.half(), gx.half()
    if compiled:
        emit({**base, "variant": "torch.compile fp16", "ms": torch_ms(torch.compile(half), hx)})
        emit({**base, "variant": "torch.compile reduce-overhead fp16",
              "ms": torch_ms(torch.compile(half, mode="reduce-overhead"), hx)})
    module.float().cpu()
    calib = None  # the same batches for every quantized variant
    for v in variants:
        precision, make = VARIANTS[v]
        if make is not None and calib is None:
            calib = random_calib(name, module, x)
        try:
            r = smelt_run(name, module, x, out_dir, None, precision, make(calib) if make else None)
        except smelt.SmeltError as e:
            emit({**base, "variant": f"smelt {v}", "error": str(e)[:3000]})
            continue
        q = r["quantization"]
        emit({**base, "variant": f"smelt {v}", "ms": r["ms"], "rel_err": float(np.abs(r["y"] - ref).max()) / peak,
              "compile_s": r["compile_s"], "weights_mb": r["weight_bytes"] / 1e6,
              "quantized_layers": len(q.get("quantized", {})), "float_layers": len(q.get("fallback", {}))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:1,bert:1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling per model)")
    args = ap.parse_args()
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for item in args.models.split(","):
            m, _, batch = item.partition(":")
            run(m, int(batch or 1), args.variants.split(","), Path(tmp), emit, not args.no_compile)
    print(f"\n{'model':<10}{'batch':>6}  {'variant':<36}{'ms':>9}{'rel err':>10}{'weights MB':>11}")
    for r in rows:
        err = f"{r['rel_err']:>10.1e}" if "rel_err" in r else f"{'-':>10}"
        mb = f"{r['weights_mb']:>11.1f}" if "weights_mb" in r else f"{'-':>11}"
        ms = f"{r['ms']:>9.3f}" if "ms" in r else f"{'failed':>9}"
        print(f"{r['model']:<10}{r['batch']:>6}  {r['variant']:<36}{ms}{err}{mb}")


if __name__ == "__main__":
    main()
