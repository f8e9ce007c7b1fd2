"""FoldConstantLayout: layout and elementwise ops on constants become constants of the exact type."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.passes import FoldConstantLayout


def test_linear_weight_transposed_and_bias_reshaped(rng):
    """torch Linear as imported: permute_dims(W) and reshape(b) become constants."""
    w, b = rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                lv = R.permute_dims(R.const(w), axes=[1, 0])
                lv1 = R.matmul(x, lv)
                lv2 = R.reshape(R.const(b), R.shape([1, 6]))
                gv = R.add(lv1, lv2)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                lv = R.const(np.ascontiguousarray(w.T))
                lv1 = R.matmul(x, lv)
                lv2 = R.const(b.reshape(1, 6))
                gv = R.add(lv1, lv2)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FoldConstantLayout(Before), Expected)


def test_chain_folds_through_bindings(rng):
    """expand_dims(squeeze(permute_dims(c))) folds step by step into one constant."""
    c = rng.standard_normal((1, 3, 4)).astype("float32")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 1, 3), "float32")):
            with R.dataflow():
                lv = R.permute_dims(R.const(c))
                lv1 = R.squeeze(lv, axis=[2])
                lv2 = R.expand_dims(lv1, axis=[-2])
                gv = R.add(x, lv2)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 1, 3), "float32")):
            with R.dataflow():
                lv = R.const(np.ascontiguousarray(c.transpose()))
                lv1 = R.const(np.ascontiguousarray(c.transpose()[:, :, 0]))
                lv2 = R.const(np.ascontiguousarray(c.transpose()[:, None, :, 0]))
                gv = R.add(x, lv2)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FoldConstantLayout(Before), Expected)


def test_scalar_result_stays_scalar():
    """A 0-d result must stay 0-d: shape (1,) would change the function's return type."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((), "float32")):
            with R.dataflow():
                lv = R.divide(R.const(1.0, "float32"), R.const(4.0, "float32"))
                gv = R.add(x, lv)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((), "float32")):
            with R.dataflow():
                lv = R.const(0.25, "float32")
                gv = R.add(x, lv)
                R.output(gv)
            return gv

    after = FoldConstantLayout(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    assert after["main"].ret_ty.ndim == 0


def test_int64_stays_int64():
    """relax.const(np.int64 array) would narrow to int32; the folded constant keeps int64."""
    idx = np.array([[0, 2**40], [3, 1]], dtype="int64")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "int64")):
            with R.dataflow():
                lv = R.reshape(R.const(idx, "int64"), R.shape([4]))
                lv1 = R.multiply(lv, R.const(3, "int64"))
                gv = R.add(x, lv1)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4,), "int64")):
            with R.dataflow():
                lv = R.const(idx.reshape(4), "int64")
                lv1 = R.const(idx.reshape(4) * 3, "int64")
                gv = R.add(x, lv1)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FoldConstantLayout(Before), Expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "float64"])
def test_astype(dtype, rng):
    c = (rng.standard_normal((4, 4)) * 8).astype("float32")
    np_dtype = np.dtype(getattr(ml_dtypes, dtype, dtype))

    @I.ir_module
    class Before:
        @R.function
        def main():
            with R.dataflow():
                gv = R.astype(R.const(c), dtype)
                R.output(gv)
            return gv

    after = FoldConstantLayout(Before)
    (binding,) = after["main"].body.blocks[0].bindings
    assert isinstance(binding.value, tvm.ir.Constant)
    assert str(binding.value.ty.dtype) == dtype and after["main"].ret_ty.dtype == dtype
    np.testing.assert_array_equal(binding.value.value.numpy(), c.astype(np_dtype))


def test_left_alone_when_not_all_constant_or_integer_divide(rng):
    """A non-constant operand, integer divide (TVM truncates) and mixed dtypes are not folded."""
    c = rng.standard_normal((2, 3)).astype("float32")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                lv = R.multiply(x, R.const(c))
                lv1 = R.divide(R.const(np.array([-7, 7], "int32")), R.const(np.array([2, 2], "int32")))
                lv2 = R.permute_dims(x)
                gv = (lv, lv1, lv2)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FoldConstantLayout(Before), Before)


def test_numbers_unchanged(rng, run):
    """Folded and unfolded modules compute the same (exactly: the folds are exact in float32)."""
    w, b = rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal(6).astype("float32")

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.permute_dims(R.const(w)))
                lv1 = R.multiply(R.reshape(R.const(b), R.shape([1, 6])), R.const(0.5, "float32"))
                gv = R.add(lv, lv1)
                R.output(gv)
            return gv

    after = FoldConstantLayout(Before)
    ops = [b.value.op.name for b in after["main"].body.blocks[0].bindings if hasattr(b.value, "op")]
    assert ops == ["relax.matmul", "relax.add"]
    x = rng.standard_normal((2, 8)).astype("float32")
    np.testing.assert_array_equal(run(after, x), run(Before, x))
