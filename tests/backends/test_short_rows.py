"""ShortRows: which kernels it takes, its one vector store per row, numerics on a GPU.

Compile-only tests need nvcc, not a GPU. The ``cuda`` test runs the kernel and compares with
numpy; tolerance: max |y - ref| at most 1e-3 * max |ref| (float16 rounding is 2^-11 relative; an
element from the wrong plane or pixel gives errors of order 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.backends.apply_default_schedules import ApplyDefaultSchedules
from smelt.backends.short_rows import ShortRows

from .test_small_reduction import run_on_gpu
from .test_tensorcore_matmul import TARGET, _one_kernel

REL_TOL = 1e-3


def image_to_nhwc(shape=(2, 3, 24, 24), pad_to=4, dtype="float16"):
    """A network's input as smelt's CUDA pipeline fuses it: fp32 NCHW -> ``dtype`` NHWC, channels padded."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.permute_dims(bb.emit(relax.op.astype(x, dtype)), [0, 2, 3, 1]))
            if pad_to > shape[1]:
                y = bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, 0, 0, 0, pad_to - shape[1]]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return _one_kernel(bb.get())


def build(func, **rule):
    sch = ShortRows(**rule).apply(func, TARGET, False)
    assert sch is not None
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=TARGET)


def test_reads_each_plane_and_stores_each_pixel_once(requires_cuda_compiler):
    code = build(image_to_nhwc((32, 3, 224, 224))).mod.imports[0].inspect_source("cuda").split("__global__", 2)[2]
    assert code.count("x_ptr[") == 3 and code.count("*(half4*)(PadInput_intermediate_ptr") == 1
    assert "for (" not in code


def test_rows_of_64_bytes_in_16_byte_pieces(requires_cuda_compiler):
    """An FP8 space-to-depth stem's input: 64 channels, a thread per row (its index arithmetic
    once), four vector stores."""
    code = build(image_to_nhwc((32, 64, 56, 56), pad_to=64, dtype="float8_e4m3fn")).mod.imports[0] \
        .inspect_source("cuda").split("__global__", 2)[2]
    assert code.count("x_ptr[") == 64 and code.count("*(uint4*)(T_transpose_intermediate_ptr") == 4, code
    assert "for (" not in code


def test_takes_the_input_layout_change_before_fallback():
    sched = ApplyDefaultSchedules()
    with TARGET:
        sched(tvm.IRModule({"k": image_to_nhwc().with_attr("global_symbol", "k")}))
    assert sched.report["k"] == "ShortRows"


@pytest.mark.parametrize("func", [image_to_nhwc(pad_to=3), image_to_nhwc((2, 64, 8, 8), pad_to=64),
                                  image_to_nhwc((1, 4, 1, 257))], ids=["3_channels", "128_bytes", "257_rows"])
def test_declines_rows_that_are_no_vector_or_threads_that_do_not_divide(func):
    assert ShortRows().apply(func, TARGET, False) is None


@pytest.mark.cuda
def test_matches_numpy_on_gpu(rng):
    x = rng.standard_normal((2, 3, 24, 56)).astype("float32")
    ref = np.zeros((2, 24, 56, 4))
    ref[..., :3] = x.astype("float16").astype("float64").transpose(0, 2, 3, 1)
    y = run_on_gpu(build(image_to_nhwc(x.shape)), [x], ref.shape)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()
