"""VectorizedElementwise: the kernels it takes, 16-byte moves, numerics on a GPU.

Compile-only tests need nvcc, not a GPU. Tests marked ``cuda`` compare with numpy in float64:
max |y - ref| at most 1e-2 * max |ref| (float16 rounding is 2^-11 relative; an element read
from the wrong place errs by order 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.backends.apply_default_schedules import ApplyDefaultSchedules
from smelt.backends.vectorized_elementwise import VectorizedElementwise

from .test_small_reduction import run_on_gpu
from .test_tensorcore_matmul import TARGET, _one_kernel

REL_TOL = 1e-2


def _kernel(shape, body, dtype="float16", shape2=None):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    args = [x] + ([relax.Var("y", relax.TensorType(shape2, dtype))] if shape2 else [])
    with bb.function("main", args):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(body(*args)))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def gelu_reshape():  # BERT's GELU, fused with the reshape before a GEMM
    return _kernel((2, 8, 256), lambda x: relax.op.reshape(relax.op.nn.gelu(x), (16, 256)))


def cast():
    return _kernel((4, 64), lambda x: relax.op.astype(x, "float16"), dtype="float32")


def residual_add():
    return _kernel((4, 64), lambda x, y: relax.op.add(x, y), shape2=(4, 64))


def build(func):
    sch = VectorizedElementwise().apply(func, TARGET, False)
    assert sch is not None
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=TARGET)


@pytest.mark.parametrize("func, load", [(gelu_reshape(), "uint4"), (cast(), "float4"), (residual_add(), "uint4")],
                         ids=["gelu", "cast", "add"])
def test_loads_and_stores_are_16_bytes(func, load, requires_cuda_compiler):
    code = build(func).mod.imports[0].inspect_source("cuda").split("__global__", 1)[1]
    assert f"*({load}*)" in code
    assert "_local_ptr[8]" in code or "_local_ptr[4]" in code  # one vector per thread, not whole rows


@pytest.mark.parametrize("shape, threads", [((4, 64), 32), ((6, 1000), 250)])
def test_threads_divide_the_vectors(shape, threads, requires_cuda_compiler):
    """No thread runs past the end: TVM does not guard the local write-back under a split that
    does not divide, and its vector store went out of bounds."""
    code = build(_kernel(shape, lambda x: relax.op.nn.relu(x))).mod.imports[0].inspect_source("cuda")
    assert f"__launch_bounds__({threads})" in code


@pytest.mark.parametrize("func", [
    _kernel((4, 64), lambda x, y: relax.op.add(x, y), shape2=(64,)),  # broadcast
    _kernel((4, 64), lambda x: relax.op.permute_dims(x)),  # transpose
    _kernel((4, 6), lambda x: relax.op.nn.relu(x)),  # rows shorter than a vector
    _kernel((526, 8), lambda x: relax.op.nn.relu(x)),  # 526 vectors: no 64-256 thread block divides them
], ids=["broadcast", "transpose", "short_rows", "no_thread_count"])
def test_declines_what_is_not_a_straight_copy(func):
    assert VectorizedElementwise().apply(func, TARGET, False) is None


def test_takes_elementwise_kernels_before_fallback():
    sched = ApplyDefaultSchedules()
    with TARGET:
        sched(tvm.IRModule({"g": gelu_reshape().with_attr("global_symbol", "g")}))
    assert sched.report["g"] == "VectorizedElementwise"


def _run(func, args, out_shape):
    return run_on_gpu(build(func), args, out_shape)


@pytest.mark.cuda
def test_gelu_and_add_match_numpy_on_gpu(rng):
    x = rng.standard_normal((2, 8, 256)).astype("float16")
    xf = x.astype("float64")
    erf = np.vectorize(math.erf)
    ref = (xf * 0.5 * (1 + erf(xf / math.sqrt(2)))).reshape(16, 256)
    y = _run(gelu_reshape(), [x], ref.shape)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
    a, b = (rng.standard_normal((4, 64)).astype("float16") for _ in range(2))
    ref = a.astype("float64") + b
    y = _run(residual_add(), [a, b], ref.shape)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
