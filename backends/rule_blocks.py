"""What smelt's GPU schedule rules share: the opening they share with dlight's (a schedule of a
PrimFunc and its blocks, normalized and with what can be inlined inlined), and the threads per
block of the rules that store from registers."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target


def inlined_blocks(rule: GPUScheduleRule, func, target: Target, inline=try_inline):
    """``(schedule, block infos)`` of ``func`` after ``inline`` (dlight's ``try_inline`` or
    ``try_inline_contiguous_spatial``), or None where ``func`` is no PrimFunc, ``target`` is not
    one of ``rule``'s, or dlight cannot normalize the function."""
    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = inline(sch, infos)
    return None if infos is None else (sch, infos)


def one_spatial_block(rule: GPUScheduleRule, func, target: Target):
    """``(schedule, block)`` where ``func``, after ``try_inline``, is one spatial block, else None."""
    opened = inlined_blocks(rule, func, target)
    if opened is None:
        return None
    sch, infos = opened
    if len(infos) != 1 or set(infos[0].dom_kind()) != {"S"}:
        return None
    return sch, infos[0].block_rv


# The widest load and store of one thread (ld.global.v4.b32).
VECTOR_BYTES = 16

# Fewer threads per block than this leave a block's warps too few to hide memory latency.
MIN_THREADS = 64


def dividing_threads(items: int, most: int) -> int | None:
    """Threads per block for ``items`` (a thread each): the most, up to ``most``, that divide
    ``items``; None where that is below ``MIN_THREADS`` (and ``items``). Dividing, because TVM
    drops the bounds check of the write-back from a local cache under a split that does not
    divide (threads past the end stored their vector out of bounds)."""
    threads = next(t for t in range(min(most, items), 0, -1) if items % t == 0)
    return threads if threads >= min(MIN_THREADS, items) else None
