"""ROCm backend: AMDGPU code objects (HSACO) through TVM's LLVM, for --arch gfx90a/gfx942/...

Linking needs ld.lld (TVM's LLVM major version, 22, preferred) and the ROCm device
libraries (ocml/ockl bitcode); both are checked before any work, with the packages
to install in the error. The device libraries are handed to TVM from where they
were found (``tvm_callback_rocm_bitcode_path``), so no ROCM_PATH is needed when they
live outside /opt/rocm (Debian/Ubuntu's rocm-device-libs: /usr/lib/x86_64-linux-gnu).

RDNA GPUs (gfx10xx, gfx11xx, gfx12xx) run 32-wide wavefronts, which is what LLVM
compiles for them; TVM's rocm target says 64 for every GPU, and kernels whose
reductions use warp shuffles would then be wrong, so the target says 32 there.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import tvm
import tvm_ffi
from tvm.relax.backend.rocm import pipeline as _rocm
from tvm.support import rocm as _tvm_rocm

from ..errors import BackendError
from .base import TargetOptions, check_libs, module_tree
from .apply_default_schedules import ApplyDefaultSchedules

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950", "gfx1030", "gfx1100")
_INSTALL = "apt-get install rocm-device-libs lld-22 (or install ROCm under /opt/rocm)"


def _device_lib_dirs() -> list[str]:
    """Folders holding the ROCm device bitcode (ocml.bc and friends), ROCM_PATH's first."""
    roots = [os.environ.get("ROCM_PATH", ""), "/opt/rocm", "/usr/lib/x86_64-linux-gnu", "/usr/lib"]
    dirs = []
    for r in filter(None, roots):
        dirs += glob.glob(os.path.join(r, "amdgcn", "bitcode")) + glob.glob(os.path.join(r, "lib", "amdgcn", "bitcode"))
    return [d for d in dict.fromkeys(dirs) if glob.glob(os.path.join(d, "ocml*.bc"))]


def _lld() -> str | None:
    major = tvm.target.codegen.llvm_version_major(allow_none=True)
    names = ([f"ld.lld-{major}"] if major else []) + ["ld.lld"]
    return next(filter(None, map(shutil.which, names)), None)


def wavefront_size(arch: str) -> int:
    """32 for RDNA (gfx10+), 64 for GCN/CDNA (gfx9)."""
    return 32 if re.fullmatch(r"gfx1\d{3}", arch) else 64


class ROCmBackend:
    """AMD GPUs; see the module docstring."""

    name = "rocm"
    description = "AMD GPUs (--arch gfx90a|gfx942|...): HSACO code objects built by TVM's LLVM and ld.lld"
    requirements = "ld.lld-22 and the ROCm device libraries (" + _INSTALL + ")"
    device_type = "rocm"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        check_libs(opts, ())
        arch = opts.arch or _local_arch()
        if arch not in SUPPORTED_ARCHS:
            raise BackendError(f"--arch {arch!r} is not a supported AMD GPU; supported: {', '.join(SUPPORTED_ARCHS)}")
        from .cpu import host_triple

        return tvm.target.Target({"kind": "rocm", "mcpu": arch, "thread_warp_size": wavefront_size(arch)},
                                 host={"kind": "llvm", "mtriple": opts.triple or host_triple()})

    def fp8_unsupported(self, target) -> str:
        return "smelt's FP8 is NVIDIA's E4M3 (float8_e4m3fn); AMD's MI300 multiplies E4M3FNUZ, which smelt does not emit"

    def check_toolchain(self, opts: TargetOptions) -> None:
        missing = []
        if _lld() is None:
            missing.append("ld.lld (package lld-22)")
        dirs = _device_lib_dirs()
        if not dirs:
            missing.append("the ROCm device libraries (package rocm-device-libs)")
        if missing:
            raise BackendError(f"target rocm cannot build here: missing {' and '.join(missing)}; {_INSTALL}")
        _use_device_libs(dirs[0])

    def prelegalize_passes(self, target):
        return []

    def postfuse_passes(self, target):
        return []

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules()]

    def lower_passes(self, target):
        return _rocm.dataflow_lower_passes(target) + _rocm.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return {}

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        """``kernels.s`` (AMDGPU assembly), ``kernels.ll`` (device LLVM IR) and ``host.ll``."""
        out = []
        kernels = [m for m in module_tree(executable.mod) if m.kind in ("hip", "rocm", "hsaco")]
        for i, m in enumerate(kernels):
            for fmt, suffix in (("asm", "s"), ("llvm", "ll")):
                text = m.inspect_source(fmt)
                if not text:
                    log.warning("ROCm module %d kept no %s source (loaded from a binary?); not written", i, fmt)
                    continue
                path = out_dir / f"kernels{i or ''}.{suffix}"
                path.write_text(text)
                out.append(path)
        for m in module_tree(executable.mod):
            if m.kind == "llvm":
                (out_dir / "host.ll").write_text(m.inspect_source("ll"))
                out.append(out_dir / "host.ll")
                break
        return out

    def link_objects(self, target) -> list[Path]:
        return []

    def prepare_run(self, target: dict) -> None:
        pass


def _use_device_libs(folder: str) -> None:
    """Point TVM's AMDGPU codegen at the device bitcode in ``folder``.

    TVM looks only under ROCM_PATH, hipcc's prefix or /opt/rocm, and the codegen calls
    ``tvm_callback_rocm_bitcode_path`` with no arguments, so the folder is bound here.
    """
    def bitcode_path(rocdl_dir=None):
        return _tvm_rocm.callback_rocm_bitcode_path(rocdl_dir or folder)

    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_path, override=True)
    log.debug("ROCm device libraries: %s", folder)


def _local_arch() -> str:
    """The gfx name of the local AMD GPU; BackendError when there is none."""
    if not tvm.rocm(0).exist:
        raise BackendError(f"target rocm needs --arch when no AMD GPU is present; supported: "
                           f"{', '.join(SUPPORTED_ARCHS)}")
    rocminfo = shutil.which("rocminfo") or "/opt/rocm/bin/rocminfo"
    try:
        out = subprocess.run([rocminfo], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendError(f"cannot tell which AMD GPU this is ({rocminfo}: {e}); pass --arch, one of "
                           f"{', '.join(SUPPORTED_ARCHS)}") from None
    found = re.search(r"\bgfx[0-9a-f]+\b", out)
    if not found:
        raise BackendError(f"{rocminfo} names no gfx GPU; pass --arch, one of {', '.join(SUPPORTED_ARCHS)}")
    return found.group(0)
