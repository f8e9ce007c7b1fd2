"""TensorCoreMatmul: which kernels it takes, that they build to ldmatrix/mma.sync/cp.async code, and numerics.

Compile-only tests need nvcc (they skip without it), not a GPU: each schedules a legalized, fused
relax matmul, or NHWC/OHWI conv2d (implicit GEMM, with its pad block and epilogue), for sm_90,
builds it with ``tvm.compile`` and compiles the CUDA C to PTX with nvcc.
Tests marked ``cuda`` run the kernels and compare with numpy in float64; tolerance: max |y - ref|
at most 1e-2 * max |ref| (fp16 output rounding is 2^-11 relative; fp16 accumulation over K=512
adds a few ulps more; a wrong tile or swizzle gives errors of order 1).
"""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

from smelt.backends import cuda as cuda_backend
from smelt.backends.apply_default_schedules import ApplyDefaultSchedules, default_rules
from smelt.backends.tensor_intrinsics import _frames_without_source
from smelt.backends.tensorcore_matmul import (INT8_SMALL_TILE, INT8_TILE, SMALL_TILE, TensorCoreMatmul, TileConfig,
                                               shared_memory_bytes)
from smelt.passes.convert_conv_layout import ConvertConvLayout

TARGET = tvm.target.Target({"kind": "cuda", "arch": "sm_90", **cuda_backend._LIMITS}, host="llvm")
REL_TOL = 1e-2


def fused_matmul(x_shape, w_shape, dtype="float16", out_dtype="float32", cast=None, bias=False, trans_w=False,
                 w_dtype=None):
    """The one PrimFunc relax makes of ``matmul(x, w, out_dtype)`` [+ astype(cast)] [+ bias].

    With ``trans_w``, ``x @ w.T`` as TE writes it (relax's FuseOps leaves a transpose outside).
    """
    if trans_w:
        return _matmul_nt(x_shape, w_shape, dtype, out_dtype)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    w = relax.Var("w", relax.TensorType(w_shape, w_dtype or dtype))
    params = [x, w]
    if bias:
        params.append(relax.Var("b", relax.TensorType((w_shape[-1],), cast or out_dtype)))
    with bb.function("main", params):
        with bb.dataflow():
            y = relax.op.matmul(x, w, out_dtype=out_dtype)
            if cast:
                y = relax.op.astype(y, cast)
            if bias:
                y = relax.op.add(y, params[2])
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def _one_kernel(mod: tvm.IRModule) -> tvm.tirx.PrimFunc:
    """The single fused PrimFunc that legalizing and fusing ``mod`` gives, named ``gemm``."""
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "gemm")


def _matmul_nt(x_shape, w_shape, dtype, out_dtype, w_dtype=None):
    x = te.placeholder(x_shape, dtype, "x")
    w = te.placeholder(w_shape, w_dtype or dtype, "w")
    k = te.reduce_axis((0, x_shape[-1]), "k")
    y = te.compute((*x_shape[:-1], w_shape[-2]),
                   lambda *i: te.sum(x[(*i[:-1], k)].astype(out_dtype) * w[(*i[:-2], i[-1], k)].astype(out_dtype),
                                     axis=k), name="matmul")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", "gemm")


def fused_conv(x_shape, w_shape, stride=1, padding=0, layout=("NHWC", "OHWI"), groups=1, out_dtype="float16",
               residual=False):
    """The one PrimFunc relax makes of ``relu(conv2d(x, w) [.astype(f16)] + bias [+ residual])`` (float16)."""
    data_layout, kernel_layout = layout
    cout = w_shape[kernel_layout.index("O")]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float16"))
    w = relax.Var("w", relax.TensorType(w_shape, "float16"))
    b = relax.Var("b", relax.TensorType([cout if a == "C" else 1 for a in data_layout], "float16"))
    params = [x, w, b]
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, groups=groups,
                                           data_layout=data_layout, kernel_layout=kernel_layout,
                                           out_dtype=out_dtype))
            if out_dtype != "float16":  # what ToMixedPrecision makes: accumulate in float32, then cast
                y = bb.emit(relax.op.astype(y, "float16"))
            y = bb.emit(relax.op.add(y, b))
            if residual:
                r = relax.Var("r", y.ty)
                params.append(r)
                y = bb.emit(relax.op.add(y, r))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def fused_int8_conv(x_shape, w_shape, stride=1, padding=0):
    """What INT8 quantization makes of a conv (NHWC/OHWI here): ``float32(conv(x_u8, w_i8) - zero) * scale``."""
    cout = w_shape[0]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    w = relax.Var("w", relax.TensorType(w_shape, "int8"))
    zero = relax.Var("zero", relax.TensorType((1, 1, 1, cout), "int32"))
    scale = relax.Var("scale", relax.TensorType((1, 1, 1, cout), "float32"))
    with bb.function("main", [x, w, zero, scale]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, data_layout="NHWC",
                                           kernel_layout="OHWI", out_dtype="int32"))
            y = relax.op.multiply(relax.op.astype(relax.op.subtract(y, zero), "float32"), scale)
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def conv_reference(x, w, stride, padding):
    """NHWC x OHWI convolution in float64."""
    o, kh, kw, _ = w.shape
    xp = np.pad(x.astype("float64"), [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, o))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += patch @ w[:, i, j, :].astype("float64").T
    return out


def build(func):
    """CUDA C and PTX of ``func`` scheduled by TensorCoreMatmul (which must apply)."""
    sch = TensorCoreMatmul().apply(func, TARGET, False)
    assert sch is not None
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        lib = tvm.compile(tvm.IRModule({"gemm": sch.mod["main"]}), target=TARGET)
    code = lib.mod.imports[0].inspect_source("cuda")
    return lib, code, cuda_backend.compile_cuda(code, "ptx").decode()


CASES = {
    "square_fp16": dict(x_shape=(512, 512), w_shape=(512, 512), cast="float16"),
    "padded": dict(x_shape=(200, 520), w_shape=(520, 136), cast="float16"),
    "batched_nt": dict(x_shape=(4, 256, 320), w_shape=(4, 192, 320), trans_w=True),
    "bias_fp16_accumulate": dict(x_shape=(256, 512), w_shape=(512, 384), out_dtype="float16", bias=True),
    "bf16": dict(x_shape=(256, 256), w_shape=(256, 256), dtype="bfloat16"),
    # few thread blocks (a batch-1 FFN): the 64x64 tile
    "small_tile_bias": dict(x_shape=(128, 3072), w_shape=(3072, 768), cast="float16", bias=True),
    "narrow_n": dict(x_shape=(512, 256), w_shape=(256, 40), cast="float16"),
}


# NHWC/OHWI convolutions as ResNet-50 has them (spatial sizes smaller), as implicit GEMMs
# M = N*OH*OW, N = Cout, K = KH*KW*Cin; none of them a multiple of the 128x128x32 tile in every dimension.
CONV_CASES = {
    "1x1": dict(x_shape=(2, 14, 14, 128), w_shape=(96, 1, 1, 128)),
    "1x1_stride2_residual": dict(x_shape=(1, 28, 28, 64), w_shape=(256, 1, 1, 64), stride=2, residual=True),
    "3x3_f32_accumulate": dict(x_shape=(1, 20, 20, 64), w_shape=(64, 3, 3, 64), padding=1, out_dtype="float32"),
    "3x3_stride2": dict(x_shape=(1, 30, 30, 32), w_shape=(128, 3, 3, 32), stride=2, padding=1),
    "7x7_stride2_stem": dict(x_shape=(1, 32, 32, 3), w_shape=(64, 7, 7, 3), stride=2, padding=3),
    "3x3_m49": dict(x_shape=(1, 7, 7, 256), w_shape=(256, 3, 3, 256), padding=1, out_dtype="float32"),
}


@pytest.fixture(scope="module", params=sorted(CONV_CASES))
def built_conv(request, requires_cuda_compiler):
    case = CONV_CASES[request.param]
    return case, build(fused_conv(**case))


def test_nhwc_convs_are_implicit_gemms_on_tensor_cores(built_conv):
    case, (_, code, ptx) = built_conv
    assert "mma.sync.aligned.m16n8k16" in ptx and "ldmatrix" in ptx
    if case["x_shape"][-1] % 8 == 0:  # rows of 16 bytes: the padded input is fetched with cp.async
        assert "cp.async.cg.shared.global" in code
    assert "ld.local" not in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans" not in code  # OHWI: B is [N, K], K innermost as in A


@pytest.mark.parametrize("layout, groups, w_shape", [(("NCHW", "OIHW"), 1, (128, 64, 3, 3)),
                                                     (("NHWC", "OHWI"), 2, (128, 3, 3, 32)),
                                                     (("NHWC", "OHWI"), 64, (64, 3, 3, 1))])
def test_declines_nchw_grouped_and_depthwise_convs(layout, groups, w_shape):
    x_shape = (1, 64, 20, 20) if layout[0] == "NCHW" else (1, 20, 20, 64)
    func = fused_conv(x_shape, w_shape, padding=1, layout=layout, groups=groups)
    assert TensorCoreMatmul().apply(func, TARGET, False) is None


def test_cuda_backend_converts_convs_to_nhwc_ohwi():
    (convert,) = [p for p in cuda_backend.CUDABackend().prelegalize_passes(TARGET) if isinstance(p, ConvertConvLayout)]
    assert (convert.data_layout, convert.kernel_layout) == ("NHWC", "OHWI")


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, requires_cuda_compiler):
    case = CASES[request.param]
    return case, build(fused_matmul(**case))


def test_kernels_use_ldmatrix_mma_and_cp_async(built):
    _, (_, code, ptx) = built
    for needle in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned", "cp.async.cg.shared.global",
                   "cp.async.wait_group"):
        assert needle in code
    case, _ = built
    b_row_major = not case.get("trans_w")  # B read as [K, N] tiles: ldmatrix must transpose
    assert ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in code) == b_row_major
    assert "mma.sync.aligned.m16n8k16" in ptx and "ldmatrix" in ptx


def test_fragments_live_in_registers(built):
    """With TVM's warp-scope mma intrinsics, LowerWarpMemory (TVM 0.27) lowered only the accumulator,
    and nvcc kept the accumulators in local memory (209 ld.local in a 2048x768x3072 kernel)."""
    _, (_, code, ptx) = built
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert "__shfl_sync" not in code  # what lowered warp memory falls back to


def test_rows_not_16_byte_aligned_still_build():
    """K = 300: 16-byte copies would straddle rows, so the copies stay scalar and synchronous."""
    _, code, _ = build(fused_matmul((200, 300), (300, 130), cast="float16"))
    assert "mma.sync.aligned.m16n8k16" in code


def test_dtypes_reach_the_instruction(built):
    case, (_, code, _) = built
    dtype = "bf16" if case.get("dtype") == "bfloat16" else "f16"
    acc = "f16" if case.get("out_dtype") == "float16" else "f32"
    assert f"m16n8k16.row.col.{acc}.{dtype}.{dtype}.{acc}" in code


@pytest.mark.parametrize("x_shape, w_shape", [((1, 512), (512, 512)), ((512, 16), (16, 512)),
                                              ((512, 512), (512, 8))])
def test_declines_small_dims(x_shape, w_shape):
    assert TensorCoreMatmul().apply(fused_matmul(x_shape, w_shape), TARGET, False) is None


@pytest.mark.parametrize("batch, m, n, tile", [(1, 128, 768, 64), (1, 49, 512, 64), (1, 4096, 40, 64),
                                               (1, 4096, 768, 128), (16, 256, 768, 128), (16, 128, 768, 64),
                                               (1, "m", 768, 128)])
def test_small_tile_where_large_tiles_leave_the_gpu_idle(batch, m, n, tile):
    m = tvm.tirx.Var("m", "int64") if m == "m" else tvm.tirx.IntImm("int64", m)
    cfg = TensorCoreMatmul()._tile(tvm.tirx.IntImm("int64", batch), m, tvm.tirx.IntImm("int64", n))
    assert (cfg.block_m, cfg.block_n) == (tile, tile)


def test_declines_float32_and_old_arches():
    assert TensorCoreMatmul().apply(fused_matmul((256, 256), (256, 256), dtype="float32"), TARGET, False) is None
    sm75 = tvm.target.Target({"kind": "cuda", "arch": "sm_75", **cuda_backend._LIMITS})
    assert TensorCoreMatmul().apply(fused_matmul((256, 256), (256, 256)), sm75, False) is None


def test_first_default_rule_and_gemv_falls_through():
    assert isinstance(default_rules()[0], TensorCoreMatmul)
    mod = tvm.IRModule({"big": fused_matmul((256, 256), (256, 256)),
                        "gemv": fused_matmul((1, 256), (256, 256)).with_attr("global_symbol", "gemv")})
    sched = ApplyDefaultSchedules()
    with TARGET:
        sched(mod)
    assert sched.report["big"] == "TensorCoreMatmul"
    assert sched.report["gemv"] != "TensorCoreMatmul" and "gemv" not in sched.fallbacks


def test_frame_stand_in_gives_the_frames_the_parser_reads():
    """The stand-in for ``inspect.stack`` used while importing TVM's intrinsics: same frames, no source."""
    local_marker = 1  # noqa: F841

    def probe():
        return _frames_without_source(), inspect.stack(0)

    ours, theirs = probe()
    assert [(f.function, f.lineno) for f in ours] == [(f.function, f.lineno) for f in theirs]
    assert "local_marker" in ours[1].frame.f_locals and ours[1].code_context is None


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_on_gpu(case, rng):
    params = CASES[case]
    func = fused_matmul(**params)
    lib, _, _ = build(func)
    dtype = params.get("dtype", "float16")
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    x = rng.standard_normal(params["x_shape"]).astype(np_dtype)
    w = rng.standard_normal(params["w_shape"]).astype(np_dtype)
    wt = np.swapaxes(w, -1, -2) if params.get("trans_w") else w
    ref = np.matmul(x.astype("float64"), wt.astype("float64"))
    args = [x, w]
    if params.get("bias"):
        b = rng.standard_normal(ref.shape[-1]).astype(params.get("cast") or params.get("out_dtype", "float32"))
        ref = ref + b
        args.append(b)
    out_dtype = params.get("cast") or params.get("out_dtype", "float32")
    dev = tvm.cuda(0)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    y = tvm.runtime.empty(ref.shape, out_dtype, dev)
    lib["gemm"](*tensors, y)
    err = np.abs(y.numpy().astype("float64") - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"{case}: max relative error {err:.2e}"



@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_numpy_on_gpu(case, rng):
    params = CONV_CASES[case]
    lib, _, _ = build(fused_conv(**params))
    x = rng.standard_normal(params["x_shape"]).astype("float16")
    w = (rng.standard_normal(params["w_shape"]) / np.sqrt(np.prod(params["w_shape"][1:]))).astype("float16")
    ref = conv_reference(x, w, params.get("stride", 1), params.get("padding", 0))
    b = rng.standard_normal((1, 1, 1, ref.shape[-1])).astype("float16")
    ref = ref + b
    args = [x, w, b]
    if params.get("residual"):
        r = rng.standard_normal(ref.shape).astype("float16")
        ref, args = ref + r, args + [r]
    ref = np.maximum(ref, 0)
    dev = tvm.cuda(0)
    y = tvm.runtime.empty(ref.shape, "float16", dev)
    lib["gemm"](*[tvm.runtime.tensor(a, dev) for a in args], y)
    err = np.abs(y.numpy().astype("float64") - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"{case}: max relative error {err:.2e}"


# 8-bit operands (uint8 activations and int8 weights, as INT8 quantization gives them, or int8 x int8):
# m16n8k32 mma with int32 accumulators, exact, so the GPU tests compare integers for equality.
INT8_CASES = {
    "nt_small_tile": dict(x_shape=(512, 512), w_shape=(256, 512), dtype="uint8"),
    "nt_large_tile_padded": dict(x_shape=(4000, 320), w_shape=(200, 320), dtype="uint8"),
    "nt_signed": dict(x_shape=(2, 256, 192), w_shape=(2, 128, 192), dtype="int8"),
    "kn_weight": dict(x_shape=(32, 2048), w_shape=(2048, 1000), dtype="uint8", w_kn=True),  # ResNet-50's FC
}
INT8_CONV_CASES = {
    "3x3": dict(x_shape=(4, 20, 20, 64), w_shape=(64, 3, 3, 64), padding=1),
    "1x1_stride2": dict(x_shape=(2, 28, 28, 64), w_shape=(256, 1, 1, 64), stride=2),
    "7x7_stride2_stem": dict(x_shape=(1, 32, 32, 4), w_shape=(64, 7, 7, 4), stride=2, padding=3),
}


def _int8_kernel(case: str):
    if case in INT8_CASES:
        p = INT8_CASES[case]
        if p.get("w_kn"):  # a [K, N] weight: B's rows gathered into [N, K] tiles
            return fused_matmul(p["x_shape"], p["w_shape"], p["dtype"], "int32", w_dtype="int8")
        return _matmul_nt(p["x_shape"], p["w_shape"], p["dtype"], "int32", w_dtype="int8")
    return fused_int8_conv(**INT8_CONV_CASES[case])


@pytest.fixture(scope="module", params=sorted(INT8_CASES) + sorted(INT8_CONV_CASES))
def built_int8(request, requires_cuda_compiler):
    return request.param, build(_int8_kernel(request.param))


def test_8bit_operands_take_m16n8k32_mma(built_int8):
    case, (_, code, ptx) = built_int8
    a = INT8_CASES.get(case, {}).get("dtype", "uint8")
    assert f"mma.sync.aligned.m16n8k32.row.col.s32.{'u8' if a == 'uint8' else 's8'}.s8.s32" in code
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in code and ".trans" not in code
    assert "ld.local" not in ptx and "st.local" not in ptx
    if case not in ("7x7_stride2_stem", "kn_weight"):  # 4-byte rows; a gathered B: copies without cp.async
        assert "cp.async.cg.shared.global" in code  # padded rows too (``_rows_clamped``)
        assert "* 80)" in code  # shared rows of 64 bytes padded to 80: conflict-free ldmatrix


def test_8bit_tiles():
    """128x64 tiles (a 32 KiB int32 result, staged in static shared memory), 64x64 for few thread blocks; K steps of 64."""
    rule = TensorCoreMatmul()
    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    large, small = rule._tile(i64(1), i64(4096), i64(768), True), rule._tile(i64(1), i64(512), i64(256), True)
    assert (large.block_m, large.block_n, large.block_k, small.block_m, small.block_n) == (128, 64, 64, 64, 64)


@pytest.mark.parametrize("cfg, in_bytes, acc_bytes", [(TileConfig(), 2, 4), (TileConfig(), 2, 2), (SMALL_TILE, 2, 4),
                                                      (INT8_TILE, 1, 4), (INT8_SMALL_TILE, 1, 4)])
def test_shared_memory_launches_without_opt_in_or_with_it(cfg, in_bytes, acc_bytes):
    """A kernel gets 48 KiB of shared memory unless it opts in, which TVM's runtime does only for more
    than 48 KiB of dynamic shared memory: static + dynamic above 48 KiB with dynamic below fails to
    launch (CUDA_ERROR_INVALID_VALUE, seen with 3 + 1 stages of the small 8-bit tile)."""
    static, dynamic = shared_memory_bytes(cfg, in_bytes, acc_bytes)
    assert static + dynamic <= 48 * 1024 or dynamic > 48 * 1024
    assert static + dynamic <= 227 * 1024  # what an sm_90 block can have


def test_tiles_that_would_not_launch_are_refused():
    with pytest.raises(ValueError, match="would not launch"):
        TensorCoreMatmul(int8_small=TileConfig(block_m=64, block_n=64, block_k=64, warp_m=32, warp_n=32, vector=16))


def test_declines_8bit_a_that_is_not_k_contiguous():
    """ldmatrix has no transposing form for 8-bit elements: A stored [K, M] declines (B is gathered)."""
    x = te.placeholder((256, 128), "uint8", "x")
    w = te.placeholder((256, 64), "int8", "w")
    k = te.reduce_axis((0, 256), "k")
    y = te.compute((128, 64), lambda i, j: te.sum(x[k, i].astype("int32") * w[k, j].astype("int32"), axis=k),
                   name="matmul")
    func = te.create_prim_func([x, w, y]).with_attr("global_symbol", "gemm")
    assert TensorCoreMatmul().apply(func, TARGET, False) is None


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(INT8_CASES) + sorted(INT8_CONV_CASES))
def test_8bit_kernels_are_exact_on_gpu(case, rng):
    lib, _, _ = build(_int8_kernel(case))
    p = {**INT8_CASES, **INT8_CONV_CASES}[case]
    a_dtype = p.get("dtype", "uint8")
    lo, hi = (0, 256) if a_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, p["x_shape"]).astype(a_dtype)
    w = rng.integers(-127, 128, p["w_shape"]).astype("int8")
    dev = tvm.cuda(0)
    if case in INT8_CASES:
        ref = np.matmul(x.astype("int64"), (w if p.get("w_kn") else np.swapaxes(w, -1, -2)).astype("int64"))
        y = tvm.runtime.empty(ref.shape, "int32", dev)
        lib["gemm"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
        np.testing.assert_array_equal(y.numpy(), ref)
        return
    acc = conv_reference(x, w, p.get("stride", 1), p.get("padding", 0)).astype("int64")  # exact in float64
    zero = rng.integers(-1000, 1000, (1, 1, 1, acc.shape[-1])).astype("int32")
    scale = rng.uniform(1e-4, 1e-3, (1, 1, 1, acc.shape[-1])).astype("float32")
    ref = (acc - zero).astype("float32") * scale
    y = tvm.runtime.empty(ref.shape, "float32", dev)
    lib["gemm"](*[tvm.runtime.tensor(a, dev) for a in (x, w, zero, scale)], y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6, atol=0)  # integers exact; one float32 rounding


def _viewed_matmul(b_view):
    """C[s, i, j] = sum_k A[s, i, k] * B'[s, k, j], B' = ``b_view(src)`` of src [4, 64, 32] (float16)."""
    a = te.placeholder((4, 64, 32), "float16", "a")
    src = te.placeholder((4, 64, 32), "float16", "src")
    b = b_view(src)
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((4, 64, 64), lambda s, i, j: te.sum(a[s, i, k].astype("float32") * b[s, k, j].astype("float32"),
                                                        axis=k), name="matmul")
    return te.create_prim_func([a, src, c]).with_attr("global_symbol", "gemm")


def _kinds(func):
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    from smelt.backends.tensorcore_matmul import _operand_inner_kinds

    sch = s_tir.Schedule(func)
    (main,) = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    return _operand_inner_kinds(sch, main)


def test_contiguous_axis_is_read_through_the_operand_views():
    """A transpose hidden behind a reshape (k.transpose(-1, -2) of attention, heads merged) is still NT:
    in global memory B's contiguous axis is the reduction axis. Judged from the main block alone
    (B [K, N]), the 16-byte copies ran along N, 64 elements apart, and cp.async read wrong data."""
    transposed = _viewed_matmul(lambda src: topi.reshape(topi.transpose(src, [0, 2, 1]), (4, 32, 64)))
    assert _kinds(transposed) == ("R", "R")
    sch = TensorCoreMatmul().apply(transposed, TARGET, False)
    assert sch is not None
    plain = _viewed_matmul(lambda src: topi.reshape(src, (4, 32, 64)))
    assert _kinds(plain) == ("R", "S")


def test_declines_views_whose_vectors_would_wrap():
    """B'[s, k, j] = src[s, j, (k + j) % 32]: no aligned run of 8 elements is contiguous."""
    rolled = _viewed_matmul(lambda src: te.compute((4, 32, 64), lambda s, k, j: src[s, j, (k + j) % 32], name="roll"))
    assert _kinds(rolled)[1] is None
    assert TensorCoreMatmul().apply(rolled, TARGET, False) is None
