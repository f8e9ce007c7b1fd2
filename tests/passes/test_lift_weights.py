"""LiftWeights: large constants become trailing parameters with their values in ``params``."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.ir.weights import MIN_WEIGHT_ELEMENTS
from smelt.passes import LiftWeights


def _module(rng):
    shared = tvm.runtime.tensor(rng.standard_normal((4, 16)).astype("float32"))
    big = rng.standard_normal(MIN_WEIGHT_ELEMENTS).astype("float32")
    small = rng.standard_normal(MIN_WEIGHT_ELEMENTS - 1).astype("float32")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), y: R.Tensor((15,), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                lv = R.add(x, R.const(shared))
                lv1 = R.multiply(lv, R.const(shared))  # the same tensor again: one parameter
                lv2 = R.add(lv1, R.const(big))
                lv3 = R.multiply(y, R.const(small))  # below the threshold: stays inline
                lv4 = R.multiply(lv3, R.const(2.0, "float32"))
                gv = (lv2, lv4)
                R.output(gv)
            return gv

        @R.function
        def helper(x: R.Tensor((16,), "float32")):  # no num_input: not a model, left alone
            return R.add(x, R.const(big))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), y: R.Tensor((15,), "float32"),
                 w0: R.Tensor((4, 16), "float32"), w1: R.Tensor((16,), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                lv = R.add(x, w0)
                lv1 = R.multiply(lv, w0)
                lv2 = R.add(lv1, w1)
                lv3 = R.multiply(y, R.const(small))
                lv4 = R.multiply(lv3, R.const(2.0, "float32"))
                gv = (lv2, lv4)
                R.output(gv)
            return gv

        @R.function
        def helper(x: R.Tensor((16,), "float32")):
            return R.add(x, R.const(big))

    return Before, Expected, [shared.numpy(), big]


def test_lifted_once_small_inline(rng):
    before, expected, values = _module(rng)
    after = LiftWeights(before)
    main = after["main"]
    tvm.ir.assert_structural_equal(after["helper"], before["helper"])
    tvm.ir.assert_structural_equal(main.without_attr("params"), expected["main"])
    params = list(main.attrs["params"])
    assert len(params) == len(main.params) - int(main.attrs["num_input"]) == 2
    for got, want in zip(params, values):
        np.testing.assert_array_equal(got.numpy(), want)


def test_existing_params_kept_in_front(rng):
    """Lifting a function that already has weight parameters appends after them."""
    before, _, values = _module(rng)
    once = LiftWeights(before)["main"]
    # Bind the second weight back as a constant, then lift again: w0 stays first.
    rebound = once.bind_params({once.params[3]: tvm.relax.const(values[1])})
    rebound = rebound.with_attr("params", list(once.attrs["params"])[:1])
    again = LiftWeights(tvm.IRModule({"main": rebound}))["main"]
    assert [p.ty.shape[0] for p in again.params[2:]] == [4, 16]
    for got, want in zip(again.attrs["params"], values):
        np.testing.assert_array_equal(got.numpy(), want)


def test_no_constants_no_change(rng):
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            R.func_attr({"num_input": 1})
            return R.add(x, R.const(1.0, "float32"))

    tvm.ir.assert_structural_equal(LiftWeights(Before), Before)
