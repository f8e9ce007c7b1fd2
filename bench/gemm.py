"""fp16 GEMMs on a CUDA GPU: dlight's default schedule vs smelt's TensorCoreMatmul vs torch.matmul (cuBLAS).

One process, one run: for each M×N×K, legalizes and fuses ``R.matmul(x, w, out_dtype="float32")``
followed by a cast to float16 (fp16 in, fp32 accumulate, fp16 out) into one PrimFunc, schedules it
with dlight's default rules (``apply_default_schedules.default_rules()`` without TensorCoreMatmul) and with
TensorCoreMatmul, builds both for the local GPU, runs them and torch.matmul on the same data, checks
each against torch (max relative error: max |y - ref| / max |ref|) and prints median ms and TFLOP/s
side by side. ``--no-async-copy`` builds without the PassContext option ``tirx.use_async_copy``
(plain copies instead of cp.async), the way the CUDA backend builds today.
Usage: python bench/gemm.py [--shapes 2048x768x3072,2048x3072x768,8192x8192x8192] [--json out.json]

H200 (sm_90), torch 2.11, TVM 0.27, cp.async on: median ms (TFLOP/s); max relative error 0 for both
TVM kernels (tensor cores summing K in order give cuBLAS's fp16 results bit for bit here).
    M x N x K                 dlight     TensorCoreMatmul            cuBLAS  vs cuBLAS
    2048x768x3072      0.160 (   60)      0.043 (  227)      0.039 (  247)        92%
    2048x3072x768      0.125 (   77)      0.034 (  282)      0.036 (  268)       105%
    8192x8192x8192    13.513 (   81)      2.850 (  386)      1.516 (  725)        53%
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

sys.path.insert(0, str(Path(__file__).parent))
from cuda_events import cuda_ms  # noqa: E402

from smelt.backends import cuda as _cuda  # noqa: E402,F401  (registers the nvcc compile callbacks)
from smelt.backends.apply_default_schedules import ApplyDefaultSchedules, default_rules  # noqa: E402
from smelt.backends.tensorcore_matmul import TensorCoreMatmul  # noqa: E402

DEFAULT_SHAPES = "2048x768x3072,2048x3072x768,8192x8192x8192"


def gemm_func(m: int, n: int, k: int) -> tvm.IRModule:
    """The fused matmul + cast PrimFunc, alone in a module."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float16"))
    w = relax.Var("w", relax.TensorType((k, n), "float16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.astype(relax.op.matmul(x, w, out_dtype="float32"), "float16"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    (gv, func), = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return tvm.IRModule({"gemm": func.with_attr("global_symbol", "gemm")})


def build(mod: tvm.IRModule, rules, target, async_copy: bool):
    sched = ApplyDefaultSchedules(rules)
    with target:
        mod = sched(mod)
    with tvm.transform.PassContext(config={"tirx.use_async_copy": async_copy}):
        return tvm.compile(mod, target=target), sched.report["gemm"]


def tvm_ms(lib, dev, args) -> float:
    timer = lib.mod.time_evaluator("gemm", dev, number=20, repeat=7)
    return 1e3 * statistics.median(timer(*args).results)


def bench(m: int, n: int, k: int, target, async_copy: bool) -> dict:
    dev = tvm.cuda(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xt = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
    wt = torch.randn(k, n, device="cuda", dtype=torch.float16, generator=gen)
    ref = torch.matmul(xt, wt)
    ref_np = ref.float().cpu().numpy()
    flop = 2.0 * m * n * k
    row = {"shape": f"{m}x{n}x{k}", "async_copy": async_copy,
           "cublas_ms": cuda_ms(lambda: torch.matmul(xt, wt))}
    x, w = tvm.runtime.tensor(xt.cpu().numpy(), dev), tvm.runtime.tensor(wt.cpu().numpy(), dev)
    mod = gemm_func(m, n, k)
    dlight_rules = [r for r in default_rules() if not isinstance(r, TensorCoreMatmul)]
    for key, rules in (("dlight", dlight_rules), ("smelt", [TensorCoreMatmul(), *dlight_rules])):
        t0 = time.perf_counter()
        lib, rule = build(mod, rules, target, async_copy)
        y = tvm.runtime.empty((m, n), "float16", dev)
        lib["gemm"](x, w, y)
        out = y.numpy().astype(np.float32)
        row[f"{key}_rule"] = rule
        row[f"{key}_build_s"] = round(time.perf_counter() - t0, 1)
        row[f"{key}_rel_err"] = float(np.abs(out - ref_np).max() / np.abs(ref_np).max())
        row[f"{key}_ms"] = tvm_ms(lib, dev, (x, w, y))
    for key in ("dlight", "smelt", "cublas"):
        row[f"{key}_tflops"] = flop / row[f"{key}_ms"] / 1e9
    row["smelt_vs_cublas"] = row["smelt_tflops"] / row["cublas_tflops"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxNxK")
    ap.add_argument("--arch", help="CUDA arch (default: the local GPU's)")
    ap.add_argument("--no-async-copy", action="store_true", help="build without tirx.use_async_copy")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    target = tvm.target.Target({"kind": "cuda", "arch": arch, **_cuda._LIMITS}, host="llvm")
    rows = []
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.lower().split("x"))
        r = bench(m, n, k, target, not args.no_async_copy)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{torch.cuda.get_device_name()} ({arch}), fp16 in, fp32 accumulate, fp16 out; median ms (TFLOP/s)")
    print(f"{'M x N x K':<18}{'dlight':>18}{'TensorCoreMatmul':>20}{'cuBLAS':>18}{'vs cuBLAS':>11}"
          f"{'rel err dlight/smelt':>24}")
    for r in rows:
        cells = "".join(f"{r[k + '_ms']:>9.3f} ({r[k + '_tflops']:>5.0f})" for k in ("dlight", "smelt", "cublas"))
        print(f"{r['shape']:<18}{cells[:18]:>18}{cells[18:36]:>20}{cells[36:]:>18}{r['smelt_vs_cublas']:>10.0%}"
              f"{r['dlight_rel_err']:>12.1e}/{r['smelt_rel_err']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
