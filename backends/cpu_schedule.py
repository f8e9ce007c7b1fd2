"""Default CPU schedules: register-tiled, vectorized, multi-threaded kernels without tuning.

TVM's CPU pipeline schedules nothing: every kernel runs as the scalar, single-threaded
loop nest that legalization wrote (ResNet-18 at 112², 803 ms where onnxruntime takes 7.4).
dlight's CPU rules cover only GEMV and row reductions, so the kernels that matter
(convolutions, matmuls, pooling) get smelt's own rule here.

Requires: legalized, fused PrimFuncs and an LLVM target (its vector width decides the
tiles). Convolutions in NHWC with HWIO weights (``ConvertConvLayout``) give the rule a
contiguous output-channel axis to vectorize; NCHW convolutions still get it, along the
output width.
Guarantees: each rule returns a schedule or None (the next rule tries); none changes
what a kernel computes. ``default_rules()`` is the order the CPU backend uses through
``ApplyDefaultSchedules``; kernels no rule takes keep TVM's default lowering.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import cpu as dl_cpu
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target.codegen import target_has_features


def default_rules() -> list:
    """Winograd transforms, tiled reductions (int8 dot products first; conv, matmul, pooling),
    dlight's CPU rules, then elementwise."""
    from .cpu_int8_dot import Int8DotTile  # built on this module's helpers

    return [WinogradTransform(), Int8DotTile(), TileReduction(), GEMV(), Reduction(), ParallelInjective()]


class _NoFloat8:
    """Mixed into a dlight rule: float8 kernels are left alone, its vectors would not compile (``_float8``)."""

    def apply(self, func, target, tunable: bool):
        return None if isinstance(func, tirx.PrimFunc) and _float8(func) else super().apply(func, target, tunable)


class GEMV(_NoFloat8, dl_cpu.GEMV):
    """dlight's CPU GEMV rule, leaving float8 kernels alone."""


class Reduction(_NoFloat8, dl_cpu.Reduction):
    """dlight's CPU row-reduction rule, leaving float8 kernels alone."""


def vector_bits(target) -> int:
    """The width of the target's vector registers: 512 with AVX-512, 256 with AVX(2), else 128.

    Not TVM's ``llvm_get_vector_width``: in TVM 0.27 it answers 512 for every x86 CPU (haswell
    and znver3 included), so AVX2 kernels were tiled for registers twice their size, and each
    tile's 16 "accumulators" took 32 of AVX2's 16 registers (a 128x3072x768 matmul on a Zen 3:
    5.6 ms, 4.2 once tiled for 256 bits).
    """
    if not _triple(target).startswith("x86_64"):
        return 128  # NEON (SVE's width is known only at run time)
    return 512 if target_has_features("avx512f", target) else 256 if target_has_features("avx", target) else 128


def vector_lanes(target, dtype_bits: int) -> int:
    return max(vector_bits(target) // dtype_bits, 4)


def _accumulators(target) -> int:
    """Vector registers to spend on accumulators: AVX-512 and NEON have 32, AVX2 16."""
    return 16 if vector_bits(target) >= 512 or _triple(target).startswith("aarch64") else 10


def _triple(target) -> str:
    return str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()


def _divisor(extent: int, at_most: int, at_least: int = 1) -> int | None:
    """The largest divisor of ``extent`` in [at_least, at_most], or None."""
    return next((d for d in range(min(at_most, extent), at_least - 1, -1) if extent % d == 0), None)


def _const_extents(sch, loops) -> list[int] | None:
    out = []
    for loop in loops:
        ext = sch.get(loop).extent
        if not isinstance(ext, tirx.IntImm):
            return None
        out.append(int(ext))
    return out


# Reductions of at most this many products per output (depthwise convs, pooling, the
# 3-channel stem) read their input through the padding instead of a padded copy: their
# few products per input element made the copy cost as much as the conv (a 3x3 stride-2
# depthwise conv at 112x112x64: 0.62 against 0.45 ms, MobileNet 0.31-0.34 against
# 0.38-0.41 of onnxruntime's speed).
SMALL_REDUCTION = 32


# TVM places a CPU allocation on the stack only if its scope is "global" and it is smaller
# than 1024 bytes (``runtime::kMaxStackAlloca``, LowerTVMBuiltin); any other one becomes a
# TVMBackendAllocWorkspace call, here once per register tile, and LLVM then keeps the
# accumulators in memory it cannot see through (zeroed, stored, read back). A "local" tile
# of 8x32 floats did that in every conv: the 1x1 conv 16->64 at 112x112 of MobileNet took
# 0.53 ms, 0.29 ms as a 7x32 stack tile that LLVM promotes to registers.
_STACK_BYTES = 1024


def _is_cpu(target) -> bool:
    return target.kind.name == "llvm"


def _opened(func, target, injective: bool = False):
    """(schedule, normalized blocks) of a kernel for the CPU, else None: another target, blocks
    that do not normalize, or (``injective``) a reduction among them."""
    if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or (injective and not all(b.is_injective() for b in infos)):
        return None
    return sch, infos


def open_reduction(func, target, keep_pads: bool = False):
    """``func`` opened for a tiling rule: (schedule, the reduction's dlight BlockInfo, its number
    of spatial iterators (which come first), the producers kept at the root, the epilogue
    blocks), where every producer that may be is inlined (a data pad stays at the root, unless
    the reduction is small and not ``keep_pads``) and the epilogue is inlined into its last
    block. None where the kernel is not one reduction block with injective producers and
    epilogue, or its loops do not match its iterators."""
    if (opened := _opened(func, target)) is None:
        return None
    sch, infos = opened
    reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
    if len(reductions) != 1:
        return None
    r = reductions[0]
    red = infos[r]
    kinds = red.dom_kind()
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s == 0 or kinds[n_s:] != "R" * (len(kinds) - n_s):
        return None
    if not all(b.is_injective() for b in infos[:r] + infos[r + 1:]):
        return None
    red_doms = [i.dom for i in red.iters if i.kind == "R"]
    small = all(isinstance(d, int) for d in red_doms) and math.prod(red_doms) <= SMALL_REDUCTION and not keep_pads
    kept = []  # producers that cannot be inlined stay at the root, scheduled below
    for producer in reversed(infos[:r]):
        if producer.is_data_pad(sch) and not small:  # inlined, its bounds check would sit in the inner loop
            kept.append(producer.block_rv)
            continue
        try:
            sch.compute_inline(producer.block_rv)
        except Exception:
            kept.append(producer.block_rv)
    epilogue = infos[r + 1:]
    for b in epilogue[:-1]:
        try:
            sch.compute_inline(b.block_rv)
        except Exception:
            return None
    if len(sch.get_loops(red.block_rv)) != len(kinds):
        return None
    return sch, red, n_s, kept, epilogue


class TileReduction(ScheduleRule):
    """One reduction block (conv2d, matmul, batch matmul, pooling) with injective producers and epilogue.

    The reduction's spatial loops are split into an outer grid, run in parallel, and an
    inner register tile ``rows × width``: ``width`` along the innermost output axis
    (a multiple of the vector length where the extent allows), ``rows`` along the next
    spatial axis with an extent above one, fused with those before it where the weights do
    not depend on them (``_fusable_rows``). The reduction loops run between the two, so
    the tile's accumulators stay in registers; producers (casts, weight decode) are
    inlined, padding stays a parallel copy of its own (inlined, its bounds check sat in
    the inner loop: 4.8 against 1.5 ms on a 7x7x256 conv) unless the reduction is small
    (``SMALL_REDUCTION``), and the epilogue (bias,
    activation, residual add) is computed per tile while it is still in cache. Constant
    operands are repacked into panels at compile time (``_pack_weights``).
    """

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if (opened := open_reduction(func, target)) is None:
            return None
        sch, red, n_s, kept, epilogue = opened
        block = red.block_rv
        loops = sch.get_loops(block)
        # Symbolic extents (a dynamic batch) may stay in the parallel grid; the register tile
        # needs static ones.
        extents = loop_extents(sch, loops)
        if extents[n_s - 1] is None:
            return None
        out_dtype = sch.get(block).writes[0].source.dtype
        lanes = 1 if _float8(func) else vector_lanes(target, tvm.DataType(out_dtype).bits)
        out_bytes, width_ext = tvm.DataType(out_dtype).bits // 8, extents[n_s - 1]
        first, row_axis, row_ext, (rows, width) = plan_register_tile(
            sch, block, n_s, extents, epilogue, target, lanes, _accumulators(target))
        vec = min(width, lanes)  # lanes of one vector op
        if rows == 1 and vec > 1 and width_ext % vec == 0:
            width = row_vector_width(width_ext, vec, _accumulators(target), out_bytes)

        free = {int(i) for i in func.attrs.get("layout_free_buffers", [])} if func.attrs is not None else set()
        if free and width > 1:
            _pack_weights(sch, block, {func.params[i].name for i in free}, n_s, width)

        # The accumulator tile is a "global" buffer below _STACK_BYTES: see there.
        writeback = epilogue[-1].block_rv if epilogue else sch.cache_write(block, 0, "global")
        outer, at, inner, r_loops = split_register_tile(sch, block, writeback, n_s, first, row_axis, row_ext,
                                                        rows, width)
        sch.reorder(*outer, *([at] if at else []), *r_loops, *inner)
        grid = sch.fuse(*outer)
        sch.parallel(grid)
        sch.reverse_compute_at(writeback, at or grid)
        # Vectorize the update before splitting off its init: TVM checks the loop's
        # subtree for a complete or reduction block, and the update alone is neither.
        # The init block keeps the update's loop kinds (vectorized, unrolled).
        _vectorize_tile(sch, block, len(inner), width, vec)
        sch.decompose_reduction(block, r_loops[0])
        wb_loops = sch.get_loops(writeback)[1:]
        if wb_loops:
            _vectorize_split(sch, wb_loops[-1], vec)
        for producer in kept:
            _schedule_root(sch, producer, lanes)
        return sch


def plan_register_tile(sch, block, n_s: int, extents: list, epilogue: list, target, lanes: int,
                       accumulators: int, width: int | None = None,
                       tails: bool = True) -> tuple[int, int | None, int, tuple[int, int]]:
    """Where the register tile of the reduction ``block`` goes: (the first spatial axis its rows
    span, its row axis, the rows' extent, (rows, width)). Rows run along the spatial axis before
    the width, fused with those before it where the weights do not index them
    (``_fusable_rows``) and that finds another tile; ``register_tile`` chooses the tile (its rows
    alone where ``width`` is given; rows that divide the extent unless ``tails``)."""
    s_ext = extents[:n_s]
    stmt = sch.get(block)
    width_ext = s_ext[-1]
    row_axis = tile_row_axis(s_ext)
    out_bytes = tvm.DataType(stmt.writes[0].source.dtype).bits // 8
    column_bytes = _column_bytes(stmt, n_s, extents[n_s:])
    chunks = _tail_chunks(target)

    def tile(first):
        if row_axis is None:
            return 1, register_tile(width_ext, 1, lanes, accumulators, out_bytes, column_bytes, width=width)
        row_ext = math.prod(s_ext[first:row_axis + 1])
        # A tail tile's rows loop alone (see split_register_tile), so the rest of the grid must share out.
        others = math.prod(e or _PARALLEL_CHUNKS for e in s_ext[:first] + s_ext[row_axis + 1:-1])
        return row_ext, register_tile(width_ext, row_ext, lanes, accumulators, out_bytes, column_bytes,
                                      tails=tails and others * width_ext // (2 * lanes) >= chunks, width=width)
    first = row_axis
    row_ext, best = tile(first)
    fused = _fusable_rows(stmt, n_s, s_ext, row_axis)
    if fused != row_axis and (not epilogue or _row_fusion(stmt, sch.get(epilogue[-1].block_rv), fused, row_axis)):
        # Fused only where that finds another tile: the same tile over fused rows gains
        # nothing and divides each row's index back into height and width.
        fused_ext, fused_tile = tile(fused)
        if fused_tile != best or row_ext % best[0]:
            first, row_ext, best = fused, fused_ext, fused_tile
    return first, row_axis, row_ext, best


def row_vector_width(width_ext: int, vec: int, accumulators: int, out_bytes: int) -> int:
    """The width of a one-row tile (a matrix-vector product): as many ``vec``-lane accumulators
    as the registers and ``_STACK_BYTES`` hold, a number that divides ``width_ext / vec``. With one
    or two, each waited on the last FMA of the reduction: the classifier 960 -> 1000 of MobileNet
    (8-lane tiles, 960 FMAs in a chain) ran at 25 GFLOP/s."""
    most = min(accumulators, (_STACK_BYTES - 1) // (vec * out_bytes))
    return vec * max(m for m in range(1, most + 1) if (width_ext // vec) % m == 0)


def split_register_tile(sch, block, writeback, n_s: int, first: int, row_axis: int | None, row_ext: int,
                        rows: int, width: int) -> tuple[list, object, list, list]:
    """The loops of ``block`` split as ``plan_register_tile`` planned, its rows fused first
    (``_fuse_rows``, also in ``writeback``): (the grid loops, the serial row-tile loop of a tail
    tile or None, the tile's row and width loops, the reduction loops). Order them as grid, row
    tile, reduction, tile.

    A tail: the last tile's rows past the end are masked off (a block predicate). Its row loop
    stays serial, out of the parallel grid, so that LoopPartition (``TAIL_PASS_CONFIG``) splits
    it into full tiles without a mask and the last one; fused into the grid, the mask sat in
    the reduction loop, and LLVM kept it there or not depending on the shape (a 16x196x128x128
    batched matmul as 5-row tiles: 0.96 ms, 0.59 partitioned)."""
    if row_axis is not None and first < row_axis:
        _fuse_rows(sch, block, writeback, first, row_axis)
        n_s -= row_axis - first
        row_axis = first
    loops = sch.get_loops(block)
    outer, inner, wi = tile_loops(sch, loops[:n_s], width, row_axis, rows)
    at = outer.pop(1 + row_axis) if row_axis is not None and row_ext % rows else None
    return outer, at, inner + [wi], loops[n_s:]


# Independent FMA chains a core needs to keep its FMA units busy: two units, four cycles of
# latency (Zen 3 and 4, Intel since Skylake).
_FMA_CHAINS = 8


# A tile whose rows do not divide the output's (a tail) must score this much higher than the
# best that divide: 5x16 with a tail over 196 rows scored 5 % above 4x16 and ran no faster.
_TAIL_GAIN = 1.1


def _tail_chunks(target) -> int:
    """Parallel iterations the rest of the grid must make for a tail tile, whose rows loop
    serially: four per core (the target's ``num-cores``, else this machine's physical cores, as
    tuning counts them). On 2 cores, a 1x1 conv 960 -> 160 at 7x7 has 10 (of 16 channels each)
    and ran 0.181 -> 0.166 ms with a tail."""
    from tvm.s_tir.meta_schedule.utils import cpu_count

    cores = target.attrs.get("num-cores")
    return 4 * (int(cores) if cores else cpu_count(logical=False))


# The PassContext entry that splits a tail tile's row loop (TileReduction): LoopPartition splits
# only loops over constant extents whose body tests the loop variable, and only when asked.
TAIL_PASS_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}


# A tile's weight panel (its columns over the whole reduction) that fits in half of L1 (32 KiB
# on Zen 3 and 4, Intel since Skylake) stays there while the tile moves along the rows.
_PANEL_BYTES = 16 * 1024


def register_tile(width_ext: int, row_ext: int, lanes: int, accumulators: int, out_bytes: int,
                  column_bytes: int | None = None, tails: bool = False, width: int | None = None) -> tuple[int, int]:
    """(rows, width) of the register tile over an output of ``row_ext`` rows by ``width_ext`` columns.

    Rows divide ``row_ext`` or, with ``tails``, leave a last tile that is partly masked off
    (scored by the share of rows it computes, and by ``_TAIL_GAIN``); width is one or two
    vectors where they divide ``width_ext``, else a part of one. Among those, the tile whose
    inner step does the most FMAs per load (a row takes one broadcast, a vector of width one
    load) while keeping ``_FMA_CHAINS`` of them in flight. Why not always two vectors: 14 or 49
    rows have no divisor up to AVX2's five rows of two, and a 2x16 tile (4 chains) left half
    the FMA units idle; 7x8 ran 1.2x (a 14x14 1x1 conv of ResNet-50) to 2x (7x7) faster on a
    Zen 3, and 5x16 with a tail faster again (a 49 x 2048 x 512 matmul: 152 -> 182 GFLOP/s).
    AVX2's 12 accumulators (6x16) ran slower in 1x1 convs at 56x56 and 28x28 (0.89 -> 0.99,
    0.72 -> 0.84 ms) and gained 3 % at most elsewhere: 10 stay.
    Three vectors where two do not divide the width (24, 72, 120 channels), else five (40): a
    1x1 conv 64 -> 24 at 56x56 ran 0.19 -> 0.13 ms as 4x24 on a Zen 3 (72 -> 24: 0.20 -> 0.16,
    40 -> 120 at 28x28: 0.11 -> 0.08), 120 -> 40 at 28x28 0.12 -> 0.09 as 2x40 (1024 -> 40 at
    14x14: 0.26 -> 0.21), instead of 8x8 (9 loads per 8 FMAs).
    Four vectors (2x32 on AVX2, 8 chains) where they score higher and the weight panel, four
    vectors wide by ``column_bytes`` (one weight column over the reduction), fits in
    ``_PANEL_BYTES``: 1x1 convs 80 -> 480 and 112 -> 672 at 14x14 ran 1.3x faster on a Zen 3
    than as 7x8, but 1024 -> 256 ran 1.2x slower, its panel streamed from L2 at every tile.
    A given ``width`` is the only one tried.
    """
    if width is not None:
        widths = [width]
    elif width_ext % lanes == 0:
        widths = [lanes] + next(([v * lanes] for v in (2, 3, 5) if width_ext % (v * lanes) == 0), [])
        if column_bytes is not None and width_ext % (4 * lanes) == 0 and 4 * lanes * column_bytes <= _PANEL_BYTES:
            widths.append(4 * lanes)
    else:  # half or quarter registers before odd widths (72 channels: 8 lanes, not 12)
        widths = [next((v for v in (lanes // 2, lanes // 4) if v >= 4 and width_ext % v == 0), None)
                  or _divisor(width_ext, lanes, min(4, width_ext)) or 1]
    best = None
    for width in widths:
        vectors = max(1, width // lanes)
        # Three vectors take two accumulators more: 4 rows on AVX2 (with 3 weight vectors and
        # a broadcast, all 16 registers), where 3 left 4x24 1.1-1.3x faster than 3x24.
        budget = min((accumulators + 2 * (vectors == 3)) // vectors, (_STACK_BYTES - 1) // (width * out_bytes))
        for rows in [_divisor(row_ext, max(1, budget))] + (list(range(2, min(budget, row_ext) + 1)) if tails else []):
            chains = rows * vectors
            score = chains / (rows + vectors) * min(1.0, chains / _FMA_CHAINS)
            if row_ext % rows:  # a tail: the share of rows computed, and a margin to be worth it
                score *= row_ext / (-(-row_ext // rows) * rows) / _TAIL_GAIN
            # Ties go to two vectors over one, and stay with two over four (4x16 and 2x32 load the same).
            if best is None or score > best[0] or (score == best[0] and vectors <= 2):
                best = (score, rows, width)
    return best[1], best[2]


def _fusable_rows(stmt, n_s: int, s_ext: list, row_axis: int | None) -> int:
    """The first of the spatial axes, ending at the tile's row axis, that its rows may span: the
    row axis is the one before the width, and those before it are static, above one, and do
    not index the weights (each row would need its own). ``row_axis`` itself where there are none.

    Rows fused over a conv's height and width find tiles that the width alone does not have:
    7x7 outputs of ResNet-50 had 7x8 tiles (7 FMA chains), 49 rows take 5x16 with a tail, and
    a 1x1 conv 2048 -> 512 at 7x7 ran 0.77 -> 0.66 ms on a Zen 3 (512 -> 2048: 0.69 -> 0.57;
    1024 -> 256 at 14x14, 7x8 -> 4x16: 0.79 -> 0.66)."""
    if row_axis is None or row_axis != n_s - 2:
        return row_axis
    iters = [iv.var for iv in stmt.iter_vars]
    # The weights: what the block reads without the row axis (an NCHW conv's weights do not
    # run along the width, a batched matmul's do, both index an axis before the rows).
    used = []
    for region in stmt.reads:
        index_vars = [v for rg in region.region for v in tirx.analysis.undefined_vars(rg.min)]
        if not any(v.same_as(iters[row_axis]) for v in index_vars):
            used += index_vars
    first = row_axis
    while first > 0 and (s_ext[first - 1] or 0) > 1 and not any(iters[first - 1].same_as(v) for v in used):
        first -= 1
    return first


def _row_fusion(stmt, consumer, first: int, last: int) -> tuple[list[int], int] | None:
    """How to fuse the spatial iterators ``first..last`` of the reduction ``stmt`` (see
    ``_fuse_rows``): (the axes of the buffer it writes that they index, the consumer's first
    iterator over those axes), or None where the buffer's axes are not those iterators in
    order, or ``consumer`` (the epilogue or the write-back) does not read it along iterators of
    the same extents, in order."""
    dims = _identity_dims(stmt.writes[0].region, stmt.iter_vars, first, last)
    reads = [r for r in consumer.reads if r.source.same_as(stmt.writes[0].source)]
    if dims is None or len(reads) != 1:
        return None
    # The consumer's iterators need not sit where the reduction's do (a write-back also
    # iterates the unit axes that the reduction's normalization dropped).
    region, ivs = reads[0].region, consumer.iter_vars
    at = next((i for i, iv in enumerate(ivs) if region[dims[0]].min.same_as(iv.var)), None)
    span = range(first, last + 1)
    if (at is None or at + len(span) > len(ivs) or _identity_dims(region, ivs, at, at + len(span) - 1) != dims
            or [int(ivs[at + j].dom.extent) for j in range(len(span))] != [int(stmt.iter_vars[i].dom.extent) for i in span]):
        return None
    return dims, at


def _fuse_rows(sch, block, consumer, first: int, last: int) -> None:
    """Fuse the spatial iterators ``first..last`` of the reduction ``block`` into one, in its
    iteration space, the layout of the buffer it writes, and the iteration space of the
    ``consumer`` of that buffer (the epilogue or the write-back); ``_row_fusion`` must allow it.

    Not a fused loop: the block would keep two iterators, and a consumer computed at a tile of
    the fused loop would cover whole rows of the first (writing what other threads compute)."""
    stmt, cons = sch.get(block), sch.get(consumer)
    plan = _row_fusion(stmt, cons, first, last)
    if plan is None:
        raise ValueError(f"rows {first}..{last} of {stmt.name_hint} cannot be fused")
    dims, at = plan
    exts = [int(iv.dom.extent) for iv in stmt.iter_vars[first:last + 1]]

    def fusing(lo: int, ndim: int):  # the index map fusing axes lo.. of ``ndim`` into one
        def fused(*v):
            f = v[lo]
            for i in range(1, len(exts)):
                f = f * exts[i] + v[lo + i]
            return [*v[:lo], f, *v[lo + len(exts):]]
        return tirx.IndexMap.from_func(fused, ndim=ndim, index_dtype=str(stmt.iter_vars[0].dom.extent.ty))
    sch.transform_layout(block, ("write", 0), fusing(dims[0], len(stmt.writes[0].source.shape)))
    sch.transform_block_layout(block, fusing(first, len(stmt.iter_vars)))
    sch.transform_block_layout(consumer, fusing(at, len(cons.iter_vars)))


def _identity_dims(region, iter_vars, first: int, last: int) -> list[int] | None:
    """The consecutive axes of ``region`` indexed by exactly ``iter_vars[first..last]``, one
    element each, else None."""
    dims = [next((d for d, r in enumerate(region) if r.min.same_as(iter_vars[i].var)
                  and isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1), None)
            for i in range(first, last + 1)]
    if None in dims or dims != list(range(dims[0], dims[0] + len(dims))):
        return None
    return dims


def _column_bytes(stmt, n_s: int, r_extents: list[int | None]) -> int | None:
    """Bytes of one column of the weight operand over the whole reduction (the product of the
    reduction extents ``r_extents`` times the size of what the block reads along the tile's
    width), None where an extent is symbolic."""
    if any(e is None for e in r_extents):
        return None
    along = [r.source for _, r in _reads_along_width(stmt, n_s) if not r.source.same_as(stmt.writes[0].source)]
    bits = max((tvm.DataType(b.dtype).bits for b in along), default=32)
    return math.prod(r_extents) * bits // 8


def _reads_along_width(stmt, n_s: int) -> list:
    """(index, region) of each read of ``stmt`` whose last axis the innermost spatial iterator
    (the register tile's width) indexes."""
    width_var = stmt.iter_vars[n_s - 1].var
    return [(i, r) for i, r in enumerate(stmt.reads) if r.region[-1].min.same_as(width_var)]


def loop_extents(sch, loops) -> list[int | None]:
    """Each loop's extent, None where it is symbolic (a dynamic batch)."""
    return [int(e) if isinstance(e, tirx.IntImm) else None for e in (sch.get(lp).extent for lp in loops)]


def tile_row_axis(s_ext: list[int | None]) -> int | None:
    """The register tile's row axis: the innermost spatial axis before the last (the channels)
    whose extent is static and above one; None where there is none."""
    return next((i for i in range(len(s_ext) - 2, -1, -1) if s_ext[i] is not None and s_ext[i] > 1), None)


def tile_loops(sch, s_loops: list, width: int, row_axis: int | None, rows: int) -> tuple[list, list, object]:
    """The spatial loops split into the register tile: (grid loops, the tile's row loop if any,
    its width loop). Output-channel tiles come first in the grid: each thread's consecutive
    tiles reuse one slice of the weights from cache (for a 3x3x256x256 conv, 7 times fewer
    weight reads)."""
    wo, wi = sch.split(s_loops[-1], [None, width])
    outer, inner = [wo], []
    for i, loop in enumerate(s_loops[:-1]):
        if i == row_axis:
            ro, ri = sch.split(loop, [None, rows])
            outer.append(ro)
            inner.append(ri)
        else:
            outer.append(loop)
    return outer, inner, wi


def _pack_weights(sch, block, names: set[str], n_s: int, width: int) -> None:
    """Lay out each constant operand indexed by the tile's vector axis as [N / width, ..., width].

    The reduction then walks each weight slice contiguously (a 3x3x512x512 HWIO weight read
    32 channels at a time touches a new 4 KiB page every two steps otherwise). The copy is
    marked as layout preprocessing: ``SplitLayoutRewritePreproc`` moves it out of the
    kernel and ``FoldConstant`` runs it once, at compile time.
    """
    for i, region in _reads_along_width(sch.get(block), n_s):
        buf = region.source
        if buf.name not in names or int(buf.shape[-1]) % width:
            continue
        cache = sch.cache_read(block, i, "global")
        ndim = len(buf.shape)
        sch.transform_layout(cache, ("write", 0), tirx.IndexMap.from_func(
            lambda *idx: [idx[-1] // width, *idx[:-1], idx[-1] % width], ndim=ndim,
            index_dtype=str(buf.shape[-1].ty)))
        sch.annotate(cache, "meta_schedule.layout_rewrite_preproc", True)


class WinogradTransform(ScheduleRule):
    """The input and output transforms of a Winograd convolution (``RewriteConvWinograd``).

    Their blocks (annotated ``winograd_tile``) pick one of 16 (input) or 4 (output)
    expressions by the position in the tile. Here that position is an unrolled loop, so each
    copy is one straight sum of ±1 terms; the tiles run in parallel, the channels innermost
    and vectorized. Scheduled as any injective kernel, the choice was made per element at
    run time (16 selects per value). The output transform's epilogue (bias, residual,
    activation) is inlined into it.
    """

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if (opened := _opened(func, target, injective=True)) is None:
            return None
        sch, infos = opened
        tagged = [b for b in infos if "winograd_tile" in sch.get(b.block_rv).annotations]
        if len(tagged) != 1:
            return None
        if _float8(func):  # its epilogue quantizes to FP8: vectors would not compile (``_float8``)
            return None
        tile = int(sch.get(tagged[0].block_rv).annotations["winograd_tile"])
        is_input = len(sch.get(tagged[0].block_rv).writes[0].source.shape) == 3  # [alpha^2, tiles, C]; the output is NHWC
        for b in infos[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                return None
        block = infos[-1].block_rv
        loops = sch.get_loops(block)
        extents = _const_extents(sch, loops)
        if extents is None:
            return None
        lanes = vector_lanes(target, 32)
        vec = lanes if extents[-1] % lanes == 0 else _divisor(extents[-1], lanes, 4)
        if vec is None:
            return None
        if is_input:
            if len(loops) != 3:
                return None
            pos, tiles, ch = loops
            co, ci = sch.split(ch, [None, vec])
            sch.reorder(tiles, co, pos, ci)
            sch.parallel(sch.fuse(tiles, co))
            sch.unroll(pos)
        else:
            if len(loops) not in (3, 4):  # a batch of one has no loop of its own
                return None
            *n, h, w, ch = loops
            ho, hi = sch.split(h, [None, tile])
            wo, wi = sch.split(w, [None, tile])
            co, ci = sch.split(ch, [None, vec])
            sch.reorder(*n, ho, wo, co, hi, wi, ci)
            sch.parallel(sch.fuse(*n, ho, wo))
            sch.unroll(hi)
            sch.unroll(wi)
        sch.vectorize(ci)
        return sch


class ParallelInjective(ScheduleRule):
    """Kernels without a reduction (elementwise, transposes, concatenation): inlined into
    the last block, whose outer loops run in parallel and innermost loop is vectorized."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if (opened := _opened(func, target, injective=True)) is None:
            return None
        sch, infos = opened
        left = [infos[-1].block_rv]  # blocks that stay at the root: the last, and what does not inline
        for b in infos[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                left.append(b.block_rv)
        lanes = 1 if _float8(func) else vector_lanes(target, 32)
        for block in left:
            _schedule_root(sch, block, lanes)
        return sch


def _float8(func: tirx.PrimFunc) -> bool:
    """Whether a kernel reads or writes float8 (FP8 quantization's, emulated on CPUs): it stays
    scalar, as TVM 0.27's LLVM code generator emulates float8 casts with a select that takes only
    a scalar condition ("if_then_else can only take scalar condition" for a vector)."""
    return any(str(p.dtype).startswith("float8") for p in func.params)


def _vectorize_tile(sch, block, depth: int, width: int, lanes: int) -> None:
    """The innermost ``depth`` loops of ``block``: the last vectorized in pieces of one
    register (``lanes``), the others unrolled.

    One register per vector op: with 32-lane ops on 16-lane registers, LLVM kept the
    accumulators as 32-lane values, and the epilogue, which reads them 16 lanes at a time,
    took them apart lane by lane (40 ``vinsertps`` per tile of a 1x1 conv).
    """
    tile = sch.get_loops(block)[-depth:]
    last = tile[-1]
    if width > lanes and width % lanes == 0:
        outer, last = sch.split(last, [None, lanes])
        sch.unroll(outer)
    if width > 1:
        sch.vectorize(last)
    for loop in tile[:-1]:
        sch.unroll(loop)


def _vectorize_split(sch, loop, lanes: int) -> None:
    """Vectorize ``loop`` in pieces of ``lanes`` (or a divisor of its extent of at least 4)."""
    ext = sch.get(loop).extent
    if not isinstance(ext, tirx.IntImm):
        return
    ext = int(ext)
    vec = lanes if ext % lanes == 0 else _divisor(ext, lanes, 4)
    if vec is None or vec < 2:
        return
    if vec < ext:
        loop = sch.split(loop, [None, vec])[1]
    sch.vectorize(loop)


def _moved_last_axis(sch, block, n_loops: int) -> int | None:
    """The block's axis that its inputs' last (contiguous) axis indexes, where that is one axis
    and not the block's own last one, which an input reads too (a transpose NHWC -> NCHW, not
    a broadcast along the last axis); else None."""
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    if len(iters) != n_loops or n_loops < 2:
        return None
    read = [v for region in stmt.reads for r in region.region for v in tirx.analysis.undefined_vars(r.min)]
    if not any(v.same_as(iters[-1]) for v in read):
        return None
    axes = set()
    for region in stmt.reads:
        if not region.region:  # a scalar (a 0-d constant): no axis to follow
            continue
        last = region.region[-1].min
        hit = [i for i, v in enumerate(iters) if last.same_as(v)]
        if hit:
            axes.add(hit[0])
        elif not isinstance(last, tirx.IntImm):
            return None  # an index this rule does not read (a reshape's arithmetic)
    if len(axes) != 1 or n_loops - 1 in axes:
        return None
    return axes.pop()


_PARALLEL_MIN = 4096  # below this many elements, starting threads costs more than it saves
_PARALLEL_CHUNKS = 64  # parallel iterations enough to share out evenly between threads
_UNROLL_MAX = 16


def _schedule_root(sch, block, lanes: int) -> None:
    """A block at the root: its loops fused, the outer part parallel, the inner part vectorized.

    Where the block moves its inputs' contiguous axis (``_moved_last_axis``) and that axis is
    longer than the output's, the vectors run along it instead: contiguous loads, scattered
    stores. The longer side gives whole vectors: NHWC -> NCHW of 14x14x1024 took 0.33 ms
    vectorized along the output's 14 (7-lane gathers, each lane 4 KiB from the last), 0.041
    along the channels on a Zen 3, beside 0.75 ms for the conv that made it
    (56x56x64: 0.148 -> 0.038; the 3-channel input transpose 0.013 -> 0.010). NCHW -> NHWC
    of 64 channels keeps the output's (0.026 ms; 0.039 along the input's 56)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = _const_extents(sch, loops)
    if extents is None:
        return
    total = math.prod(extents)
    moved = _moved_last_axis(sch, block, len(loops))
    if moved is not None and extents[moved] > extents[-1] and (vec := _divisor(extents[moved], lanes, 4)) is not None:
        vo, vi = sch.split(loops[moved], [None, vec])
        rest = loops[:moved] + [vo] + loops[moved + 1:]
        sch.reorder(*rest, vi)
        sch.vectorize(vi)
        if total >= _PARALLEL_MIN:
            # The loops down to the moved axis's tiles when they make chunks enough: the rest
            # stay plain loops (fused too, each store paid for dividing the index back up).
            head = moved + 1 if math.prod(extents[:moved]) * (extents[moved] // vec) >= _PARALLEL_CHUNKS else len(rest)
            sch.parallel(sch.fuse(*rest[:head]) if head > 1 else rest[0])
        return
    inner = extents[-1]
    vec = lanes if inner % lanes == 0 else _divisor(inner, lanes, 4) if inner >= 4 else None
    if vec and vec > 1:
        *rest, last = loops
        lo, li = sch.split(last, [None, vec]) if vec < inner else (None, last)
        sch.vectorize(li)
        outer = rest + ([lo] if lo is not None else [])
    elif len(loops) > 1 and inner <= _UNROLL_MAX:
        # An axis too short to vectorize stays an unrolled loop of its own, and so does the one
        # above it where the rest still makes chunks enough: fused into the parallel loop, each
        # element paid for dividing the fused index back into coordinates (the input transpose
        # of ResNet and MobileNet at 224x224, before it took the path above: 0.060 against
        # 0.008 ms alone).
        sch.unroll(loops[-1])
        keep = 2 if len(loops) > 2 and total // (extents[-1] * extents[-2]) >= _PARALLEL_CHUNKS else 1
        outer = loops[:-keep]
    else:
        outer = loops
    if outer and total >= _PARALLEL_MIN:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
