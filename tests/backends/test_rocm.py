"""ROCm backend, compile only: HSACO built without a GPU, AMDGPU assembly emitted, errors name packages.

The build tests need ld.lld and the ROCm device libraries (skip without them); the
error tests simulate their absence and run everywhere.
"""

from __future__ import annotations

import re

import pytest

import smelt
from smelt.backends import get
from smelt.backends import rocm as rocm_backend
from smelt.errors import BackendError
from smelt.examples import zoo


@pytest.fixture(scope="module")
def encoder(requires_rocm_toolchain, tmp_path_factory):
    """A one-layer transformer encoder built for gfx942 and saved with its source."""
    art = smelt.compile([zoo.transformer_encoder(layers=1)], target="rocm", arch="gfx942")
    path = art.save(tmp_path_factory.mktemp("rocm") / "enc", emit_source=True)
    return art, path


def test_encoder_builds_hsaco_for_gfx942(encoder):
    art, path = encoder
    assert art.backend == "rocm" and str(art.target.attrs["mcpu"]) == "gfx942"
    lib = (path / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF"
    assert b"amdgcn-amd-amdhsa" in lib  # the linked code object travels inside the library
    files = set(smelt.artifact.read_manifest(path)["files"])
    assert {"source/kernels.s", "source/kernels.ll", "source/host.ll"} <= files


def test_emitted_assembly_targets_the_arch(encoder):
    art, path = encoder
    asm = (path / "source" / "kernels.s").read_text()
    assert re.search(r'^\s*\.amdgcn_target "amdgcn-amd-amdhsa-[a-z]*-gfx942"', asm, re.M)
    kernels = set(re.findall(r"^\s*\.amdhsa_kernel (\w+)$", asm, re.M))
    assert {f"{k}_kernel" for k in art.report.schedules} <= kernels
    assert asm.count("s_endpgm") >= len(kernels)
    ll = (path / "source" / "kernels.ll").read_text()
    assert 'target triple = "amdgcn-amd-amdhsa' in ll and '"target-cpu"="gfx942"' in ll


@pytest.mark.usefixtures("requires_rocm_toolchain")
@pytest.mark.parametrize("arch, wave", [("gfx942", 64), ("gfx1100", 32)])
def test_wavefront_size_of_target_matches_the_code(arch, wave, tmp_path):
    """RDNA compiles to 32-wide wavefronts; warp-shuffle reductions (softmax, layer norm) must agree."""
    art = smelt.compile([zoo.transformer_encoder(layers=1, seq=8, d_model=32, heads=2, ffn=64)],
                        target="rocm", arch=arch)
    assert int(art.target.attrs["thread_warp_size"]) == wave
    asm = get("rocm").emit_source(art.executable, tmp_path)[0].read_text()
    assert set(re.findall(r"\.wavefront_size:\s+(\d+)", asm)) == {str(wave)}


def test_missing_linker_names_the_package(monkeypatch):
    monkeypatch.setattr(rocm_backend.shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match=r"missing ld\.lld \(package lld-22\).*apt-get install .*lld-22"):
        smelt.compile([zoo.mlp()], target="rocm", arch="gfx942")


def test_missing_device_libs_name_the_package(monkeypatch):
    monkeypatch.setattr(rocm_backend, "_device_lib_dirs", lambda: [])
    with pytest.raises(BackendError, match=r"missing .*the ROCm device libraries \(package rocm-device-libs\)"):
        smelt.compile([zoo.mlp()], target="rocm", arch="gfx942")


def test_device_libs_found_outside_opt_rocm(monkeypatch, tmp_path):
    """A folder with ocml.bc under ROCM_PATH (or /usr/lib/x86_64-linux-gnu) is found; TVM is pointed at it."""
    bitcode = tmp_path / "amdgcn" / "bitcode"
    bitcode.mkdir(parents=True)
    (bitcode / "ocml.bc").write_bytes(b"")
    monkeypatch.setenv("ROCM_PATH", str(tmp_path))
    assert rocm_backend._device_lib_dirs()[0] == str(bitcode)


@pytest.mark.parametrize("arch", ["gfx9999", "sm_90", "mi300"])
def test_bad_arch_lists_supported(arch):
    with pytest.raises(BackendError, match=r"not a supported AMD GPU; supported: gfx90a, .*gfx942"):
        smelt.compile([zoo.mlp()], target="rocm", arch=arch)


def test_no_arch_without_gpu_asks_for_one():
    import tvm

    if tvm.rocm(0).exist:
        pytest.skip("an AMD GPU is present: its arch is the default")
    with pytest.raises(BackendError, match=r"needs --arch when no AMD GPU is present; supported: gfx90a"):
        smelt.compile([zoo.mlp()], target="rocm")


def test_backend_implements_the_protocol():
    assert isinstance(get("rocm"), smelt.backends.Backend)
