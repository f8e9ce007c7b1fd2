"""HoistQuantizeOverMaxPool: the FP8 quantization of a max pool's result moves before the pool onto
an FP8 conv's result, bit-identically (both quantization forms and layouts, clipped values, padded
windows; rounding to E4M3 is monotone on every float16), over the E4M3 bits as int8 after a ReLU,
and where it does not."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from tvm import relax

from smelt.passes import Explainer, HoistQuantizeOverMaxPool

FP8 = "float8_e4m3fn"


def _module(form: str, scale: float = 37.5, extra_user: bool = False, layout: str = "NHWC", conv: bool = True,
            conv_read_elsewhere: bool = False, relu: bool = True):
    """x -> [FP8 1x1 conv -> scale -> float16 [-> ReLU]] -> max_pool2d 3x3/2 pad 1 -> quantize
    (``form``: clip or maximum/minimum) -> FP8 [-> float16]."""
    shape = (2, 9, 9, 32) if layout == "NHWC" else (2, 32, 9, 9)
    w = np.random.default_rng(3).standard_normal((32, 32, 1, 1) if layout == "NCHW" else (32, 1, 1, 32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            if conv:
                q = bb.emit(relax.op.astype(x, FP8))
                y = bb.emit(relax.op.nn.conv2d(q, relax.const(w.astype(ml_dtypes.float8_e4m3fn)), data_layout=layout,
                                               kernel_layout="OIHW" if layout == "NCHW" else "OHWI",
                                               out_dtype="float32"))
                y = bb.emit(relax.op.astype(bb.emit(relax.op.multiply(y, relax.const(0.5, "float32"))), "float16"))
                if relu:
                    y = bb.emit(relax.op.nn.relu(y))
            pool = bb.emit(relax.op.nn.max_pool2d(y, 3, 2, 1, layout=layout))
            q = bb.emit(relax.op.multiply(pool, relax.const(scale, "float16")))
            if form == "clip":
                q = bb.emit(relax.op.clip(q, -448.0, 448.0))
            else:
                q = bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(q, relax.const(-448.0, "float16"))),
                                             relax.const(448.0, "float16")))
            q = bb.emit(relax.op.astype(q, FP8))
            outs = [bb.emit(relax.op.astype(q, "float16"))] + ([pool] if extra_user else []) + \
                ([y] if conv_read_elsewhere else [])
            gv = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        bb.emit_func_output(gv)
    return bb.get()


def _ops(mod) -> list[str]:
    return [b.value.op.name if b.value.op.name != "relax.call_tir" else b.value.args[0].name_hint
            for b in mod["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]


@pytest.mark.parametrize("form", ["clip", "max_min"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu_bits", "signed"])
def test_bit_identical(form, layout, relu, rng, run):
    before = _module(form, layout=layout, relu=relu)
    explain = Explainer("HoistQuantizeOverMaxPool")
    after = HoistQuantizeOverMaxPool(explain)(before)
    assert explain.num_fired == 1
    assert "relax.nn.max_pool2d" not in _ops(after) and "max_pool2d_e4m3" in _ops(after), _ops(after)
    # after a ReLU the pool takes the E4M3 bits as int8; else it widens them
    assert ("reinterpret" in after["max_pool2d_e4m3"].script()) == relu
    # values over E4M3's range once scaled (clipped), ReLU's zeros, ties, and without the ReLU
    # windows of negative values only
    x = (rng.standard_normal([int(d) for d in before["main"].params[0].ty.shape.values]) * 8).astype(np.float16)
    want, got = run(before, x), run(after, x)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() == 448  # the clip was exercised
    assert relu or (want < 0).any()


def test_pool_read_elsewhere_negative_scale_or_no_fp8_conv_stays():
    for mod in (_module("clip", extra_user=True), _module("clip", scale=-2.0),
                _module("clip", conv_read_elsewhere=True), _module("clip", conv=False)):
        explain = Explainer("HoistQuantizeOverMaxPool")
        after = HoistQuantizeOverMaxPool(explain)(mod)
        assert explain.num_fired == 0 and "relax.nn.max_pool2d" in _ops(after)
    assert any("no FP8 conv" in line for line in explain.lines())  # quantized apart it would cost a kernel


def test_e4m3_rounding_is_monotone():
    """The premise: rounding to E4M3 never reverses an order (all finite float16 values)."""
    v = np.arange(65536, dtype=np.uint16).view(np.float16)
    v = np.sort(v[np.isfinite(v)])
    q = np.clip(v.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.all(np.diff(q) >= 0)
