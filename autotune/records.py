"""Tuning records: where they live and how a compile applies them.

Guarantees: records are stored per target key (kind, arch/CPU, triple) in
``<log_dir>/<key>/`` as a MetaSchedule JSON database, so records of one GPU
architecture are never applied to another; ``records_passes`` applies them with
``MetaScheduleApplyDatabase`` (kernels without records keep default schedules).

MetaSchedule appends one JSON line per record and cannot load a file whose last
line was cut off by a killed writer; ``open_database`` drops such a torn tail (a
writer, holding ``lock``, truncates the file; a reader loads a copy of the whole
lines), so a SIGKILL loses at most the record being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import tvm
from tvm import relax

from ..errors import SmeltError
from .tasks import workload_hash

log = logging.getLogger(__name__)

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
TASKS = "tasks.json"  # written by ``tune``: task names, weights, FLOPs, default-schedule latency


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


BUNDLED = Path(__file__).resolve().parent.parent / "tune_logs"  # records that ship with smelt


def records_passes(target: tvm.target.Target, log_dir: str | Path | None,
                   bundled: bool = True) -> list[tvm.transform.Pass]:
    """``MetaScheduleApplyDatabase`` over the records for ``target``: ``log_dir``'s and smelt's own.

    Per kernel, the best record across both folders is applied, unless ``tune`` measured the
    kernel's default schedule to be at least as fast (then the default stays). None when
    neither folder holds records for ``target``'s key; ``log_dir=None`` turns records off.
    """
    if log_dir is None:
        return []
    dirs = []
    for root in [Path(log_dir)] + ([BUNDLED] if bundled else []):
        d = record_dir(root, target)
        if (d / WORKLOADS).is_file() and (d / RECORDS).is_file() and \
                all(d.resolve() != o.resolve() for o in dirs):
            dirs.append(d)
    if not dirs:
        return []
    log.info("applying tuning records from %s", ", ".join(map(str, dirs)))
    db, slower = best_records(dirs)
    return [_ApplyRecords(db, dirs, slower)]


def read_tasks(directory: str | Path) -> dict:
    """``tasks.json`` of a record folder: {workload hash: name, weight, FLOPs, default latency};
    {} when it is missing or unreadable (names and default latencies are then measured again)."""
    path = Path(directory) / TASKS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is unreadable; task names and default latencies are measured again", path)
        return {}


def write_tasks(directory: str | Path, entries: dict) -> None:
    """Write ``tasks.json`` atomically (one JSON line, keys sorted, so that diffs stay small)."""
    path = Path(directory) / TASKS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def best_records(dirs: list[Path], keep_slower: bool = False, min_speedup: float = 1.0):
    """(a MemoryDatabase of the best record per kernel that beats its default, {kernel: why not});
    ``keep_slower``: also the best of kernels whose records lose to their default; ``min_speedup``:
    a record must be that many times faster than the default to count as beating it. Where
    ``tune`` timed that very record in turns with the default (``side_by_side``), their ratio
    decides; else the two timings ``tune`` took apart."""
    from tvm.s_tir import meta_schedule as ms

    best: dict[str, tuple[float, object]] = {}
    entries: dict[str, dict] = {}
    for d in dirs:
        for shash, recs in records_by_workload(open_database(d, writable=False)).items():
            for rec in recs:
                secs = best_seconds([rec])
                if secs is not None and (shash not in best or secs < best[shash][0]):
                    best[shash] = (secs, rec)
        for shash, t in read_tasks(d).items():
            entries.setdefault(shash, t)
    mem = ms.database.MemoryDatabase(module_equality="structural")
    slower = {}
    for shash, (secs, rec) in best.items():
        entry = entries.get(shash, {})
        name, default = entry.get("name", shash), entry.get("default_seconds")
        speedup = side_by_side(entry, secs)
        if speedup is not None:  # this record, timed in turns with the default
            if speedup <= min_speedup:
                slower[name] = f"best record {speedup:.2f}x the default schedule, timed side by side"
                if not keep_slower:
                    continue
        elif default is not None and secs * min_speedup >= default:
            slower[name] = f"best record {secs * 1e6:.1f} us, default schedule {default * 1e6:.1f} us"
            if not keep_slower:
                continue
        wl = mem.commit_workload(rec.workload.mod)
        mem.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
    for name, why in slower.items():
        log.info("keeping the default schedule of %s (%s)", name, why)
    return mem, slower


def records_by_workload(db) -> dict[str, list]:
    """Tuning records grouped by workload hash (each workload hashed once, not once per record)."""
    out: dict[str, list] = {}
    keys: dict = {}  # records of one workload share its object (TVM objects hash by identity)
    for rec in db.get_all_tuning_records():
        if rec.workload not in keys:
            keys[rec.workload] = workload_hash(rec.workload.mod)
        out.setdefault(keys[rec.workload], []).append(rec)
    return out


def side_by_side(entry: dict, best: float | None) -> float | None:
    """The record-over-default speedup ``tune`` timed in turns for a ``tasks.json`` entry, if it
    timed the record whose latency is ``best`` (else None: a newer record, or none timed)."""
    checked = entry.get("side_by_side", {})
    return checked.get("speedup") if best is not None and checked.get("record_seconds") == best else None


def best_seconds(records) -> float | None:
    """The lowest mean run time of the records that ran (None when none did)."""
    best = None
    for rec in records:
        secs = [float(s) for s in (rec.run_secs or [])]
        if not secs or any(s >= 1e9 for s in secs):  # MetaSchedule stores failed runs as 1e10
            continue
        mean = sum(secs) / len(secs)
        best = mean if best is None else min(best, mean)
    return best


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
class _ApplyRecords:
    """``report`` maps each PrimFunc a record scheduled to ``tuned`` (compile counts them);
    ``slower`` names the kernels whose records lost to their default schedule."""

    def __init__(self, db, dirs: list[Path], slower: dict[str, str]):
        self.db = db
        self.dirs = [str(d) for d in dirs]
        self.slower = slower
        self.report: dict[str, str] = {}

    def transform_module(self, mod, ctx):
        with self.db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and \
                    int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                self.report[gv.name_hint] = "tuned"
        return mod


def _whole_length(path: Path, chunk: int = 1 << 16) -> int:
    """Bytes of ``path`` up to the end of its last whole JSON line (the file size when nothing is torn).

    Reads only the tail: a record is a few kB, the file can be many MB.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = size
        while True:  # back up until the tail holds the last line and the newline before it
            start = max(0, start - chunk)
            f.seek(start)
            tail = f.read(size - start)
            if start == 0 or tail.count(b"\n") >= 2:
                break
    end = len(tail)
    if not tail.endswith(b"\n"):
        end = tail.rfind(b"\n") + 1
    if end:  # a killed writer can leave a newline-terminated but unparsable line only at the end
        first = tail.rfind(b"\n", 0, end - 1) + 1
        try:
            json.loads(tail[first:end])
        except ValueError:
            end = first
    return start + end


def open_database(directory: str | Path, writable: bool = True):
    """The MetaSchedule JSON database in ``directory``, with any torn last line dropped.

    ``writable``: create the folder if needed and truncate torn files in place (hold
    ``lock`` first). Otherwise the files are only read; a torn one is loaded from a copy.
    """
    from tvm.s_tir import meta_schedule as ms

    d = Path(directory)
    paths = [d / WORKLOADS, d / RECORDS]
    if writable:
        d.mkdir(parents=True, exist_ok=True)
    torn = {p: n for p in paths if p.is_file() and (n := _whole_length(p)) != p.stat().st_size}
    for p, n in torn.items():
        log.warning("%s: dropping a torn last record (%d bytes) left by an interrupted writer",
                    p, p.stat().st_size - n)
    _register_intrinsics(paths[1])
    with contextlib.ExitStack() as stack:
        if torn and writable:
            for p, n in torn.items():
                with open(p, "r+b") as f:
                    f.truncate(n)
        elif torn:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smelt-records-")))
            for p in paths:
                with open(p, "rb") as src, open(tmp / p.name, "wb") as dst:
                    if p in torn:
                        dst.write(src.read(torn[p]))
                    else:
                        shutil.copyfileobj(src, dst)
            paths = [tmp / p.name for p in paths]
        return ms.database.JSONDatabase(str(paths[0]), str(paths[1]), allow_missing=writable,
                                        module_equality="structural")


def _register_intrinsics(records: Path) -> None:
    """Register TVM's tensor intrinsics when the records tensorize: parsing such a trace looks
    each intrinsic up by name (``wmma_fill_16x16x16_f32``: "not registered"), and nothing but
    importing ``tvm.s_tir.tensor_intrin`` registers them."""
    if records.is_file() and b'"Tensorize"' in records.read_bytes():
        from ..backends.tensor_intrinsics import import_intrinsics

        import_intrinsics("tvm.s_tir.tensor_intrin.cuda")  # first: the package imports it too
        import_intrinsics("tvm.s_tir.tensor_intrin")


@contextlib.contextmanager
def lock(directory: str | Path):
    """Hold ``<directory>/.lock`` for one writer; another job on the same records gets a clear error."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SmeltError(f"{d}: these tuning records are being written by {holder}; wait for it "
                             f"to finish or give another --log-dir") from None
        f.truncate(0)
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield d
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
