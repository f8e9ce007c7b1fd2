"""CUDA backend: PTX/cubin for NVIDIA GPUs through nvcc; builds without a GPU.

Default schedules come from dlight (crash-safe, per kernel); CUDA graphs capture
static-shape regions (TVM's RewriteCUDAGraph decides where that is legal).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import tvm
from tvm.relax.backend.cuda import pipeline as _cuda

from ..errors import BackendError
from .base import TargetOptions
from .gpu_schedule import ApplyDefaultSchedules


class CUDABackend:
    name = "cuda"
    description = "NVIDIA GPUs (--arch sm_XX); code built with nvcc, CUDA graphs where shapes are static"
    requirements = "nvcc on PATH (CUDA toolkit) to build; an NVIDIA GPU and driver to run"
    device_type = "cuda"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        arch = opts.arch or _local_arch()
        if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch or ""):
            raise BackendError(f"--arch {arch!r} is not a CUDA architecture; expected sm_XX, e.g. sm_80, sm_90")
        from .cpu import host_triple

        return tvm.target.Target({"kind": "cuda", "arch": arch},
                                 host={"kind": "llvm", "mtriple": opts.triple or host_triple()})

    def check_toolchain(self, opts: TargetOptions) -> None:
        if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
            raise BackendError("target cuda needs nvcc to build: install the CUDA toolkit and put nvcc on PATH")

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules()]

    def lower_passes(self, target):
        return _cuda.dataflow_lower_passes(target) + _cuda.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return {"relax.backend.use_cuda_graph": bool(opts.cuda_graph)}

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        out = []
        for m in _walk(executable.mod):
            if m.kind == "cuda":
                p = out_dir / "kernels.cu"
                p.write_text(m.inspect_source("cu") if "cu" in m.get_write_formats() or True else "")
                out.append(p)
            elif m.kind == "llvm":
                p = out_dir / "host.ll"
                p.write_text(m.inspect_source("ll"))
                out.append(p)
        return out


def _walk(mod):
    for m in mod.imports:
        yield m
        yield from _walk(m)


def _local_arch() -> str:
    dev = tvm.cuda(0)
    if not dev.exist:
        raise BackendError("target cuda needs --arch sm_XX when no GPU is present (e.g. --arch sm_90)")
    return "sm_" + dev.compute_version.replace(".", "")
