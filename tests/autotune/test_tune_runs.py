"""Real MetaSchedule runs on this CPU: resume after SIGKILL, wall-time stop, RPC tracker, merged models.

Each run measures a few candidates of a small MLP (3 kernels). Build workers live for
the whole run, so a trial costs well under a second here; the first run in a process
pays about 30 s for MetaSchedule's tensor-intrinsic registry.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import smelt
from smelt.autotune import TuneOptions, records, report, tune
from smelt.autotune.records import records_by_workload
from smelt.errors import SmeltError
from smelt.examples import zoo

FEW = dict(trials_per_iter=4, progress=False)


def _records(directory) -> int:
    return len(records.open_database(directory, writable=False).get_all_tuning_records())


def test_tune_compile_applies_records_numerics_hold(tmp_path, onnx_reference):
    model = zoo.mlp()
    rep = tune(model, log_dir=tmp_path, options=TuneOptions(trials=12, trials_per_task=4, **FEW))
    assert rep.new_trials == 12 and rep.stopped_by == "trials" and len(rep.tasks) == 3
    assert all(t.default_seconds and t.best_seconds for t in rep.tasks), rep.tasks
    assert rep.tuned_estimate_s <= rep.default_estimate_s
    assert rep.plot and (tmp_path / rep.target_key / "progress.png").stat().st_size > 0
    [summary] = report(tmp_path)
    assert {w.name for w in summary.workloads} == {t.name for t in rep.tasks}

    art = smelt.compile(model, options=smelt.CompileOptions(tune_log_dir=str(tmp_path)))
    assert art.report.tune_records[0] == str(tmp_path / rep.target_key)  # then smelt's own, for this CPU
    # records slower than a kernel's default schedule stay unused: after 4 trials, usually all of
    # them against the tiled CPU defaults; each kernel is either tuned or named as slower
    assert art.report.tuned_kernels + len(art.report.records_slower) == 3
    x = np.random.default_rng(1).standard_normal((1, 64)).astype("float32")
    got = smelt.load(art.save(tmp_path / "art")).run(next(iter(art.models)), features=x)
    want = onnx_reference(model, {"features": x})
    np.testing.assert_allclose(np.asarray(got), want[0], rtol=1e-4, atol=1e-5)  # fp32, reordered sums

    again = tune(model, log_dir=tmp_path, options=TuneOptions(trials=12, **FEW))
    assert again.new_trials == 0  # resumed: the budget is spent

    # A default schedule timed as another schedule (an older smelt's) is timed again, with no
    # new trials, and so is its record in turns with it (the ratio timed against the old default,
    # here a made-up 99x, goes), so that a record is applied only where it beats today's default.
    tasks_file = tmp_path / rep.target_key / "tasks.json"
    known = json.loads(tasks_file.read_text())
    stale = next(iter(known))
    fresh_hash = known[stale]["default_hash"]
    best = records.best_seconds(records_by_workload(records.open_database(tmp_path / rep.target_key))[stale])
    known[stale].update(default_seconds=1.0, default_hash="0" * 16,
                        side_by_side={"record_seconds": best, "speedup": 99.0})
    tasks_file.write_text(json.dumps(known))
    again = tune(model, log_dir=tmp_path, options=TuneOptions(trials=12, **FEW))
    timed = json.loads(tasks_file.read_text())[stale]
    assert again.new_trials == 0 and timed["default_hash"] == fresh_hash and timed["default_seconds"] < 0.1
    assert timed.get("side_by_side", {}).get("speedup", 0) < 20, timed


def test_wall_time_stops_after_the_batch_in_flight(tmp_path):
    first = tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=3, trials_per_task=1, **FEW))
    startup = first.seconds - first.tuning_seconds  # importing, fusing, timing default schedules
    budget = startup + 10
    rep = tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=1000, seconds=budget, **FEW))
    assert rep.stopped_by == "time" and 0 < rep.new_trials < 1000
    assert rep.seconds < budget + 30, "the clock is checked after every batch"  # one batch: a few seconds


def test_sigkill_then_resume_loses_nothing_committed(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(zoo.mlp(), path)
    cmd = [sys.executable, "-m", "smelt.cli", "tune", str(path), "--trials", "200", "--log-dir", str(tmp_path),
           "--builders", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        key_dirs = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            key_dirs = [d for d in tmp_path.iterdir() if (d / records.RECORDS).is_file()]
            if key_dirs and (key_dirs[0] / records.RECORDS).read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.2)
        assert key_dirs and proc.poll() is None, proc.stdout.read().decode()[-2000:]
        delay = random.uniform(0.0, 3.0)
        time.sleep(delay)
        committed = (key_dirs[0] / records.RECORDS).read_bytes().count(b"\n")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the build and measure workers it left
        except ProcessLookupError:
            pass
    d = key_dirs[0]
    loaded = _records(d)
    assert loaded >= committed, f"killed {delay:.2f} s in: {committed} lines committed, {loaded} loaded"
    rep = tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=loaded + 8, **FEW))
    assert rep.new_trials > 0 and _records(d) >= loaded + rep.new_trials


def test_torn_last_record_is_dropped(tmp_path):
    tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=3, trials_per_task=1, **FEW))
    [d] = [p for p in tmp_path.iterdir() if p.is_dir()]
    full = _records(d)
    path = d / records.RECORDS
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a writer killed mid-line
    assert _records(d) == full - 1 and path.read_bytes() == data[:-40]  # a reader leaves the file alone
    db = records.open_database(d)  # a writer truncates to the last whole line
    assert len(db.get_all_tuning_records()) == full - 1
    assert path.read_bytes() == data[:data.rstrip(b"\n").rfind(b"\n") + 1]


def test_second_writer_gets_a_clear_error(tmp_path):
    from smelt.autotune.tune import fused_module

    _, target = fused_module(zoo.mlp())
    with records.lock(records.record_dir(tmp_path, target)):
        with pytest.raises(SmeltError, match="being written by process"):
            tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=3, **FEW))


def test_merged_models_tune_their_fused_kernels(tmp_path):
    models = [zoo.mlp(seed=1), zoo.mlp(seed=2)]
    rep = tune(models, names=["a", "b"], merge=True, log_dir=tmp_path,
               options=TuneOptions(trials=40, trials_per_task=1, min_flops=0, **FEW))
    d = tmp_path / rep.target_key
    # the per-model kernels (called once per model) and the horizontally fused ones of __all__
    assert any(t.weight == 2 for t in rep.tasks)
    assert len(records_by_workload(records.open_database(d, writable=False))) == len(rep.tasks)
    art = smelt.compile(models, names=["a", "b"], merge=True,
                        options=smelt.CompileOptions(tune_log_dir=str(tmp_path)))
    # one trial per kernel: a record slower than the kernel's default schedule is not applied
    assert art.report.tuned_kernels + len(art.report.records_slower) == art.report.kernels


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_rpc_tracker_on_loopback(tmp_path):
    from tvm.rpc.tracker import Tracker

    from smelt.autotune.runners import registered_servers

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--tracker", f"127.0.0.1:{tracker.port}",
                       "--key", "smelt-test", "--silent"]) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while registered_servers("127.0.0.1", tracker.port, "smelt-test") < 2:
            assert time.monotonic() < deadline and all(s.poll() is None for s in servers)
            time.sleep(0.5)
        from click.testing import CliRunner

        from smelt.cli import main

        path = tmp_path / "mlp.onnx"
        onnx.save(zoo.mlp(), path)
        r = CliRunner().invoke(main, ["tune", str(path), "--trials", "8", "--trials-per-task", "4", "--quiet",
                                      "--log-dir", str(tmp_path), "--rpc-tracker", f"127.0.0.1:{tracker.port}",
                                      "--rpc-key", "smelt-test", "--json"])
        assert r.exit_code == 0, r.output
        rep = json.loads(r.output)
        assert rep["devices"] == 2 and rep["new_trials"] == 8
        assert all(t["best_seconds"] for t in rep["tasks"] if t["new_trials"])
        with pytest.raises(SmeltError, match="no server under key 'nobody'"):
            tune(zoo.mlp(), log_dir=tmp_path / "other", options=TuneOptions(trials=3, rpc_tracker=f"127.0.0.1:{tracker.port}",
                                                                  rpc_key="nobody", **FEW))
    finally:
        for s in servers:
            s.kill()
        tracker.terminate()


def test_devices_need_a_gpu_target(tmp_path):
    with pytest.raises(SmeltError, match="--devices lists GPUs"):
        tune(zoo.mlp(), log_dir=tmp_path, options=TuneOptions(trials=3, devices=(0, 1), **FEW))


def test_per_device_runner_deals_candidates_to_every_device(tmp_path):
    """The --devices runner on CPU candidates: one pinned worker per device, every candidate measured."""
    from tvm.s_tir import meta_schedule as ms

    from smelt.autotune.builder import PersistentBuilder
    from smelt.autotune.runners import PerDeviceRunner
    from smelt.autotune.tasks import extract_tasks
    from smelt.autotune.tune import fused_module

    mod, target = fused_module(zoo.mlp())
    tasks, _ = extract_tasks(mod, target)
    builder = PersistentBuilder(2)
    try:
        built = builder.build([ms.builder.BuilderInput(t.mod, target) for t in tasks])
    finally:
        builder.shutdown()
    runner = PerDeviceRunner("SMELT_TEST_VISIBLE", [0, 1])
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(t.mod["main"]))
                          for b, t in zip(built, tasks)])
    results = [f.result() for f in futures]
    assert len(runner.runners) == 2 and all(r.error_msg is None and r.run_secs for r in results)


def test_per_device_runner_measures_on_all_devices_at_once():
    """Each device's candidate is in flight together: a barrier that needs both would break if not."""
    import threading

    from tvm.s_tir import meta_schedule as ms

    from smelt.autotune.runners import PerDeviceRunner

    both = threading.Barrier(2, timeout=30)

    class Device:
        def __init__(self, secs):
            self.secs = secs

        def run(self, inputs):
            both.wait()
            return [ms.runner.LocalRunnerFuture([self.secs] * len(inputs), None)]

    runner = PerDeviceRunner("SMELT_TEST_VISIBLE", [0, 1])
    runner.runners = [Device(1.0), Device(2.0)]
    futures = runner.run([ms.runner.RunnerInput(f"candidate{i}.tar", "cuda", []) for i in range(2)])
    assert [[float(s) for s in f.result().run_secs] for f in futures] == [[1.0], [2.0]]
    assert not both.broken


@pytest.mark.parametrize("pipeline", [1, 2])
def test_a_task_whose_search_raises_is_dropped_with_its_reason(tmp_path, monkeypatch, pipeline):
    """MetaSchedule aborts a whole run when one task's search raises; smelt drops that task only.

    With ``pipeline`` 2 (as on GPUs, whose measuring is asynchronous) two tasks share a
    MetaSchedule call, and the one that raises is found by tuning each alone.
    """
    from tvm.s_tir import meta_schedule as ms

    tune_mod = sys.modules["smelt.autotune.tune"]
    real = ms.tune_tasks
    calls = []

    def tune_tasks(**kw):
        calls.append([t.task_name for t in kw["tasks"]])
        if "fused_matmul_add_relu" in calls[-1]:
            raise RuntimeError("Check failed: (false) is false: Unsupported case")
        return real(**kw)

    monkeypatch.setattr(ms, "tune_tasks", tune_tasks)
    monkeypatch.setattr(tune_mod, "asynchronous", lambda runner: pipeline > 1)
    options = TuneOptions(trials=6, trials_per_task=2, pipeline=pipeline, **FEW)
    rep = tune(zoo.mlp(), log_dir=tmp_path, options=options)
    assert any(s.startswith("fused_matmul_add_relu: MetaSchedule cannot search it") and "Unsupported case" in s
               for s in rep.skipped), rep.skipped
    assert {t.name for t in rep.tasks if t.new_trials} == {"fused_matmul1_add_relu", "fused_matmul2_add1"}
    assert max(map(len, calls)) == pipeline, calls


def test_cuda_default_schedules_build_in_tuning_workers():
    """``tune`` times each task's default schedule through its builder first. Smelt's tensor-core
    GEMM failed there (code generation of its ``mma`` stores needs an index map that only TVM's
    intrinsics import registers), so no tensor-core default was ever measured and any record beat it."""
    import shutil

    import torch
    from tvm.s_tir import meta_schedule as ms

    from smelt import backends
    from smelt.autotune.builder import PersistentBuilder
    from smelt.autotune.tasks import extract_tasks
    from smelt.autotune.tune import fused_module
    from smelt.passes import PipelineOptions

    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).eval()
    mod, target = fused_module([(conv, (torch.randn(1, 64, 28, 28),))], "cuda", "sm_90",
                               pipeline=PipelineOptions(precision="float16"), libs=())  # not cuDNN's
    tasks, _ = extract_tasks(mod, target, min_flops=0)
    backend = backends.get("cuda")
    scheduled = []
    for t in tasks:
        with target:
            s = t.mod
            for p in backend.schedule_passes(target):
                s = p(s)
        scheduled.append(s)
    assert any("mma" in s.script() for s in scheduled)  # the tensor-core default took the conv
    builder = PersistentBuilder(2, config=backend.pass_config(backends.TargetOptions("cuda")))
    try:
        built = builder.build([ms.builder.BuilderInput(s, target) for s in scheduled])
    finally:
        builder.shutdown()
    assert [b.error_msg for b in built] == [None] * len(tasks)


def test_winograd_transforms_are_not_tuning_tasks():
    """A ResNet's 3x3 convs run as Winograd: its batched matmuls are tasks, its transforms
    keep their default schedule (MetaSchedule's space for them hardly builds)."""
    from smelt.autotune.tasks import extract_tasks
    from smelt.autotune.tune import fused_module

    mod, target = fused_module(zoo.resnet(depth=18, size=32, classes=10))
    tasks, skipped = extract_tasks(mod, target)
    assert any(t.name.startswith("matmul") for t in tasks), [t.name for t in tasks]
    assert not any("winograd" in t.name for t in tasks), [t.name for t in tasks]
    assert any(s.startswith("winograd_input") and "Winograd transform" in s for s in skipped), skipped


def test_records_are_timed_side_by_side_with_the_default(tmp_path):
    """A default timed in a slow minute (here: 1 s) lets no record in: the run's end times each
    best record in turns with its default, and the compile decides by that ratio."""
    model = zoo.mlp()
    rep = tune(model, log_dir=tmp_path, options=TuneOptions(trials=6, trials_per_task=2, **FEW))
    tasks_file = tmp_path / rep.target_key / "tasks.json"
    known = json.loads(tasks_file.read_text())
    for entry in known.values():
        entry.update(default_seconds=1.0)
        entry.pop("side_by_side", None)
    tasks_file.write_text(json.dumps(known))
    tune(model, log_dir=tmp_path, options=TuneOptions(trials=12, trials_per_task=2, **FEW))
    known = json.loads(tasks_file.read_text())
    checked = {k: v["side_by_side"] for k, v in known.items() if "side_by_side" in v}
    assert len(checked) == 3, known  # every kernel has a record under 1 s
    best = {k: records.best_seconds(v) for k, v in records_by_workload(
        records.open_database(tmp_path / rep.target_key, writable=False)).items()}
    assert all(c["record_seconds"] == best[k] and 0.05 < c["speedup"] < 20 for k, c in checked.items()), checked
    _, slower = records.best_records([tmp_path / rep.target_key])
    losing = {known[k]["name"] for k, c in checked.items() if c["speedup"] <= 1.0}
    assert set(slower) == losing, (slower, checked)
