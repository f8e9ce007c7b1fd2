"""Tune benchmark models and print trials per minute and where the time went.

One process: builds the models (those of ``gpu_e2e.py`` with the same shapes, so the
records apply there, or zoo ONNX models), runs ``smelt.autotune.tune`` with a
wall-time budget on the local GPU(s) or CPU, and prints the report:
new trials, trials/minute, MetaSchedule's profile (building, measuring, search) and
the estimated model latency with default schedules and tuned.
``--stock`` measures what stock MetaSchedule gets instead: TVM's ``LocalBuilder`` (a
fresh worker pool per batch) and ``LocalRunner`` (waits for every candidate, so nothing
overlaps measuring), the baseline smelt's builder and runners replace.
Usage: python bench/tune_throughput.py --models resnet50:1,bert:1 --time 300 [--devices 0,1] [--json out.json]
       [--precision float16] [--trials-per-task 64]
       python bench/tune_throughput.py --target cpu --models zoo-resnet18:1 --time 180 [--stock]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from smelt import autotune
from smelt.examples import zoo

tune_mod = importlib.import_module("smelt.autotune.tune")  # the module; ``autotune.tune`` is the function


def models(spec: str) -> tuple[list, list[str]]:
    out, names = [], []
    for item in spec.split(","):
        m, _, batch = item.partition(":")
        batch = int(batch or 1)
        names.append(f"{m}_b{batch}")
        if m.startswith("zoo-resnet"):
            out.append(zoo.resnet(int(m[len("zoo-resnet"):]), batch=batch, size=112))
            continue
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        import torch_models

        module, x = {"resnet50": lambda: (torch_models.resnet50(), torch.randn(batch, 3, 224, 224)),
                     "mobilenetv3": lambda: (torch_models.mobilenet_v3_large(), torch.randn(batch, 3, 224, 224)),
                     "bert": lambda: (torch_models.bert_base(), torch.randn(batch, 128, 768))}[m]()
        out.append((module, (x,)))
    return out, names


class _StockBuilder:
    """TVM's LocalBuilder behind the interface ``tune`` expects of its builder."""

    def __new__(cls, workers=None, timeout=60.0, config=None):
        from tvm.s_tir import meta_schedule as ms

        b = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout)
        b.workers = b.max_workers
        b.shutdown = lambda: None
        return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50:1,bert:1")
    ap.add_argument("--log-dir", default="tune_logs")
    ap.add_argument("--time", type=float, default=300, help="seconds")
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--trials-per-task", type=int, help="at most this many new trials per task")
    ap.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="tune what smelt.compile(precision=...) builds (gpu_e2e.py --precision)")
    ap.add_argument("--devices", default="", help="local GPUs, e.g. 0,1 (default: this process measures on GPU 0)")
    ap.add_argument("--target", default="cuda", choices=["cuda", "cpu", "rocm"])
    ap.add_argument("--arch", help="default: the local GPU's or CPU's")
    ap.add_argument("--stock", action="store_true", help="TVM's LocalBuilder instead of smelt's")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    if args.stock:
        from tvm.s_tir import meta_schedule as ms

        tune_mod.PersistentBuilder = _StockBuilder
        tune_mod.measuring = lambda target, **kw: (ms.runner.LocalRunner(timeout_sec=kw["timeout"]), 1)
    built, names = models(args.models)
    opts = autotune.TuneOptions(trials=args.trials, trials_per_task=args.trials_per_task, seconds=args.time,
                                progress=False,
                                devices=tuple(int(d) for d in args.devices.split(",") if d))
    rep = autotune.tune(built, args.target, args.arch, names=names, log_dir=args.log_dir, options=opts,
                        precision=args.precision)
    row = {"models": args.models, "builder": "stock LocalBuilder+LocalRunner" if args.stock else "smelt",
           **rep.to_json()}
    phases = sorted(((k, v) for k, v in rep.phase_seconds.items() if k != "Total"), key=lambda kv: -kv[1])[:5]
    print(f"{row['builder']}: {rep.new_trials} new trials in {rep.tuning_seconds:.0f} s of tuning = "
          f"{rep.trials_per_minute:.1f} trials/min on {rep.devices} device(s); {len(rep.tasks)} tasks")
    print("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases))
    if rep.default_estimate_s and rep.tuned_estimate_s:
        print(f"  estimated latency: default {rep.default_estimate_s * 1e3:.3f} ms -> tuned "
              f"{rep.tuned_estimate_s * 1e3:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
