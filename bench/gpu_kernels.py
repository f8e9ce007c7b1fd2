"""Where GPU time goes, kernel by kernel: smelt beside torch.compile(mode="reduce-overhead").

One process, one run per model: both sides run the same module at fp16 under torch's CUPTI
profiler, which records every kernel the process launches (TVM's too, CUDA-graph replays
included), so both columns come from the device's own timestamps rather than host timers.
For each side: kernels per call, summed kernel time per call, and the top kernels with their
time per call and count. Kernel time leaves out launch gaps; the wall time is printed beside it.
With ``--quantize int8|fp8|fp8-f16stem``, smelt's side is INT8 or FP8 (calibrated on 4 random batches, minmax),
with float16 in between; ``--no-torch`` leaves torch's side out.
Usage: python bench/gpu_kernels.py [--models bert:16,mobilenetv3:32] [--quantize int8|fp8|fp8-f16stem] [--no-torch] [--top 25]
       [--sequence]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import torch_models  # noqa: E402
from cuda_events import cuda_ms  # noqa: E402

import smelt  # noqa: E402

MODELS = {"resnet50": (torch_models.resnet50, (3, 224, 224)), "bert": (torch_models.bert_base, (128, 768)),
          "mobilenetv3": (torch_models.mobilenet_v3_large, (3, 224, 224))}


def kernels(fn, reps: int) -> dict:
    """Kernel time per call of ``fn`` (CUPTI), grouped by kernel name, and the wall time per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / 1e3 / reps, e.count / reps) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    launches = sorted((e.time_range.start, e.key, e.time_range.elapsed_us()) for e in prof.events()
                      if e.device_type == DeviceType.CUDA)
    per_call = len(launches) // reps
    # the last call's kernels in launch order (us each): which layer's kernel takes how long
    sequence = [(key, us) for _, key, us in launches[len(launches) - per_call:]]
    return {"wall_ms": cuda_ms(fn, 20), "kernel_ms": sum(r[1] for r in rows),
            "launches": sum(r[2] for r in rows), "rows": rows, "sequence": sequence}


def random_calib(name: str, module, x, batches: int = 4) -> list[dict]:
    """Calibration data for ``module`` (one input ``x``): ``batches`` random batches of x's shape."""
    input_name = smelt.import_models([(module, (x,))], [name]).models[name].inputs[0].name
    return [{input_name: torch.randn_like(x).numpy()} for _ in range(batches)]


def smelt_side(name: str, module, x, tmp: Path, graphs: bool, scheme: str | None = None) -> dict:
    quantize = None
    if scheme:
        calib = random_calib(name, module, x)
        quantize = smelt.Int8(calib=calib) if scheme == "int8" else \
            smelt.Fp8(calib=calib, stem=False if scheme == "fp8-f16stem" else None)
    art = smelt.compile([(module, (x,))], target="cuda", names=[name], precision="float16", quantize=quantize,
                        options=smelt.CompileOptions(target=smelt.TargetOptions(kind="cuda", cuda_graph=graphs)))
    rt = smelt.load(art.save(tmp / f"{name}-{graphs}", force=True))
    args = rt.device_args(name, {rt.models[name].inputs[0].name: x.numpy()})
    return kernels(lambda: rt.vm[name](*args), reps=10)


def torch_side(module, x) -> dict:
    gm, gx = module.cuda().half(), x.cuda().half()
    ro = torch.compile(gm, mode="reduce-overhead")
    with torch.no_grad():
        return kernels(lambda: ro(gx), reps=10)


def show(label: str, res: dict, top: int) -> None:
    print(f"\n## {label}: wall {res['wall_ms']:.3f} ms, kernel time {res['kernel_ms']:.3f} ms, "
          f"{res['launches']:.0f} kernels per call")
    for key, ms, count in res["rows"][:top]:
        print(f"{ms:9.4f} ms {ms / res['kernel_ms']:6.1%} x{count:<5.0f} {key[:150]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert:16", help="comma-separated MODEL:BATCH, MODEL in " + ", ".join(MODELS))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--quantize", choices=["int8", "fp8", "fp8-f16stem"],
                    help="smelt's side in INT8 or FP8 (float16 in between; fp8-f16stem: the stem in float16)")
    ap.add_argument("--sequence", action="store_true", help="print smelt's kernels of one call in launch order")
    ap.add_argument("--no-torch", action="store_true", help="leave torch.compile's side out")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.models.split(","):
            m, _, batch = item.partition(":")
            make, shape = MODELS[m]
            x = torch.randn(int(batch or 1), *shape)
            res = {f"smelt {args.quantize or ''}".strip(): smelt_side(m, make(), x, Path(tmp), True, args.quantize)}
            if not args.no_torch:
                res["torch.compile ro"] = torch_side(make(), x)
            for label, r in res.items():
                show(f"{item} {label}", r, args.top)
            if args.sequence:
                for key, us in next(iter(res.values()))["sequence"]:
                    print(f"{us:8.1f} us  {key[:110]}")
            out[item] = res
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
