"""RemoveIdentityOps: inference no-ops become their input (var-to-var bindings, cleaned up later)."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from smelt.passes import Explainer, RemoveIdentityOps


def test_identity_ops_removed():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                lv = R.nn.dropout(x, rate=0.5)
                lv1 = lv[0]
                lv2 = R.astype(lv1, "float32")
                lv3 = R.reshape(lv2, R.shape([2, 3]))
                lv4 = R.permute_dims(lv3, axes=[0, 1])
                lv5 = R.broadcast_to(lv4, R.shape([2, 3]))
                gv = R.nn.relu(lv5)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                lv = (x, x)
                lv1 = lv[0]
                lv2 = lv1
                lv3 = lv2
                lv4 = lv3
                lv5 = lv4
                gv = R.nn.relu(lv5)
                R.output(gv)
            return gv

    explain = Explainer("RemoveIdentityOps")
    tvm.ir.assert_structural_equal(RemoveIdentityOps(explain)(Before), Expected)
    assert explain.lines() == [
        "RemoveIdentityOps: rewrote nn.dropout: dropout is the identity at inference",
        "RemoveIdentityOps: rewrote astype: cast to the same dtype",
        "RemoveIdentityOps: rewrote reshape: reshape to the same shape",
        "RemoveIdentityOps: rewrote permute_dims: identity permutation",
        "RemoveIdentityOps: rewrote broadcast_to: broadcast_to to the same shape"]


def test_symbolic_shape_and_rank_one_reverse():
    """reshape to the same symbolic shape, and the default (reversing) permute of a vector."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32"), v: R.Tensor((5,), "float32")):
            n = T.int64()
            with R.dataflow():
                lv = R.reshape(x, R.shape([n, 3]))
                lv1 = R.permute_dims(v)
                gv = (lv, lv1)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32"), v: R.Tensor((5,), "float32")):
            with R.dataflow():
                lv = x
                lv1 = v
                gv = (lv, lv1)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(RemoveIdentityOps()(Before), Expected)


def test_real_ops_kept():
    """Casts, reshapes and permutations that change something stay, and nothing is explained."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32"), y: R.Tensor((2, 3), "float32")):
            n = T.int64()
            with R.dataflow():
                lv = R.astype(y, "float16")
                lv1 = R.reshape(y, R.shape([3, 2]))
                lv2 = R.permute_dims(y, axes=[1, 0])
                lv3 = R.permute_dims(y)
                lv4 = R.reshape(x, R.shape([3, n]))
                lv5 = R.broadcast_to(y, R.shape([4, 2, 3]))
                gv = (lv, lv1, lv2, lv3, lv4, lv5)
                R.output(gv)
            return gv

    explain = Explainer("RemoveIdentityOps")
    tvm.ir.assert_structural_equal(RemoveIdentityOps(explain)(Before), Before)
    assert explain.records == []
