"""The shared fuse phase (passes/pipeline.py): what it guarantees the schedule phase."""

from __future__ import annotations

import tvm
from tvm import relax

from smelt.passes.pipeline import PipelineOptions, fuse_passes


def _reshape_views(batch) -> tuple[list[str], int]:
    """The fuse phase on lib_a → reshape → lib_b and a reshape of the parameter, with ``batch``
    rows: (Relax ops left, number of kernels)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 128, 768), "float16"))
    out_ty = relax.TensorType((batch, 128, 768), "float16")
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.call_dps_packed("lib_a", relax.Tuple([x]), out_ty))
            r = bb.emit(relax.op.reshape(a, (batch * 128, 768)))
            y = bb.emit(relax.call_dps_packed("lib_b", relax.Tuple([r]),
                                              relax.TensorType((batch * 128, 768), "float16")))
            p = bb.emit(relax.op.reshape(x, (batch * 128, 768)))
            out = bb.emit_output(relax.Tuple([y, p]))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential(fuse_passes(PipelineOptions()))(bb.get())
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return ops, len([gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)])


def test_reshape_kernels_become_views():
    """A reshape between two library calls (BERT's norm → reshape → cuBLASLt GEMM) fuses with
    nothing; it leaves the fuse phase as a view (``R.reshape``), not a copy kernel for the
    schedule phase to schedule. A reshape of the function's parameter stays a kernel
    (RewriteReshapeViews says why)."""
    ops, kernels = _reshape_views(1)
    assert ops.count("relax.reshape") == 1 and ops.count("relax.call_tir") == 1, ops
    assert kernels == 1


def test_reshapes_of_a_symbolic_batch_become_views():
    """The same with a batch N (an ONNX model's): the view's shape is symbolic."""
    ops, kernels = _reshape_views(tvm.tirx.Var("n", "int64"))
    assert ops.count("relax.reshape") == 1 and ops.count("relax.call_tir") == 1, ops
    assert kernels == 1
