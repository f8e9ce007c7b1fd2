"""DispatchCutlassConv: FP8 convs, their epilogue and the next layer's quantization become calls
of smelt's CUTLASS conv.

Without a GPU, the scales the pass folds into each call are checked by running the dispatched
module on the CPU with the routine's contract written in numpy (``_reference_routine``): its
output must match the FP8 graph the CPU runs without the pass (cosine >= 0.995, largest
deviation <= 0.15 of the output's scale) and onnxruntime's float32 (cosine >= 0.995). The two
FP8 computations differ by rounding alone (the routine adds bias and residual in float32 where
the graph rounds each step to float16, which moves values across E4M3 rounding boundaries, and
50 layers compound it: cosine 0.9978 between them, each 0.9973 to float32); a shortcut scale
20 % off drops the cosine to 0.855. A compile for sm_90 checks which convs are taken and which write FP8; on an
NVIDIA Hopper GPU (marker ``cuda``) CUTLASS's kernels match the CPU's FP8 graph within 3e-2: the
ones timing picks, and each candidate kernel of the routine forced onto every conv it takes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

import smelt
from smelt import backends
from smelt.examples import zoo
from smelt.passes import PassManager, PipelineOptions, Step, build_pipeline, quantize_passes
from smelt.passes.calibration import _cpu_executable

SIZE = 64


@pytest.fixture(scope="module")
def resnet():
    m = zoo.resnet(50, batch=2, size=SIZE)
    name = m.graph.input[0].name
    rng = np.random.default_rng(0)
    calib = [{name: rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)} for _ in range(3)]
    x = np.random.default_rng(9).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return m, name, calib, x


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _conv(x, w, pad, stride):
    """NHWC x, OHWI w, float32, through torch's reference conv."""
    with torch.no_grad():
        y = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(0, 3, 1, 2),
                                       stride=stride, padding=pad)
    return y.permute(0, 2, 3, 1).numpy()


def _reference_routine(*args):
    """smelt_cutlass_conv2d[_residual] as backends/cutlass_conv.cu specifies it."""
    *ins, y, _workspace = args
    if len(ins) == 9:
        x, w, bias, pad_h, pad_w, sh, sw, alpha, epilogue = ins
        res, beta = None, 0.0
    else:
        x, w, bias, res, pad_h, pad_w, sh, sw, alpha, beta, epilogue = ins
    f32 = [t.numpy().astype(np.float32) for t in (x, w, bias)]
    out = alpha * _conv(f32[0], f32[1], (pad_h, pad_w), (sh, sw)) + f32[2]
    if res is not None:
        out = out + beta * res.numpy().astype(np.float32)
    if epilogue == 1:
        out = np.maximum(out, 0)
    dtype = ml_dtypes.float8_e4m3fn if str(y.dtype) == "float8_e4m3fn" else np.float16
    y.copyfrom(np.clip(out, -448, 448).astype(dtype) if dtype is not np.float16 else out.astype(dtype))


def _fp8_pipeline(m, calib, target_kind, libs=None, stem=False):
    """The module after the quantize phase (FP8, float16) and, for CUDA, the backend's pre-legalize passes."""
    program = smelt.import_models([m], ["m"])
    backend = backends.get(target_kind)
    target = backend.target(backends.TargetOptions(target_kind, arch="sm_90" if target_kind == "cuda" else None,
                                                   libs=libs))
    _, before, after = quantize_passes(smelt.Fp8(calib=calib, stem=stem), ["m"])
    steps = [s for s in build_pipeline(backend, target, PipelineOptions(precision="float16"), quantize=before,
                                       after_precision=after) if s.phase in ("canonicalize", "quantize")]
    if target_kind == "cuda":
        steps += [Step("fuse", p) for p in backend.prelegalize_passes(target)]
    return PassManager(steps).run(program.bind(), target)


@pytest.mark.parametrize("stem", [False, True], ids=["float16_stem", "fp8_stem"])
def test_folded_scales_match_the_fp8_graph(resnet, stem):
    m, name, calib, x = resnet
    graph = _fp8_pipeline(m, calib, "cpu", stem=stem)
    dispatched = _fp8_pipeline(m, calib, "cuda", libs=("cutlass",), stem=stem)
    for fn in ("smelt_cutlass_conv2d", "smelt_cutlass_conv2d_residual"):
        tvm_ffi.register_global_func(fn, _reference_routine, override=True)
    outs = []
    for mod in (graph, dispatched):
        vm = relax.VirtualMachine(_cpu_executable(mod), tvm.cpu())
        outs.append(vm["m"](tvm.runtime.tensor(x)).numpy().astype(np.float32))
    text = dispatched.script(show_meta=False)
    if stem:  # the stem too (RewriteConvSpaceToDepth: 4x1 over 64 channels) writes the FP8 pool's input
        assert text.count("smelt_cutlass_conv2d") == 53 and "R.nn.conv2d" not in text
        assert "max_pool2d_e4m3" in text and "R.nn.max_pool2d" not in text
    else:  # every conv but the 3-channel stem
        assert text.count("smelt_cutlass_conv2d") == 52 and "R.nn.conv2d" in text and "max_pool2d_e4m3" not in text
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x})[0]
    assert _cos(outs[1], outs[0]) >= 0.995 and np.abs(outs[1] - outs[0]).max() <= 0.15 * np.abs(outs[0]).max()
    assert _cos(outs[1], ref) >= 0.995 and _cos(outs[0], ref) >= 0.995


def test_chains_write_fp8_and_read_fp8_shortcuts(resnet, requires_cuda_compiler):
    """With the stem in float16 (``stem=False``): 52 convs."""
    m, _, calib, _ = resnet
    art = smelt.compile([m], names=["m"], target="cuda", arch="sm_90", precision="float16",
                        quantize=smelt.Fp8(calib=calib, stem=False), options=smelt.CompileOptions(tune_log_dir=None))
    lines = [line for line in art.report.explanations if line.startswith("DispatchCutlassConv: rewrote")]
    assert len(lines) == 52
    # 3 convs and a ReLU per bottleneck; only the last conv writes float16 (the classifier's input)
    assert sum("-> float8_e4m3fn" in line for line in lines) == 51, lines
    assert sum("conv2d + bias + residual + relu" in line for line in lines) == 16
    # every shortcut reads FP8: 12 identities and the 4 projection convs' (QuantizeFp8's conv_shortcuts)
    assert sum("residual float8_e4m3fn" in line for line in lines) == 16
    assert len(art.report.quantization["fp8_shortcuts"]) == 4
    assert any("3x3 stride 2x2, 128->128 channels" in line for line in lines)
    # the classifier stays cuBLASLt's FP8 GEMM
    assert any(line.startswith("DispatchCublasLt: rewrote matmul") and "in FP8" in line
               for line in art.report.explanations)


def test_fp8_stem_by_default_writes_the_max_pools_fp8_input(resnet, requires_cuda_compiler):
    """On Hopper ``Fp8()`` takes the stem too (``stem=None``: the CUDA backend's ``fp8_stem``)."""
    m, _, calib, _ = resnet
    art = smelt.compile([m], names=["m"], target="cuda", arch="sm_90", precision="float16",
                        quantize=smelt.Fp8(calib=calib), options=smelt.CompileOptions(tune_log_dir=None))
    assert art.options.quantize.stem is True
    lines = [line for line in art.report.explanations if line.startswith("DispatchCutlassConv: rewrote")]
    assert len(lines) == 53 and sum("-> float8_e4m3fn" in line for line in lines) == 52
    assert any("4x1 stride 1x1, 64->64 channels" in line and "-> float8_e4m3fn" in line for line in lines)
    assert any(line.startswith("HoistQuantizeOverMaxPool: rewrote") for line in art.report.explanations)


def test_convs_gemm_keeps_3x3_convs_in_float16(resnet, requires_cuda_compiler):
    m, _, calib, _ = resnet
    art = smelt.compile([m], names=["m"], target="cuda", arch="sm_90", precision="float16",
                        quantize=smelt.Fp8(calib=calib, convs="gemm"), options=smelt.CompileOptions(tune_log_dir=None))
    lines = [line for line in art.report.explanations if line.startswith("DispatchCutlassConv: rewrote")]
    assert len(art.report.quantization["quantized"]) == 34  # 33 1x1 convs of stride 1 and the classifier
    assert len(lines) == 33 and all("1x1 stride 1x1" in line and "-> float16" in line for line in lines), lines


def test_older_gpus_keep_fp8_convs_in_generated_code(resnet, requires_cuda_compiler):
    """CUTLASS's kernels are Hopper's: an sm_89 compile leaves the FP8 convs to TVM's code."""
    m, _, calib, _ = resnet
    art = smelt.compile([m], names=["m"], target="cuda", arch="sm_89", precision="float16",
                        quantize=smelt.Fp8(calib=calib), options=smelt.CompileOptions(tune_log_dir=None))
    assert not any("Cutlass" in line for line in art.report.explanations)
    assert art.options.quantize.stem is False  # without CUTLASS's convs the stem stays float16


@pytest.mark.slow
def test_artifact_links_the_cutlass_routine(resnet, requires_cuda_compiler, tmp_path):
    """Builds backends/cutlass_conv.cu with nvcc (about 2 minutes, once per version)."""
    m, _, calib, _ = resnet
    art = smelt.compile([m], names=["m"], target="cuda", arch="sm_90", precision="float16",
                        quantize=smelt.Fp8(calib=calib), options=smelt.CompileOptions(tune_log_dir=None))
    path = art.save(tmp_path / "m")
    assert "cutlass" in smelt.artifact.read_manifest(path)["target"]["libs"]


# the routine's candidate kernels (backends/cutlass_conv.cu's kCandidates)
_CANDIDATES = int(re.search(r"kCandidates = (\d+);", (Path(smelt.__file__).parent / "backends" / "cutlass_conv.cu")
                            .read_text()).group(1))
# runs the artifact argv[1] on the input argv[2] (input name argv[4]), saves the output as argv[3]
_RUN = ("import sys, numpy as np, smelt; x = np.load(sys.argv[2]); "
        "np.save(sys.argv[3], np.asarray(smelt.load(sys.argv[1]).run('m', **{sys.argv[4]: x}), np.float32))")


def _artifacts(resnet, tmp: Path, stem: bool):
    """The CPU's FP8 graph's output, and the sm_90 artifact's path with its input saved beside it."""
    m, name, calib, x = resnet
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("CUTLASS's FP8 convs are sm_90's")
    opts = smelt.CompileOptions(tune_log_dir=None)
    quantize = smelt.Fp8(calib=calib, stem=stem)
    cpu = smelt.compile([m], names=["m"], precision="float16", quantize=quantize, options=opts)
    gpu = smelt.compile([m], names=["m"], target="cuda", arch="sm_90", precision="float16", quantize=quantize,
                        options=opts)
    want = np.asarray(smelt.load(cpu.save(tmp / "cpu")).run("m", **{name: x}), np.float32)
    np.save(tmp / "x.npy", x)
    return want, gpu.save(tmp / "gpu"), tmp


@pytest.fixture(scope="module")
def fp8_artifacts(resnet, tmp_path_factory):
    """The stem in FP8, as on Hopper by default (named: the CPU's default keeps it float16)."""
    return _artifacts(resnet, tmp_path_factory.mktemp("fp8"), stem=True)


def _run_gpu(fp8_artifacts, name, out, env) -> str:
    """Runs the sm_90 artifact in a process of its own (the routine reads its variables once);
    returns the process's stderr."""
    _, path, tmp = fp8_artifacts
    proc = subprocess.run([sys.executable, "-c", _RUN, str(path), str(tmp / "x.npy"), str(out), name],
                          capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.cuda
def test_cutlass_fp8_matches_the_cpu_graph(resnet, fp8_artifacts):
    """The kernels timing picks."""
    want, _, tmp = fp8_artifacts
    _run_gpu(fp8_artifacts, resnet[1], tmp / "out.npy", {})
    got = np.load(tmp / "out.npy")
    assert _cos(got, want) >= 0.995 and np.abs(got - want).max() <= 0.15 * np.abs(want).max()


@pytest.mark.cuda
def test_cutlass_fp8_with_a_float16_stem_matches_the_cpu_graph(resnet, tmp_path):
    """``stem=False``: the stem in float16 on cuDNN, its max pool's quantization in the pool."""
    artifacts = _artifacts(resnet, tmp_path, stem=False)
    want = artifacts[0]
    _run_gpu(artifacts, resnet[1], tmp_path / "out.npy", {})
    got = np.load(tmp_path / "out.npy")
    assert _cos(got, want) >= 0.995 and np.abs(got - want).max() <= 0.15 * np.abs(want).max()


@pytest.mark.cuda
@pytest.mark.parametrize("candidate", range(_CANDIDATES))
def test_each_cutlass_kernel_matches_the_cpu_graph(resnet, fp8_artifacts, candidate):
    """Every candidate kernel, not only those timing picks: SMELT_CUTLASS_CANDIDATE=i runs kernel i
    on each conv it takes (the others fall back to the first that runs), and SMELT_CUTLASS_VERBOSE=1
    shows that it ran."""
    want, _, tmp = fp8_artifacts
    out = tmp / f"out{candidate}.npy"
    log = _run_gpu(fp8_artifacts, resnet[1], out,
                   {"SMELT_CUTLASS_CANDIDATE": str(candidate), "SMELT_CUTLASS_VERBOSE": "1"})
    assert f": kernel {candidate} (" in log, log[-3000:]
    got = np.load(out)
    assert _cos(got, want) >= 0.995 and np.abs(got - want).max() <= 0.15 * np.abs(want).max()
