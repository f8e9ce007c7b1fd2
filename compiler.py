"""``smelt.compile``: models in, one compiled multi-model artifact out.

The flow is one way: frontends → Program → pipeline (canonicalize, merge,
quantize, fuse, schedule, lower) → VM build → ``Artifact``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import tvm
from tvm import relax

from . import backends
from .artifact import Artifact
from .autotune import records_passes
from .errors import BackendError, SmeltError, error_line
from .frontend import import_models
from .ir import ModelInfo, Program, TensorSpec, summarize
from .passes import (MERGED, PRECISIONS, Explainer, Fp8, Int8, MergeOptions, PassManager, PipelineOptions, Step,
                     WeightOnly, build_pipeline, canonicalize_passes, merge_passes, quantize_passes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Everything that shapes a compile besides the models (recorded in the manifest)."""

    target: backends.TargetOptions = field(default_factory=backends.TargetOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    tune_log_dir: str | None = "tune_logs"
    verify_each: bool = False
    dump_ir: str | None = None
    merge: MergeOptions = field(default_factory=MergeOptions)
    quantize: Int8 | Fp8 | WeightOnly | None = None

    def to_json(self) -> dict:
        d = asdict(replace(self, quantize=None))  # calibration data is not copied into the manifest
        d["target"] = self.target.to_json()
        d["quantize"] = self.quantize.to_json() if self.quantize is not None else None
        return d


@dataclass
class CompileReport:
    """What a compile did: the summary printed at its end."""

    models: list[str]
    ops_before: int = 0
    ops_after: int = 0
    ops_before_hist: dict = field(default_factory=dict)
    ops_after_hist: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    weights: int = 0
    weight_bytes: int = 0
    weight_bytes_offered: int = 0
    phase_seconds: dict = field(default_factory=dict)
    pass_seconds: list = field(default_factory=list)
    kernels: int = 0
    schedules: dict = field(default_factory=dict)
    schedule_fallbacks: dict = field(default_factory=dict)
    tuned_kernels: int = 0
    tune_records: list[str] = field(default_factory=list)  # record folders a compile applied
    records_slower: dict = field(default_factory=dict)  # kernel -> why its record lost to the default
    explanations: list = field(default_factory=list)  # why rewrites fired or not (--explain)
    merge: dict = field(default_factory=dict)  # what MergeCommonStems/FuseHorizontal shared
    quantization: dict = field(default_factory=dict)  # QuantizeInt8's or QuantizeWeights' report

    def to_json(self) -> dict:
        return asdict(self)


def compile(models, target: str = "cpu", *, arch: str | None = None, names: Sequence[str] | None = None,
            input_shapes: dict | None = None, dynamic_batch: bool = False, merge: bool | None = None,
            share_inputs: bool | None = None, share_input: dict | None = None, precision: str | None = None,
            quantize: Int8 | Fp8 | WeightOnly | None = None, options: CompileOptions | None = None,
            on_step: Callable | None = None) -> Artifact:
    """Compile ``models`` (paths, ModelProtos, ExportedPrograms or (module, example_args)) together.

    ``merge=True`` adds the ``__all__`` entry that runs every model at once, computing shared
    stems once and fusing same-shaped layers; ``share_inputs=True`` shares inputs of equal
    name, shape and dtype; ``share_input={"b.x": "a.x"}`` shares named ones.
    ``precision="float16"`` or ``"bfloat16"`` computes in that type (softmax, norms and
    reductions stay float32; inputs and outputs stay float32).
    ``quantize=smelt.Int8(calib=..., method="minmax"|"percentile"|"entropy")`` runs
    convolutions and matmuls in INT8, calibrated on the given data; layers whose
    estimated error is too large stay float32 (``report.quantization``).
    ``quantize=smelt.Fp8(calib=...)`` runs matmuls with a weight and convolutions on FP8
    (E4M3) operands with calibrated per-tensor scales: on CUDA, matmuls on cuBLASLt's FP8
    tensor-core kernels (sm_89 and newer) and convolutions on smelt's CUTLASS routine (sm_90),
    whose results stay FP8 between convolutions; elsewhere the same numbers through generated code.
    ``quantize=smelt.WeightOnly(bits=4|8, group_size=128)`` stores matmul weights in int4
    or int8 with group-wise scales, dequantized inside the matmul kernel.
    Returns an in-memory ``Artifact``; ``art.save(dir)`` writes it, ``smelt.load(dir)`` runs it.
    """
    opts = options or CompileOptions()
    if merge is not None or share_inputs is not None or share_input:
        m = opts.merge
        opts = replace(opts, merge=MergeOptions(
            m.enabled if merge is None else bool(merge), m.share_inputs if share_inputs is None else bool(share_inputs),
            m.share + tuple((share_input or {}).items()), m.horizontal))
    if precision is not None:
        if precision not in PRECISIONS:
            raise SmeltError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        opts = replace(opts, pipeline=replace(opts.pipeline, precision=precision))
    if quantize is not None:
        if not isinstance(quantize, (Int8, Fp8, WeightOnly)):
            raise SmeltError(f"quantize={quantize!r}: expected smelt.Int8(calib=..., method=...), "
                             "smelt.Fp8(calib=...) or smelt.WeightOnly(bits=..., group_size=...)")
        opts = replace(opts, quantize=quantize)
    if isinstance(opts.quantize, (Int8, Fp8)) and opts.merge.enabled:
        raise SmeltError(f"{opts.quantize.to_json()['scheme'].upper()} quantization of merged models is not "
                         "supported yet: compile without --merge")
    if opts.target.kind != target or (arch and opts.target.arch != arch):
        opts = replace(opts, target=replace(opts.target, kind=target, arch=arch or opts.target.arch))
    backend = backends.get(opts.target.kind)
    tvm_target = backend.target(opts.target)
    if isinstance(opts.quantize, Fp8) and (why := getattr(backend, "fp8_unsupported", lambda _t: "")(tvm_target)):
        raise SmeltError(f"--quantize fp8 for target {opts.target.kind}: {why}; use --quantize int8 or --precision fp16")
    backend.check_toolchain(opts.target)
    if isinstance(opts.quantize, Fp8) and opts.quantize.stem is None:
        # A backend says whether a few-channel stem runs in FP8 (optional ``fp8_stem(target)``).
        opts = replace(opts, quantize=replace(opts.quantize, stem=getattr(backend, "fp8_stem", lambda _t: False)(
            tvm_target)))

    t0 = time.perf_counter()
    program = import_models(models, names, input_shapes, dynamic_batch)
    report = CompileReport(models=list(program.models))
    report.phase_seconds["import"] = time.perf_counter() - t0
    before = summarize(program.mod)
    report.ops_before, report.ops_before_hist = before.num_ops, dict(before.ops)

    merging = merge_passes(program.models, opts.merge)
    # A backend may narrow INT8 weights for its instructions (optional ``int8_weight_limit(target)``).
    weight_limit = getattr(backend, "int8_weight_limit", lambda _target: 127)(tvm_target)
    quantizer, calibrated, after_precision = quantize_passes(opts.quantize, list(program.models) + (
        [MERGED] if merging else []), weight_limit)
    steps = build_pipeline(backend, tvm_target, opts.pipeline, merge=merging, quantize=calibrated,
                           after_precision=after_precision)
    tuned = records_passes(tvm_target, opts.tune_log_dir)
    if tuned:  # records first: default schedules only touch what they did not cover
        first = next(i for i, s in enumerate(steps) if s.phase == "schedule") if any(
            s.phase == "schedule" for s in steps) else next(i for i, s in enumerate(steps) if s.phase == "lower")
        steps[first:first] = [Step("schedule", p) for p in tuned]

    def after_phase(phase, mod):
        if phase == "canonicalize":
            s = summarize(mod, list(program.models))
            report.ops_after, report.ops_after_hist = s.num_ops, dict(s.ops)
            report.flops = {m: summarize(mod, [m]).flops for m in program.models}
        if phase == "merge" and any(gv.name_hint == MERGED for gv in mod.get_global_vars()):
            program.models[MERGED] = _merged_info(mod, program.models)
            report.merge = merging[0].report.to_json()
            if len(merging) > 1 and isinstance(getattr(merging[-1], "report", None), dict):
                report.merge["horizontal"] = merging[-1].report

    manager = PassManager(steps, dump_ir=Path(opts.dump_ir) if opts.dump_ir else None,
                          verify_each=opts.verify_each, on_step=on_step, after_phase=after_phase,
                          config=backend.pass_config(opts.target))
    mod = manager.run(program.bind(), tvm_target)
    for step in manager.steps:
        rep = getattr(step.pass_, "report", None)
        report.tune_records += getattr(step.pass_, "dirs", [])
        report.records_slower.update(getattr(step.pass_, "slower", {}))
        if step.phase == "schedule" and isinstance(rep, dict):
            report.schedules.update(rep)
            report.schedule_fallbacks.update(getattr(step.pass_, "fallbacks", {}))
        explain = getattr(step.pass_, "explain", None)
        if isinstance(explain, Explainer):
            report.explanations += explain.lines()
    if quantizer is not None:
        report.quantization = quantizer.report
    report.tuned_kernels = sum(1 for v in report.schedules.values() if v == "tuned")
    report.phase_seconds.update(manager.phase_seconds())
    report.pass_seconds = [(t.name, round(t.seconds, 4)) for t in manager.timings]

    lowered = Program.from_module(mod, program.models)
    report.weights, report.weight_bytes = len(lowered.weights), lowered.weights.nbytes
    report.weight_bytes_offered = lowered.weights.added_bytes  # each model's weights counted per model
    mod = lowered.mod
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    report.kernels = len(kernels)
    for name in kernels:  # what neither a record nor a backend rule scheduled: TVM's default lowering
        report.schedules.setdefault(name, "default")

    tvm_target = _libs_called(mod, tvm_target)
    t1 = time.perf_counter()
    if on_step:
        on_step(Step("build", _BuildMarker), len(steps) + 1, len(steps) + 1)
    try:
        with tvm.transform.PassContext(opt_level=3, config=backend.pass_config(opts.target)), tvm_target:
            executable = relax.build(mod, tvm_target, relax_pipeline=None)
    except SmeltError:
        raise
    except Exception as e:
        raise BackendError(f"code generation for {opts.target.kind} failed: {error_line(e, last=True)}") from e
    report.phase_seconds["build"] = time.perf_counter() - t1
    return Artifact(executable, lowered.models, lowered.weights, backend.name, tvm_target, opts, report,
                    [s.name for s in steps])


def _libs_called(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with its ``libs`` narrowed to the vendor libraries whose routines
    (``smelt_<lib>_*``) ``mod`` calls: the artifact links and loads only those (BERT needs no
    cuDNN on the machine that runs it)."""
    libs = [str(lib) for lib in target.attrs.get("libs", None) or []]
    if not libs:
        return target
    called: set[str] = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: called.add(str(e.global_symbol))
                                            if isinstance(e, relax.ExternFunc) else None)
    used = [lib for lib in libs if any(s.startswith(f"smelt_{lib}_") for s in called)]
    if used == libs:
        return target
    spec = {k: v for k, v in dict(target.export()).items() if k != "libs"}
    return tvm.target.Target({**spec, **({"libs": used} if used else {})})


@dataclass
class MergeAnalysis:
    """What merging would do: the report, the module after the merge phase, the passes' records."""

    report: dict
    module: tvm.IRModule
    users: dict
    models: list
    explanations: list


def analyze_merge(models, names: Sequence[str] | None = None, share_inputs: bool = False,
                  share_input: dict | None = None, input_shapes: dict | None = None,
                  horizontal: bool = True) -> MergeAnalysis:
    """Import and canonicalize ``models``, run the merge phase, and say what it shared (no code is built)."""
    import json

    program = import_models(models, names, input_shapes)
    if len(program.models) < 2:
        raise SmeltError("merging needs at least two models")
    opts = MergeOptions(True, share_inputs, tuple((share_input or {}).items()), horizontal)
    passes = merge_passes(program.models, opts)
    steps = [Step("canonicalize", p) for p in canonicalize_passes(PipelineOptions())] + \
            [Step("merge", p) for p in passes]
    mod = PassManager(steps).run(program.bind())
    stems = passes[0]
    report = stems.report.to_json()
    horizontal_report = getattr(passes[-1], "report", None) if len(passes) > 1 else None
    if isinstance(horizontal_report, dict):
        report["horizontal"] = horizontal_report
    meta = json.loads(str(mod[MERGED].attrs["smelt.merge"]))
    explanations = []
    for p in passes:
        ex = getattr(p, "explain", None)
        if isinstance(ex, Explainer):
            explanations += ex.lines()
    return MergeAnalysis(report, mod, meta.get("users", stems.report.users), list(program.models), explanations)


def _merged_info(mod: tvm.IRModule, models: dict) -> ModelInfo:
    """Signature of ``__all__``: its parameters (named ``model.input``) and every model's outputs."""
    import json

    meta = json.loads(str(mod[MERGED].attrs["smelt.merge"]))
    first_key = {}
    for key, param in meta["inputs"].items():
        first_key.setdefault(param, key)
    specs = {f"{m}.{t.name}": t for m, info in models.items() for t in info.inputs}
    inputs = []
    for p in mod[MERGED].params:
        spec = specs[first_key[p.name]]
        inputs.append(TensorSpec(first_key[p.name], spec.shape, spec.dtype))
    outputs = [TensorSpec(f"{m}.{t.name}", t.shape, t.dtype) for m, info in models.items() for t in info.outputs]
    return ModelInfo(MERGED, inputs, outputs, "merged: " + ", ".join(models), [])


@tvm.transform.module_pass(opt_level=0, name="BuildExecutable")
def _BuildMarker(mod, _ctx):  # a name for the progress display of the build step
    return mod
