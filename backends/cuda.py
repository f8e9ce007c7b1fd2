"""CUDA backend: kernels for NVIDIA GPUs (--arch sm_XX); builds without a GPU.

Weight GEMMs and 1x1 convolutions (with their bias, residual and ReLU) run on cuBLASLt
(``DispatchCublasLt``), the other convolutions of one group on cuDNN (``DispatchCudnn``), FP8
convolutions on Hopper with CUTLASS (``DispatchCutlassConv``), unless
``--libs`` leaves that library out; the routines are linked into the artifact, the libraries
opened at run time (``vendor_libs.py``).
Default schedules come from smelt's TensorCoreMatmul, then dlight (crash-safe, per kernel);
convolutions are converted to NHWC/OHWI first, so that TensorCoreMatmul takes them as implicit
GEMMs. CUDA graphs capture static-shape regions, cuBLASLt calls included (TVM's
RewriteCUDAGraph decides where that is legal).

Where the code is compiled: TVM 0.27 turns the generated CUDA C into a cubin at
build time only when its CUDA runtime is loaded (a machine with a driver). Without
one the module keeps the CUDA C and the GPU machine compiles it when the artifact
is loaded. Both go through TVM's ``tvm_callback_cuda_compile``, which has two
faults this module works around, in one place:

- it compiles for the *current* target's arch, and no target is current while
  ``relax.build`` generates code or an artifact loads, so it compiles for the local
  GPU whatever ``--arch`` said. smelt's ``tvm_callback_cuda_postproc`` writes the arch
  into the first line of the CUDA C (``// smelt-cuda-arch: sm_90``) and smelt's compile
  callback reads it back, so the arch travels with the code;
- it insists on NVRTC and fails with "the cuda-bindings package is not available"
  even with nvcc on PATH; smelt's callback uses nvcc when NVRTC is missing.
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
from ..passes.convert_conv_layout import ConvertConvLayout
from ..passes.dispatch_cublaslt import DispatchCublasLt
from ..passes.dispatch_cudnn import DispatchCudnn
from ..passes.dispatch_cutlass_conv import DispatchCutlassConv
from ..passes.fuse_norm_input_casts import FuseNormInputCasts
from ..passes.fuse_operand_views import FuseOperandViews
from ..passes.hoist_quantize_over_max_pool import HoistQuantizeOverMaxPool
from ..passes.legalize_grouped_conv import LegalizeGroupedConv
from ..passes.split_k_matmul import SplitKMatmul
from .vendor_libs import CUBLASLT, CUDA_LIBS, CUDNN, CUTLASS
from .base import TargetOptions, check_libs, module_tree
from .apply_default_schedules import ApplyDefaultSchedules
from .tensorcore_matmul import FULL_WAVE, SMALL_TILE

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

        libs = check_libs(opts, tuple(CUDA_LIBS))
        return tvm.target.Target({"kind": "cuda", "arch": arch, **_LIMITS, **({"libs": list(libs)} if libs else {})},
                                 host={"kind": "llvm", "mtriple": opts.triple or host_triple()})

    def fp8_unsupported(self, target) -> str:
        """E4M3 tensor cores and conversions came with Ada (sm_89); TVM 0.27 emulates the type on
        older GPUs with vectors of bools its CUDA code generator cannot write."""
        m = _ARCH.fullmatch(str(target.attrs["arch"]))
        return "" if m and int(m.group(1)) >= 89 else \
            f"FP8 (E4M3) needs an NVIDIA GPU of sm_89 or newer (Ada, Hopper), not {target.attrs['arch']}"

    def fp8_stem(self, target) -> bool:
        """Whether ``Fp8(stem=None)`` rewrites a few-channel stem to run in FP8: where CUTLASS takes
        FP8 convs (Hopper, ``libs`` naming it), whose space-to-depth stem and max pool over E4M3
        beat cuDNN's float16 stem (see ``RewriteConvSpaceToDepth``)."""
        return _hopper(target) and _uses(target, CUTLASS)

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

    def prelegalize_passes(self, target):
        # NHWC/OHWI: a conv is then an implicit GEMM whose A (the padded input) and B (the weights)
        # both have the reduction axis (KH, KW, Cin) innermost, the layout TensorCoreMatmul reads with
        # 16-byte cp.async copies and plain ldmatrix. Grouped convs are rewritten first, in NCHW
        # (LegalizeGroupedConv handles only that layout), so they keep their batched-matmul form.
        # Matmuls that fill less than half the GPU with TensorCoreMatmul's tiles split their K.
        # Transposes and slices of matmul operands (attention's q/k/v) are read inside the matmul.
        # Weight GEMMs go to cuBLASLt, when the target lists it: split-K and operand views apply only
        # to the matmuls left. They are taken after the layout conversion, where a 1x1 conv is one GEMM too;
        # cuDNN then takes the convs cuBLASLt left, when the target lists it.
        # Norms and means read their float16 input and cast it themselves (a GEMM's epilogue would
        # otherwise have taken that cast), once the layout is converted (a mean in a kernel of its
        # own is no op the conversion knows: it would keep NCHW behind a transpose).
        # Depthwise convs stay OHWI too (a thread per channel in SmallReduction); the ``hwio`` variant
        # of bench/gpu_rule_ab.py times HWIO weights with 8-channel threads against that.
        # FP8 convs go to CUTLASS first (sm_90 only: its kernels are Hopper's), with their next
        # layer's quantization: cuBLASLt would take the 1x1 ones as GEMMs with 16-bit results. A max
        # pool's quantization moves before it first, into the epilogue of the conv feeding it.
        hopper = _hopper(target)
        return [LegalizeGroupedConv(), ConvertConvLayout("NHWC", "OHWI"), FuseNormInputCasts()] + \
            ([HoistQuantizeOverMaxPool(), DispatchCutlassConv()] if hopper and _uses(target, CUTLASS) else []) + \
            ([DispatchCublasLt()] if _uses(target, CUBLASLT) else []) + \
            ([DispatchCudnn()] if _uses(target, CUDNN) else []) + \
            [SplitKMatmul(min_tiles=FULL_WAVE // 2, tile=SMALL_TILE.block_m), FuseOperandViews()]

    def postfuse_passes(self, target):
        return []

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules()]

    def lower_passes(self, target):
        return _cuda.dataflow_lower_passes(target) + _cuda.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        # cp.async copies (sm_80+) for the tensor-core rule's multi-stage pipeline: TVM emits
        # them only under this option.
        return {"relax.backend.use_cuda_graph": bool(opts.cuda_graph), "tirx.use_async_copy": True}

    def link_objects(self, target) -> list[Path]:
        return [lib.object_file() for lib in CUDA_LIBS.values() if _uses(target, lib)]

    def prepare_run(self, target: dict) -> None:
        for name in target.get("libs") or []:
            CUDA_LIBS[name].preload()

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        """``kernels.cu`` (CUDA C), ``kernels.ptx`` (PTX for the arch it was built for) and ``host.ll``."""
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
            arch = code_arch(code)
            if arch is None:
                log.warning("CUDA module %d does not say which arch it was built for; no PTX written", i)
                continue
            (out_dir / f"{stem}.ptx").write_bytes(compile_cuda(code, "ptx"))
            out.append(out_dir / f"{stem}.ptx")
        for m in module_tree(executable.mod):
            if m.kind == "llvm":
                (out_dir / "host.ll").write_text(m.inspect_source("ll"))
                out.append(out_dir / "host.ll")
                break
        return out


def _hopper(target: tvm.target.Target) -> bool:
    """Whether ``target`` is sm_90, whose kernels smelt's CUTLASS routine holds."""
    return re.fullmatch(r"sm_90a?", str(target.attrs["arch"])) is not None


def _uses(target: tvm.target.Target, lib) -> bool:
    return lib.name in list(target.attrs.get("libs", None) or [])


_MARKER = "// smelt-cuda-arch: "


def code_arch(code: str) -> str | None:
    """The arch smelt's postproc wrote into generated CUDA C, or None."""
    first = code.lstrip("\n").split("\n", 1)[0]
    return first[len(_MARKER):].strip() if first.startswith(_MARKER) else None


def compile_cuda(code: str, fmt: str, compiler: str | None = None) -> bytes:
    """Compile generated CUDA C to ``fmt`` (ptx, cubin, fatbin) for the arch it names.

    ``compiler`` is nvcc or nvrtc; by default nvcc for PTX (it ships with the toolkit)
    and NVRTC for binaries when installed. Raises BackendError with the compiler's message.
    """
    compiler = compiler or ("nvcc" if fmt == "ptx" and shutil.which("nvcc") else
                            "nvrtc" if _has_nvrtc() else "nvcc")
    arch = code_arch(code)
    # TVM's wrappers also read the compute version from the current target (nvcc's
    # even with an explicit arch), and none is current here.
    scope = tvm.target.Target({"kind": "cuda", "arch": arch, **_LIMITS}) if arch else None
    try:
        if scope is None:
            return bytes(_nvcc.compile_cuda(code, target_format=fmt, compiler=compiler))
        with scope:
            return bytes(_nvcc.compile_cuda(code, target_format=fmt, arch=arch, compiler=compiler))
    except RuntimeError as e:
        detail = [line for line in str(e).rpartition("Compilation error:")[2].strip().splitlines() if line]
        # each error with the source line and caret after it (warnings about unused helpers come first)
        errors = [line for i, e_at in enumerate(detail) if ": error" in e_at for line in detail[i:i + 3]]
        raise BackendError(f"{compiler} could not compile the generated CUDA C for {arch or 'the local GPU'}: "
                           f"{' | '.join(errors[:9] or detail[-5:]) or e}") from None


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


def _postproc(code: str, target) -> str:
    """smelt's ``tvm_callback_cuda_postproc``: record the target arch in the code's first line, and
    repair TVM's 16-lane 8-bit constants (``_byte_vectors``)."""
    if _previous_postproc is not None:
        code = _previous_postproc(code, target)
    code = _byte_vectors(code)
    arch = target.attrs.get("arch") if target is not None else None
    return f"{_MARKER}{arch}\n{code}" if arch and code_arch(code) is None else code


_BYTE = r"\((?:uchar|signed char|char)\)\(?(-?\d+)\)?"
_BYTE_VECTOR = re.compile(rf"make_(u?int)4\({_BYTE}((?:, {_BYTE}){{15}})\)")


def _byte_vectors(code: str) -> str:
    """TVM 0.27 prints a 16-lane 8-bit broadcast (the zero that fills padded int8 tiles) as
    ``make_uint4`` of 16 bytes, which has 4 parameters (nvcc: "too many arguments"); here the
    bytes become 4 words. Only the case TVM emits is handled: all 16 bytes the same constant."""

    def words(m: re.Match) -> str:
        values = {int(m.group(2))} | {int(v) for v in re.findall(_BYTE, m.group(3))}
        if len(values) != 1:
            return m.group(0)
        word = f"0x{(values.pop() & 0xFF) * 0x01010101:08x}"
        return f"make_{m.group(1)}4({', '.join([word] * 4)})"

    return _BYTE_VECTOR.sub(words, code)


def _compile_callback(code: str) -> bytes:
    """smelt's ``tvm_callback_cuda_compile``: the arch the code names; NVRTC when installed, else nvcc.

    TVM's debug variable ``TVM_CUDA_COMPILE_MODE`` (nvrtc or nvcc) still decides when set.
    """
    compiler = os.environ.get("TVM_CUDA_COMPILE_MODE", "").lower() or None
    if compiler is None and not _has_nvrtc():
        _log_nvcc_once()
        compiler = "nvcc"
    compiler = compiler or "nvrtc"
    try:
        return compile_cuda(code, "cubin" if compiler == "nvrtc" else "fatbin", compiler)
    except BackendError as e:
        raise RuntimeError(str(e)) from None  # crosses the FFI boundary; compiler.py wraps it again


@functools.lru_cache(maxsize=1)
def _log_nvcc_once() -> None:
    log.info("NVRTC (pip package cuda-bindings) is not installed; compiling CUDA kernels with nvcc")


# A postproc someone registered before us still runs first (ours is idempotent).
_previous_postproc = tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True)
tvm_ffi.register_global_func("tvm_callback_cuda_postproc", _postproc, override=True)
tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback, override=True)


def _local_arch() -> str:
    dev = tvm.cuda(0)
    if not dev.exist:
        raise BackendError(f"target cuda needs --arch when no GPU is present; expected {ARCH_FORMS}")
    return "sm_" + dev.compute_version.replace(".", "")
