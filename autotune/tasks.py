"""Tuning tasks: the fused kernels of one or more models, deduplicated by structure.

Tasks are taken from the module as it is at the end of smelt's ``fuse`` phase (after
canonicalize, merge and quantize), so they are exactly the PrimFuncs that
``records_passes`` later looks up at the start of the ``schedule`` phase. Kernels of
equal structure (across models, too) are one task whose weight is its call count;
kernels below ``min_flops`` are skipped (tuning them costs more than it saves), and so are
Winograd transforms (``winograd_tile`` blocks): MetaSchedule's space for their per-position
selects hardly builds (on a 2-core Zen 3 it spent 9 of 18 minutes on ``winograd_input`` for
one candidate, 11x slower than the ``WinogradTransform`` default), and they take under 2 %
of a model's time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
import tvm_ffi

log = logging.getLogger(__name__)


@dataclass
class TuneTask:
    """One kernel to tune: ``mod`` holds it as ``main``; ``weight`` is how often the models call it."""

    name: str
    mod: tvm.IRModule
    weight: float
    flops: float
    shash: str  # structural hash of ``mod``: the database's workload key

    def to_json(self) -> dict:
        return {"name": self.name, "weight": self.weight, "flops": self.flops, "shash": self.shash}


def workload_hash(mod: tvm.IRModule) -> str:
    """The key of a workload, as ``%016x`` of its structural hash (equal for equal kernels)."""
    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target,
                  min_flops: float = 0.0) -> tuple[list[TuneTask], list[str]]:
    """Tasks of a fused module for ``target``: (kept, names of those skipped and why)."""
    from tvm.s_tir import analysis
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks as _extract

    kept, skipped = [], []
    for t in _extract(mod, target, module_equality="structural"):
        task_mod = t.dispatched[0]
        try:
            flops = float(analysis.estimate_tir_flops(task_mod))
        except Exception as e:  # noqa: BLE001 - estimation fails on some data-dependent loops
            log.info("no FLOP estimate for %s (%s); tuning it anyway", t.task_name, e)
            flops = float("nan")
        if task_mod.attrs is not None and task_mod.attrs.get("tirx.is_scheduled", False):
            skipped.append(f"{t.task_name}: already scheduled")
        elif _is_winograd_transform(task_mod):
            skipped.append(f"{t.task_name}: a Winograd transform (its default schedule stays)")
        elif flops == flops and flops < min_flops:
            skipped.append(f"{t.task_name}: {flops:.0f} FLOPs < min_flops {min_flops:.0f}")
        else:
            kept.append(TuneTask(t.task_name, task_mod, float(t.weight), flops, workload_hash(task_mod)))
    for line in skipped:
        log.info("not tuning %s", line)
    return kept, skipped


def _is_winograd_transform(mod: tvm.IRModule) -> bool:
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(mod)
        blocks = sch.get_child_blocks(sch.get_sblock("root", func_name="main"))
    except Exception:  # noqa: BLE001 - no single root block: not one of RewriteConvWinograd's kernels
        return False
    return any("winograd_tile" in sch.get(b).annotations for b in blocks)
