"""WarpRowReduction: softmax and norms over short rows, one warp per row and several rows per block.

Requires: a GPU target; a PrimFunc that, after inlining its contiguous spatial blocks (as dlight's
``GeneralReduction`` does), is one or more reduction blocks over the same rows followed by one
spatial block writing the rows: leading spatial iterators, then the row's trailing reduction
iterators (softmax: max, sum of exps, normalize; layer norm: the sums, normalize); static
extents, a row of a multiple of 32 elements, at most ``max_row``, and at least ``min_rows`` rows
(fewer would leave most of the GPU idle with a warp per row: BERT-base's 128 rows at batch 1 make
16 blocks of 8 warps, where ``GeneralReduction``'s block per row makes 128).
Declines (``apply`` returns None) anything else, so ``GeneralReduction`` takes it.
Guarantees: the same function. Each row is reduced by one warp: every lane takes every 32nd
element (neighbouring lanes read neighbouring addresses), TVM lowers the cross-lane reductions
to warp shuffles without shared memory or barriers, which leave the row's reduced values (max,
sum, mean) in every lane's registers; a block holds ``rows`` warps (``threadIdx.y``).
Why not dlight: ``GeneralReduction`` gives every row a block of 256 threads that reduces across
all of them, half of them idle on a 128-long row. BERT-base's attention softmax at batch 16
(192 x 128 rows of 128) on an H200 took about 15 us per layer more that way than its tuned
record (1.64 against 1.46 ms end to end).
Where: ``apply_default_schedules.default_rules()``, before ``GeneralReduction``.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from ..passes.mutate import static_ints
from .rule_blocks import inlined_blocks

WARP = 32
# Blocks enough for every SM of a large GPU (132 on an H200) to hold a few; fewer rows per block
# where the rows would not make that many.
MIN_BLOCKS = 256


class WarpRowReduction(GPUScheduleRule):
    """See the module docstring."""

    def __init__(self, rows: int = 8, max_row: int = 4096, min_rows: int = 1024):
        self.rows, self.max_row, self.min_rows = rows, max_row, min_rows

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` for ``target``, or None where the rule does not apply."""
        opened = inlined_blocks(self, func, target, try_inline_contiguous_spatial)
        if opened is None:
            return None
        sch, infos = opened
        if len(infos) < 2:
            return None
        kind = infos[0].dom_kind()
        lead = len(kind) - len(kind.lstrip("S"))
        trail = len(kind) - lead
        if lead == 0 or trail == 0 or "S" in kind[lead:] or any(i.dom_kind() != kind for i in infos[1:-1]):
            return None
        last = infos[-1]
        if not last.is_injective() or len(last.dom_kind()) != len(kind):
            return None
        extents = static_ints([iv.dom.extent for iv in sch.get(infos[0].block_rv).iter_vars])
        loops = sch.get_loops(last.block_rv)
        # The last block walks the rows in the reductions' order: same extents, same nesting.
        if extents is None or static_ints([sch.get(lp).extent for lp in loops]) != extents:
            return None
        row, n_rows = math.prod(extents[lead:]), math.prod(extents[:lead])
        if row % WARP or row > self.max_row or n_rows < self.min_rows:
            return None
        rows = next(r for r in (self.rows, 4, 2, 1) if n_rows % r == 0 and n_rows // r >= MIN_BLOCKS or r == 1)

        try:
            bx, ty = sch.split(sch.fuse(*loops[:lead]), [None, rows])
            r, tx = sch.split(sch.fuse(*loops[lead:]), [None, WARP])
            sch.reorder(tx, r)
            sch.bind(bx, "blockIdx.x")
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.unroll(r)
            for info in reversed(infos[:-1]):
                block = info.block_rv
                # Registers, not shared memory: the warp's reduction leaves its result in every lane.
                # (In shared memory, lane 0 stored it and TVM put no barrier before the other lanes read.)
                for i, _ in enumerate(sch.get(block).writes):
                    sch.set_scope(block, buffer_index=i, storage_scope="local")
                sch.compute_at(block, ty, preserve_unit_loops=True)
                block_loops = sch.get_loops(block)
                row_loops = block_loops[2:-trail]
                if static_ints([sch.get(lp).extent for lp in row_loops]) != [1] * len(row_loops):
                    return None  # it needs other rows than its warp's
                r, tx = sch.split(sch.fuse(*block_loops[-trail:]), [None, WARP])
                sch.reorder(tx, r)
                sch.bind(tx, "threadIdx.x")
                sch.unroll(r)
        except s_tir.ScheduleError:
            return None
        return sch
