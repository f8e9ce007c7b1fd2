"""TensorCoreMatmul: a default CUDA schedule for fp16/bf16/INT8 GEMMs on tensor cores (ldmatrix + mma.sync).

Requires: a CUDA target with arch sm_80 or newer; a PrimFunc whose one reduction block is
matmul-like (dlight's ``get_index_map`` accepts it: plain, batched, NN/NT/TN/TT layouts,
with elementwise producers and consumers such as a bias add, GELU or a cast, as relax
``LegalizeOps`` + ``FuseOps`` make them), float16 or bfloat16 inputs of one dtype and a
float32 accumulator (float16 inputs may also accumulate in float16, when the TIR says so),
or 8-bit inputs (uint8 or int8 A, int8 B: what INT8 quantization makes) into int32.
8-bit operands: m16n8k32 mma, K steps of 64, tiles of 128x64 or 64x64; A must be
K-contiguous in global memory (ldmatrix cannot transpose bytes), a [K, N] B is gathered into
[N, K] shared tiles by byte copies; shared rows are padded by 16 bytes instead of swizzled, and
rows pad_einsum adds past M or N repeat the last row so that their copies stay ``cp.async``
(``_rows_clamped``).
Declines (``apply`` returns None, logged at debug level, so the next rule takes over):
other targets and arches, other dtypes, kernels that are not matmul-like, functions marked
``dlight.do_not_tensorize``, and any static M, N or K of 16 or less after dlight's
reindexing (GEMV-like kernels, where dlight's GEMV rule is the better fit).
Convolutions: NHWC ``conv2d`` (block ``conv2d_nhwc``, weights OHWI as the CUDA backend's
``ConvertConvLayout`` makes them, or HWIO) is taken as an implicit GEMM, M = N*OH*OW,
N = Cout, K = KH*KW*Cin, with the pad block inlined into the shared-memory copies (predicated
``cp.async`` that zero-fills); only M <= 16 declines (N and K are padded). Grouped, depthwise
and NCHW convolutions decline (dlight takes them).
Guarantees: the returned schedule computes the same function; M, N, K that are not
multiples of the tile are padded (``pad_einsum``), symbolic ones included. The kernel:

- a 128x128 block tile, or 64x64 (``SMALL_TILE``, warps of 32x32) where static shapes give fewer
  than ``FULL_WAVE`` large tiles or M or N is at most 64 (batch-1 convolutions and GEMMs);
  K step 32, four warps (2x2) of 64x64 (32x32), each accumulating 4x8 (2x4) m16n8k16
  ``mma.sync`` tiles in registers and reading its operands from shared memory with ``ldmatrix``
  (``.trans`` for operands whose global layout is the other way round, so that global reads
  stay contiguous along the innermost axis);
- shared memory filled by 16-byte ``cp.async`` copies in a 4-stage software pipeline, with
  TVM's XOR "permuted layout" swizzle, so ldmatrix and the copies are free of bank conflicts;
- the result staged through shared memory (static when the tile fits in 48 KiB; not swizzled:
  ``mma_store`` writes whole tiles)
  and written back, 8 or 16 bytes per thread, with the fused epilogue;
- thread blocks ordered in groups of up to 8 tile rows so that they share operands in L2;
- int32 indices when every parameter is static and below 2^31 elements.

The large tile uses 64 KiB of dynamic shared memory (TVM's runtime raises the kernel's limit), more than
the 48 KiB every CUDA GPU guarantees without opting in and less than every sm_80+ GPU allows.
``cp.async`` is emitted only under the PassContext option ``tirx.use_async_copy`` (TVM's
``InjectPTXAsyncCopy``); without it the pipeline uses plain copies, still correct. Operands
whose rows are not 16-byte aligned (inner dimension not a multiple of 8) get scalar copies.
Mma fragments use smelt's per-thread twins of TVM's intrinsics (see ``_register``).

Measured on an H200 (sm_90) with ``bench/gemm.py`` (fp16 in, fp32 accumulate, fp16 out,
cp.async on, median of 7x20 runs), TFLOP/s:

    M x N x K          dlight Matmul (WMMA)   TensorCoreMatmul   cuBLAS (torch 2.11)
    2048 x 768 x 3072          60                  227 (92 %)          247
    2048 x 3072 x 768          77                  282 (105 %)         268
    8192 x 8192 x 8192         81                  386 (53 %)          725

The large square GEMM is where mma.sync stays behind cuBLAS's Hopper wgmma kernels.
ResNet-50 fp16 end to end (``bench/gpu_e2e.py``, H200): batch 32 1.84 ms (torch.compile
reduce-overhead 2.6 ms; 6.7 ms with convs on dlight's WMMA), batch 1 0.52 ms (0.58-0.74 ms;
2.1 ms with 128x128 tiles only, which left most SMs idle and the 7x7 stage on dlight's WMMA).
Where: first rule of ``apply_default_schedules.default_rules()``.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

from .tensor_intrinsics import import_intrinsics

log = logging.getLogger(__name__)

MIN_EXTENT = 16  # static M, N or K at or below this: decline (for convolutions only M)
FULL_WAVE = 128  # thread blocks that keep a large GPU busy (132 SMs on an H100/H200)


@dataclass(frozen=True)
class TileConfig:
    """Block tile ``block_m x block_n x block_k``, warps of ``warp_m x warp_n``, pipeline depth."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 32
    warp_m: int = 64
    warp_n: int = 64
    stages: int = 4
    vector: int = 8  # elements per 16-byte copy
    l2_group: int = 8  # tile rows per group of thread blocks (L2 reuse); 1 turns it off


SMALL_TILE = TileConfig(block_m=64, block_n=64, warp_m=32, warp_n=32)
# 8-bit operands: K steps of 64 (two m16n8k32 mma), 16 elements per 16-byte copy, and a 128x64 tile
# whose int32 result (32 KiB) is staged in static shared memory (see ``_schedule``). The small tile
# keeps 3 stages: static and dynamic shared memory together stay within the 48 KiB a kernel gets
# without opting in (TVM's runtime opts in only for more than 48 KiB of *dynamic* shared memory).
INT8_TILE = TileConfig(block_m=128, block_n=64, block_k=64, warp_m=64, warp_n=32, vector=16)
INT8_SMALL_TILE = TileConfig(block_m=64, block_n=64, block_k=64, warp_m=32, warp_n=32, stages=3, vector=16)


def _arch(target: Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(c for c in arch.removeprefix("sm_") if c.isdigit())
    return int(digits) if arch.startswith("sm_") and digits else -1


def _operand_inner_kinds(sch: s_tir.Schedule, main, vector: int = 8) -> tuple[str | None, str | None]:
    """For A and B: 'R' when the axis contiguous in global memory is the reduction axis, 'S' when
    spatial, else None, read through every producer block (views such as transposes and
    slices, which the shared-memory copies will inline), on a copy of ``sch``. ``vector``: the
    elements of one 16-byte copy."""
    probe = sch.copy()
    probe_main = probe.get_sblock(probe.get(main).name_hint)
    auto_inline_producers(probe, probe_main)
    block = probe.get(probe_main)
    value = getattr(block.body, "value", None)
    loads = [n for n in _loads(value) if not n.source.same_as(block.writes[0].source)] if value is not None else []
    if len(loads) != 2:
        return None, None
    analyzer = tvm.sym.Analyzer()
    for iv in block.iter_vars:
        analyzer.bind(iv.var, iv.dom)

    def kind(load) -> str | None:
        index = analyzer.simplify(load.indices[-1])
        # (... + k) % 64, heads merged back into a row: contiguous in whole vectors when the rest is aligned
        wrapped = type(index).__name__ == "FloorMod" and isinstance(index.b, tirx.IntImm) and \
            index.b.value % vector == 0
        inner = index.a if wrapped else index
        for iv in block.iter_vars:  # the iterator that steps the innermost index by one element
            coef = tvm.sym.detect_linear_equation(inner, [iv.var])
            if not coef or not isinstance(coef[0], tirx.IntImm) or coef[0].value != 1:
                continue
            rest = analyzer.modular_set(coef[1])
            if wrapped and (rest.coeff % vector or rest.base % vector):
                return None  # a vector could wrap around mid-way
            return "R" if iv.iter_type == tirx.IterVar.CommReduce else "S"
        return None
    return kind(loads[0]), kind(loads[1])


def _loads(expr) -> list:
    """The buffer loads in ``expr``, left to right (the Python API of TVM 0.27 has no expression visitor)."""
    if isinstance(expr, tvm.ir.expr.TensorLoad):  # tirx.BufferLoad is a constructor function in TVM 0.27
        return [expr]
    children = [getattr(expr, f, None) for f in ("a", "b", "value", "condition", "true_value", "false_value")]
    children += list(getattr(expr, "args", []) or [])
    return [load for c in children if isinstance(c, tvm.ir.expr.Expr) for load in _loads(c)]


def _static(extent) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


class TensorCoreMatmul(GPUScheduleRule):
    """See the module docstring."""

    def __init__(self, config: TileConfig = TileConfig(), small: TileConfig = SMALL_TILE,
                 int8: TileConfig = INT8_TILE, int8_small: TileConfig = INT8_SMALL_TILE):
        for cfg, in_bytes in ((config, 2), (small, 2), (int8, 1), (int8_small, 1)):
            static, dynamic = shared_memory_bytes(cfg, in_bytes, 4)
            if static + dynamic > 48 * 1024 >= dynamic or static + dynamic > 227 * 1024:
                raise ValueError(f"tile {cfg} needs {static} + {dynamic} bytes of static + dynamic shared "
                                 "memory: it would not launch (see shared_memory_bytes)")
        self.config, self.small = config, small
        self.int8, self.int8_small = int8, int8_small

    def _tile(self, batch, m, n, eight_bit: bool = False) -> TileConfig:
        """The large tile, or the 64x64 one where the large tile would leave the GPU half idle:
        fewer than ``FULL_WAVE`` thread blocks (batch-1 convs and GEMMs), or M or N of 64 or less."""
        cfg, small = (self.int8, self.int8_small) if eight_bit else (self.config, self.small)
        dims = [_static(e) for e in (batch, m, n)]
        if None in dims:
            return cfg
        b, m, n = dims
        blocks = b * -(-m // cfg.block_m) * -(-n // cfg.block_n)
        return small if blocks < FULL_WAVE or min(m, n) <= small.block_m else cfg

    def _decline(self, func_name: str, why: str, level: int = logging.DEBUG) -> None:
        log.log(level, "TensorCoreMatmul declines %s: %s", func_name, why)
        return None

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` for ``target``, or None where the rule does not apply."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        name = str(func.attrs.get("global_symbol", "?")) if func.attrs is not None else "?"
        if target.kind.name != "cuda" or _arch(target) < 80:
            return self._decline(name, f"target {target.kind.name} {target.attrs.get('arch', '')} is not sm_80+")
        if func.attrs is not None and "dlight.do_not_tensorize" in func.attrs:
            return self._decline(name, "marked dlight.do_not_tensorize")
        sch = s_tir.Schedule(int32_indices(func))
        reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if reductions is None:
            return self._decline(name, "not one reduction block among spatial blocks")
        main = reductions[0]
        stmt = sch.get(main)
        conv = "conv" in stmt.name_hint
        if conv and not stmt.name_hint.startswith("conv2d_nhwc"):
            return self._decline(name, f"block {stmt.name_hint}: of the convolutions only plain NHWC conv2d is taken "
                                       "(grouped, depthwise and NCHW ones go to dlight)")
        index_maps = get_index_map(stmt)
        if index_maps is None:
            return self._decline(name, "not matmul-like")
        a_dtype, b_dtype = (str(r.source.dtype) for r in stmt.reads[:2])
        c_dtype = str(stmt.writes[0].source.dtype)
        if c_dtype not in _INTRINSICS.get((a_dtype, b_dtype), ()):
            return self._decline(name, f"dtypes {a_dtype} x {b_dtype} -> {c_dtype}")
        eight_bit = tvm.DataType(a_dtype).bits == 8
        a_inner, b_inner = _operand_inner_kinds(sch, main, 16 if eight_bit else 8)
        if None in (a_inner, b_inner):  # the 16-byte copies would read the wrong elements
            return self._decline(name, "no axis of an operand is contiguous in global memory")
        # Smem layouts follow the global ones: A as [M, K] unless its global inner axis is M, B as [N, K]
        # only when its global inner axis is K (the NT case); ldmatrix.trans reads the other ones.
        trans_a = a_inner == "S"
        trans_b = b_inner == "R"
        if eight_bit and trans_a:  # ldmatrix.trans moves 16-bit elements: no 8-bit form
            return self._decline(name, "8-bit A must be K-contiguous in global memory ([M, K])")
        try:
            return self._schedule(sch, main, conv, (a_dtype, b_dtype), c_dtype, trans_a, trans_b, name)
        except _Decline as e:  # a tensorize mismatch is unexpected for a kernel that got this far
            return self._decline(name, str(e), logging.WARNING if "tensorize" in str(e) else logging.DEBUG)

    def _schedule(self, sch, main, conv, in_dtypes, acc_dtype, trans_a, trans_b, name):
        # Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (dlight's Matmul does the same). The index
        # maps come from the reindexed block: reindexing drops unit iterators (a 1x1 conv's kernel axes),
        # which maps taken before it would still name.
        reindexed = [sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1)), sch.reindex(main, ("write", 0))]
        index_maps = get_index_map(sch.get(main))
        if index_maps is None:
            raise _Decline("not matmul-like after reindexing")
        matmul_map, a_map, b_map, c_map = index_maps
        sch.transform_layout(reindexed[0], ("write", 0), a_map)
        sch.transform_layout(reindexed[1], ("write", 0), b_map)
        sch.transform_layout(reindexed[2], ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars]
        small = [f"{axis}={_static(e)}" for axis, e in zip("MNK", extents[1:])
                 if _static(e) is not None and _static(e) <= MIN_EXTENT and (axis == "M" or not conv)]
        if small:
            raise _Decline(f"{', '.join(small)} <= {MIN_EXTENT} (GEMV-like)")
        eight_bit = tvm.DataType(in_dtypes[0]).bits == 8
        cfg = self._tile(*extents[:3], eight_bit)
        mma_k = 32 if eight_bit else 16  # one 16x16 tile of mma: m16n8k32 for 8-bit inputs, m16n8k16 else
        layout = _ldmatrix_layout_8bit if eight_bit else _ldmatrix_layout

        sch.pad_einsum(main, [1, cfg.block_m, cfg.block_n, cfg.block_k])
        if eight_bit:
            sch, main = _rows_clamped(sch, main)
        batch, i, j, k = sch.get_loops(main)
        i, i_mma = sch.split(i, [None, 16])
        j, j_mma = sch.split(j, [None, 16])
        k, k_mma = sch.split(k, [None, mma_k])
        sch.reorder(i, j, k, i_mma, j_mma, k_mma)
        inner = main
        outer = sch.blockize(i_mma)

        warps_m, warps_n = cfg.block_m // cfg.warp_m, cfg.block_n // cfg.warp_n
        tiles_m = _static(sch.get(sch.get_loops(outer)[1]).extent)
        group = 1
        if tiles_m is not None:
            tiles_m //= cfg.block_m // 16
            group = next(g for g in (cfg.l2_group, 4, 2, 1) if g <= cfg.l2_group and tiles_m % g == 0)
        i0, i1, i2, i3 = sch.split(i, [None, group, warps_m, cfg.warp_m // 16])
        j0, j2, j3 = sch.split(j, [None, warps_n, cfg.warp_n // 16])
        k0, k1 = sch.split(k, [None, cfg.block_k // mma_k])
        sch.reorder(i0, j0, i1, i2, j2, k0, k1, i3, j3)
        sch.bind(sch.fuse(batch, i0, j0, i1), "blockIdx.x")
        block_axis = sch.get_loops(outer)[0]
        sch.bind(i2, "threadIdx.z")
        sch.bind(j2, "threadIdx.y")

        unrolled = [k1, i3, j3]

        def fetch(read: int, trans: bool, tag: str):
            smem = sch.cache_read(outer, read, "shared.dyn")
            sch.compute_at(smem, k0)
            auto_inline_producers(sch, smem)
            vector = cfg.vector
            if trans:  # keep the global inner axis innermost in shared memory too
                a0, a1 = sch.get_loops(smem)[-2:]
                sch.reorder(a1, a0)
                if eight_bit:
                    # No ldmatrix transposes 8-bit elements: shared memory stays [N, K], filled by byte
                    # copies whose threads walk the global inner axis (coalesced reads, no cp.async;
                    # a [K, N] matmul weight, as INT8 quantization stores it).
                    vector = 1
                else:
                    sch.transform_layout(smem, ("write", 0), lambda b, x, y: (b, y, x))
            _spread_over_threads(sch, smem, warps_m, warps_n, vector)
            # TVM's XOR swizzle permutes 8-element chunks, half a 16-byte copy or ldmatrix row of 8-bit
            # elements; those rows get 16 bytes of padding instead, which spreads ldmatrix's 8 rows of
            # 16 bytes over all 32 banks (a row stride of 80 bytes for K steps of 64).
            if eight_bit:
                sch.storage_align(smem, 0, axis=-2, factor=cfg.block_k, offset=cfg.vector)
            else:
                sch.annotate(smem, "permuted_layout", f"g2s_{tag}")

            reg = sch.cache_read(outer, read, "local")
            sch.compute_at(reg, k1)
            r0, r1 = sch.split(sch.get_loops(reg)[-2], [None, 16])
            c0, c1 = sch.split(sch.get_loops(reg)[-1], [None, mma_k])
            sch.reorder(r0, c0, r1, c1)
            unrolled.extend([r0, c0])
            sch.transform_layout(reg, ("write", 0), layout)
            fragment = sch.blockize(sch.get_loops(reg)[-2])
            if not eight_bit:
                sch.annotate(fragment, "permuted_layout", f"s2l_{tag}")
            return reg

        reg_a = fetch(0, trans_a, "A")
        reg_b = fetch(1, not trans_b, "B")

        # The output tile is staged in static shared memory when it fits (48 KiB): in dynamic shared memory,
        # TVM 0.27 merges it with the operand stages and, unless both happen to be the same size (the
        # 128x128 fp32 tile), mistypes the merged buffer ("tvm_access_ptr element type must match").
        # Hence the 8-bit tiles of at most 128x64 int32 (32 KiB), whose padded operand stages differ in size.
        out_bytes = cfg.block_m * cfg.block_n * tvm.DataType(acc_dtype).bits // 8
        out_scope = "shared" if out_bytes <= 48 * 1024 else "shared.dyn"
        out_smem = sch.cache_write(outer, 0, out_scope)
        sch.reverse_compute_at(out_smem, block_axis)
        auto_inline_consumer_chain(sch, out_smem)
        _spread_over_threads(sch, out_smem, warps_m, warps_n, 4)  # 16 bytes of float32 or int32

        out_reg = sch.cache_write(outer, 0, "local")
        _, m, n = sch.get_loops(out_reg)[-3:]
        m1, m2, m3 = sch.split(m, [warps_m, None, 16])
        n1, n2, n3 = sch.split(n, [warps_n, None, 16])
        sch.reorder(m1, n1, m2, n2, m3, n3)
        unrolled.extend([m2, n2])
        sch.bind(m1, "threadIdx.z")
        sch.bind(n1, "threadIdx.y")
        sch.transform_layout(out_reg, ("read", 0), _ldmatrix_layout)

        init = sch.decompose_reduction(outer, k0)
        init_inner = sch.get_child_blocks(init)[0]
        unrolled.extend(sch.get_loops(init_inner)[-4:-2])
        intrins = _intrinsics(in_dtypes, acc_dtype, trans_a, trans_b or eight_bit, out_scope)
        try:
            sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
            sch.tensorize(sch.get_loops(reg_a)[-2], intrins["load_a"])
            sch.tensorize(sch.get_loops(reg_b)[-2], intrins["load_b"])
            sch.tensorize(sch.get_loops(inner)[-3], intrins["compute"])
            sch.tensorize(sch.get_loops(out_reg)[-2], intrins["store"])
        except Exception as e:  # tensorize raises plain TVMErrors when the body does not match
            raise _Decline(f"tensorize failed: {str(e).strip().splitlines()[-1]}") from None

        for loop in unrolled:
            sch.unroll(loop)
        sch.annotate(k0, "software_pipeline_stage", [0, 0, cfg.stages - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
        return sch


def _spread_over_threads(sch, block, warps_m: int, warps_n: int, vector: int) -> None:
    """``block``'s two innermost loops fused and copied by every thread of the block, ``vector`` at a time."""
    fused = sch.fuse(*sch.get_loops(block)[-2:])
    _, tz, ty, tx, vec = sch.split(fused, [None, warps_m, warps_n, 32, vector])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def int32_indices(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with int32 loops and indices where every parameter is static, small and not of a 64-bit integer type.

    Relax legalizes with int64 shapes; 64-bit address arithmetic in the inner loop costs
    integer instructions the tensor-core loop cannot spare. TVM's ``ForceNarrowIndexToInt32``
    also narrows int64 *data* buffers, hence the dtype condition (8- and 32-bit data stay as they are).
    """
    for buf in func.params:
        sizes = [_static(d) for d in buf.shape]
        if None in sizes or str(buf.dtype) in ("int64", "uint64") or \
                functools.reduce(lambda a, b: a * b, sizes, 1) >= 2**31:
            return func
    mod = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))
    return mod["main"]


# A pad block of pad_einsum that pads an operand along M or N only: buf_pad[b, i, k] = if i < M: buf[b, i, k] else 0
_ROW_PAD = re.compile(r"T\.if_then_else\((v\w*) < (?:T\.int64\((\d+)\)|(\d+)), (\w+)\[(v\w*), \1, (v\w*)\], "
                      r"T\.u?int8\(0\)\)")


def _rows_clamped(sch: s_tir.Schedule, main) -> tuple[s_tir.Schedule, object]:
    """``sch`` with the 8-bit operand rows that pad_einsum added past M (N) repeating the last row, not zeros.

    Why: TVM 0.27's InjectPTXAsyncCopy makes a zero-filling ``cp.async`` of a predicated copy only when
    the fill value is a *float* zero; 8-bit tiles padded with integer zeros were copied synchronously,
    outside the software pipeline. Rows past M (N) only reach results that are never stored, so any
    row in bounds does. Zeros along K, which do reach the results, stay. TVM's schedule has no
    primitive for a pad value, hence the rewrite of the function's script (which round-trips).
    """
    text = sch.mod["main"].script()

    def clamp(m: re.Match) -> str:
        last = f"T.int64({int(m.group(2)) - 1})" if m.group(2) else str(int(m.group(3)) - 1)
        return f"{m.group(4)}[{m.group(5)}, T.min({m.group(1)}, {last}), {m.group(6)}]"

    clamped, n = _ROW_PAD.subn(clamp, text)
    if not n:
        return sch, main
    from tvm.script import from_source

    name = sch.get(main).name_hint
    sch = s_tir.Schedule(from_source(clamped))
    return sch, sch.get_sblock(name)


class _Decline(Exception):
    """Internal: the kernel is out of the rule's reach; ``apply`` turns this into None."""


def shared_memory_bytes(cfg: TileConfig, in_bytes: int, acc_bytes: int) -> tuple[int, int]:
    """(static, dynamic) shared memory of a kernel with tile ``cfg``: the pipelined operand stages
    (8-bit rows padded by 16 bytes) and the staged result (static when it fits in 48 KiB).

    A kernel gets 48 KiB unless it opts in, which TVM's runtime does only for more than 48 KiB of
    *dynamic* shared memory: static + dynamic above 48 KiB with dynamic below fails to launch
    (CUDA_ERROR_INVALID_VALUE, seen with 4 stages of the small 8-bit tile); an sm_90 block has
    227 KiB at most. ``TensorCoreMatmul`` refuses tiles that would not launch."""
    row = cfg.block_k * in_bytes + (16 if in_bytes == 1 else 0)
    operands = (cfg.block_m + cfg.block_n) * row * cfg.stages
    out = cfg.block_m * cfg.block_n * acc_bytes
    return (out, operands) if out <= 48 * 1024 else (0, max(out, operands))


def _ldmatrix_layout(b, x, y):
    shared_16x16_to_ldmatrix_32x8_layout = import_intrinsics().shared_16x16_to_ldmatrix_32x8_layout
    return (b, x // 16, y // 16, *shared_16x16_to_ldmatrix_32x8_layout(x % 16, y % 16))


def _ldmatrix_layout_8bit(b, x, y):
    shared_16x32_to_ldmatrix_32x16_layout = import_intrinsics().shared_16x32_to_ldmatrix_32x16_layout
    return (b, x // 16, y // 32, *shared_16x32_to_ldmatrix_32x16_layout(x % 16, y % 32))


# (A, B) input dtypes -> accumulator dtypes the mma intrinsics support
_INTRINSICS = {("float16", "float16"): ("float32", "float16"), ("bfloat16", "bfloat16"): ("float32",),
               ("int8", "int8"): ("int32",), ("uint8", "int8"): ("int32",)}


def _intrinsics(in_dtypes: tuple[str, str], acc_dtype: str, trans_a: bool, trans_b: bool,
                out_scope: str = "shared.dyn") -> dict[str, str]:
    """Names of the per-thread twins (see ``_register``) of TVM's mma intrinsic group, registered on demand."""
    cuda = import_intrinsics()
    eight_bit = acc_dtype == "int32"
    group = cuda.get_mma_intrin_group("shared.dyn", "shared.dyn", "int8" if eight_bit else "float16", acc_dtype,
                                      trans_a, trans_b, not_use_mma_store_intrinic=False)
    acc = {"float32": "f32", "float16": "f16", "int32": "i32"}[acc_dtype]
    names = {}
    for role, name in group.items():
        if role == "store":  # TVM registers mma_store to shared.dyn for f32 only
            name = f"mma_store_16x16_{acc}_{out_scope.replace('.', '_')}_"
            funcs = lambda: cuda.get_mma_store_intrin(acc_dtype, 8, out_scope, True)  # noqa: E731
        elif eight_bit and role.startswith("load"):  # TVM registers 8-bit ldmatrix from static shared memory only
            funcs = functools.partial(cuda.get_ldmatrix_intrin, 32, "int8", role[-1].upper(), role == "load_b",
                                      "shared.dyn")
        else:
            funcs = functools.partial(lambda n: (cuda.TensorIntrin.get(n).desc, cuda.TensorIntrin.get(n).impl), name)
        retype = []
        if in_dtypes[0] == "bfloat16" and role in ("load_a", "load_b", "compute"):
            name, retype = name.replace("f16", "bf16"), [('"float16"', '"bfloat16"')]
            retype += [('"fp16"', '"bf16"')] if role == "compute" else []  # the instruction's operand types
        elif in_dtypes[0] == "uint8" and role == "load_a":
            name, retype = name.replace("i8", "u8"), [('"int8"', '"uint8"')]
        elif in_dtypes[0] == "uint8" and role == "compute":  # A's buffer and the instruction's A type
            name, retype = name.replace("i8i8", "u8i8"), [('A: T.Buffer((32, 16), "int8"', 'A: T.Buffer((32, 16), "uint8"'),
                                                           ('"int8", "int8", "int32"', '"uint8", "int8", "int32"')]
        names[role] = _register(f"smelt_{name}", funcs, retype)
    return names


def _register(name: str, funcs, retype: list[tuple[str, str]] = ()) -> str:
    """Register the per-thread twin of TVM's intrinsic ``funcs()`` as ``name``, its script text
    retyped by the ``(old, new)`` replacements of ``retype``.

    Why per-thread: TVM keeps mma fragments in ``warp`` scope and relies on ``LowerWarpMemory``
    to turn them into per-thread registers. In TVM 0.27 that pass lowers only the first warp
    buffer of each statement sequence (the accumulator); the ldmatrix fragments stayed
    warp-sized arrays indexed by ``threadIdx.x``, and common-subexpression elimination, which
    runs first, hides the accumulator's constant indices, so nvcc kept all 128 accumulators
    of a thread in local memory (209 ``ld.local`` in the main loop). The twins keep
    fragments in ``local`` scope: the buffer keeps the warp-wide [32, 8] shape of each tile
    (so the tensorize description is unchanged), but each thread reads and writes only its
    8 elements at ``elem_offset // 32``, constant offsets nvcc maps to registers.
    Why retyped: TVM registers these intrinsics for float16 and int8 only; the bf16 instructions take
    the same operands as the float16 ones, and mma multiplies unsigned by signed 8-bit integers
    (``.u8.s8``), the form smelt's INT8 quantization gives (uint8 activations, int8 weights).
    """
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    desc, impl = funcs()
    texts = []
    for func, is_impl in ((desc, False), (impl, True)):
        text = func.script().replace('scope="warp"', 'scope="local"')
        if is_impl:
            text, n = re.subn(r"(\w+)\.elem_offset \+ (?:(?:8|16) \* tx|tx \* (?:8|16))", r"\1.elem_offset // 32",
                              text)
            text, m = re.subn(r"(C_warp)\.elem_offset([,)])", r"\1.elem_offset // 32\2", text)
            if n + m == 0:
                raise RuntimeError(f"TVM's intrinsic for {name} changed shape; cannot derive its per-thread twin")
            # TVM 0.27 prints these calls without the dtype its parser requires; parsed back without
            # it, ldmatrix defaults to int8, which the code generator turns into a wrong scalar loop.
            for call, buf in (("cuda.mma_fill_legacy", "C_warp"), ("cuda.mma_store_legacy", "C_warp"),
                              ("ptx_legacy.ldmatrix", "shared")):
                dtype = re.search(rf'{buf}: T\.Buffer\(\(\d+, \d+\), "(\w+)"', text)
                if dtype and f"T.{call}(" in text:
                    text = re.sub(rf"(T\.{re.escape(call)}\(.*)\)$", rf'\1, dtype="{dtype.group(1)}")', text,
                                  flags=re.M)
        texts.append(text)
    for old, new in retype:
        if not any(old in t for t in texts):
            raise RuntimeError(f"TVM's intrinsic for {name} changed: no {old} to retype")
        texts = [t.replace(old, new) for t in texts]
    from tvm.script import from_source

    s_tir.TensorIntrin.register(name, *(from_source(t) for t in texts))
    return name
