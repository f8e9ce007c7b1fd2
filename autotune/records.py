"""Tuning records: where they live and how a compile applies them.

Guarantees: records are stored per target key (kind, arch/CPU, triple) in
``<log_dir>/<key>/`` as a MetaSchedule JSON database, so records of one GPU
architecture are never applied to another; ``records_passes`` applies them with
``MetaScheduleApplyDatabase`` (kernels without records keep default schedules).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import tvm
from tvm import relax

log = logging.getLogger(__name__)

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def target_key(target: tvm.target.Target) -> str:
    """A file-system-safe key naming what code for ``target`` depends on, e.g. ``cuda-sm_90``."""
    kind = target.kind.name
    attrs = target.attrs
    if kind == "cuda":
        parts = ["cuda", str(attrs.get("arch", "unknown"))]
    elif kind == "rocm":
        parts = ["rocm", str(attrs.get("mcpu", "unknown"))]
    else:
        parts = ["cpu", str(attrs.get("mtriple", "host")).split("-")[0], str(attrs.get("mcpu", "generic"))]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def record_dir(log_dir: str | Path, target: tvm.target.Target) -> Path:
    return Path(log_dir) / target_key(target)


def records_passes(target: tvm.target.Target, log_dir: str | Path | None) -> list[tvm.transform.Pass]:
    """``MetaScheduleApplyDatabase`` over the records for ``target`` in ``log_dir``, if any."""
    if log_dir is None:
        return []
    d = record_dir(log_dir, target)
    if not (d / WORKLOADS).is_file() or not (d / RECORDS).is_file():
        return []
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(str(d / WORKLOADS), str(d / RECORDS), allow_missing=False)
    log.info("applying tuning records from %s", d)
    return [_ApplyRecords(db)]


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
class _ApplyRecords:
    """``report`` maps each PrimFunc a record scheduled to ``tuned`` (compile counts them)."""

    def __init__(self, db):
        self.db = db
        self.report: dict[str, str] = {}

    def transform_module(self, mod, ctx):
        with self.db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and \
                    int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                self.report[gv.name_hint] = "tuned"
        return mod
