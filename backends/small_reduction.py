"""SmallReduction: a default GPU schedule for reductions over a few elements (depthwise convs, pooling).

Requires: a GPU target; a PrimFunc whose blocks, after inlining every injective producer
(padding) and consumer (bias, cast, activation) that TVM's inliner accepts, are one
reduction block, optionally followed by one spatial epilogue block; the reduction's
iterators static, their product at most ``max_extent`` (64: a 3x3, 5x5 or 7x7 window).
Spatial extents may be symbolic.
Declines (``apply`` returns None) anything else, so the next rule takes over.
Guarantees: the same function, computed one output element per thread: the thread's
window is read straight from global memory, accumulated in a register with the
reduction loops unrolled, and the epilogue is applied before the single store. Threads
run along the innermost output axis (the channels of an NHWC depthwise conv), so
neighbouring threads read neighbouring addresses.

Why not dlight: its ``GeneralReduction`` rule gives every output element a thread block
that reduces across threads: for the 9 products of a 3x3 depthwise conv that is one busy
thread in 32+. On an H200, MobileNetV3-Large fp16 at batch 32 spent 37 of its 39 ms in
its 12 depthwise convs (``bench/gpu_e2e.py``). ``Fallback`` maps a thread per element
too, but accumulates in global memory and leaves the window loop rolled.
Where: ``apply_default_schedules.default_rules()``, after the GEMM and GEMV rules and
before dlight's reduction rules.
"""

from __future__ import annotations

import functools

from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from .rule_blocks import inlined_blocks


class SmallReduction(GPUScheduleRule):
    """See the module docstring."""

    def __init__(self, max_extent: int = 64, threads: int = 256):
        self.max_extent, self.threads = max_extent, threads

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` for ``target``, or None where the rule does not apply."""
        opened = inlined_blocks(self, func, target)
        if opened is None:
            return None
        sch, infos = opened
        kinds = [info.dom_kind() for info in infos]
        if not 1 <= len(infos) <= 2 or "R" not in kinds[0] or (len(infos) == 2 and set(kinds[1]) != {"S"}):
            return None
        main = infos[0].block_rv
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if not all(isinstance(e, tirx.IntImm) for e in extents) or \
                functools.reduce(lambda a, b: a * b, (int(e) for e in extents), 1) > self.max_extent:
            return None

        # Accumulate in a register; the write-back folds into the epilogue when there is one.
        tail = sch.cache_write(main, 0, "local")
        if len(infos) == 2:
            sch.compute_inline(tail)
            tail = infos[1].block_rv
        bx, tx = sch.split(sch.fuse(*sch.get_loops(tail)), [None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        # compute_at makes one loop per block iterator, in the iterators' order (unit loops kept).
        sch.compute_at(main, tx, preserve_unit_loops=True)
        loops = sch.get_loops(main)[2:]
        iters = sch.get(main).iter_vars
        if len(loops) != len(iters):
            return None
        reduce_loops = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.CommReduce]
        # The init stays in the loop nest (decompose_reduction rejects the fused bindings); unrolled,
        # its condition on the first window element folds away.
        for loop in reduce_loops:
            sch.unroll(loop)
        return sch
