"""WarpRowReduction: softmax and layer norm rows reduced by one warp each.

Compile-only tests need nvcc, not a GPU: which kernels the rule takes, that the reductions are
warp shuffles with each warp on its own row. Tests marked ``cuda`` compare with numpy in
float64; tolerance: max |y - ref| <= 1e-2 * max |ref| (float16 output rounding is 2^-11
relative; a row reduced by the wrong warp gives errors of order 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.backends.apply_default_schedules import ApplyDefaultSchedules
from smelt.backends.warp_row_reduction import WarpRowReduction

from .test_small_reduction import run_on_gpu
from .test_tensorcore_matmul import TARGET, _one_kernel

REL_TOL = 1e-2


def _kernel(shape, body, n_params=0, cast=True):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    params = [relax.Var(f"p{i}", relax.TensorType(shape[-1:], "float32")) for i in range(n_params)]
    with bb.function("main", [x, *params]):
        with bb.dataflow():
            y = body(x, *params)
            out = bb.emit_output(bb.emit(relax.op.astype(y, "float16") if cast else y))
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def softmax(shape=(8, 256, 128)):  # attention scores: 2048 rows of 128, 8 per block
    return _kernel(shape, lambda x: relax.op.nn.softmax(x, axis=-1))


def layer_norm(shape=(1536, 768)):  # BERT's hidden rows; 4 per block, so that 384 blocks fill the GPU
    return _kernel(shape, lambda x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5), n_params=2)


def build(func):
    sch = WarpRowReduction().apply(func, TARGET, False)
    assert sch is not None
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=TARGET)


@pytest.mark.parametrize("func, threads", [(softmax(), 256), (layer_norm(), 128)], ids=["softmax", "layer_norm"])
def test_rows_reduce_in_warp_shuffles(func, threads, requires_cuda_compiler):
    code = build(func).mod.imports[0].inspect_source("cuda").split("__global__", 1)[1]
    assert f"__launch_bounds__({threads})" in code  # 8 or 4 warps: a row each
    assert "__shfl_down_sync" in code
    assert "threadIdx.y" in code.split("__shfl_down_sync", 1)[0]  # each warp loads its own row
    assert "for (" not in code.split("__shfl_down_sync", 1)[0]  # ... and no other
    # The reduced values stay in registers: stored to shared memory by lane 0, they were read by
    # the other lanes without a barrier (TVM inserted none), and BERT's outputs were NaN.
    assert "__shared__" not in code and "__syncthreads" not in code


@pytest.mark.parametrize("func", [
    softmax((4, 300, 100)),  # a row that is no multiple of a warp
    layer_norm((128, 768)),  # BERT at batch 1: 128 rows would be 16 blocks of 8 warps
    _kernel((2048, 128), lambda x: relax.op.sum(x, axis=-1), cast=False),  # one reduction: dlight's Reduction rule
], ids=["row_of_100", "few_rows", "plain_sum"])
def test_declines(func):
    assert WarpRowReduction().apply(func, TARGET, False) is None


def test_takes_softmax_before_general_reduction():
    sched = ApplyDefaultSchedules()
    with TARGET:
        sched(tvm.IRModule({"s": softmax().with_attr("global_symbol", "s")}))
    assert sched.report["s"] == "WarpRowReduction"


@pytest.mark.cuda
def test_softmax_and_layer_norm_match_numpy_on_gpu(rng):
    x = rng.standard_normal((8, 256, 128)).astype("float32") * 4
    e = np.exp(x.astype("float64") - x.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    y = run_on_gpu(build(softmax()), [x], ref.shape)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
    x = rng.standard_normal((1536, 768)).astype("float32") + 3
    g, b = (rng.standard_normal(768).astype("float32") for _ in range(2))
    xf = x.astype("float64")
    ref = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5) * g + b
    y = run_on_gpu(build(layer_norm()), [x, g, b], ref.shape)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
