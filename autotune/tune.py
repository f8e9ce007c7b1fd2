"""``smelt.autotune.tune``: MetaSchedule over the fused kernels of some models, records per target.

Requires: models that ``smelt.compile`` accepts and a backend for ``target``.
Guarantees: the kernels are those a compile with the same options schedules (the
module after the ``fuse`` phase), tuned with MetaSchedule's evolutionary search and
XGBoost cost model; every measured candidate is committed to the JSON database in
``records.record_dir(log_dir, target)`` as it is measured (a killed run loses at
most the batch in flight). Re-running against the same folder resumes: measured
records count against the ``trials`` budget and seed the search. ``tasks.json``
beside the database keeps each task's name, weight and FLOPs for ``report``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm

from .. import backends
from ..errors import SmeltError
from ..frontend import import_models
from ..passes import PassManager, PipelineOptions, build_pipeline
from .records import record_dir, target_key
from .database import TASKS, best_seconds, open_database, records_by_workload
from .tasks import TuneTask, extract_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneOptions:
    """Budgets and search settings of one tuning run (all trial counts are measured candidates).

    ``trials``: total over all tasks, counting records already in the database;
    ``trials_per_task``: at most this many new trials per task in this run;
    ``seconds``: wall-time budget of this run (checked after every measured batch);
    ``min_flops``: kernels estimated below this are not tuned.
    """

    trials: int = 1000
    trials_per_task: int | None = None
    seconds: float | None = None
    trials_per_iter: int = 64
    min_flops: float = 2048.0
    seed: int | None = None
    build_timeout: float = 120.0  # per batch of a worker; a fresh worker first imports TVM (~15 s on 2 cores)
    run_timeout: float = 60.0


@dataclass
class TaskResult:
    """One task after tuning: its best measured latency (seconds) over all records in the database."""

    name: str
    shash: str
    weight: float
    flops: float
    trials: int
    new_trials: int
    best_seconds: float | None

    @property
    def gflops(self) -> float | None:
        if not self.best_seconds or not self.flops or math.isnan(self.flops):
            return None
        return self.flops / self.best_seconds / 1e9


@dataclass
class TuneReport:
    """What ``tune`` did: the record folder, the tasks, and what was skipped."""

    target_key: str
    record_dir: str
    tasks: list[TaskResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    new_trials: int = 0
    stopped_by: str = ""  # "trials", "time", or "" when nothing was left to tune

    def to_json(self) -> dict:
        return asdict(self)


def fused_module(models, target="cpu", arch: str | None = None, triple: str | None = None,
                 names: Sequence[str] | None = None, input_shapes: dict | None = None, pipeline=None):
    """Import ``models`` and run smelt's pipeline to the end of the ``fuse`` phase: (module, TVM target)."""
    topts = backends.TargetOptions(target, arch, triple)
    backend = backends.get(topts.kind)
    tvm_target = backend.target(topts)
    program = import_models(models, names, input_shapes)
    steps = [s for s in build_pipeline(backend, tvm_target, pipeline or PipelineOptions())
             if s.phase not in ("schedule", "lower")]
    mod = PassManager(steps, config=backend.pass_config(topts)).run(program.bind(), tvm_target)
    return mod, tvm_target


def tune(models, target: str = "cpu", arch: str | None = None, *, trials: int = 1000,
         trials_per_task: int | None = None, seconds: float | None = None, log_dir: str | Path = "tune_logs",
         names: Sequence[str] | None = None, input_shapes: dict | None = None, triple: str | None = None,
         options: TuneOptions | None = None) -> TuneReport:
    """Tune the kernels of ``models`` for ``target``; records go to ``<log_dir>/<target key>/``.

    Budgets: ``trials`` in total (existing records count), ``trials_per_task`` per task in
    this run, ``seconds`` of wall time. ``options`` overrides the three budget arguments.
    """
    opts = options or TuneOptions(trials=trials, trials_per_task=trials_per_task, seconds=seconds)
    if opts.trials <= 0 or (opts.trials_per_task is not None and opts.trials_per_task <= 0):
        raise SmeltError(f"trial budgets must be positive (trials={opts.trials}, "
                         f"trials_per_task={opts.trials_per_task})")
    t0 = time.perf_counter()
    mod, tvm_target = fused_module(models, target, arch, triple, names, input_shapes)
    tasks, skipped = extract_tasks(mod, tvm_target, opts.min_flops)
    out = record_dir(log_dir, tvm_target)
    db = open_database(out)
    _write_tasks(out, tasks)
    report = TuneReport(target_key(tvm_target), str(out), skipped=skipped)
    before = records_by_workload(db)
    done = sum(len(before.get(t.shash, [])) for t in tasks)
    remaining = opts.trials - done
    if not tasks:
        log.warning("no kernel to tune (skipped: %s)", "; ".join(skipped) or "none")
    elif remaining <= 0:
        log.info("the database already holds %d trials for these tasks (budget %d): nothing to do", done, opts.trials)
    else:
        report.stopped_by = _run(tasks, tvm_target, db, out, opts, remaining, t0)
    after = records_by_workload(db)
    for t in tasks:
        recs = after.get(t.shash, [])
        report.tasks.append(TaskResult(t.name, t.shash, t.weight, t.flops, len(recs),
                                       len(recs) - len(before.get(t.shash, [])), best_seconds(recs)))
    report.new_trials = sum(r.new_trials for r in report.tasks)
    report.seconds = time.perf_counter() - t0
    return report


def _run(tasks: list[TuneTask], target, db, work_dir: Path, opts: TuneOptions, budget: int, t0: float) -> str:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    target = _with_cores(target)
    contexts = [ms.TuneContext(mod=t.mod, target=target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=t.name, rand_state=seed,
                               num_threads="physical").clone()
                for t, seed in zip(tasks, fork_seed(opts.seed, n=len(tasks)))]
    deadline = None if opts.seconds is None else t0 + opts.seconds
    stop = _Deadline(deadline) if deadline is not None else None
    callbacks = ms.measure_callback.MeasureCallback.create("default") + ([stop] if stop is not None else [])
    per_task = opts.trials_per_task if opts.trials_per_task is not None else budget
    log.info("tuning %d tasks for %s: %d trials (at most %d per task)%s", len(tasks), target_key(target),
             budget, per_task, "" if deadline is None else f", {opts.seconds:.0f} s")
    ms.tune_tasks(tasks=contexts, task_weights=[t.weight for t in tasks], work_dir=str(work_dir / "logs"),
                  max_trials_global=budget, max_trials_per_task=per_task,
                  num_trials_per_iter=min(opts.trials_per_iter, per_task, budget), database=db,
                  builder=ms.builder.LocalBuilder(timeout_sec=opts.build_timeout),
                  runner=ms.runner.LocalRunner(timeout_sec=opts.run_timeout),
                  cost_model="xgb", measure_callbacks=callbacks, task_scheduler="gradient")
    return "time" if stop is not None and stop.fired else "trials"


def _with_cores(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule's CPU rules need ``num-cores`` (the key and the records ignore it)."""
    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    from tvm.s_tir.meta_schedule.utils import cpu_count

    return tvm.target.Target({**target.export(), "num-cores": cpu_count(logical=False)})


def _make_deadline():
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class Deadline(PyMeasureCallback):
        """Ends every task once the wall-time budget is spent (checked after each measured batch)."""

        def __init__(self, deadline: float):
            self.deadline = deadline
            self.fired = False

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if time.perf_counter() < self.deadline:
                return
            if not self.fired:
                log.info("wall-time budget spent; stopping after the batch in flight")
            self.fired = True
            for i, rec in enumerate(task_scheduler.tasks_):
                if not rec.is_terminated:
                    task_scheduler.terminate_task(i)

    return Deadline


def _Deadline(deadline: float):  # noqa: N802 - built lazily: meta_schedule is slow to import
    return _make_deadline()(deadline)


def _write_tasks(directory: Path, tasks: list[TuneTask]) -> None:
    """Merge ``tasks`` into ``tasks.json`` (keyed by workload hash), written atomically."""
    path = directory / TASKS
    known = json.loads(path.read_text()) if path.is_file() else {}
    for t in tasks:
        known[t.shash] = t.to_json()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, path)
