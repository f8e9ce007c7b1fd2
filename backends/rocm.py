"""ROCm backend: AMDGPU code objects (HSACO) through TVM's LLVM, for --arch gfx90a/gfx942.

Linking needs ld.lld of TVM's LLVM major version (22) and the ROCm device
libraries (ocml/ockl bitcode); both are checked before any work, with the
packages to install in the error.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import tvm
from tvm.relax.backend.rocm import pipeline as _rocm

from ..errors import BackendError
from .base import TargetOptions
from .gpu_schedule import ApplyDefaultSchedules

SUPPORTED_ARCHS = ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950", "gfx1030", "gfx1100")
_INSTALL = "apt-get install rocm-device-libs lld-22, then export ROCM_PATH=/usr/lib/x86_64-linux-gnu"


def _device_lib_dirs() -> list[str]:
    roots = [os.environ.get("ROCM_PATH", ""), "/opt/rocm", "/usr/lib/x86_64-linux-gnu", "/usr/lib"]
    dirs = []
    for r in filter(None, roots):
        dirs += glob.glob(os.path.join(r, "amdgcn", "bitcode")) + glob.glob(os.path.join(r, "lib", "amdgcn", "bitcode"))
    return [d for d in dirs if glob.glob(os.path.join(d, "ocml*.bc"))]


class ROCmBackend:
    name = "rocm"
    description = "AMD GPUs (--arch gfx90a|gfx942): HSACO code objects built by TVM's LLVM and ld.lld"
    requirements = "ld.lld-22 and the ROCm device libraries (" + _INSTALL + ")"
    device_type = "rocm"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        arch = opts.arch or "gfx942"
        if arch not in SUPPORTED_ARCHS:
            raise BackendError(f"--arch {arch!r} is not a supported AMD GPU; supported: {', '.join(SUPPORTED_ARCHS)}")
        from .cpu import host_triple

        return tvm.target.Target({"kind": "rocm", "mcpu": arch},
                                 host={"kind": "llvm", "mtriple": opts.triple or host_triple()})

    def check_toolchain(self, opts: TargetOptions) -> None:
        missing = []
        if not (shutil.which("ld.lld-22") or shutil.which("ld.lld")):
            missing.append("ld.lld-22 (package lld-22)")
        if not _device_lib_dirs():
            missing.append("the ROCm device libraries (package rocm-device-libs)")
        if missing:
            raise BackendError(f"target rocm cannot build here: missing {' and '.join(missing)}; {_INSTALL}")
        if "ROCM_PATH" not in os.environ:
            os.environ["ROCM_PATH"] = str(Path(_device_lib_dirs()[0]).parent.parent)

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules()]

    def lower_passes(self, target):
        return _rocm.dataflow_lower_passes(target) + _rocm.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return {}

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        from .cuda import _walk

        out = []
        for m in _walk(executable.mod):
            if m.kind in ("hsaco", "rocm"):
                for fmt, name in (("asm", "kernels.s"), ("ll", "kernels.ll")):
                    try:
                        text = m.inspect_source(fmt)
                    except Exception:
                        continue
                    if text:
                        (out_dir / name).write_text(text)
                        out.append(out_dir / name)
            elif m.kind == "llvm":
                (out_dir / "host.ll").write_text(m.inspect_source("ll"))
                out.append(out_dir / "host.ll")
        return out
