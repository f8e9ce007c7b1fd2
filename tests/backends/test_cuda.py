"""CUDA backend, compile only: builds without a GPU, emits CUDA C and PTX for the arch, errors name fixes.

Needs nvcc (skips without it), not a GPU. What runs on a GPU is in test_gpu_numerics.py.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

import smelt
from smelt.backends import TargetOptions, get
from smelt.backends import cuda as cuda_backend
from smelt.compiler import CompileOptions
from smelt.errors import BackendError
from smelt.examples import zoo

pytestmark = pytest.mark.usefixtures("requires_cuda_compiler")

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def cuda_elf_sms(blob: bytes) -> list[int]:
    """SM numbers of the CUDA ELF images (cubins) inside ``blob``: a cubin, a fatbin or a host library.

    The SM is in e_flags: the low byte for OS/ABI 0x33, the next byte for 0x41 (CUDA 12.8+).
    """
    sms, at = [], blob.find(b"\x7fELF")
    while at >= 0:
        abi = blob[at + 7]
        if abi in (0x33, 0x41) and blob[at + 4] == 2:  # 64-bit CUDA ELF
            flags = struct.unpack_from("<I", blob, at + 0x30)[0]
            sms.append((flags >> 8) & 0xFF if abi == 0x41 else flags & 0xFF)
        at = blob.find(b"\x7fELF", at + 4)
    return sms


def cubin_sm(blob: bytes) -> int:
    sms = cuda_elf_sms(blob)
    assert sms, "no CUDA ELF image in the binary"
    return sms[0]


def kernels_in_library(lib: bytes, arch: str) -> bool:
    """The host library carries the kernels for ``arch``: as CUDA C naming it (built without a GPU,
    compiled when loaded) or as a cubin for it (built where TVM's CUDA runtime is loaded)."""
    sm = int(re.match(r"sm_(\d+)", arch).group(1))
    return f"// smelt-cuda-arch: {arch}".encode() in lib or sm in cuda_elf_sms(lib)


@pytest.fixture(scope="module")
def resnet(requires_cuda_compiler, tmp_path_factory):
    """ResNet-18 at 32×32 built for sm_90 and saved with its source, all its kernels generated
    (``--libs none``; by default its convs would run on cuDNN)."""
    opts = smelt.CompileOptions(smelt.TargetOptions("cuda", "sm_90", libs=()))
    art = smelt.compile([zoo.resnet(18, size=32)], target="cuda", options=opts)
    path = art.save(tmp_path_factory.mktemp("cuda") / "resnet18", emit_source=True)
    return art, path


def test_resnet_builds_for_sm90_without_a_gpu(resnet):
    art, path = resnet
    assert art.backend == "cuda" and str(art.target.attrs["arch"]) == "sm_90"
    assert art.target.host is not None and art.target.host.kind.name == "llvm"
    assert art.report.kernels > 10 and not art.report.schedule_fallbacks
    manifest = smelt.artifact.read_manifest(path)
    assert manifest["target"]["arch"] == "sm_90" and manifest["backend"] == "cuda"
    # The library holds the host code and the kernels (CUDA C, JIT-compiled on the GPU machine).
    lib = (path / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF"
    assert kernels_in_library(lib, "sm_90") and b"fused_conv2d" in lib
    assert set(manifest["files"]) == {"model.so", "weights.bin", "source/kernels.cu", "source/kernels.ptx",
                                      "source/host.ll"}


def test_emitted_cuda_c_and_ptx_target_the_arch(resnet):
    art, path = resnet
    cu = (path / "source" / "kernels.cu").read_text()
    ptx = (path / "source" / "kernels.ptx").read_text()
    assert cu.startswith("// smelt-cuda-arch: sm_90\n") and "__global__" in cu
    assert re.search(r"^\.target sm_90$", ptx, re.M), "PTX not generated for sm_90"
    kernels = set(KERNEL.findall(cu))
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M))
    assert kernels and kernels == entries
    # Every scheduled kernel of the report is in the CUDA C (one __global__ each, "_kernel" suffix).
    assert {f"{k}_kernel" for k in art.report.schedules} <= kernels
    assert "target triple" in (path / "source" / "host.ll").read_text()


def test_int8_resnet_with_float16_in_between_builds_on_tensor_cores(requires_cuda_compiler, tmp_path):
    """INT8 convolutions are uint8 x int8 implicit GEMMs on mma.sync; the rest is float16. The PTX
    is built by nvcc (``emit_source``): TVM's float16 ``round`` called a function CUDA lacks."""
    m = zoo.resnet(18, size=32)
    calib = [{m.graph.input[0].name: np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype("float32")}
             for i in range(2)]
    art = smelt.compile([m], target="cuda", arch="sm_90", precision="float16", quantize=smelt.Int8(calib=calib))
    convs = {k: v for k, v in art.report.schedules.items() if "conv2d" in k}
    # at 32x32 the last stages have M = N*OH*OW of 16 or less: GEMV-like, other rules take them
    assert sum(v == "TensorCoreMatmul" for v in convs.values()) >= 4, convs
    assert not any(k.startswith(("fused_transpose", "transpose")) and "pad" in k for k in art.report.schedules)
    path = art.save(tmp_path / "int8", emit_source=True)
    assert "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32" in (path / "source" / "kernels.ptx").read_text()


def test_transformer_encoder_builds_and_saves(tmp_path):
    art = smelt.compile([zoo.transformer_encoder()], target="cuda", arch="sm_80")
    path = art.save(tmp_path / "enc")
    assert {p.name for p in path.iterdir()} == {"model.so", "weights.bin", "manifest.json"}
    assert kernels_in_library((path / "model.so").read_bytes(), "sm_80")
    # softmax and layer norm are reductions: dlight's reduction rules, not the fallback, take them
    assert {"Reduction", "GeneralReduction"} & set(art.report.schedules.values())


def _generated_kernels(arch: str):
    """The MLP with its GEMMs as generated kernels (by default cuBLASLt runs them: no kernel is left)."""
    opts = smelt.CompileOptions(smelt.TargetOptions("cuda", arch, libs=()))
    return smelt.compile([zoo.mlp()], target="cuda", arch=arch, options=opts)


def test_an_mlp_is_all_cublaslt_by_default():
    art = smelt.compile([zoo.mlp()], target="cuda", arch="sm_90")
    assert not [m for m in smelt.backends.base.module_tree(art.executable.mod) if m.kind == "cuda"]
    assert "smelt_cublaslt_matmul_bias" in art.executable.as_text()


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_compile_to_a_cubin_for_the_arch_they_name(arch):
    """The compile callback the GPU machine runs (at build or at load) builds for the arch in the code,
    not for the local GPU: TVM's own callback has no target in scope there."""
    art = _generated_kernels(arch)
    (cuda_mod,) = [m for m in smelt.backends.base.module_tree(art.executable.mod) if m.kind == "cuda"]
    code = cuda_mod.inspect_source("cuda")
    assert cuda_backend.code_arch(code) == arch
    blob = cuda_backend._compile_callback(code)
    assert cubin_sm(blob) == int(arch[3:])


def test_symptoms_of_tvms_own_compile_callback(monkeypatch):
    """Why smelt replaces ``tvm_callback_cuda_compile``: TVM's insists on NVRTC, and with nvcc it compiles
    for the current target or the local GPU, and neither exists while code is generated or loaded."""
    import tvm
    from tvm.support import nvcc

    art = _generated_kernels("sm_80")
    (cuda_mod,) = [m for m in smelt.backends.base.module_tree(art.executable.mod) if m.kind == "cuda"]
    code = cuda_mod.inspect_source("cuda")
    if not cuda_backend._has_nvrtc():
        with pytest.raises(Exception, match="cuda-bindings"):
            nvcc.tvm_callback_cuda_compile(code)
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    if tvm.cuda(0).exist:
        local = int(tvm.cuda(0).compute_version.replace(".", ""))
        assert cubin_sm(bytes(nvcc.tvm_callback_cuda_compile(code))) == local  # not the 80 asked for
    else:
        with pytest.raises(Exception, match="No CUDA architecture was specified or GPU detected"):
            nvcc.tvm_callback_cuda_compile(code)
    assert cubin_sm(cuda_backend._compile_callback(code)) == 80


def test_cuda_graph_captures_static_shapes():
    art = smelt.compile([zoo.mlp()], target="cuda", arch="sm_90")
    text = art.executable.as_text()
    assert "vm.builtin.cuda_graph.run_or_capture" in text and "vm.builtin.cuda_graph.get_cached_alloc" in text


def test_cuda_graph_off_when_asked():
    opts = CompileOptions(TargetOptions("cuda", "sm_90", cuda_graph=False))
    art = smelt.compile([zoo.mlp()], target="cuda", options=opts)
    assert "cuda_graph" not in art.executable.as_text()


def test_no_cuda_graph_for_symbolic_batch():
    art = smelt.compile([zoo.mlp(batch="N")], target="cuda", arch="sm_90")
    assert art.models["mlp"].inputs[0].shape[0] == "N"
    # No captured graph (it would replay one batch's launches); the static cuBLASLt workspace may
    # come from TVM's cached allocation (``cuda_graph.get_cached_alloc``).
    assert "cuda_graph.run_or_capture" not in art.executable.as_text()


@pytest.mark.parametrize("arch", ["sm90", "90", "compute_90", "gfx942", "sm_9"])
def test_bad_arch_lists_valid_forms(arch):
    with pytest.raises(BackendError, match=r"not a CUDA architecture; expected sm_XX.*sm_90a"):
        smelt.compile([zoo.mlp()], target="cuda", arch=arch)


def test_arch_nvcc_cannot_build_lists_what_it_can():
    with pytest.raises(BackendError, match=r"'sm_20' is not supported by .*nvcc; it builds for .*sm_90"):
        smelt.compile([zoo.mlp()], target="cuda", arch="sm_20")


def test_no_arch_without_gpu_asks_for_one():
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present: its arch is the default")
    with pytest.raises(BackendError, match=r"needs --arch when no GPU is present; expected sm_XX"):
        smelt.compile([zoo.mlp()], target="cuda")


def test_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cuda_backend.shutil, "which", lambda name: None)
    monkeypatch.setattr(cuda_backend, "_has_nvrtc", lambda: False)
    with pytest.raises(BackendError, match=r"needs a CUDA compiler: nvcc on PATH .*CUDA toolkit.*cuda-bindings"):
        smelt.compile([zoo.mlp()], target="cuda", arch="sm_90")


def test_unknown_target_lists_known_ones():
    with pytest.raises(BackendError, match=r"unknown target 'tpu'; known targets: cpu, cuda, .*rocm"):
        smelt.compile([zoo.mlp()], target="tpu")


def test_backend_implements_the_protocol():
    assert isinstance(get("cuda"), smelt.backends.Backend)


def test_byte_vector_constants_are_written_as_words():
    """TVM 0.27 prints a 16-lane byte broadcast as make_uint4 of 16 bytes (nvcc: too many arguments)."""
    from smelt.backends.cuda import _byte_vectors

    zeros = "x = make_uint4(" + ", ".join(["(uchar)0"] * 16) + ");"
    assert _byte_vectors(zeros) == "x = make_uint4(0x00000000, 0x00000000, 0x00000000, 0x00000000);"
    minus_one = "y = make_int4(" + ", ".join(["(signed char)-1"] * 16) + ");"
    assert _byte_vectors(minus_one) == "y = make_int4(0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff);"
    mixed = "z = make_uint4(" + ", ".join(["(uchar)0"] * 15 + ["(uchar)1"]) + ");"
    assert _byte_vectors(mixed) == mixed  # not what TVM emits: left for nvcc to report
    words = "w = make_uint4(0, 0, 0, 0);"
    assert _byte_vectors(words) == words
