"""SinkReshapes: reshapes move below elementwise ops and cancel, so that epilogues fuse into matmuls."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from smelt.passes import Explainer
from smelt.passes.sink_reshapes import SinkReshapes


def test_linear_gelu_residual_stays_two_dimensional():
    """view -> matmul -> view -> gelu / + residual / layer_norm, as torch.export writes nn.Linear."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8), "float32"), w: R.Tensor((8, 8), "float32"), b: R.Tensor((8,), "float32"),
                 g: R.Tensor((8,), "float32")):
            with R.dataflow():
                lv = R.reshape(x, R.shape([4, 8]))
                lv1 = R.matmul(lv, w)
                lv2 = R.reshape(lv1, R.shape([1, 4, 8]))
                lv3 = R.add(lv2, b)
                lv4 = R.nn.gelu(lv3)
                lv5 = R.add(x, lv4)
                lv6 = R.nn.layer_norm(lv5, g, g, axes=[2])
                gv = R.reshape(lv6, R.shape([4, 8]))
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8), "float32"), w: R.Tensor((8, 8), "float32"), b: R.Tensor((8,), "float32"),
                 g: R.Tensor((8,), "float32")):
            with R.dataflow():
                lv = R.reshape(x, R.shape([4, 8]))
                lv1 = R.matmul(lv, w)
                lv3 = R.add(lv1, b)
                lv4 = R.nn.gelu(lv3)
                lv6 = R.add(lv, lv4)  # the residual reuses the reshape of x that fed the matmul
                gv = R.nn.layer_norm(lv6, g, g, axes=[-1])
                R.output(gv)
            return gv

    after, lines = _sunk(Before, Expected)
    assert len(lines) == 4
    assert "SinkReshapes: rewrote nn.gelu: reshape [4, 8] -> [1, 4, 8] moved below nn.gelu" in lines
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((1, 4, 8), (8, 8), (8,), (8,))]
    np.testing.assert_allclose(_run(after, args), _run(Before, args), rtol=1e-6, atol=1e-6)


def test_pooled_nhwc_head_quantizes_in_the_pooling():
    """A CNN head in NHWC: mean over H, W, a permute_dims of the [N, 1, 1, C] result to NCHW (a
    reshape: it moves only axes of extent 1), the FC input's quantize, the flatten. The permute
    and the flatten become one reshape after the quantize, whose ops then fuse into the mean."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 3, 8), "float32")):
            with R.dataflow():
                lv = R.mean(x, axis=[1, 2], keepdims=True)
                lv1 = R.permute_dims(lv, axes=[0, 3, 1, 2])
                lv2 = R.multiply(lv1, R.const(4.0, "float32"))
                lv3 = R.clip(lv2, R.prim_value(-448), R.prim_value(448))
                gv = R.reshape(lv3, R.shape([2, 8]))
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 3, 8), "float32")):
            with R.dataflow():
                lv = R.mean(x, axis=[1, 2], keepdims=True)
                lv2 = R.multiply(lv, R.const(4.0, "float32"))
                lv3 = R.clip(lv2, R.prim_value(-448), R.prim_value(448))
                gv = R.reshape(lv3, R.shape([2, 8]))
                R.output(gv)
            return gv

    after, lines = _sunk(Before, Expected)
    assert "SinkReshapes: rewrote permute_dims: permute_dims of [2, 1, 1, 8] moves only axes of extent 1: " \
        "a reshape to [2, 8, 1, 1]" in lines
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 8)).astype("float32") * 100
    np.testing.assert_array_equal(_run(after, [x]), _run(Before, [x]))


def test_what_cannot_move_stays():
    """A norm over an axis the reshape changes, a broadcast over a changed axis, dynamic shapes, a
    permute_dims that moves data."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), c: R.Tensor((2, 1, 1), "float32"), y: R.Tensor(("n", 8), "float32"),
                 z: R.Tensor((2, 1, 3, 8), "float32")):
            n = T.int64()
            with R.dataflow():
                lv = R.reshape(x, R.shape([2, 2, 8]))
                lv1 = R.nn.softmax(lv, axis=1)
                lv2 = R.multiply(lv, c)
                lv3 = R.reshape(y, R.shape([1, n, 8]))
                lv4 = R.nn.relu(lv3)
                lv5 = R.permute_dims(z, axes=[0, 3, 1, 2])
                lv6 = R.nn.relu(lv5)
                gv = (lv1, lv2, lv4, lv6)
                R.output(gv)
            return gv

    explain = Explainer("SinkReshapes")
    tvm.ir.assert_structural_equal(SinkReshapes(explain)(Before), Before)
    assert explain.num_fired == 0


def _sunk(before, expected):
    """SinkReshapes on ``before``, checked against ``expected`` (after CanonicalizeBindings):
    the module it made and its explanation's lines."""
    explain = Explainer("SinkReshapes")
    after = SinkReshapes(explain)(before)
    tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after), expected, map_free_vars=True)
    return after, explain.lines()


def _run(mod, args):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
