"""EmulateE4M3RoundTrips: a round trip to E4M3 inside one CPU kernel keeps its rounding. Checked
against ml_dtypes (which rounds as the GPU does) on every E4M3 value, the midpoints between
neighbours (ties to even), subnormals and values past ±448; and that without the pass TVM's CPU
code loses the rounding."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax

from smelt.passes import Explainer
from smelt.passes.emulate_e4m3_round_trips import EmulateE4M3RoundTrips


def _round_trip(n: int, dtype: str, also_fp8: bool = False) -> tvm.IRModule:
    """``astype(astype(x * 1, e4m3), dtype)`` (+ the E4M3 tensor as a second output)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n,), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.astype(bb.emit(relax.op.multiply(x, relax.const(1.0, dtype))), "float8_e4m3fn"))
            y = bb.emit(relax.op.add(relax.op.astype(q, dtype), relax.const(0.0, dtype)))
            out = bb.emit_output(relax.Tuple([y, q]) if also_fp8 else y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, x: np.ndarray):
    """``mod`` fused, built for the CPU and run on ``x``."""
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x))


def _values() -> np.ndarray:
    """Every finite E4M3 value, the midpoints between neighbours, points a little off them, and
    values beyond ±448 (clipped first, as QuantizeFp8 does)."""
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mid = (grid[1:] + grid[:-1]) / 2
    near = np.concatenate([mid * (1 + 1e-3), mid * (1 - 1e-3)])
    beyond = np.array([449.0, 463.0, 464.0, 500.0, 1e4, -449.0, -464.0, -1e4], np.float32)
    return np.concatenate([grid, mid, near, np.clip(beyond, -448, 448)]).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_round_trip_in_one_kernel_rounds_as_ml_dtypes(dtype):
    x = _values().astype(dtype)
    explain = Explainer("EmulateE4M3RoundTrips")
    got = _run(EmulateE4M3RoundTrips(explain)(_round_trip(x.size, dtype)), x).numpy()
    want = x.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(dtype)
    np.testing.assert_array_equal(got, want)
    assert len(explain.lines()) == 1


def test_without_it_the_cpu_loses_the_rounding():
    """TVM's FP8ComputeLegalize drops a round trip within one kernel."""
    x = np.array([0.3, 1.1, 17.0, 300.0], np.float32)
    got = _run(_round_trip(x.size, "float32"), x).numpy()
    assert not np.array_equal(got, x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_the_e4m3_tensor_stays_for_its_other_users():
    """The stored E4M3 tensor is TVM's own conversion, compared on E4M3's normal range: TVM 0.27's
    CPU conversion to E4M3 does not make subnormals (below 2^-6 it stores zeros and wrong codes)."""
    x = _values()
    got_y, got_q = _run(EmulateE4M3RoundTrips()(_round_trip(x.size, "float32", also_fp8=True)), x)
    want = x.astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(got_y.numpy(), want.astype(np.float32))
    normal = np.abs(x) >= 2.0 ** -6
    np.testing.assert_array_equal(got_q.numpy().view(np.uint8)[normal], want.view(np.uint8)[normal])


def test_other_casts_stay():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.astype(x, "float16"))
            out = bb.emit_output(relax.op.astype(h, "float32"))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(EmulateE4M3RoundTrips()(mod), mod)
