"""What a ``tune_logs/`` folder holds (``report``), keeping only the records a compile applies
(``prune``), and adding another folder's records (``merge``: jobs run on several machines).

Every ``<log_dir>/<target key>/`` with both database files is one target's records;
``tasks.json`` beside them (written by ``tune``) names the tasks and their weights.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tvm.s_tir.meta_schedule.database import TuningRecord

from ..errors import SmeltError
from .records import (RECORDS, WORKLOADS, best_records, best_seconds, lock, open_database, read_tasks,
                      records_by_workload, side_by_side, write_tasks)

log = logging.getLogger(__name__)


@dataclass
class RecordSummary:
    """One workload's records: ``best_seconds`` is the lowest mean of the runs that succeeded;
    ``default_seconds`` the default schedule's, as measured by ``tune`` (None if unknown);
    ``side_by_side`` the best record's speedup over the default timed in turns (None if not)."""

    name: str
    shash: str
    weight: float | None
    trials: int
    best_seconds: float | None
    default_seconds: float | None = None
    side_by_side: float | None = None


@dataclass
class TargetRecords:
    target_key: str
    path: str
    workloads: list[RecordSummary] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def record_dirs(log_dir: str | Path) -> list[Path]:
    """The per-target record folders under ``log_dir`` (a record folder itself is accepted too)."""
    root = Path(log_dir)
    if not root.is_dir():
        raise SmeltError(f"{log_dir}: no such tuning-log folder")
    dirs = [root] if (root / WORKLOADS).is_file() else sorted(
        d for d in root.iterdir() if (d / WORKLOADS).is_file() and (d / RECORDS).is_file())
    if not dirs:
        raise SmeltError(f"{log_dir}: no tuning records (expected <target key>/{WORKLOADS} and {RECORDS})")
    return dirs


def report(log_dir: str | Path) -> list[TargetRecords]:
    """Per target key, per workload: task name and weight (from ``tasks.json``), trials, best latency."""
    out = []
    for d in record_dirs(log_dir):
        tasks = read_tasks(d)
        entry = TargetRecords(d.name, str(d))
        for shash, recs in records_by_workload(open_database(d, writable=False)).items():
            t = tasks.get(shash, {})
            best = best_seconds(recs)
            entry.workloads.append(RecordSummary(t.get("name", f"workload-{shash}"), shash, t.get("weight"),
                                                 len(recs), best, t.get("default_seconds"), side_by_side(t, best)))
        entry.workloads.sort(key=lambda w: -(w.weight or 0) * (w.best_seconds or 0))
        out.append(entry)
    return out


def prune(log_dir: str | Path, keep_slower: bool = False, min_speedup: float = 1.0) -> dict[str, tuple[int, int]]:
    """Keep, per workload in every record folder, only the record a compile would apply:
    {target key: (before, after)}.

    That is the best record, and only where it beats the kernel's default schedule as
    ``tune`` measured it (``best_records``, the same choice ``records_passes`` makes);
    records that lose to the default are dropped, workloads and all, since no compile
    applies them. ``keep_slower`` keeps those too (the best per workload), for a folder
    that tuning goes on from: it then knows these kernels were tried. ``tasks.json`` keeps
    the entries of the workloads that stay. ``min_speedup`` (above 1) also drops records that
    beat the default by less than that factor: gains within the timing noise of the machine that
    measured them, not worth shipping.
    The pruned database is written beside the old one and moved over it, so a crash
    leaves either the old or the new files.
    """
    out = {}
    for d in record_dirs(log_dir):
        with lock(d), tempfile.TemporaryDirectory(dir=d) as tmp:
            before = len(open_database(d, writable=False).get_all_tuning_records())
            best, _ = best_records([d], keep_slower, min_speedup)
            pruned = open_database(tmp)
            for rec in best.get_all_tuning_records():
                wl = pruned.commit_workload(rec.workload.mod)
                pruned.commit_tuning_record(TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
            after = len(pruned.get_all_tuning_records())
            kept = records_by_workload(pruned)
            _compact_workloads(Path(tmp) / WORKLOADS)
            for name in (WORKLOADS, RECORDS):
                os.replace(Path(tmp) / name, d / name)
            write_tasks(d, {k: v for k, v in read_tasks(d).items() if k in kept})
        log.info("%s: %d records -> %d", d.name, before, after)
        out[d.name] = (before, after)
    return out


def _compact_workloads(path: Path) -> None:
    """Rewrite each workload without the indentation TVM writes it with: half the bytes.

    Our own step because TVM has none: a workload line is ``[hash, base64(u64 length +
    JSON of the module)]``, the JSON indented (a 3 x 3 conv: about 95 KB, most of it spaces),
    and the records ship inside smelt. A line in another form is left as it is.
    """
    lines = []
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        blob = base64.b64decode(line[1])
        (n,) = struct.unpack("<Q", blob[:8])
        if len(blob) == 8 + n:
            text = json.dumps(json.loads(blob[8:]), separators=(",", ":")).encode()
            line[1] = base64.b64encode(struct.pack("<Q", len(text)) + text).decode()
        lines.append(json.dumps(line, separators=(",", ":")))
    path.write_text("".join(f"{x}\n" for x in lines))


def merge(sources, log_dir: str | Path) -> dict[str, int]:
    """Add every record of the record folders under ``sources`` to ``log_dir``: {target key: records added}.

    Records land in the folder of the same target key, so records of one target never
    join another's; tasks.json entries are merged (what ``log_dir`` knows stays, a
    default latency it lacks is taken). Records already in ``log_dir`` are not added twice.
    """
    out: dict[str, int] = {}
    for src in [d for s in sources for d in record_dirs(s)]:
        dst = Path(log_dir) / src.name
        if dst.resolve() == src.resolve():
            raise SmeltError(f"{src}: cannot merge a record folder into itself")
        with lock(dst):
            db = open_database(dst)
            have = {_identity(shash, r) for shash, recs in records_by_workload(db).items() for r in recs}
            added = 0
            for shash, recs in records_by_workload(open_database(src, writable=False)).items():
                workload = None
                for r in recs:
                    if _identity(shash, r) in have:
                        continue
                    workload = workload or db.commit_workload(r.workload.mod)
                    db.commit_tuning_record(TuningRecord(r.trace, workload, r.run_secs, r.target, r.args_info))
                    added += 1
            _merge_tasks(src, dst)
        log.info("%s: %d records added from %s", dst, added, src)
        out[src.name] = out.get(src.name, 0) + added
    return out


def _identity(shash: str, rec) -> tuple:
    """What makes two records the same measurement: workload, schedule trace and run times."""
    return shash, str(rec.trace), tuple(float(x) for x in rec.run_secs or ())


def _merge_tasks(src: Path, dst: Path) -> None:
    """``src``'s tasks.json entries into ``dst``'s; what ``dst`` knows (not None) stays."""
    ours = read_tasks(dst)
    for shash, entry in read_tasks(src).items():
        ours[shash] = {**entry, **{k: v for k, v in ours.get(shash, {}).items() if v is not None}}
    write_tasks(dst, ours)
