"""CUDA backend: kernels for NVIDIA GPUs (--arch sm_XX); builds without a GPU.

Default schedules come from dlight (crash-safe, per kernel); CUDA graphs capture
static-shape regions (TVM's RewriteCUDAGraph decides where that is legal).

Where the code is compiled: TVM 0.27 turns the generated CUDA C into a cubin at
build time only when its CUDA runtime is loaded (a machine with a driver). Without
one the module keeps the CUDA C and the GPU machine compiles it when the artifact
is loaded. Either way the compiler is TVM's ``tvm_callback_cuda_compile``; smelt
replaces it (``_compile_cuda``) so that nvcc is used when NVRTC's Python bindings
(``cuda-bindings``) are missing: TVM's own callback insists on NVRTC and fails with
"the cuda-bindings package is not available" even with nvcc on PATH.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import tvm
import tvm_ffi
from tvm.relax.backend.cuda import pipeline as _cuda
from tvm.support import nvcc as _nvcc

from ..errors import BackendError
from .base import TargetOptions, module_tree
from .gpu_schedule import ApplyDefaultSchedules

log = logging.getLogger(__name__)

ARCH_FORMS = "sm_XX or sm_XXa/sm_XXf (e.g. sm_80, sm_89, sm_90, sm_90a, sm_100a)"
_ARCH = re.compile(r"sm_(\d{2,3})([af]?)")
# Limits every CUDA GPU since Kepler guarantees (TVM's own target tags use the same);
# dlight reads them and warns when they are missing.
_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32,
           "registers_per_block": 65536}


class CUDABackend:
    """NVIDIA GPUs; see the module docstring."""

    name = "cuda"
    description = "NVIDIA GPUs (--arch sm_XX); code built with nvcc, CUDA graphs where shapes are static"
    requirements = "nvcc on PATH (CUDA toolkit) or NVRTC (pip install cuda-bindings) to build; " \
                   "an NVIDIA GPU and driver to run"
    device_type = "cuda"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        arch = opts.arch or _local_arch()
        if not _ARCH.fullmatch(arch):
            raise BackendError(f"--arch {arch!r} is not a CUDA architecture; expected {ARCH_FORMS}")
        from .cpu import host_triple

        return tvm.target.Target({"kind": "cuda", "arch": arch, **_LIMITS},
                                 host={"kind": "llvm", "mtriple": opts.triple or host_triple()})

    def check_toolchain(self, opts: TargetOptions) -> None:
        nvcc = shutil.which("nvcc")
        if nvcc is None and not _has_nvrtc():
            hint = " (/usr/local/cuda/bin/nvcc exists: add /usr/local/cuda/bin to PATH)" \
                if Path("/usr/local/cuda/bin/nvcc").exists() else ""
            raise BackendError("target cuda needs a CUDA compiler: nvcc on PATH (install the CUDA toolkit)"
                               f"{hint} or NVRTC (pip install cuda-bindings)")
        arch = opts.arch
        if arch and nvcc:
            known = _nvcc_archs(nvcc)
            m = _ARCH.fullmatch(arch)
            if known and m and f"sm_{m.group(1)}" not in known:
                raise BackendError(f"--arch {arch!r} is not supported by {nvcc}; it builds for "
                                   f"{', '.join(known)}")

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules()]

    def lower_passes(self, target):
        return _cuda.dataflow_lower_passes(target) + _cuda.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return {"relax.backend.use_cuda_graph": bool(opts.cuda_graph)}

    def emit_source(self, executable, out_dir: Path, target: tvm.target.Target | None = None) -> list[Path]:
        """``kernels.cu`` (CUDA C), with ``target`` also ``kernels.ptx`` for its arch, and ``host.ll``."""
        out = []
        kernels = [m for m in module_tree(executable.mod) if m.kind == "cuda"]
        for i, m in enumerate(kernels):
            stem = f"kernels{i or ''}"
            code = m.inspect_source("cuda") or m.inspect_source("")
            if not code:
                log.warning("CUDA module %d kept no CUDA source (loaded from a binary?); not written", i)
                continue
            (out_dir / f"{stem}.cu").write_text(code)
            out.append(out_dir / f"{stem}.cu")
            if target is not None:
                (out_dir / f"{stem}.ptx").write_bytes(compile_ptx(code, target))
                out.append(out_dir / f"{stem}.ptx")
        for m in module_tree(executable.mod):
            if m.kind == "llvm":
                (out_dir / "host.ll").write_text(m.inspect_source("ll"))
                out.append(out_dir / "host.ll")
                break
        return out


def compile_ptx(code: str, target: tvm.target.Target) -> bytes:
    """PTX for ``target``'s arch from generated CUDA C (nvcc, or NVRTC without nvcc)."""
    arch = str(target.attrs["arch"])
    compiler = "nvcc" if shutil.which("nvcc") else "nvrtc"
    try:
        with target:  # TVM's nvcc wrapper reads the compute version from the current target
            return bytes(_nvcc.compile_cuda(code, target_format="ptx", arch=arch, compiler=compiler))
    except RuntimeError as e:
        detail = str(e).rpartition("Compilation error:")[2].strip().splitlines()
        raise BackendError(f"{compiler} could not compile the generated CUDA C for {arch}: "
                           f"{' | '.join(detail[-5:]) or e}") from None


def _has_nvrtc() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings.nvrtc") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _nvcc_archs(nvcc: str) -> tuple[str, ...]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(sorted(set(re.findall(r"\bsm_\d+\b", out)), key=lambda a: int(a[3:])))


def _compile_cuda(code: str) -> bytes:
    """smelt's ``tvm_callback_cuda_compile``: NVRTC when installed, else nvcc.

    TVM's debug variable ``TVM_CUDA_COMPILE_MODE`` (nvrtc or nvcc) still decides when set.
    """
    compiler = os.environ.get("TVM_CUDA_COMPILE_MODE", "").lower() or ("nvrtc" if _has_nvrtc() else "nvcc")
    if compiler == "nvcc" and "TVM_CUDA_COMPILE_MODE" not in os.environ:
        _log_nvcc_once()
    fmt = "cubin" if compiler == "nvrtc" else "fatbin"
    return _nvcc.compile_cuda(code, target_format=fmt, compiler=compiler)


@functools.lru_cache(maxsize=1)
def _log_nvcc_once() -> None:
    log.info("NVRTC (pip package cuda-bindings) is not installed; compiling CUDA kernels with nvcc")


tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_cuda, override=True)


def _local_arch() -> str:
    dev = tvm.cuda(0)
    if not dev.exist:
        raise BackendError(f"target cuda needs --arch when no GPU is present; expected {ARCH_FORMS}")
    return "sm_" + dev.compute_version.replace(".", "")
