"""The opening smelt's GPU schedule rules share with dlight's: a schedule of a PrimFunc and its
blocks, normalized and with what can be inlined inlined."""

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
