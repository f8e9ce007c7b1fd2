"""smelt's vendor-library routines (``cublaslt.cc``, ``cudnn.cc``, ``cutlass_conv.cu``): building
them and loading the libraries they call.

CUDA targets list in ``libs`` the vendor libraries their generated code may call (by default
cuBLASLt and cuDNN, as TensorRT and torch use them; ``--libs`` chooses, ``none`` turns them off):
``DispatchCublasLt`` rewrites weight GEMMs and ``DispatchCudnn`` convolutions into
``call_dps_packed`` calls of small routines of ours, and the artifact's library carries their
object code. TVM 0.27's wheel has no cuBLAS or cuDNN support of its own (built with
USE_CUBLAS=OFF and USE_CUDNN=OFF), hence these routines.

A library's routines are named ``smelt_<name>_*``: a compile keeps in the target's ``libs``
only the libraries whose routines the module calls, so an artifact links and loads no other.

Each object is compiled from its source (and ``cuda_timer.h``, which times a library's candidate
algorithms on the first call) against TVM-FFI's headers, once per source version, into the
user's cache folder (atomically: a concurrent compile never sees half a file). The routines of
cuBLASLt and cuDNN build with the system C++ compiler: the library itself is opened when the
first call runs, so building needs no CUDA toolkit and the artifact loads anywhere. CUTLASS is a
header library of GPU kernels, so its routine builds with nvcc, for sm_90a, against CUTLASS's
headers (``$SMELT_CUTLASS_DIR``, else those of PyPI's nvidia-cutlass wheel, fetched once into
the cache: TVM's wheel carries CUTLASS 4.1 without the ``tools/util`` headers its sm90 conv
needs); its kernels' launch code calls the CUDA runtime, which the artifact finds loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "smelt"


@dataclass(frozen=True)
class VendorLib:
    """One vendor library smelt's generated code may call."""

    name: str  # in the target's ``libs`` and in ``--libs``
    source: Path  # smelt's routine calling it
    sonames: tuple[str, ...]  # the library's, newest first
    wheel_dirs: tuple[str, ...]  # where pip's wheels put it, under the ``nvidia`` namespace package
    runs: str  # what an artifact runs with it, for errors
    install: str  # how to get it
    nvcc: bool = False  # built by nvcc with CUTLASS's headers (else by the system C++ compiler)

    def object_file(self) -> Path:
        """The compiled routine (position-independent object), built on first use."""
        import tvm_ffi

        # the source, smelt's headers beside it and TVM-FFI's (the version's)
        text = b"".join(p.read_bytes() for p in [self.source, *sorted(self.source.parent.glob("*.h"))])
        digest = hashlib.sha256(text + tvm_ffi.__version__.encode()).hexdigest()[:16]
        out = cache_dir() / f"{self.source.stem}-{digest}.o"
        if out.is_file():
            return out
        try:
            includes = tvm_ffi.libinfo.include_paths()
        except RuntimeError as e:
            raise BackendError(f"compiling {self.source.name} needs TVM-FFI's C++ headers, which this installation "
                               f"of apache-tvm-ffi lacks ({e}); reinstall it, or compile with --libs none") from None
        if self.nvcc:
            nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                            else None)
            if nvcc is None:
                raise BackendError(f"linking {self.name} calls into a CUDA artifact needs nvcc (the CUDA toolkit) on "
                                   f"PATH, or compile with --libs naming the others")
            cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
                   "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-c", str(self.source)]
            includes = [*includes, *cutlass_include_dirs()]
        else:
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
            if cxx is None:
                raise BackendError(f"linking {self.name} calls into a CUDA artifact needs a C++ compiler (c++ or g++ "
                                   f"on PATH, or CXX), or compile with --libs none")
            cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-c", str(self.source)]
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        cmd += ["-o", tmp] + [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise BackendError(f"compiling {self.source.name} failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
        return out

    def preload(self) -> str:
        """Load the library for the artifact's calls (they open it by soname, which then finds
        the loaded one): the system's, else the one a pip wheel installs (torch depends on
        them), which is on no loader path; a wheel's companion libraries (cuDNN's engines) are
        loaded with it. Returns the library loaded; raises ArtifactError saying what to install
        when there is none."""
        import ctypes
        import importlib.util

        from ..errors import ArtifactError

        candidates: list[tuple[str, list[str]]] = [(n, []) for n in self.sonames]
        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            for sub in self.wheel_dirs:
                folder = Path(root) / sub
                for n in self.sonames:
                    if (folder / n).is_file():
                        prefix, _, version = n.partition(".so")
                        companions = sorted(str(p) for p in folder.glob(f"{prefix}_*.so{version}"))
                        candidates.append((str(folder / n), companions))
        for lib, companions in candidates:
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            # Companions need one another: load in rounds until a round loads none more. What
            # does not load here is left to the library, which says so when it needs it.
            while companions:
                left = []
                for c in companions:
                    try:
                        ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL)
                    except OSError:
                        left.append(c)
                if len(left) == len(companions):
                    break
                companions = left
            return lib
        raise ArtifactError(f"this artifact runs {self.runs}, and {' or '.join(self.sonames)} was not found: "
                            f"{self.install}, or recompile with --libs naming the others (or none)")


CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"


def cutlass_include_dirs() -> list[str]:
    """CUTLASS's ``include`` and ``tools/util/include`` folders: under ``$SMELT_CUTLASS_DIR`` (a
    CUTLASS source tree), else from the nvidia-cutlass wheel, downloaded (without its Python
    dependencies, which smelt does not use) and unpacked into the cache once."""
    root = os.environ.get("SMELT_CUTLASS_DIR")
    if root is None:
        root = str(cache_dir() / CUTLASS_WHEEL.replace("==", "-"))
        if not os.path.isdir(root):
            _fetch_cutlass(Path(root))
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not all(os.path.isfile(os.path.join(d, h)) for d, h in zip(dirs, ("cutlass/cutlass.h", "cutlass/util/packed_stride.hpp"))):
        raise BackendError(f"{root} holds no CUTLASS headers (include/cutlass/cutlass.h and "
                           f"tools/util/include/cutlass/util/packed_stride.hpp)")
    return dirs


def _fetch_cutlass(root: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", work,
                               CUTLASS_WHEEL], capture_output=True, text=True)
        wheels = list(Path(work).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise BackendError(f"FP8 convolutions for CUDA build with CUTLASS's headers, and downloading {CUTLASS_WHEEL} "
                               f"failed ({proc.stderr.strip()[-500:]}); set SMELT_CUTLASS_DIR to a CUTLASS 4.2 source "
                               f"tree, or compile with --libs naming the others")
        prefix = "cutlass_library/source/"
        staging = Path(work) / "cutlass"
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith((prefix + "include/", prefix + "tools/util/include/")) and not name.endswith("/"):
                    dest = staging / name[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, root)
        except OSError:  # another compile unpacked it first
            if not root.is_dir():
                raise


_HERE = Path(__file__).parent
CUBLASLT = VendorLib("cublaslt", _HERE / "cublaslt.cc", ("libcublasLt.so.13", "libcublasLt.so.12"),
                     ("cu13/lib", "cublas/lib"),  # the CUDA 13 and CUDA 12 wheels' layouts
                     "its matmuls with cuBLASLt",
                     "pip install nvidia-cublas, or add the CUDA toolkit's lib64 to LD_LIBRARY_PATH")
CUDNN = VendorLib("cudnn", _HERE / "cudnn.cc", ("libcudnn.so.9", "libcudnn.so.8"), ("cudnn/lib", "cu13/lib"),
                  "its convolutions with cuDNN",
                  "pip install nvidia-cudnn-cu13 (or -cu12), or add cuDNN's lib folder to LD_LIBRARY_PATH")
# The CUDA runtime the CUTLASS kernels' launch code calls (TVM's CUDA runtime links the same one)
CUTLASS = VendorLib("cutlass", _HERE / "cutlass_conv.cu", ("libcudart.so.13", "libcudart.so.12"),
                    ("cu13/lib", "cuda_runtime/lib"), "its FP8 convolutions with CUTLASS",
                    "pip install nvidia-cuda-runtime, or add the CUDA toolkit's lib64 to LD_LIBRARY_PATH", nvcc=True)
CUDA_LIBS = {lib.name: lib for lib in (CUBLASLT, CUDNN, CUTLASS)}
