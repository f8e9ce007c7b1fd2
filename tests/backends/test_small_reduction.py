"""SmallReduction: which kernels it takes, that they build, and numerics on a GPU.

Compile-only tests need nvcc, not a GPU. Tests marked ``cuda`` run the kernels and compare
with numpy in float64; tolerance: max |y - ref| at most 1e-2 * max |ref| (fp16 output
rounding is 2^-11 relative; a wrong window or channel gives errors of order 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.backends.apply_default_schedules import ApplyDefaultSchedules
from smelt.backends.small_reduction import SmallReduction

from .test_tensorcore_matmul import TARGET, _one_kernel, fused_conv, fused_matmul

REL_TOL = 1e-2


def depthwise(x_shape=(2, 20, 20, 72), k=3, stride=1, kernel_layout="HWIO"):
    """A depthwise conv as the CUDA pipeline makes it (weights HWIO, ``ConvertConvLayout``), or in OHWI."""
    c = x_shape[-1]
    w_shape = (k, k, 1, c) if kernel_layout == "HWIO" else (c, k, k, 1)
    return fused_conv(x_shape, w_shape, stride=stride, padding=k // 2, groups=c, out_dtype="float32",
                      layout=("NHWC", kernel_layout))


def max_pool(x_shape=(2, 20, 20, 64), layout="NHWC"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(x, 3, 2, 1, layout=layout))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def max_pool_fp8(x_shape=(32, 112, 112, 64)):
    """ResNet-50's pool with the next conv's FP8 quantize fused into it (QuantizeFp8)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = relax.op.multiply(relax.op.nn.max_pool2d(x, 3, 2, 1, layout="NHWC"), relax.const(np.float16(52.6)))
            y = relax.op.minimum(relax.op.maximum(y, relax.const(np.float16(-448))), relax.const(np.float16(448)))
            out = bb.emit_output(bb.emit(relax.op.astype(y, "float8_e4m3fn")))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def softmax(shape=(4, 32)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(x)))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def build(func, **rule):
    sch = SmallReduction(**rule).apply(func, TARGET, False)
    assert sch is not None
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=TARGET)


def cuda_source(func, **rule) -> str:
    return build(func, **rule).mod.imports[0].inspect_source("cuda").split("__global__", 2)[2]


@pytest.mark.parametrize("func", [depthwise(), depthwise(k=5, stride=2), max_pool()], ids=["dw3", "dw5s2", "pool"])
def test_one_thread_per_output_with_the_window_unrolled(func, requires_cuda_compiler):
    for rule in ({}, {"min_vectors": 0}):
        code = cuda_source(func, **rule)
        assert "__shared__" not in code and "__syncthreads" not in code
        assert "for (" not in code  # every window loop unrolled


@pytest.mark.parametrize("func, loads, lanes", [
    (max_pool((32, 112, 112, 64)), 9, "uint4"),  # ResNet-50's pool at batch 32: 8 channels a thread
    (depthwise((32, 56, 56, 72)), 9, "uint4"),
    (depthwise((1, 28, 28, 40)), 9, "half4"),  # batch 1: 4 channels a thread keep 7840 threads
], ids=["pool_b32", "dw_b32", "dw_b1"])
def test_large_kernels_load_each_window_position_as_one_vector(func, loads, lanes, requires_cuda_compiler):
    code = cuda_source(func, min_vectors=4096)
    assert code.count(f"= *({lanes}*)(x_ptr") == loads
    assert code.count(f"= *({lanes}*)(w_ptr") in (0, loads)  # the weights too, where there are any
    assert f"*({lanes}*)(compute" in code or f"*({lanes}*)(pool_max_ptr" in code  # one vector store


def test_fp8_results_leave_four_lanes_at_a_time(requires_cuda_compiler):
    # 8 halves would be cast to 8 E4M3 values as one uint4 -> uint2 conversion, which nvcc rejects
    code = cuda_source(max_pool_fp8(), min_vectors=4096)
    assert code.count("= *(uint4*)(x_ptr") == 0 and code.count("= *(half4*)(x_ptr") == 9  # 4 halves a load


def test_fp8_bits_pooled_as_int8_leave_sixteen_lanes_at_a_time(requires_cuda_compiler):
    """HoistQuantizeOverMaxPool's pool after a ReLU reinterprets E4M3 bits, casts nothing."""
    from smelt.passes.hoist_quantize_over_max_pool import max_pool2d_e4m3

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((32, 112, 112, 64), "float8_e4m3fn"))
    attrs = relax.op.nn.max_pool2d(x, 3, 2, 1, layout="NHWC").attrs
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(max_pool2d_e4m3, x, attrs, "float16", True))
        bb.emit_func_output(out)
    code = cuda_source(_one_kernel(bb.get()), min_vectors=4096)
    assert code.count("= *(uint4*)(x_ptr") == 9 and code.count("*(uint4*)(e4m3_ptr") == 1, code


def test_weights_across_the_channels_keep_a_thread_per_channel(requires_cuda_compiler):
    # OHWI: 8 channels' weights lie 9 elements apart, 8 scalar loads; the HWIO twin takes vectors
    code = cuda_source(depthwise((32, 56, 56, 72), kernel_layout="OHWI"))
    assert "uint4" not in code and "half4" not in code and "half2" not in code
    assert code.count("= *(uint4*)(w_ptr") == 0 < cuda_source(depthwise((32, 56, 56, 72))).count("= *(uint4*)(w_ptr")


@pytest.mark.parametrize("budget, lanes", [(400, "half4"), (288, "half2"), (800, "uint4")])
def test_vectors_narrow_while_the_windows_exceed_the_register_budget(budget, lanes, requires_cuda_compiler):
    # 5x5 of input and weights: 100 bytes a channel
    code = cuda_source(depthwise((32, 14, 14, 480), k=5), max_window_bytes=budget)
    assert code.count(f"= *({lanes}*)(x_ptr") == 25 and code.count(f"= *({lanes}*)(w_ptr") == 25


@pytest.mark.parametrize("func", [max_pool(), max_pool((2, 64, 20, 20), layout="NCHW"), depthwise((2, 20, 20, 12))],
                         ids=["few_threads", "nchw", "12_channels"])
def test_keeps_scalar_loads_where_vectors_do_not_fit(func, requires_cuda_compiler):
    # too few outputs for 32768 threads of vectors; rows of width along the pooled axis; 12
    # channels of fp16 are whole vectors of 4 only, and 4 lanes leave 4800 threads
    code = cuda_source(func)
    assert "uint4" not in code and "half4" not in code and "half2" not in code


def test_takes_depthwise_convs_before_dlight():
    sched = ApplyDefaultSchedules()
    with TARGET:
        sched(tvm.IRModule({"dw": depthwise().with_attr("global_symbol", "dw")}))
    assert sched.report["dw"] == "SmallReduction"


@pytest.mark.parametrize("func", [fused_matmul((64, 256), (256, 64)), softmax(),
                                  depthwise(x_shape=(1, 20, 20, 8), k=9)], ids=["matmul_k256", "softmax", "dw9x9"])
def test_declines_large_or_several_reductions(func):
    assert SmallReduction().apply(func, TARGET, False) is None


def run_on_gpu(lib, args, out_shape) -> np.ndarray:
    """``lib["main"](*args, out)`` on GPU 0 with a float16 ``out``; ``out`` as float64."""
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float16"), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy().astype("float64")


def _run(func, args, out_shape, **rule):
    return run_on_gpu(build(func, **rule), args, out_shape)


VECTORS = pytest.mark.parametrize("min_vectors", [32768, 0], ids=["scalar", "vectors"])


@pytest.mark.cuda
@VECTORS
@pytest.mark.parametrize("kernel_layout", ["HWIO", "OHWI"])
@pytest.mark.parametrize("k, stride", [(3, 1), (5, 2)])
def test_depthwise_matches_numpy_on_gpu(k, stride, kernel_layout, min_vectors, rng):
    x = rng.standard_normal((2, 20, 20, 72)).astype("float16")
    w = rng.standard_normal((72, k, k, 1)).astype("float16")  # OHWI
    b = rng.standard_normal((1, 1, 1, 72)).astype("float16")
    pad = k // 2
    xp = np.pad(x.astype("float64"), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    o = (20 + 2 * pad - k) // stride + 1
    ref = np.zeros((2, o, o, 72))
    for i in range(k):
        for j in range(k):
            ref += xp[:, i:i + stride * (o - 1) + 1:stride, j:j + stride * (o - 1) + 1:stride] * w[:, i, j, 0]
    ref = np.maximum(ref + b, 0)
    wl = w.transpose(1, 2, 3, 0).copy() if kernel_layout == "HWIO" else w
    y = _run(depthwise(k=k, stride=stride, kernel_layout=kernel_layout), [x, wl, b], ref.shape, min_vectors=min_vectors)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()


@pytest.mark.cuda
@VECTORS
def test_max_pool_matches_numpy_on_gpu(min_vectors, rng):
    x = rng.standard_normal((2, 20, 20, 64)).astype("float16")
    xp = np.pad(x.astype("float64"), [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    ref = np.full((2, 10, 10, 64), -np.inf)
    for i in range(3):
        for j in range(3):
            ref = np.maximum(ref, xp[:, i:i + 19:2, j:j + 19:2])
    y = _run(max_pool(), [x], ref.shape, min_vectors=min_vectors)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
