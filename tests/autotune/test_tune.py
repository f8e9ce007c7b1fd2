"""smelt.autotune: tasks after fusion, records keyed by target, applied at compile, report/prune, CLI.

These tests commit records built from MetaSchedule design spaces (no measuring);
``test_tune_runs.py`` runs real trials.
"""

from __future__ import annotations

import json

import numpy as np

import smelt
from smelt.autotune import database, merge, prune, records, report
from smelt.autotune.tasks import extract_tasks
from smelt.autotune.tune import _with_cores, _write_tasks, fused_module
from smelt.examples import zoo


def _commit_design_spaces(model, log_dir, key=None):
    """Write one record per task (its first design space, a made-up latency) as ``tune`` would."""
    from tvm.s_tir import meta_schedule as ms

    mod, target = fused_module(model)
    tasks, _ = extract_tasks(mod, target, min_flops=0)
    out = records.record_dir(log_dir, target) if key is None else log_dir / key
    db = database.open_database(out)
    for i, t in enumerate(tasks):
        ctx = ms.TuneContext(mod=t.mod, target=_with_cores(target), space_generator="post-order-apply",
                             task_name=t.name).clone()
        sch = ctx.generate_design_space()[0]
        wl = db.commit_workload(t.mod)
        for secs in (2e-5, 1e-5):  # two records per workload: prune keeps one
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, [secs * (i + 1)], target,
                                                             ms.arg_info.ArgInfo.from_prim_func(t.mod["main"])))
    _write_tasks(out, tasks, {})
    return tasks, out


def test_tasks_are_fused_kernels_deduplicated():
    mod, target = fused_module([zoo.mlp(), zoo.mlp()], names=["a", "b"])
    tasks, skipped = extract_tasks(mod, target, min_flops=0)
    # two identical MLPs: 3 distinct fused kernels, each called twice
    assert len(tasks) == 3 and all(t.weight == 2 for t in tasks)
    assert all(t.name.startswith("fused_") for t in tasks)
    big, small = extract_tasks(mod, target, min_flops=10_000)
    assert len(big) == 2 and len(small) == 1 and "min_flops" in small[0]


def test_cuda_gemms_on_cublaslt_are_no_tasks(requires_cuda_compiler):
    """Tuning sees what a compile builds: with cuBLASLt (the CUDA default) the MLP's GEMMs and
    their epilogues are library calls, so nothing is left to tune; with ``libs=()`` they are tasks."""
    mod, target = fused_module(zoo.mlp(), "cuda", "sm_90")
    assert extract_tasks(mod, target, min_flops=0)[0] == []
    mod, target = fused_module(zoo.mlp(), "cuda", "sm_90", libs=())
    tasks, _ = extract_tasks(mod, target, min_flops=0)
    assert len(tasks) == 3 and all("matmul" in t.name for t in tasks)


def test_cpu_tasks_know_their_weight_operands():
    """Tasks are the kernels a compile schedules: marked with the weights the default schedule
    repacks at compile time, so MetaSchedule's RewriteLayout repacks them in tuned kernels too and
    the default is timed with packed weights (before, tasks were unmarked: defaults were timed
    reading weights unpacked, and records that beat only that were applied)."""
    mod, target = fused_module(zoo.resnet(depth=18, size=32))
    tasks, _ = extract_tasks(mod, target, min_flops=0)
    convs = [t for t in tasks if t.name.startswith("fused_conv2d")]
    assert convs and all(len(t.mod["main"].attrs["layout_free_buffers"]) == 2 for t in convs)  # weight, bias


def test_records_apply_at_compile_and_numerics_hold(tmp_path, onnx_reference):
    model = zoo.mlp()
    tasks, out = _commit_design_spaces(model, tmp_path)
    art = smelt.compile(model, options=smelt.CompileOptions(tune_log_dir=str(tmp_path)))
    assert art.report.tuned_kernels == len(tasks) == 3
    x = np.random.default_rng(0).standard_normal((1, 64)).astype("float32")
    rt = smelt.load(art.save(tmp_path / "art"))
    got = rt.run(next(iter(art.models)), features=x)
    want = onnx_reference(model, {"features": x})
    np.testing.assert_allclose(np.asarray(got), want[0], rtol=1e-4, atol=1e-5)  # fp32, reordered sums


def test_records_slower_than_the_default_schedule_are_not_applied(tmp_path):
    tasks, out = _commit_design_spaces(zoo.mlp(), tmp_path)
    known = json.loads((out / records.TASKS).read_text())
    known[tasks[0].shash]["default_seconds"] = 1e-9  # the default beats every record of this kernel
    (out / records.TASKS).write_text(json.dumps(known))
    art = smelt.compile(zoo.mlp(), options=smelt.CompileOptions(tune_log_dir=str(tmp_path)))
    assert art.report.tuned_kernels == len(tasks) - 1
    assert list(art.report.records_slower) == [tasks[0].name]


def test_records_of_another_target_are_not_applied(tmp_path):
    model = zoo.mlp()
    _commit_design_spaces(model, tmp_path, key="cpu-x86_64-someothercpu")
    art = smelt.compile(model, options=smelt.CompileOptions(tune_log_dir=str(tmp_path)))
    assert art.report.tuned_kernels == 0


def test_report_and_prune(tmp_path):
    tasks, out = _commit_design_spaces(zoo.mlp(), tmp_path)
    [rep] = report(tmp_path)
    assert rep.target_key == out.name
    assert {w.name for w in rep.workloads} == {t.name for t in tasks}
    assert all(w.trials == 2 and w.best_seconds is not None and w.weight == 1 for w in rep.workloads)
    size = (out / records.WORKLOADS).stat().st_size
    assert prune(tmp_path) == {out.name: (6, 3)}
    assert (out / records.WORKLOADS).stat().st_size < 0.75 * size  # written without indentation
    [rep] = report(tmp_path)
    assert all(w.trials == 1 for w in rep.workloads)
    assert {w.best_seconds for w in rep.workloads} == {1e-5 * (i + 1) for i in range(len(tasks))}


def test_prune_drops_records_that_lose_to_the_default(tmp_path):
    tasks, out = _commit_design_spaces(zoo.mlp(), tmp_path)
    known = json.loads((out / records.TASKS).read_text())
    known[tasks[0].shash]["default_seconds"] = 1e-9  # the default beats both records of this kernel
    (out / records.TASKS).write_text(json.dumps(known))
    assert prune(tmp_path, keep_slower=True) == {out.name: (6, 3)}
    assert prune(tmp_path) == {out.name: (3, 2)}
    [rep] = report(tmp_path)
    assert {w.name for w in rep.workloads} == {t.name for t in tasks[1:]}


def test_prune_with_min_speedup_drops_gains_within_noise(tmp_path):
    tasks, out = _commit_design_spaces(zoo.mlp(), tmp_path)
    known = json.loads((out / records.TASKS).read_text())
    known[tasks[1].shash]["default_seconds"] = 1.05 * 2e-5  # its best record (2e-5) gains 5 %
    known[tasks[2].shash]["default_seconds"] = 1.5 * 3e-5  # 50 %
    (out / records.TASKS).write_text(json.dumps(known))
    assert prune(tmp_path, min_speedup=1.1) == {out.name: (6, 2)}
    [rep] = report(tmp_path)
    assert {w.name for w in rep.workloads} == {tasks[0].name, tasks[2].name}  # tasks[0]: no default timed


def test_cli_report_and_prune(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    _commit_design_spaces(zoo.mlp(), tmp_path)
    r = CliRunner().invoke(main, ["tune", "--report", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)[0]["workloads"]) == 3
    r = CliRunner().invoke(main, ["tune", "--prune", str(tmp_path)])
    assert r.exit_code == 0 and "6 -> 3" in r.output, r.output
    r = CliRunner().invoke(main, ["tune"])
    assert r.exit_code != 0


def test_merge_adds_records_once_per_target_key(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    tasks, a = _commit_design_spaces(zoo.mlp(), tmp_path / "a")
    _commit_design_spaces(zoo.mlp(), tmp_path / "b", key="cuda-sm_90")  # another target key stays apart
    dst = tmp_path / "dst"
    assert merge([tmp_path / "a", tmp_path / "b"], dst) == {a.name: 6, "cuda-sm_90": 6}
    assert merge([tmp_path / "a"], dst) == {a.name: 0}  # nothing twice
    r = CliRunner().invoke(main, ["tune", "--import-records", str(tmp_path / "b"), "--log-dir", str(dst)])
    assert r.exit_code == 0 and "cuda-sm_90: 0 records added" in r.output, r.output
    reps = {rep.target_key: rep for rep in report(dst)}
    assert set(reps) == {a.name, "cuda-sm_90"}
    assert {w.name for w in reps[a.name].workloads} == {t.name for t in tasks}  # tasks.json merged too
    assert all(w.trials == 2 for w in reps[a.name].workloads)


def test_records_that_tensorize_open_in_a_fresh_process(tmp_path):
    """A wmma record names TVM's tensor intrinsics, which a fresh process has not registered:
    opening its database failed ("TensorIntrin 'wmma_fill_16x16x16_f32' is not registered")."""
    import subprocess
    import sys

    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from smelt.backends.tensor_intrinsics import import_intrinsics

    import_intrinsics()
    a, b = te.placeholder((256, 256), "float16", name="A"), te.placeholder((256, 256), "float16", name="B")
    k = te.reduce_axis((0, 256), "k")
    c = te.compute((256, 256), lambda i, j: te.sum(a[i, k].astype("float32") * b[k, j].astype("float32"), axis=k))
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024,
                                "max_shared_memory_per_block": 49152, "thread_warp_size": 32})
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", task_name="matmul").clone()
    sch = next(s for s in ctx.generate_design_space() if "wmma_sync" in str(s.trace))
    for postproc in ctx.space_generator.postprocs:  # what a measured candidate's trace holds
        postproc.apply(sch)
    assert "sch.tensorize(" in str(sch.trace)
    db = database.open_database(tmp_path)
    wl = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, [1e-5], target,
                                                     ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    code = ("import sys; from smelt.autotune.records import open_database; "
            "print(len(open_database(sys.argv[1], writable=False).get_all_tuning_records()))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-1] == "1", r.stderr[-2000:]
