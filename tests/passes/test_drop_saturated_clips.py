"""DropSaturatedClips: a clip to +-448 before a cast to float8_e4m3fn goes (CUDA's cast saturates);
any other clip stays. On an NVIDIA GPU (marker ``cuda``) the unclipped cast gives the clipped
cast's bytes for values in, around and far beyond E4M3's range, and infinities."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.passes import Explainer
from smelt.passes.drop_saturated_clips import DropSaturatedClips


def _quantize(clip):
    """``x * 2`` clipped by ``clip(bb, x)`` and cast to E4M3."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 16), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(x, relax.const(2.0, "float16")))
            q = bb.emit_output(relax.op.astype(clip(bb, y), "float8_e4m3fn"))
        bb.emit_func_output(q)
    return bb.get()


def _min_max(lo, hi, max_first=True):
    def clip(bb, y):
        if max_first:
            return bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(y, relax.const(lo, "float16"))),
                                            relax.const(hi, "float16")))
        return bb.emit(relax.op.maximum(relax.const(lo, "float16"),
                                        bb.emit(relax.op.minimum(y, relax.const(hi, "float16")))))
    return clip


def _cast_input(mod) -> relax.Expr:
    """What the function's cast to float8_e4m3fn reads (its bound value)."""
    bindings = {b.var: b.value for b in mod["main"].body.blocks[0].bindings}
    cast = next(v for v in bindings.values() if isinstance(v, relax.Call) and v.op.name == "relax.astype")
    return bindings.get(cast.args[0], cast.args[0])


@pytest.mark.parametrize("clip", [_min_max(-448.0, 448.0), _min_max(-448.0, 448.0, max_first=False),
                                  lambda bb, y: bb.emit(relax.op.clip(y, -448.0, 448.0))],
                         ids=["max_then_min", "min_then_max", "clip"])
def test_the_clip_before_an_e4m3_cast_goes(clip):
    explain = Explainer("DropSaturatedClips")
    out = relax.transform.DeadCodeElimination()(DropSaturatedClips(explain)(_quantize(clip)))
    assert _cast_input(out).op.name == "relax.multiply"
    assert not any(op in out.script() for op in ("R.minimum", "R.maximum", "R.clip"))
    assert len(explain.lines()) == 1


@pytest.mark.parametrize("lo,hi", [(-448.0, 240.0), (0.0, 448.0)])
def test_other_clips_stay(lo, hi):
    out = DropSaturatedClips()(_quantize(_min_max(lo, hi)))
    assert _cast_input(out).op.name == "relax.minimum"


def test_a_clip_before_another_cast_stays():
    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            with R.dataflow():
                lv = R.clip(x, -448.0, 448.0)
                gv = R.astype(lv, "float16")
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(DropSaturatedClips()(Mod), Mod)


@pytest.mark.cuda
def test_cudas_cast_saturates_as_the_clip_did():
    values = np.array([0.0, 1.0, -3.5, 440.0, 447.0, 448.0, 460.0, 500.0, 6e4, np.inf] * 4, np.float16)
    x = np.stack([values, -values] * 2).astype(np.float16)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    dev = tvm.cuda()
    outs = []
    for mod in (_quantize(_min_max(-448.0, 448.0)), DropSaturatedClips()(_quantize(_min_max(-448.0, 448.0)))):
        with target:
            mod = tvm.s_tir.dlight.ApplyDefaultSchedule(tvm.s_tir.dlight.gpu.Fallback())(
                relax.transform.LegalizeOps()(mod))
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), dev)
        outs.append(vm["main"](tvm.runtime.tensor(x, dev)).numpy().view(np.uint8))
    np.testing.assert_array_equal(outs[1], outs[0])
    expected = np.clip(x.astype(np.float32) * 2, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(outs[0], expected)
