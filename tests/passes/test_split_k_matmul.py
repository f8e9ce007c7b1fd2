"""SplitKMatmul: which matmuls split their K, the numbers they give, and the epilogue fused into the sum."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.pipeline import PipelineOptions, fuse_passes
from smelt.passes.split_k_matmul import SplitKMatmul


def linear(m, k, n, out_dtype="float32", batch=()):
    """relu(matmul(x, w, out_dtype).astype(float16) + b), x [*batch, m, k] and w [k, n] in float16."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*batch, m, k), "float16"))
    w = relax.Var("w", relax.TensorType((k, n), "float16"))
    b = relax.Var("b", relax.TensorType((n,), "float16"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w, out_dtype=out_dtype))
            if out_dtype != "float16":
                y = bb.emit(relax.op.astype(y, "float16"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(y, b))))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod):
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("batch", [(), (2,)], ids=["2d", "3d"])
def test_same_numbers_as_the_plain_matmul(batch, rng):
    """float32 partial sums in another order: max error 1e-3 of the output's scale (fp16 output rounding)."""
    before = linear(16, 2048, 64, batch=batch)
    explain = Explainer("SplitKMatmul")
    after = SplitKMatmul(explain=explain)(before)
    assert explain.lines() == ["SplitKMatmul: rewrote matmul: 1 output tiles: K=2048 split in 8"]
    assert set(_calls(after)) == {"matmul_split_k", "sum_split_k"}
    assert int(after["sum_split_k"].attrs["op_pattern"]) == 4
    args = [rng.standard_normal(s).astype("float16") for s in ((*batch, 16, 2048), (2048, 64), (64,))]
    ref = np.maximum((args[0].astype("float64") @ args[1].astype("float64")) + args[2], 0)
    got = _run(after, args).astype("float64")
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("m, k, n, out_dtype", [(4096, 2048, 768, "float32"),  # enough tiles
                                                (128, 1024, 768, "float32"),  # K too short
                                                (16, 2048, 64, "float16"),  # no float32 accumulator
                                                (16, 2056, 64, "float32")])  # K not a multiple of 32 * S
def test_matmuls_that_keep_their_k(m, k, n, out_dtype):
    before = linear(m, k, n, out_dtype)
    tvm.ir.assert_structural_equal(SplitKMatmul()(before), before)


def test_epilogue_fuses_into_the_sum():
    mod = SplitKMatmul()(linear(16, 2048, 64))
    mod = tvm.transform.Sequential(fuse_passes(PipelineOptions()))(mod)
    names = _calls(mod)
    assert "matmul_split_k" in names
    assert any(n.startswith("fused_sum_split_k") and "add" in n and "relu" in n for n in names), names


def _run(mod, args):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
