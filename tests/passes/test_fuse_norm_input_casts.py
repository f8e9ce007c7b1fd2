"""FuseNormInputCasts: a norm or mean reads its float16 input and casts it inside its own kernel.

Numbers: the rewritten module against the original on the CPU, float32 norms and means of
float16 inputs; the cast is exact, so the results agree to float32 rounding (tolerance 1e-6).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.fuse_norm_input_casts import FuseNormInputCasts


def _norms(dtype="float16"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), dtype))
    g = relax.Var("g", relax.TensorType((64,), "float32"))
    b = relax.Var("b", relax.TensorType((64,), "float32"))
    with bb.function("main", [x, g, b]):
        with bb.dataflow():
            xf = bb.emit(relax.op.astype(x, "float32"))
            ln = bb.emit(relax.op.nn.layer_norm(xf, g, b, axes=[-1], epsilon=1e-5))
            rms = bb.emit(relax.op.nn.rms_norm(xf, g, axes=[-1], epsilon=1e-5))
            out = bb.emit_output(relax.op.add(ln, rms))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return ops


def test_norms_read_the_half_input(run):
    mod = _norms()
    explain = Explainer("FuseNormInputCasts")
    out = relax.transform.DeadCodeElimination()(FuseNormInputCasts(explain)(mod))
    ops = _ops(out)
    assert "relax.nn.layer_norm" not in ops and "relax.nn.rms_norm" not in ops and "relax.astype" not in ops
    assert ops.count("relax.call_tir") == 2
    assert len(explain.lines()) == 2
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((4, 64)).astype("float16"), rng.standard_normal(64).astype("float32"),
            rng.standard_normal(64).astype("float32"))
    want, got = run(mod, *args), run(out, *args)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_float32_inputs_are_left_alone():
    mod = _norms("float32")  # astype float32 -> float32: not a widening cast of a half tensor
    assert "relax.nn.layer_norm" in _ops(FuseNormInputCasts()(mod))


def test_global_average_pool_reads_the_half_input(run):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 7, 7, 64), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            m = bb.emit(relax.op.mean(bb.emit(relax.op.astype(x, "float32")), axis=[1, 2], keepdims=True))
            out = bb.emit_output(relax.op.astype(m, "float16"))
        bb.emit_func_output(out)
    mod = bb.get()
    out = relax.transform.DeadCodeElimination()(FuseNormInputCasts()(mod))
    ops = _ops(out)
    assert "relax.mean" not in ops and ops.count("relax.astype") == 1 and ops.count("relax.call_tir") == 1
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 64)).astype("float16")
    want, got = run(mod, x), run(out, x)
    assert got.shape == (2, 1, 1, 64) and np.abs(got.astype("float64") - want).max() == 0
