"""Vendor libraries (backends/vendor_libs.py): building smelt's routines and finding the libraries.

Runs on any machine: the routines build with the system C++ compiler and export their
functions; a library that is not installed is an ArtifactError saying what to install; a
wheel-style folder (the library and its companions, off the loader path) is found and loaded.
"""

from __future__ import annotations

import ctypes
import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

import smelt
from smelt.backends.vendor_libs import CUBLASLT, CUDNN, CUTLASS, VendorLib

EXPORTS = {CUBLASLT: ["smelt_cublaslt_matmul", "smelt_cublaslt_matmul_bias", "smelt_cublaslt_matmul_residual",
                      "smelt_cublaslt_matmul_bias_residual"],
           CUDNN: ["smelt_cudnn_conv2d", "smelt_cudnn_conv2d_residual"],
           CUTLASS: ["smelt_cutlass_conv2d", "smelt_cutlass_conv2d_residual"]}


# CUTLASS's routine builds with nvcc and CUTLASS's headers (downloaded once): about 3.5 minutes here
@pytest.mark.parametrize("lib", [CUBLASLT, CUDNN, pytest.param(CUTLASS, marks=pytest.mark.slow)],
                         ids=lambda lib: lib.name)
def test_routine_builds_and_exports_its_functions(lib, tmp_path, monkeypatch):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if lib.nvcc and shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    obj = lib.object_file()
    assert obj.parent == tmp_path / "smelt" and obj.name.startswith(lib.source.stem + "-")
    symbols = subprocess.run(["nm", "-g", str(obj)], capture_output=True, text=True).stdout
    for fn in EXPORTS[lib]:
        assert f"__tvm_ffi_{fn}" in symbols
    assert lib.object_file() == obj  # cached: built once per source version


def test_missing_library_says_what_to_install(monkeypatch):
    missing = VendorLib("cudnn", CUDNN.source, ("libsmelt_absent.so.9",), ("absent/lib",),
                        "its convolutions with cuDNN", "pip install nvidia-cudnn-cu13")
    with pytest.raises(smelt.ArtifactError, match="runs its convolutions with cuDNN, and libsmelt_absent.so.9 "
                                                   "was not found: pip install nvidia-cudnn-cu13"):
        missing.preload()


def test_wheel_folder_is_found_with_its_companions(tmp_path, monkeypatch):
    """pip's layout: site-packages/nvidia/<dir>/lib holds the library and its companions
    (cuDNN's libcudnn_*.so.9), on no loader path; the library is loaded from there, then its
    companions."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    lib_dir = tmp_path / "nvidia" / "fake" / "lib"
    lib_dir.mkdir(parents=True)
    src = tmp_path / "f.c"
    src.write_text("int smelt_fake(void) { return 1; }\n")
    for name in ("libsmeltfake.so.9", "libsmeltfake_ops.so.9"):
        subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib_dir / name),
                        f"-Wl,-soname,{name}"], check=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()  # nvidia/ (no __init__.py) is a namespace package, as pip's
    fake = VendorLib("fake", CUDNN.source, ("libsmeltfake.so.9",), ("fake/lib",), "fakes", "nothing")
    loaded = []

    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0, _cdll=ctypes.CDLL: loaded.append(Path(path).name)
                        or _cdll(path, mode=mode))
    assert fake.preload() == str(lib_dir / "libsmeltfake.so.9")
    assert loaded[-2:] == ["libsmeltfake.so.9", "libsmeltfake_ops.so.9"], loaded
