"""``smelt.autotune.tune``: MetaSchedule over the fused kernels of some models, records per target.

Requires: models that ``smelt.compile`` accepts and a backend for ``target``.
Guarantees: the kernels are those a compile with the same options (merging included)
schedules: the module after the ``fuse`` phase, tuned with MetaSchedule's evolutionary
search and XGBoost cost model. Every measured candidate is committed to the JSON
database in ``records.record_dir(log_dir, target)`` as it is measured; a killed run
loses at most the batch in flight, and the next run drops a torn last line. One job at
a time writes a record folder (``records.lock``). Re-running resumes: measured records
count against the ``trials`` budget and seed the search. ``tasks.json`` beside the
database keeps each task's name, weight, FLOPs and default-schedule latency (measured
once, before the first trial), and ``history.jsonl`` the estimated model latency over
tuning time, for ``report`` and the plot.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.utils import cpu_count, fork_seed

from .. import backends
from ..errors import SmeltError, error_line
from ..frontend import import_models
from ..passes import MergeOptions, PassManager, PipelineOptions, build_pipeline, merge_passes
from .builder import PersistentBuilder
from .progress import Progress, TaskState, estimate, plot
from .records import (best_seconds, lock, open_database, read_tasks, record_dir, records_by_workload,
                      side_by_side, target_key, write_tasks)
from .runners import asynchronous, measuring
from .tasks import TuneTask, extract_tasks, workload_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneOptions:
    """Budgets, search and measurement settings of one tuning run (trial counts are measured candidates).

    ``trials``: total over all tasks, counting records already in the database;
    ``trials_per_task``: at most this many new trials per task in this run;
    ``seconds``: wall-time budget of this run (checked after every measured batch);
    ``min_flops``: kernels estimated below this are not tuned;
    ``builders``: parallel build processes (default: one per logical core);
    ``rpc_tracker``/``rpc_key``: measure on the devices registered there;
    ``devices``: measure on these local GPUs, one pinned worker each;
    ``pipeline``: tasks per MetaSchedule call when measuring is asynchronous (GPUs, RPC):
    one task's search and build run while another's candidates are measured.
    """

    trials: int = 1000
    trials_per_task: int | None = None
    seconds: float | None = None
    trials_per_iter: int = 64
    min_flops: float = 2048.0
    seed: int | None = None
    builders: int | None = None
    build_timeout: float = 60.0
    run_timeout: float = 60.0
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    devices: tuple[int, ...] = ()
    pipeline: int = 2
    progress: bool = True


@dataclass
class TaskResult:
    """One task after tuning: its best measured latency (seconds) over all records, and its default's."""

    name: str
    shash: str
    weight: float
    flops: float
    trials: int
    new_trials: int
    best_seconds: float | None
    default_seconds: float | None = None
    side_by_side: float | None = None  # the best record's speedup over the default, timed in turns

    @property
    def gflops(self) -> float | None:
        if not self.best_seconds or not self.flops or math.isnan(self.flops):
            return None
        return self.flops / self.best_seconds / 1e9


@dataclass
class TuneReport:
    """What ``tune`` did: the record folder, the tasks, what was skipped, and where the time went.

    ``default_estimate_s``/``tuned_estimate_s``: the weighted sum of task latencies with
    default schedules only, and with the best of default and tuned per task.
    ``phase_seconds``: MetaSchedule's profile (building, measuring, search) of this run.
    """

    target_key: str
    record_dir: str
    tasks: list[TaskResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tuning_seconds: float = 0.0
    new_trials: int = 0
    devices: int = 1
    stopped_by: str = ""  # "trials", "time", or "" when nothing was left to tune
    default_estimate_s: float | None = None
    tuned_estimate_s: float | None = None
    phase_seconds: dict = field(default_factory=dict)
    plot: str | None = None

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.new_trials / self.tuning_seconds if self.tuning_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "trials_per_minute": round(self.trials_per_minute, 2)}


def fused_module(models, target="cpu", arch: str | None = None, triple: str | None = None,
                 names: Sequence[str] | None = None, input_shapes: dict | None = None, pipeline=None,
                 merge: MergeOptions | None = None, libs: tuple[str, ...] | None = None):
    """Import ``models`` and run smelt's pipeline to the end of the ``fuse`` phase: (module, TVM target)."""
    topts = backends.TargetOptions(target, arch, triple, libs=libs)
    backend = backends.get(topts.kind)
    tvm_target = backend.target(topts)
    program = import_models(models, names, input_shapes)
    steps = [s for s in build_pipeline(backend, tvm_target, pipeline or PipelineOptions(),
                                       merge=merge_passes(program.models, merge or MergeOptions()))
             if s.phase not in ("schedule", "lower")]
    mod = PassManager(steps, config=backend.pass_config(topts)).run(program.bind(), tvm_target)
    return mod, tvm_target


def tune(models, target: str = "cpu", arch: str | None = None, *, trials: int = 1000,
         trials_per_task: int | None = None, seconds: float | None = None, log_dir: str | Path = "tune_logs",
         names: Sequence[str] | None = None, input_shapes: dict | None = None, triple: str | None = None,
         merge: bool = False, share_inputs: bool = False, share_input: dict | None = None,
         precision: str = "float32", options: TuneOptions | None = None,
         plot_to: str | Path | None = None, libs: tuple[str, ...] | None = None) -> TuneReport:
    """Tune the kernels of ``models`` for ``target``; records go to ``<log_dir>/<target key>/``.

    Budgets: ``trials`` in total (existing records count), ``trials_per_task`` per task in
    this run, ``seconds`` of wall time; ``options`` overrides the three. ``merge`` and the
    sharing arguments, ``precision`` and ``libs`` (``TargetOptions.libs``: GEMMs a vendor
    library runs are no tasks) are those of ``smelt.compile``: tune what such a compile builds.
    ``plot_to``: where the PNG of estimated latency against tuning time goes
    (default ``<record folder>/progress.png``).
    """
    opts = options or TuneOptions(trials=trials, trials_per_task=trials_per_task, seconds=seconds)
    if opts.trials <= 0 or (opts.trials_per_task is not None and opts.trials_per_task <= 0):
        raise SmeltError(f"trial budgets must be positive (trials={opts.trials}, "
                         f"trials_per_task={opts.trials_per_task})")
    t0 = time.perf_counter()
    merging = MergeOptions(bool(merge), bool(share_inputs), tuple((share_input or {}).items()))
    mod, tvm_target = fused_module(models, target, arch, triple, names, input_shapes,
                                   pipeline=PipelineOptions(precision=precision), merge=merging, libs=libs)
    tasks, skipped = extract_tasks(mod, tvm_target, opts.min_flops)
    out = record_dir(log_dir, tvm_target)
    report = TuneReport(target_key(tvm_target), str(out), skipped=skipped)
    with lock(out):
        db = open_database(out)
        before = records_by_workload(db)
        known = read_tasks(out)
        done = sum(len(before.get(t.shash, [])) for t in tasks)
        remaining = opts.trials - done
        if not tasks:
            log.warning("no kernel to tune (skipped: %s)", "; ".join(skipped) or "none")
        else:
            if remaining <= 0:
                log.info("the database already holds %d trials for these tasks (budget %d): no new trials",
                         done, opts.trials)
            # With no trials left this still times default schedules that changed since (smelt's own
            # got faster): a record must beat today's default to be applied.
            _run(tasks, tvm_target, db, out, opts, max(remaining, 0), t0, known, before, report)
        _write_tasks(out, tasks, known)
        after = records_by_workload(db)
    for t in tasks:
        recs = after.get(t.shash, [])
        best = best_seconds(recs)
        report.tasks.append(TaskResult(t.name, t.shash, t.weight, t.flops, len(recs),
                                       len(recs) - len(before.get(t.shash, [])), best,
                                       known.get(t.shash, {}).get("default_seconds"),
                                       side_by_side(known.get(t.shash, {}), best)))
    report.new_trials = sum(r.new_trials for r in report.tasks)
    states = [TaskState(r.name, r.weight, r.trials, r.best_seconds, r.default_seconds) for r in report.tasks]
    default, missing = estimate(states, lambda s: s.default)
    report.default_estimate_s = None if missing else default
    tuned, missing = estimate(states)
    report.tuned_estimate_s = None if missing else tuned
    if report.new_trials:
        png = plot(out, Path(plot_to) if plot_to else out / "progress.png",
                   f"{report.target_key}, {len(tasks)} tasks")
        report.plot = str(png) if png else None
    report.seconds = time.perf_counter() - t0
    return report


def _run(tasks: list[TuneTask], target, db, work_dir: Path, opts: TuneOptions, budget: int, t0: float,
         known: dict, before: dict, report: TuneReport) -> None:
    target = _with_cores(target)
    backend = backends.get(_kind(target))
    defaults = _default_schedules(tasks, backend, target, known)
    if not defaults and budget <= 0:
        return
    # Candidates and defaults are built as a compile builds them (cp.async copies on CUDA).
    builder = PersistentBuilder(opts.builders, timeout=opts.build_timeout,
                                config=backend.pass_config(backends.TargetOptions(_kind(target))))
    try:
        runner, ndev = measuring(target, rpc_tracker=opts.rpc_tracker, rpc_key=opts.rpc_key, devices=opts.devices,
                                 timeout=opts.run_timeout)
        report.devices = ndev
        _measure_defaults(defaults, target, builder, runner, known)
        _write_tasks(work_dir, tasks, known)  # a run killed while tuning keeps the defaults
        if budget <= 0:  # records timed against a default that changed are timed again
            _side_by_side(tasks, backend, target, db, builder, runner, known)
            return
        states = [TaskState(t.name, t.weight, len(before.get(t.shash, [])), best_seconds(before.get(t.shash, [])),
                            known.get(t.shash, {}).get("default_seconds")) for t in tasks]
        contexts = [_context(t, target, seed) for t, seed in zip(tasks, fork_seed(opts.seed, n=len(tasks)))]
        progress = Progress(states, budget, work_dir, enabled=opts.progress)
        deadline = None if opts.seconds is None else t0 + opts.seconds
        callbacks = ms.measure_callback.MeasureCallback.create("default") + [Monitor(progress)]
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cpu_count(logical=False))
        per_task = opts.trials_per_task if opts.trials_per_task is not None else budget
        sched = _Scheduler(states, per_task)
        depth = max(1, opts.pipeline) if asynchronous(runner) else 1
        log.info("tuning %d tasks for %s: %d trials (at most %d per task), %d builders (%s), %d device(s)%s",
                 len(tasks), target_key(target), budget, per_task, builder.workers, type(builder).__name__, ndev,
                 "" if deadline is None else f", {opts.seconds:.0f} s")
        t1 = time.perf_counter()
        report.stopped_by = "trials"
        with ms.Profiler() as profiler:
            while progress.new_trials < budget:
                if deadline is not None and time.perf_counter() >= deadline:
                    report.stopped_by = "time"
                    break
                picks = sched.pick(depth)
                if not picks:
                    break
                left = budget - progress.new_trials
                n = min([opts.trials_per_iter, left] + [per_task - sched.new[i] for i in picks])
                picks = picks[:max(1, left // n)]
                before = [(states[i].trials, states[i].best) for i in picks]
                progress.batch = picks
                try:
                    ms.tune_tasks(tasks=[contexts[i] for i in picks], task_weights=[tasks[i].weight for i in picks],
                                  work_dir=str(work_dir / "logs"), max_trials_global=n * len(picks),
                                  max_trials_per_task=n, num_trials_per_iter=n, database=db, builder=builder,
                                  runner=runner, cost_model=cost_model, measure_callbacks=callbacks,
                                  task_scheduler="round-robin")
                except Exception as e:  # noqa: BLE001 - seen on the H200, see below
                    # A task whose search raises would abort MetaSchedule's whole run (on the H200:
                    # "blockIdx is bound but threadIdx is not" on ResNet-50's global mean). A task
                    # tuned alone names the culprit: it is dropped with the reason, the rest go on.
                    for i, (trials, _) in zip(picks, before):
                        sched.new[i] += states[i].trials - trials
                    if len(picks) > 1:
                        log.info("a search among %s raised; each goes alone from now on",
                                 ", ".join(tasks[i].name for i in picks))
                        sched.solo.update(picks)
                        continue
                    reason = f"{tasks[picks[0]].name}: MetaSchedule cannot search it ({error_line(e, last=True)})"
                    log.warning("not tuning %s", reason)
                    report.skipped.append(reason)
                    sched.drop(picks[0])
                    continue
                for i, (trials, best) in zip(picks, before):
                    sched.record(i, states[i].trials - trials,
                                 states[i].best is not None and (best is None or states[i].best < best))
        progress.finish()
        report.tuning_seconds = time.perf_counter() - t1
        report.phase_seconds = {k: round(float(v), 2) for k, v in profiler.get().items()}
        _side_by_side(tasks, backend, target, db, builder, runner, known)
    finally:
        builder.shutdown()


def _context(task: TuneTask, target, seed):
    return ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply",
                          search_strategy="evolutionary", task_name=task.name, rand_state=seed,
                          num_threads="physical").clone()


class _Scheduler:
    """Which tasks get the next batches: every task once (those without records first, so a
    resumed run goes on where the last stopped; then largest weighted default latency first),
    then the largest weight x best latency, discounted by batches that did not improve it.

    MetaSchedule's own schedulers join measured batches lazily (a killed run lost up to one
    batch per task) and check no clock (a wall-time budget overran by minutes with 37 tasks
    on the H200), so ``tune`` runs one batch of each of a few tasks per MetaSchedule call
    instead. A task in ``solo`` is only tuned alone (its call raised with others in it).
    """

    def __init__(self, states: list[TaskState], per_task: int):
        self.states = states
        self.per_task = per_task
        self.alive = set(range(len(states)))
        self.new = [0] * len(states)
        self.rounds = [0] * len(states)
        self.stale = [0] * len(states)
        self.solo: set[int] = set()

    def pick(self, k: int = 1) -> list[int]:
        """Up to ``k`` tasks, most promising first (only the first when it must go alone)."""
        ready = [i for i in self.alive if self.new[i] < self.per_task]
        fresh = sorted((i for i in ready if self.rounds[i] == 0),
                       key=lambda i: (self.states[i].trials > 0,
                                      -self.states[i].weight * (self.states[i].default or 0.0), i))
        seen = sorted((i for i in ready if self.rounds[i] > 0),
                      key=lambda i: (-self.states[i].weight * (self.states[i].known or 0.0) / (1 + self.stale[i]), i))
        ranked = fresh + seen
        if not ranked or ranked[0] in self.solo:
            return ranked[:1]
        return [i for i in ranked if i not in self.solo][:k]

    def record(self, i: int, trials: int, improved: bool) -> None:
        self.rounds[i] += 1
        self.new[i] += trials
        self.stale[i] = 0 if improved else self.stale[i] + 1
        if trials == 0:  # the search produced no candidate: its space is exhausted
            self.drop(i)

    def drop(self, i: int) -> None:
        self.alive.discard(i)


def _kind(target: tvm.target.Target) -> str:
    """smelt's backend name for ``target``, which is also the runtime's device name."""
    return {"llvm": "cpu"}.get(target.kind.name, target.kind.name)


def _default_schedules(tasks: list[TuneTask], backend, target, known: dict) -> list[tuple[TuneTask, tvm.IRModule]]:
    """The tasks whose default schedule has no timing in ``known`` yet, or one of another
    schedule (``default_hash``: the scheduled kernel's structural hash; smelt's default
    schedules change between versions), each with that schedule."""
    out = []
    for t in tasks:
        entry = known.setdefault(t.shash, {})
        try:
            mod = _default_schedule(t, backend, target)
        except Exception as e:  # noqa: BLE001 - no default schedule: the task is still tuned
            log.info("no default schedule for %s: %s", t.name, e)
            entry["default_seconds"] = None
            continue
        digest = workload_hash(mod)
        if entry.get("default_seconds") is not None and entry.get("default_hash") == digest:
            continue
        if entry.get("default_seconds") is not None:
            log.info("default schedule of %s may have changed since it was timed: timing it again", t.name)
        entry["default_hash"] = digest
        entry.pop("side_by_side", None)  # its record was timed against the old default
        out.append((t, mod))
    return out


def _default_schedule(task: TuneTask, backend, target) -> tvm.IRModule:
    """``task``'s kernel under the backend's default schedules, as a compile without records builds it."""
    with target:
        mod = task.mod
        for p in backend.schedule_passes(target):
            mod = p(mod)
    return mod


def _measure_defaults(scheduled: list[tuple[TuneTask, tvm.IRModule]], target, builder, runner, known: dict) -> None:
    """Time each default schedule of ``scheduled`` once (``known[shash]["default_seconds"]``), as tuning measures."""
    if not scheduled:
        return
    todo = [t for t, _ in scheduled]
    built = builder.build([ms.builder.BuilderInput(mod, target) for _, mod in scheduled])
    runs = [(t, b) for (t, _), b in zip(scheduled, built) if b.error_msg is None]
    # Arguments as the kernel was built: weights the default schedule repacks come in their
    # packed layout (the builder drops the repacking, as a compile folds it into the weights).
    args = {t.shash: ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True) for t, mod in scheduled}
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, _kind(target), args[t.shash]) for t, b in runs])
    for (t, b), fut in zip(runs, futures):
        res = fut.result()
        secs = [float(s) for s in (res.run_secs or [])]
        ok = res.error_msg is None and secs and all(s < 1e9 for s in secs)
        if res.error_msg is not None:
            log.warning("default schedule of %s did not run: %s", t.name, error_line(res.error_msg, last=True))
        known.setdefault(t.shash, {})["default_seconds"] = sum(secs) / len(secs) if ok else None
        shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    for (t, _), b in zip(scheduled, built):
        if b.error_msg is not None:
            log.info("default schedule of %s did not build: %s", t.name, b.error_msg.splitlines()[0])
            known.setdefault(t.shash, {})["default_seconds"] = None
    log.info("default schedules: %s", ", ".join(
        f"{t.name} {known[t.shash]['default_seconds'] * 1e6:.1f} us" for t in todo
        if known.get(t.shash, {}).get("default_seconds") is not None))


SIDE_BY_SIDE_ROUNDS = 5


def _side_by_side(tasks: list[TuneTask], backend, target, db, builder, runner, known: dict) -> None:
    """Time each task's best record against its default schedule, alternating, and keep the
    ratio of the medians (``known[shash]["side_by_side"]``), which ``best_records`` then decides by.

    Why: a default is timed once, when tuning starts, and its records over the minutes after.
    On a shared 2-core Zen 3 a slow minute made defaults look up to 1.8x slower than they were:
    10 ResNet-50 records beat their default by 1.25-1.86x as timed, and 6 of them lost to it
    when both ran in turns.
    """
    pairs = []
    for t in tasks:
        entry = known.get(t.shash, {})
        if not db.has_workload(t.mod):
            continue
        recs = db.get_top_k(db.commit_workload(t.mod), 1)
        secs = best_seconds(recs)
        if not recs or secs is None or entry.get("default_seconds") is None or secs >= entry["default_seconds"]:
            continue
        if side_by_side(entry, secs) is not None:
            continue  # this record was already timed against this default
        try:
            default = _default_schedule(t, backend, target)
            sch = s_tir.Schedule(t.mod)
            recs[0].trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as e:  # noqa: BLE001 - the comparison is skipped, the timed one stands
            log.info("no side-by-side timing for %s: %s", t.name, error_line(str(e), last=True))
            continue
        pairs.append((t, secs, default, sch.mod))
    if not pairs:
        return
    mods = [m for _, _, default, tuned in pairs for m in (default, tuned)]
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    args = [ms.arg_info.ArgInfo.from_entry_func(m, remove_preproc=True) for m in mods]
    ok = [i for i in range(0, len(mods), 2) if built[i].error_msg is None and built[i + 1].error_msg is None]
    times: dict[int, list[float]] = {i: [] for i in range(len(mods))}
    for _ in range(SIDE_BY_SIDE_ROUNDS):  # default, record, default, record, ...
        inputs = [(j, ms.runner.RunnerInput(built[j].artifact_path, _kind(target), args[j]))
                  for i in ok for j in (i, i + 1)]
        for (j, _), fut in zip(inputs, runner.run([x for _, x in inputs])):
            res = fut.result()
            secs = [float(x) for x in (res.run_secs or [])]
            if res.error_msg is None and secs and all(x < 1e9 for x in secs):
                times[j].append(sum(secs) / len(secs))
    for i in ok:
        t, secs, _, _ = pairs[i // 2]
        if times[i] and times[i + 1]:
            speedup = statistics.median(times[i]) / statistics.median(times[i + 1])
            known.setdefault(t.shash, {})["side_by_side"] = {"record_seconds": secs, "speedup": round(speedup, 4)}
            log.info("%s side by side: record %.2fx the default", t.name, speedup)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)


def _with_cores(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule's CPU rules need ``num-cores`` (the key and the records ignore it)."""
    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    return tvm.target.Target({**target.export(), "num-cores": cpu_count(logical=False)})


@derived_object
class Monitor(PyMeasureCallback):
    """Feeds ``Progress`` after every measured batch and logs the first few distinct failures."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.errors: set[str] = set()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        for res in list(builder_results) + list(runner_results):
            if res.error_msg and len(self.errors) < 5:
                line = error_line(res.error_msg, last=True)
                if line not in self.errors:
                    self.errors.add(line)
                    hint = " (an RPC server for GPUs needs --no-fork)" if "InitializationError" in line else ""
                    log.warning("a candidate failed: %s%s", line, hint)
        self.progress.update(self.progress.batch[task_id], [None if r.run_secs is None else [float(s) for s in r.run_secs]
                                                     for r in runner_results])


def _write_tasks(directory: Path, tasks: list[TuneTask], known: dict) -> None:
    """Merge ``tasks`` into ``known`` (keyed by workload hash) and write it as ``tasks.json``."""
    for t in tasks:
        known[t.shash] = {**known.get(t.shash, {}), **t.to_json()}
    write_tasks(directory, known)
