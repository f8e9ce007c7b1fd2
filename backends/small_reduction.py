"""SmallReduction: a default GPU schedule for reductions over a few elements (depthwise convs, pooling).

Requires: a GPU target; a PrimFunc whose blocks, after inlining every injective producer
(padding excepted) and consumer (bias, cast, activation) that TVM's inliner accepts, are one
reduction block, optionally followed by one spatial epilogue block, and the pads of its
inputs; the reduction's iterators static, their product at most ``max_extent`` (64: a 3x3,
5x5 or 7x7 window). Spatial extents may be symbolic.
Declines (``apply`` returns None) anything else, so the next rule takes over.
Guarantees: the same function, computed a few output elements per thread: the thread's
window is read straight from global memory, accumulated in registers with the reduction
loops unrolled, and the epilogue is applied before the store. Threads run along the
innermost output axis (the channels of an NHWC depthwise conv), so neighbouring threads
read neighbouring addresses. Where the shapes are static, the channels hold whole vectors
and the padded input is read along them, a thread takes 16 bytes of channels (8 at fp16):
its window comes into registers as one vector load per position (a padded position is the
pad value, never a load), so do the window's weights, and its result leaves as one vector
store. The weights must run along the channels too (HWIO, ``ConvertConvLayout``'s
``depthwise_kernel_layout``); in OHWI the kernel keeps a thread per channel. Vectors shrink
(to 2 channels, then to none) while the kernel would have fewer than ``min_vectors``
threads, which keeps small batch-1 layers spread over the GPU, or while the windows in
registers would take more than ``max_window_bytes`` per thread (a 5x5 window of fp16
inputs and weights at 8 channels: 800 bytes, 200 registers, one thread block per SM).

Why not dlight: its ``GeneralReduction`` rule gives every output element a thread block
that reduces across threads: for the 9 products of a 3x3 depthwise conv that is one busy
thread in 32+. On an H200, MobileNetV3-Large fp16 at batch 32 spent 37 of its 39 ms in
its 12 depthwise convs (``bench/gpu_e2e.py``). ``Fallback`` maps a thread per element
too, but accumulates in global memory and leaves the window loop rolled.
Where: ``apply_default_schedules.default_rules()``, after the GEMM and GEMV rules and
before dlight's reduction rules.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from ..passes.mutate import static_ints
from .rule_blocks import VECTOR_BYTES, dividing_threads, inlined_blocks

_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def _is_padding(sch: s_tir.Schedule, info) -> bool:
    """Whether ``info``'s block is a pad: spatial, storing ``if_then_else(in bounds, load, value)``."""
    store = sch.get(info.block_rv).body
    return set(info.dom_kind()) == {"S"} and isinstance(store, tirx.stmt.BufferStore) and \
        isinstance(store.value, tvm.ir.expr.Call) and store.value.op.same_as(_IF_THEN_ELSE)


def _along_channels(block, read) -> bool:
    """Whether ``block``'s ``read`` takes one element per output channel along its innermost axis."""
    channel = [iv.var for iv in block.iter_vars if iv.iter_type != tirx.IterVar.CommReduce][-1]
    return read.region[-1].min.same_as(channel) and static_ints([read.region[-1].extent]) == [1]


def _channel_operands(sch: s_tir.Schedule, main, pads: list) -> list[int]:
    """The indices of ``main``'s reads, pads' outputs aside, that run along its output channels
    (``_along_channels``): a depthwise conv's HWIO weights, ``[kh, kw, 0, c]``."""
    block = sch.get(main)
    padded = [sch.get(pad.block_rv).writes[0].source for pad in pads]
    return [i for i, r in enumerate(block.reads)
            if not any(r.source.same_as(p) for p in padded) and _along_channels(block, r)]


def _inline_all_but_padding(sch: s_tir.Schedule, infos: list) -> list:
    """dlight's ``try_inline`` on every block but the pads, which stay blocks of their own."""
    pads = [info for info in infos if _is_padding(sch, info)]
    return try_inline(sch, [info for info in infos if info not in pads]) + pads


class SmallReduction(GPUScheduleRule):
    """See the module docstring."""

    def __init__(self, max_extent: int = 64, threads: int = 256, min_vectors: int = 32768,
                 max_window_bytes: int = 400):
        self.max_extent, self.threads, self.min_vectors = max_extent, threads, min_vectors
        self.max_window_bytes = max_window_bytes

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` for ``target``, or None where the rule does not apply."""
        opened = inlined_blocks(self, func, target, inline=_inline_all_but_padding)
        if opened is None:
            return None
        sch, infos = opened
        pads = [info for info in infos if _is_padding(sch, info)]
        infos = [info for info in infos if info not in pads]
        kinds = [info.dom_kind() for info in infos]
        if not 1 <= len(infos) <= 2 or "R" not in kinds[0] or (len(infos) == 2 and set(kinds[1]) != {"S"}):
            return None
        main = infos[0].block_rv
        window = static_ints([iv.dom.extent for iv in sch.get(main).iter_vars
                              if iv.iter_type == tirx.IterVar.CommReduce])
        if window is None or math.prod(window) > self.max_extent:
            return None

        # Accumulate in a register; the write-back folds into the epilogue when there is one.
        tail = sch.cache_write(main, 0, "local")
        if len(infos) == 2:
            sch.compute_inline(tail)
            tail = infos[1].block_rv
        vector, threads, operands = self._vector(sch, main, tail, pads, math.prod(window))
        if vector == 1:  # without vectors, the pads inline as TVM's inliner does (each load tests its bounds)
            for pad in pads:
                sch.compute_inline(pad.block_rv)
            pads = []
        *outer, last = sch.get_loops(tail)
        if vector > 1:
            last, lanes = sch.split(last, [None, vector])
        bx, tx = sch.split(sch.fuse(*outer, last), [None, threads])
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
        if vector > 1:
            sch.vectorize(lanes)
            sch.unroll([lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce][-1])
        for pad in pads:
            # Each thread's window, ``vector`` channels at a time, into registers; a padded
            # position is the pad value, never a load.
            sch.set_scope(pad.block_rv, 0, "local")
            sch.compute_at(pad.block_rv, tx, preserve_unit_loops=True)
            *window, channels = sch.get_loops(pad.block_rv)[2:]
            for loop in window:
                sch.unroll(loop)
            sch.vectorize(channels)
        if vector > 1:
            self._cache_vector_operands(sch, main, tx, operands)
        return sch

    @staticmethod
    def _cache_vector_operands(sch: s_tir.Schedule, main, tx, operands: list[int]) -> None:
        """Each of ``main``'s reads ``operands`` (``_channel_operands``) comes into registers a
        vector at a time, once per thread, before the window loops."""
        for index in reversed(operands):  # a cache_read leaves the earlier read indices as they are
            cache = sch.cache_read(main, index, "local")
            sch.compute_at(cache, tx, preserve_unit_loops=True)
            *window, lanes = sch.get_loops(cache)[2:]
            for loop in window:
                sch.unroll(loop)
            sch.vectorize(lanes)

    def _vector(self, sch: s_tir.Schedule, main, tail, pads, window: int) -> tuple[int, int, list[int]]:
        """Channels and threads per block, and the channel operands to load as vectors: 16 bytes of
        the widest padded input or output, where the innermost output axis holds whole vectors,
        the pad and every other operand are read along it, and the ``window`` positions fit
        ``max_window_bytes``, and threads that divide the number of vectors
        (``dividing_threads``); else 1, ``self.threads`` and none."""
        scalar = 1, self.threads, []
        extents = static_ints([sch.get(lp).extent for lp in sch.get_loops(tail)])
        if len(pads) != 1 or extents is None:
            return scalar
        block = sch.get(main)
        out, src = sch.get(tail).writes[0].source, sch.get(pads[0].block_rv).writes[0].source
        read = next((r for r in block.reads if r.source.same_as(src)), None)
        operands = _channel_operands(sch, main, pads)
        if read is None or not _along_channels(block, read) or len(operands) != len(block.reads) - 1:
            # An operand across the channels (OHWI weights) would be gathered, a scalar load per
            # lane: on an H200 MobileNetV3's 480- to 960-channel depthwise convs then ran 2.0 to
            # 2.3 times slower with 8-channel threads than with a thread per channel.
            return scalar
        # Registers per vector lane: the window of the padded input and of each channel operand.
        window_bytes = window * tvm.DataType(str(src.dtype)).bits // 8 * (1 + len(operands))
        vector = VECTOR_BYTES * 8 // max(tvm.DataType(str(b.dtype)).bits for b in (out, src))
        if "float8" in str(out.dtype) and tvm.DataType(str(block.writes[0].source.dtype)).bits > 8:
            # TVM 0.27's CUDA code generator casts 4 lanes at most to FP8 (8 halves to
            # 8 E4M3 values it writes as a uint4 -> uint2 conversion nvcc rejects); a
            # reduction over 8-bit values (FP8 bits as int8) reinterprets them instead
            vector = min(vector, 4)
        while vector > 1 and (extents[-1] % vector or math.prod(extents) // vector < self.min_vectors
                              or vector * window_bytes > self.max_window_bytes):
            vector //= 2
        if vector == 1:
            return scalar
        threads = dividing_threads(math.prod(extents) // vector, self.threads)
        return scalar if threads is None else (vector, threads, operands)
