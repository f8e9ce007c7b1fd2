"""How fast ResNet-50's convolutions could run in FP8 on a Hopper GPU: each layer's fp16 conv (cuDNN)
beside the same GEMM in fp16 (cuBLAS) and in FP8 E4M3 (cuBLASLt, ``torch._scaled_mm``), from one run.

The issue's goal for ResNet-50 at batch 32 is 0.66 ms on an H200 (twice the time of its 262 GFLOP
at ~790 TFLOP/s); in fp16 smelt runs it in about 1.0 ms, of which the convolutions in cuDNN and
cuBLASLt take about 0.9. This script bounds what FP8 kernels could give before any is written.
For every conv of ResNet-50 (NHWC, batch ``--batch``) it times, with CUDA events, median of
``--repeat`` calls after warm-up:
- ``conv fp16``: ``torch.nn.functional.conv2d`` in channels-last fp16 (cuDNN), as smelt calls it;
- ``gemm fp16`` / ``gemm fp8``: the conv's GEMM, M = batch x output pixels, K = C x kh x kw,
  N = output channels, the activations as an [M, K] matrix (for a 3x3 conv that is the im2col
  matrix, 9 times the bytes an implicit-GEMM conv reads from memory: for those layers the
  GEMM is a bound from above, not below, on the memory side);
and sums the layers, each as often as the network has it. The FP8 column is the speed FP8
convolutions with fused epilogues would approach if activations stayed FP8 between layers
(a separate quantize kernel per layer would add its traffic; not counted here).
With ``--cutlass PROBE`` (bench/cutlass_conv_probe.cu, built by bench/build_cutlass_probe.sh on a
machine with nvcc: the GPU machine needs no CUDA toolkit), each layer also runs as CUTLASS's
Hopper implicit-GEMM conv with bias, residual and ReLU fused, FP8 E4M3 in and fp16 or FP8 out,
and INT8 in, fp16 out; the fastest of its six conv tile shapes (FP8 also of eight persistent
conv kernels, for 1x1 stride-1 layers also of ten persistent GEMM kernels, stream-K ones
included) is shown, and its error against an fp32 reference of the same quantized inputs; ``--json`` keeps every kernel's time.
The stem (K = 147) and the classifier are left out; ``--json`` writes the rows.
Usage: python bench/fp8_headroom.py [--batch 32] [--repeat 50] [--cutlass ./probe] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cuda_events import cuda_ms  # noqa: E402
from roofline import resnet50  # noqa: E402


def resnet50_convs(batch: int) -> list[dict]:
    """ResNet-50's convs after the stem (``roofline.resnet50``), one row per shape with its count:
    input size ``h`` (224² images), channels in and out, kernel ``k``, stride, and the GEMM."""
    merged: dict[tuple, dict] = {}

    def hook(mod, inp, _out):
        key = (inp[0].shape[-1], mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0])
        merged.setdefault(key, dict(zip(("h", "c_in", "c_out", "k", "stride"), key), count=0))["count"] += 1

    model = resnet50()
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 3]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    rows = list(merged.values())
    for r in rows:
        ho = r["h"] // r["stride"]
        r.update(batch=batch, m=batch * ho * ho, n=r["c_out"], kdim=r["c_in"] * r["k"] * r["k"],
                 gflop=2 * batch * ho * ho * r["c_out"] * r["c_in"] * r["k"] ** 2 / 1e9)
    return rows


def measure(r: dict, repeat: int) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(r["batch"], r["c_in"], r["h"], r["h"], device=dev, dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(r["c_out"], r["c_in"], r["k"], r["k"], device=dev, dtype=torch.float16) * 0.05)
    w = w.contiguous(memory_format=torch.channels_last)
    pad = r["k"] // 2
    conv = cuda_ms(lambda: torch.nn.functional.conv2d(x, w, stride=r["stride"], padding=pad), repeat)
    a16 = torch.randn(r["m"], r["kdim"], device=dev, dtype=torch.float16)
    b16 = torch.randn(r["n"], r["kdim"], device=dev, dtype=torch.float16) * 0.05
    gemm16 = cuda_ms(lambda: a16 @ b16.t(), repeat)
    a8, b8 = a16.to(torch.float8_e4m3fn), (b16 * 20).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev, dtype=torch.float32)
    gemm8 = cuda_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float16), repeat)
    # the FP8 product against the fp16 one on the same (rounded) values: the call computes what it should
    ref = a8.float() @ b8.float().t()
    got = torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    return dict(r, conv_fp16_ms=conv, gemm_fp16_ms=gemm16, gemm_fp8_ms=gemm8, fp8_rel_err=err)


CUTLASS_VARIANTS = ("e4m3->f16", "e4m3->e4m3", "s8->f16")


def cutlass_times(probe: str, rows: list[dict]) -> None:
    """Adds to each row the probe's best time (ms, over its tiles) and error for each variant."""
    layers = [f"{r['batch']},{r['h']},{r['c_in']},{r['c_out']},{r['k']},{r['stride']}" for r in rows]
    out = subprocess.run([probe, *layers], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{probe} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    for line in out.stdout.splitlines():
        index, variant, tile, ms, err = line.split()
        r, ms = rows[int(index)], float(ms)
        r.setdefault("cutlass_runs", []).append([variant, tile, ms])
        best = r.setdefault("cutlass", {}).get(variant)
        if ms > 0 and (best is None or ms < best["ms"]):
            r["cutlass"][variant] = dict(ms=ms, tile=tile, rel_err=float(err))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--cutlass", metavar="PROBE", help="bench/cutlass_conv_probe.cu, built: time CUTLASS's convs too")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [measure(r, args.repeat) for r in resnet50_convs(args.batch)]
    variants = CUTLASS_VARIANTS if args.cutlass else ()
    if args.cutlass:
        cutlass_times(args.cutlass, rows)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, median ms of "
          f"{args.repeat} calls per layer")
    print(f"{'layer':>28} {'count':>5} {'GFLOP':>7} {'conv fp16':>10} {'gemm fp16':>10} {'gemm fp8':>9}"
          f" {'fp8 TFLOP/s':>11} {'fp8 err':>8}" + "".join(f" {v:>20}" for v in variants))

    def cut(r, v):
        c = r.get("cutlass", {}).get(v)
        return f" {c['ms']:9.4f} ({c['rel_err']:7.1e})" if c else f" {'-':>20}"
    for r in rows:
        name = f"{r['h']}² {r['c_in']}->{r['c_out']} {r['k']}x{r['k']}/{r['stride']}"
        print(f"{name:>28} {r['count']:>5} {r['gflop']:7.2f} {r['conv_fp16_ms']:10.4f} {r['gemm_fp16_ms']:10.4f} "
              f"{r['gemm_fp8_ms']:9.4f} {r['gflop'] / r['gemm_fp8_ms']:11.0f} {r['fp8_rel_err']:8.1e}"
              + "".join(cut(r, v) for v in variants))
    for kind in ("1x1", "3x3"):
        sel = [r for r in rows if f"{r['k']}x{r['k']}" == kind]
        tot = {c: sum(r[c] * r["count"] for r in sel) for c in ("conv_fp16_ms", "gemm_fp16_ms", "gemm_fp8_ms")}
        cuts = "".join(f" {sum(r['cutlass'][v]['ms'] * r['count'] for r in sel):9.4f}{'':11}"
                       if all(v in r.get("cutlass", {}) for r in sel) else f" {'-':>20}" for v in variants)
        print(f"{kind + ' convs, in all':>28} {sum(r['count'] for r in sel):>5} "
              f"{sum(r['gflop'] * r['count'] for r in sel):7.1f} {tot['conv_fp16_ms']:10.4f} "
              f"{tot['gemm_fp16_ms']:10.4f} {tot['gemm_fp8_ms']:9.4f}{'':21}" + cuts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                       "repeat": args.repeat, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
