"""The GPU's pooling, depthwise and input-layout rules, old against new, in one process (H200).

Each model is compiled at fp16 with variants of the defaults (``VARIANTS``): ``old`` (SmallReduction
without vectors, no ShortRows), ``new`` (the defaults), ``hwio`` (depthwise weights HWIO, so their
convs take vectors too), ``wide``/``narrow`` (hwio with no / a tighter register budget for windows),
``vec8`` (vectors whatever the thread count), ``occ8k`` (vectors down to 8192 threads), ``oldsr``
(ShortRows only); with ``--quantize fp8`` in FP8 (calibrated on 4 random batches; on Hopper the
stem too, whose space-to-depth kernel ShortRows schedules); the runtimes are then timed in turns
(7 rounds, median) and each output is compared with torch eager fp32.
With ``--kernels N``, each variant also runs under CUPTI (bench/gpu_kernels.py) and the N kernels
whose time moved most between the first variant and each other one are printed.
Usage: python bench/gpu_rule_ab.py resnet50:32:old+new,mobilenetv3:1:old+new+vec8 [--kernels 15]
       [--quantize fp8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import torch_models  # noqa: E402
from gpu_kernels import kernels, random_calib  # noqa: E402

import smelt  # noqa: E402
from smelt.backends import apply_default_schedules as ads  # noqa: E402
from smelt.backends import small_reduction as sr  # noqa: E402
from smelt.backends.cuda import CUDABackend  # noqa: E402
from smelt.backends.short_rows import ShortRows  # noqa: E402
from smelt.passes.convert_conv_layout import ConvertConvLayout  # noqa: E402

MODELS = {"resnet50": (torch_models.resnet50, (3, 224, 224)),
          "mobilenetv3": (torch_models.mobilenet_v3_large, (3, 224, 224))}
# name: (SmallReduction's arguments, ShortRows's (None: off), depthwise weights HWIO)
VARIANTS = {"old": (dict(min_vectors=1 << 62), None, False), "new": ({}, {}, False),
            "hwio": ({}, {}, True), "wide": (dict(max_window_bytes=1 << 30), {}, True),
            "narrow": (dict(max_window_bytes=288), {}, True), "vec8": (dict(min_vectors=0), {}, False),
            "occ8k": (dict(min_vectors=8192), {}, False), "oldsr": (dict(min_vectors=1 << 62), {}, False)}
orig = ads.default_rules
orig_prelegalize = CUDABackend.prelegalize_passes


def use(kw, short, hwio):
    """Make the defaults the variant's: its SmallReduction, its ShortRows or none, its depthwise weight layout."""
    def variant(rule):
        if isinstance(rule, sr.SmallReduction):
            return sr.SmallReduction(**kw)
        return ShortRows(**short) if isinstance(rule, ShortRows) else rule

    def rules():
        return [variant(r) for r in orig() if short is not None or not isinstance(r, ShortRows)]

    def prelegalize(self, target):
        passes = orig_prelegalize(self, target)
        for p in passes:
            if isinstance(p, ConvertConvLayout):
                p.depthwise_kernel_layout = "HWIO" if hwio else p.kernel_layout
        return passes
    ads.default_rules = rules
    CUDABackend.prelegalize_passes = prelegalize

ap = argparse.ArgumentParser()
ap.add_argument("specs", help="comma-separated MODEL:BATCH:VARIANT+VARIANT...")
ap.add_argument("--kernels", type=int, default=0, help="print the N kernels that moved most")
ap.add_argument("--onnx", help="also export each model (float32, at its batch) to ONNX into this folder")
ap.add_argument("--source", help="write each variant's CUDA source into this folder")
ap.add_argument("--quantize", choices=["fp8"], help="compile in FP8 (float16 in between)")
args = ap.parse_args()
out = Path(tempfile.mkdtemp())
if args.onnx:
    Path(args.onnx).mkdir(parents=True, exist_ok=True)
for spec in args.specs.split(","):
    name, b, vs = spec.split(":")
    ctor, shape = MODELS[name]
    torch.manual_seed(0)
    m = ctor().eval()
    x = torch.randn(int(b), *shape)
    with torch.no_grad():
        ref = m.cuda()(x.cuda()).float().cpu().numpy()
    if args.onnx:
        torch.onnx.export(m.cpu(), (x,), f"{args.onnx}/{name}{b}.onnx", dynamo=False)
    rts = {}
    quantize = smelt.Fp8(calib=random_calib(name, m.cpu(), x)) if args.quantize else None
    for v in vs.split("+"):
        use(*VARIANTS[v])
        art = smelt.compile([(m.cpu(), (x,))], target="cuda", names=[name], precision="float16", quantize=quantize)
        art.save(out / f"{name}{b}{v}", force=True)
        rts[v] = smelt.load(out / f"{name}{b}{v}")
        if args.source:
            mods = [art.executable.mod]
            for mod in mods:  # grows while walked: every import, at any depth
                mods.extend(mod.imports)
            Path(args.source).mkdir(parents=True, exist_ok=True)
            (Path(args.source) / f"{name}{b}{v}.cu").write_text(
                "".join(mod.inspect_source("cuda") for mod in mods if mod.kind == "cuda"))
    ads.default_rules, CUDABackend.prelegalize_passes = orig, orig_prelegalize
    xn = x.numpy()
    times = {v: [] for v in rts}
    for rt in rts.values():
        inp = rt.models[name].inputs[0].name
        y = rt.run(name, **{inp: xn})
    for _ in range(7):
        for v, rt in rts.items():
            inp = rt.models[name].inputs[0].name
            times[v].append(statistics.median(rt.time(name, number=20, repeat=3, **{inp: xn})) * 1e3)
    for v, rt in rts.items():
        inp = rt.models[name].inputs[0].name
        y = rt.run(name, **{inp: xn})
        y = np.asarray(y[0] if isinstance(y, (list, tuple)) else y, dtype="float64")
        rel = np.abs(y - ref).max() / np.abs(ref).max()
        print(f"{spec:16s} {v:8s} {statistics.median(times[v]):.4f} ms  rel err {rel:.2e}", flush=True)
    if args.kernels:
        prof = {}
        for v, rt in rts.items():
            dargs = rt.device_args(name, {rt.models[name].inputs[0].name: xn})
            prof[v] = {key: ms for key, ms, _ in kernels(lambda: rt.vm[name](*dargs), reps=10)["rows"]}
        first, *rest = prof
        for v in rest:
            keys = sorted(set(prof[first]) | set(prof[v]),
                          key=lambda k: -abs(prof[v].get(k, 0) - prof[first].get(k, 0)))
            print(f"  kernels {first} -> {v}: total {sum(prof[first].values()):.4f} -> {sum(prof[v].values()):.4f} ms")
            for k in keys[:args.kernels]:
                print(f"  {prof[first].get(k, 0):8.4f} {prof[v].get(k, 0):8.4f} ms  {k[:110]}", flush=True)
