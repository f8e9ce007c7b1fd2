"""smelt's cuBLASLt GEMM (``cublaslt.cc``): building it and linking it into CUDA artifacts.

CUDA targets with ``libs=["cublaslt"]`` (the default; ``--libs none`` turns it off) run their
weight GEMMs through cuBLASLt, as TensorRT and torch do: ``DispatchCublasLt`` rewrites the
matmuls into ``call_dps_packed`` calls of the functions below, and the artifact's library
carries their object code. TVM 0.27's wheel has no cuBLAS support of its own (built with
USE_CUBLAS=OFF), hence this small routine of ours.

The object is compiled from ``cublaslt.cc`` with the system C++ compiler against TVM-FFI's
headers, once per source version, into the user's cache folder (atomically: a concurrent
compile never sees half a file). cuBLASLt itself is opened when the first GEMM runs, so
building needs no CUDA toolkit and the artifact loads anywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BackendError

LIB = "cublaslt"  # the name in the target's ``libs`` and in ``--libs``
SOURCE = Path(__file__).with_name("cublaslt.cc")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "smelt"


def object_file() -> Path:
    """The compiled ``cublaslt.cc`` (position-independent object), built on first use."""
    import tvm_ffi

    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + tvm_ffi.__version__.encode()).hexdigest()[:16]  # the headers are the version's
    out = cache_dir() / f"cublaslt-{digest}.o"
    if out.is_file():
        return out
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise BackendError("linking cuBLASLt GEMMs into a CUDA artifact needs a C++ compiler (c++ or g++ on "
                           "PATH, or CXX), or compile with --libs none")
    try:
        includes = tvm_ffi.libinfo.include_paths()
    except RuntimeError as e:
        raise BackendError(f"compiling {SOURCE.name} needs TVM-FFI's C++ headers, which this installation of "
                           f"apache-tvm-ffi lacks ({e}); reinstall it, or compile with --libs none") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-c", str(SOURCE), "-o", tmp] + [f"-I{p}" for p in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BackendError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def preload() -> str:
    """Load libcublasLt for the artifact's GEMMs (they open it by soname, which then finds the
    loaded one): the system's, else the one pip's ``nvidia-cublas`` wheel installs (torch
    depends on it), which is on no loader path. Returns the library loaded; raises
    ArtifactError saying what to install when there is none."""
    import ctypes
    import importlib.util

    from ..errors import ArtifactError

    names = ("libcublasLt.so.13", "libcublasLt.so.12")
    candidates = list(names)
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib", "cublas/lib"):  # the CUDA 13 and CUDA 12 wheels' layouts
            candidates += [str(Path(root) / sub / n) for n in names if (Path(root) / sub / n).is_file()]
    for c in candidates:
        try:
            ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL)
            return c
        except OSError:
            continue
    raise ArtifactError("this artifact runs its matmuls with cuBLASLt, and libcublasLt.so.13 or .so.12 was not "
                        "found: pip install nvidia-cublas, or add the CUDA toolkit's lib64 to LD_LIBRARY_PATH, "
                        "or recompile with --libs none")
