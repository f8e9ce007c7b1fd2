"""The shared fuse phase (passes/pipeline.py): what it guarantees the schedule phase."""

from __future__ import annotations

import tvm
from tvm import relax

from smelt.passes.pipeline import PipelineOptions, fuse_passes


def test_reshape_kernels_become_views():
    """A reshape between two library calls (BERT's norm → reshape → cuBLASLt GEMM) fuses with
    nothing; it leaves the fuse phase as a view (``R.reshape``), not a copy kernel for the
    schedule phase to schedule. A reshape of the function's parameter stays a kernel
    (RewriteReshapeViews says why)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 128, 768), "float16"))
    out_ty = relax.TensorType((1, 128, 768), "float16")
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.call_dps_packed("lib_a", relax.Tuple([x]), out_ty))
            r = bb.emit(relax.op.reshape(a, (128, 768)))
            y = bb.emit(relax.call_dps_packed("lib_b", relax.Tuple([r]), relax.TensorType((128, 768), "float16")))
            p = bb.emit(relax.op.reshape(x, (128, 768)))
            out = bb.emit_output(relax.Tuple([y, p]))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential(fuse_passes(PipelineOptions()))(bb.get())
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    assert ops.count("relax.reshape") == 1 and ops.count("relax.call_tir") == 1, ops
    assert len([gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]) == 1
