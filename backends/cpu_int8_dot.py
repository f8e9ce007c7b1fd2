"""Int8DotTile: uint8 x int8 -> int32 convolutions and matmuls on x86's dot-product instructions.

Requires: an x86 LLVM target with AVX-512 VNNI (``vpdpbusd``) or AVX2 (``vpmaddubsw``); a kernel
of one reduction block ``C[..., n] += int32(A[..., k]) * int32(W[..., k, n])`` (QuantizeInt8's
convs in NHWC/HWIO and its matmuls) with A uint8, W an int8 weight the kernel may repack
(``layout_free_buffers``), n the innermost output axis, static and a multiple of the
instruction's lanes (16 VNNI, 8 AVX2), and k the innermost reduction axis, static and a
multiple of its depth (4), indexing A's last axis; on AVX2, weights within ±63 (QuantizeInt8
quantizes to 7 bits for such targets: ``weight_limit``, the CPU backend's
``int8_weight_limit``). Declines anything else (TileReduction then widens both operands to
int32 and multiplies in 32-bit lanes).
Guarantees: the same integers. Each instruction multiplies ``depth`` consecutive k of A with
``lanes`` output channels and adds into ``lanes`` int32 accumulators (``DOTS`` below); W is
repacked at compile time into [N / lanes, ..., K / depth, lanes, depth], so each instruction's
weights are one contiguous load. Grid, register tile and epilogue are as in TileReduction: the
output channel tiles outermost and parallel, the reduction loops, then ``rows`` x ``width``
int32 accumulators, the epilogue (rescale, bias, activation, the next layer's quantize) per tile.
Why: widened to int32 (16 multiplies per instruction, against float32's 16 FMAs), a quantized
ResNet-18 at 112x112 took 8.25 ms on a 2-core Zen 4, 0.61x smelt's own float32; with VNNI
2.82 ms, and 2.28 ms once QuantizeInt8 padded the stem's 3 channels to 4 for it: 2.3x faster
than float32, 3.0-3.7x faster than onnxruntime's INT8 (bench/quantize.py). AVX2's byte dot
product, ``vpmaddubsw``, adds two u8 x s8 products in int16, which saturates past 2^15 unless
|W| <= 63 (onnxruntime's ``reduce_range`` makes the same choice for it); ``vpmaddwd`` by ones then
adds the pairs into int32. The alternative, the bytes widened to int16 and ``vpmaddwd`` on them
(full 8-bit weights), ran ResNet-18 INT8 at 112x112 at 6.97 ms on a 2-core Zen 3 (smelt's
float32: 6.9); ``vpmaddubsw`` at 3.82.
Where: ``cpu_schedule.default_rules()``, before TileReduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from .cpu_schedule import (_schedule_root, _vectorize_split, loop_extents, open_reduction, plan_register_tile,
                           row_vector_width, split_register_tile, vector_lanes)


# What the instructions compute, ``lanes`` int32 sums of ``depth`` products: TVM's
# ``dot_product_16x4_u8i8i32_desc`` for VNNI, written out here because importing it from
# ``tvm.s_tir.tensor_intrin.x86`` imports every target's intrinsics (10 s of every CPU compile's
# start on a 2-core machine, 70 s before ``tensor_intrinsics``).
def _dot_desc(lanes: int, depth: int):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((depth,), "uint8", offset_factor=1), B: T.Buffer((lanes, depth), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


# TVM's own ``dot_16x4_vnni`` passes vpdpbusd its bytes as <16 x i32>; LLVM 22 (TVM 0.27's) declares
# them <64 x i8> and rejects the call ("code generation for cpu failed"). The same instruction,
# with the operand types LLVM now has:
@T.prim_func(s_tir=True)
def _dot_16x4_vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                   C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64"), B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16")


# AVX2 with 7-bit weights: vpmaddubsw multiplies A's four bytes (broadcast) with W's 32 bytes into
# int16 pair sums, which cannot saturate while |W| <= 63 (2 x 255 x 63 < 2^15); vpmaddwd by ones
# adds the pairs into int32 lanes.
@T.prim_func(s_tir=True)
def _dot_8x4_avx2(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32"),
            B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")


@dataclass(frozen=True)
class Dot:
    """A dot-product instruction: the CPU feature, output lanes, products per lane, its intrinsic, how
    many int32 accumulator registers a register tile may take (the rest hold A and W), and the
    largest |weight| it multiplies exactly."""

    feature: str
    lanes: int
    depth: int
    intrin: str
    accumulators: int
    weight_limit: int


# Vectors across the register tile's width. TileReduction's scoring (FMA chains per load) chose
# one-vector tiles at 14x14 (7x8) and 7x7, with which ResNet-18 at 112x112 ran 7.6 ms on a Zen 3
# (AVX2), 6.7 with two vectors (the rows' dots each take a widened broadcast pair).
INT8_WIDTH_VECTORS = 2

DOTS = [Dot("avx512vnni", 16, 4, "smelt_dot_16x4_vnni", 12, 127),  # of AVX-512's 32 registers
        Dot("avx2", 8, 4, "smelt_dot_8x4_avx2", 10, 63)]  # of AVX2's 16
TensorIntrin.register(DOTS[0].intrin, _dot_desc(16, 4), _dot_16x4_vnni, override=True)
TensorIntrin.register(DOTS[1].intrin, _dot_desc(8, 4), _dot_8x4_avx2, override=True)


def dot_for(target) -> Dot | None:
    """The dot-product instruction this rule uses on ``target``, None where it declines every kernel."""
    if "x86" not in str(target.attrs.get("mtriple", "")):
        return None
    return next((d for d in DOTS if target_has_features(d.feature, target)), None)


def weight_limit(target) -> int:
    """The largest |int8 weight| that QuantizeInt8 may emit for ``target`` (``int8_weight_limit`` of
    the CPU backend): 63 where the rule multiplies with AVX2's ``vpmaddubsw``, else 127."""
    dot = dot_for(target)
    return 127 if dot is None else dot.weight_limit


def _operands(stmt: tirx.SBlock):
    """(A, W) of ``C[...] = C[...] + int32(A[...]) * int32(W[...])``, else None (``tirx.BufferLoad``
    is a constructor function in TVM 0.27: loads are ``tvm.ir.expr.TensorLoad``)."""
    store = stmt.body
    if not isinstance(store, tirx.stmt.BufferStore) or str(store.buffer.dtype) != "int32":
        return None
    add = store.value
    if not isinstance(add, tirx.Add) or not isinstance(add.a, tvm.ir.expr.TensorLoad) or \
            not add.a.source.same_as(store.buffer) or not isinstance(add.b, tirx.Mul):
        return None
    loads = []
    for e in (add.b.a, add.b.b):
        if not isinstance(e, tirx.Cast) or str(e.ty) != "int32" or not isinstance(e.value, tvm.ir.expr.TensorLoad):
            return None
        loads.append(e.value)
    a, w = loads
    if str(a.source.dtype) != "uint8" or str(w.source.dtype) != "int8":
        return None
    return a, w


class Int8DotTile(ScheduleRule):
    """See the module docstring."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if (dot := dot_for(target)) is None:
            return None
        lanes, depth = dot.lanes, dot.depth
        if (opened := open_reduction(func, target, keep_pads=True)) is None:
            return None
        sch, red, n_s, kept, epilogue = opened
        block = red.block_rv
        stmt = sch.get(block)
        if (operands := _operands(stmt)) is None:
            return None
        a, w = operands
        free = {func.params[int(i)].name for i in func.attrs.get("layout_free_buffers", [])} \
            if func.attrs is not None else set()
        if w.source.name not in free or len(w.indices) < 2:
            return None
        n_var, k_var = stmt.iter_vars[n_s - 1].var, stmt.iter_vars[-1].var
        if not (w.indices[-1].same_as(n_var) and w.indices[-2].same_as(k_var) and a.indices[-1].same_as(k_var)):
            return None
        loops = sch.get_loops(block)
        extents = loop_extents(sch, loops)
        n_ext, k_ext = extents[n_s - 1], extents[-1]
        if n_ext is None or k_ext is None or n_ext % lanes or k_ext % depth:
            return None

        # Register tile: rows x width int32 accumulators, planned as TileReduction's but always two
        # vectors wide where they divide (INT8_WIDTH_VECTORS), and with rows that divide the
        # output's: with tail tiles ResNet-18 at 112x112 ran 8.0 ms on a Zen 3 (AVX2), 6.7 without.
        # (No tail, so ``split_register_tile`` leaves every row-tile loop in the grid.)
        vectors = INT8_WIDTH_VECTORS if n_ext % (INT8_WIDTH_VECTORS * lanes) == 0 else 1
        first, row_axis, row_ext, (rows, width) = plan_register_tile(
            sch, block, n_s, extents, epilogue, target, lanes, dot.accumulators, width=vectors * lanes, tails=False)
        if rows == 1:  # one row (a matrix-vector product): the accumulators go along the width
            width = row_vector_width(n_ext, lanes, dot.accumulators, 4)

        # W as [N / lanes, ..., K / depth, lanes, depth], repacked once at compile time
        # (SplitLayoutRewritePreproc).
        index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(w.source))
        packed = sch.cache_read(block, index, "global")
        sch.transform_layout(packed, ("write", 0), tirx.IndexMap.from_func(
            lambda *idx: [idx[-1] // lanes, *idx[:-2], idx[-2] // depth, idx[-1] % lanes, idx[-2] % depth],
            ndim=len(w.source.shape), index_dtype=str(w.source.shape[-1].ty)))
        sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)

        writeback = epilogue[-1].block_rv if epilogue else sch.cache_write(block, 0, "global")
        outer, _, inner, r_loops = split_register_tile(sch, block, writeback, n_s, first, row_axis, row_ext,
                                                       rows, width)
        *inner, wi = inner
        wio, wii = sch.split(wi, [None, lanes])
        ko, ki = sch.split(r_loops[-1], [None, depth])
        sch.reorder(*outer, *r_loops[:-1], ko, *inner, wio, wii, ki)
        grid = sch.fuse(*outer)
        sch.parallel(grid)
        sch.reverse_compute_at(writeback, grid)
        init = sch.decompose_reduction(block, r_loops[0] if len(r_loops) > 1 else ko)
        sch.vectorize(sch.get_loops(init)[-1])
        for loop in sch.get_loops(init)[1:-1]:
            sch.unroll(loop)
        sch.tensorize(wii, dot.intrin)
        for loop in (*inner, wio):
            sch.unroll(loop)
        wb_loops = sch.get_loops(writeback)[1:]
        if wb_loops:
            _vectorize_split(sch, wb_loops[-1], vector_lanes(target, 32))
        for producer in kept:
            _schedule_root(sch, producer, vector_lanes(target, 8))
        return sch
