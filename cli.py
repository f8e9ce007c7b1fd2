"""The ``smelt`` command line: thin over the Python API (parse, validate, call, format)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from .errors import SmeltError, error_line

log = logging.getLogger("smelt")


def _fail(ctx: click.Context, err: BaseException) -> None:
    debug = ctx.find_root().obj.get("debug", False) if ctx.find_root().obj else False
    if debug:
        raise err
    if isinstance(err, SmeltError):
        click.echo(f"error: {err}", err=True)
        ctx.exit(1)
    click.echo(f"internal error: {error_line(err, with_type=True)} (run with --debug for the traceback)", err=True)
    ctx.exit(2)


_PRECISION = {"fp16": "float16", "bf16": "bfloat16", "float16": "float16", "bfloat16": "bfloat16",
              "float32": "float32"}


class _Group(click.Group):
    """Turns every error into one line and a non-zero exit (tracebacks only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place that reports errors
            _fail(ctx, e)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="smelt")
@click.pass_context
def main(ctx, debug, verbose):
    """smelt: compile several deep-learning models together on Apache TVM."""
    ctx.obj = {"debug": debug}
    level = logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _targets() -> list[str]:
    from .backends import available

    try:
        return sorted(available())
    except SmeltError:
        return ["cpu", "cuda", "rocm"]


def _parse_shape(value: str) -> tuple[str, list]:
    name, eq, dims = value.partition("=")
    if not eq or not dims:
        raise click.BadParameter(f"{value!r}: expected NAME=D1,D2,… (e.g. input=1,3,224,224)")
    out = []
    for d in dims.split(","):
        d = d.strip()
        out.append(int(d) if d.isdigit() else d)
    return name, out


def _quantize_options(command):
    """The options that shape ``--quantize`` (compile and quantize-report take the same ones)."""
    options = [
        click.option("--group-size", default=128, show_default=True, type=click.IntRange(min=1),
                     help="With --quantize w8/w4: rows of the weight sharing one scale."),
        click.option("--calib", type=click.Path(exists=True), help="Calibration data: .npz (one array per input, "
                     "samples along the first axis) or a folder of <input>.npy files."),
        click.option("--calib-method", default="minmax", show_default=True,
                     type=click.Choice(["minmax", "percentile", "entropy"]),
                     help="How activation ranges are picked from the calibration data."),
        click.option("--calib-percentile", default=99.99, show_default=True, type=float,
                     help="With --calib-method percentile."),
        click.option("--max-error", type=float, help="With --quantize int8 or fp8: layers whose estimated relative "
                     "error exceeds this stay unquantized (default: 0.05 for int8, 0.1 for fp8)."),
        click.option("--smooth", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
                     help="With --quantize int8: SmoothQuant strength for matmuls (0: off); per layer, the "
                     "smoothed form is kept only where it measures more accurate."),
        click.option("--fp8-convs", default="all", show_default=True, type=click.Choice(["all", "gemm"]),
                     help="With --quantize fp8: which convolutions take FP8, all (those of one group with "
                     "channels in multiples of 16; on Hopper, activations stay FP8 between them) or only the "
                     "1x1 ones that are GEMMs."),
        click.option("--fp8-stem/--no-fp8-stem", default=None, help="With --quantize fp8 and --fp8-convs all: "
                     "whether a strided conv over fewer than 16 channels (a CNN's stem) is rewritten to take 16 "
                     "or more and runs in FP8 too (default: where the target runs FP8 convs on CUTLASS, Hopper)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _libs(value: str | None) -> tuple[str, ...] | None:
    """``--libs``: None (the backend's default), () for ``none``, else the names."""
    if value is None:
        return None
    return () if value.strip().lower() == "none" else tuple(x.strip() for x in value.split(",") if x.strip())


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-t", "--target", default="cpu", show_default=True, type=click.Choice(_targets()),
              help="Backend to generate code for.")
@click.option("--arch", help="sm_XX for cuda, gfxNNN for rocm, an LLVM CPU name for cpu (default: host/local GPU).")
@click.option("--triple", help="LLVM target triple for the CPU code (cross-compilation).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--name", "names", multiple=True, help="Model names, one per model, in order (default: file stems).")
@click.option("--input-shape", "shapes", multiple=True, metavar="[MODEL.]INPUT=D1,D2,…",
              help="Override an input shape; a dimension may be a name to keep it symbolic.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--emit-source", is_flag=True, help="Also write the generated source (CUDA C, LLVM IR, AMDGPU asm).")
@click.option("--dump-ir", type=click.Path(file_okay=False), help="Write the IR after every pass into this folder.")
@click.option("--verify-each", is_flag=True, help="Check well-formedness after every pass.")
@click.option("--no-cuda-graph", is_flag=True, help="Do not capture CUDA graphs.")
@click.option("--libs", metavar="LIB[,LIB]|none", help="Vendor libraries the generated code may call "
              "(cuda: cublaslt runs weight GEMMs on cuBLASLt, cudnn convolutions on cuDNN; both by default); "
              "none: only generated kernels.")
@click.option("--no-fold-batch-norm", is_flag=True, help="Keep BatchNorm as its own ops.")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(list(_PRECISION)),
              help="Compute precision (fp16, bf16); softmax, norms and reductions stay float32.")
@click.option("--quantize", type=click.Choice(["int8", "fp8", "w8", "w4"]),
              help="int8: calibrated INT8 for convolutions and matmuls (needs --calib); fp8: calibrated FP8 (E4M3) "
              "GEMMs, on cuBLASLt for CUDA sm_89+ (needs --calib); w8, w4: weight-only int8/int4 matmul weights "
              "with group-wise scales.")
@_quantize_options
@click.option("--tune-log-dir", default="tune_logs", show_default=True, type=click.Path(file_okay=False),
              help="Where tuning records are looked up.")
@click.option("--merge", is_flag=True, help="Add the __all__ entry: shared stems computed once, same-shaped "
              "layers of different models fused.")
@click.option("--share-inputs", is_flag=True, help="With --merge: inputs of equal name, shape and dtype are one input.")
@click.option("--share-input", "share_pairs", multiple=True, metavar="A.X=B.Y",
              help="With --merge: model A's input X and model B's input Y are one input.")
@click.option("--no-horizontal", is_flag=True, help="With --merge: do not fuse layers of different models.")
@click.option("--explain", is_flag=True, help="Print why each rewrite fired or did not.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the compile report as JSON.")
def compile(models, target, arch, triple, output, names, shapes, force, emit_source, dump_ir, verify_each,
            no_cuda_graph, libs, no_fold_batch_norm, precision, quantize, group_size, calib, calib_method, calib_percentile,
            max_error, smooth, fp8_convs, fp8_stem, tune_log_dir, merge, share_inputs, share_pairs, no_horizontal, explain, quiet, as_json):
    """Compile MODELS (.onnx, .pt2) together into one artifact folder."""
    from . import CompileOptions, PipelineOptions, TargetOptions
    from .passes import MergeOptions
    from . import compile as compile_models

    if Path(output).exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to replace it")
    if names and len(names) != len(models):
        raise click.BadParameter(f"{len(names)} --name values for {len(models)} models", param_hint="--name")
    if (share_inputs or share_pairs or no_horizontal) and not merge:
        raise click.UsageError("--share-inputs, --share-input and --no-horizontal go with --merge")
    opts = CompileOptions(TargetOptions(target, arch, triple, not no_cuda_graph, _libs(libs)),
                          PipelineOptions(fold_batch_norm=not no_fold_batch_norm, precision=_PRECISION[precision]),
                          tune_log_dir, verify_each, dump_ir,
                          MergeOptions(merge, share_inputs, _share_pairs(share_pairs), not no_horizontal),
                          _quantize_config(quantize, group_size, calib, calib_method, calib_percentile, max_error,
                                           smooth, fp8_convs, fp8_stem))
    input_shapes = dict(_parse_shape(s) for s in shapes)
    t0 = time.perf_counter()
    show_bar = not quiet and not as_json and sys.stderr.isatty()
    bar = click.progressbar(length=1, label="compiling", file=sys.stderr, show_pos=True) if show_bar else None

    def on_step(step, i, n):
        if bar is not None:
            bar.length = n
            bar.label = f"{step.phase:>12}: {step.name:<24}"
            bar.update(i - bar.pos)

    try:
        art = compile_models(list(models), target, arch=arch, names=list(names) or None,
                             input_shapes=input_shapes or None, options=opts, on_step=on_step)
    finally:
        if bar is not None:
            bar.render_finish()
    path = art.save(output, force=force, emit_source=emit_source)
    total = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({"output": str(path), "seconds": round(total, 3), "manifest": _manifest(path)}, indent=1))
    elif not quiet:
        click.echo(format_compile_summary(art, path, total))
        if explain:
            click.echo("\n".join(format_explanations(art.report.explanations)))


def _quantize_config(scheme, group_size, calib, method, percentile, max_error, smooth=0.5, fp8_convs="all",
                     fp8_stem=None):
    """``--quantize`` and its options as the API's ``Int8`` or ``WeightOnly`` (None without it)."""
    from . import Fp8, Int8, WeightOnly

    if calib and scheme not in ("int8", "fp8"):
        raise click.UsageError("--calib goes with --quantize int8 or fp8" +
                               (f"; {scheme} needs no calibration" if scheme else ""))
    if scheme in ("int8", "fp8") and not calib:
        raise click.UsageError(f"--quantize {scheme} needs --calib (calibration data)")
    if scheme == "int8":
        return Int8(calib, method, percentile, 0.05 if max_error is None else max_error, smooth=smooth)
    if scheme == "fp8":
        return Fp8(calib, method, percentile, 0.1 if max_error is None else max_error, convs=fp8_convs, stem=fp8_stem)
    return WeightOnly(int(scheme[1:]), group_size) if scheme else None


def format_explanations(lines: list[str]) -> list[str]:
    """Identical records once, with their count, in first-seen order."""
    from collections import Counter

    counts = Counter(lines)
    out = ["why rewrites fired or not:"] if counts else ["no pattern pass had anything to say"]
    for line in dict.fromkeys(lines):
        out.append(f"  {line}" + (f" (x{counts[line]})" if counts[line] > 1 else ""))
    return out


def _share_pairs(values) -> tuple[tuple[str, str], ...]:
    pairs = []
    for v in values:
        a, eq, b = v.partition("=")
        if not eq or "." not in a or "." not in b:
            raise click.BadParameter(f"{v!r}: expected MODEL.INPUT=MODEL.INPUT (e.g. a.x=b.x)",
                                     param_hint="--share-input")
        pairs.append((a.strip(), b.strip()))
    return tuple(pairs)


def _manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def format_compile_summary(art, path: Path, total: float) -> str:
    r = art.report
    m = _manifest(path)
    lines = [f"smelt compile: {len(art.models)} model(s) -> {path} ({art.backend}, {_target_str(m)})"]
    rows = [("model", "inputs", "outputs", "FLOPs")]
    for name, info in art.models.items():
        rows.append((name, "; ".join(map(str, info.inputs)), "; ".join(map(str, info.outputs)),
                     _flops(r.flops.get(name, 0))))
    lines += _table(rows, indent=2)
    removed = sorted(set(r.ops_before_hist) - set(r.ops_after_hist))
    lines.append(f"  ops: {r.ops_before} -> {r.ops_after} after canonicalization"
                 + (f" (gone: {', '.join(f'{o} x{r.ops_before_hist[o]}' for o in removed)})" if removed else ""))
    q = r.quantization
    if q and q["scheme"] not in ("int8", "fp8"):
        lines.append(f"  {q['scheme']} weight-only (groups of {q['group_size']} rows): {len(q['quantized'])} matmuls"
                     + ("; not handled: " + ", ".join(f"{k} ({v})" for k, v in q["skipped"].items())
                        if q["skipped"] else ""))
    elif q:
        lines.append(f"  {q['scheme']} ({q['method']}, {q['batches']} calibration batches): {len(q['quantized'])} layers"
                     + (f" ({len(q['smoothed'])} smoothed)" if q.get("smoothed") else "")
                     + ("; unquantized (estimated error over the limit): "
                        + ", ".join(f"{k} {v:.3g}" for k, v in q["fallback"].items()) if q["fallback"] else "")
                     + ("; not handled: " + ", ".join(f"{k} ({v})" for k, v in q["skipped"].items())
                        if q["skipped"] else ""))
    saved = r.weight_bytes_offered - r.weight_bytes
    lines.append(f"  weights: {r.weights} tensors, {_mb(r.weight_bytes)}"
                 + (f" ({_mb(saved)} stored once instead of twice or more)" if saved > 0 else ""))
    sched = {}
    for rule in r.schedules.values():
        sched[rule] = sched.get(rule, 0) + 1
    lines.append(f"  kernels: {r.kernels}" + (f" (schedules: {', '.join(f'{k} {v}' for k, v in sorted(sched.items()))})"
                                             if sched else "") + (f"; {len(r.schedule_fallbacks)} fell back"
                                                                  if r.schedule_fallbacks else ""))
    if r.tune_records:
        untuned = sorted(k for k, v in r.schedules.items() if v != "tuned")
        lines.append(f"  tuning records: {r.tuned_kernels} of {r.kernels} kernels tuned ({', '.join(r.tune_records)})"
                     + (f"; default schedules: {', '.join(untuned[:4])}" + (" ..." if len(untuned) > 4 else "")
                        if untuned else ""))
    files = m.get("files", {})
    lines.append(f"  artifact: {_mb(_dir_size(path))} ("
                 + ", ".join(f"{f} {_mb((Path(path) / f).stat().st_size)}" for f in files if "/" not in f) + ")")
    lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.phase_seconds.items()) + f"; total {total:.2f}s")
    return "\n".join(lines)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-t", "--target", default="cpu", show_default=True, type=click.Choice(_targets()))
@click.option("--arch", help="sm_XX for cuda, gfxNNN for rocm (default: the local GPU).")
@click.option("--tune-log-dir", default="tune_logs", show_default=True, type=click.Path(file_okay=False),
              help="Tuning records for the tuned column ('' for none).")
@click.option("--repeat", default=20, show_default=True, type=click.IntRange(min=1), help="Timed calls per runner.")
@click.option("--input-shape", "shapes", multiple=True, metavar="INPUT=D1,D2,…", help="Fix a symbolic input shape.")
@click.option("--no-peers", is_flag=True, help="Time smelt only.")
@click.option("--profile", is_flag=True, help="Also time each smelt kernel and list the top ones.")
@click.option("--top", default=10, show_default=True, help="Kernels listed by --profile.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--markdown", is_flag=True, help="Print one markdown table for all models.")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(list(_PRECISION)),
              help="smelt's compute precision, and torch's (onnxruntime stays float32).")
@click.option("--quantize", type=click.Choice(["int8", "fp8", "w8", "w4"]), help="Quantize smelt's build "
              "(see compile --quantize); the peers run unquantized.")
@_quantize_options
def bench(models, target, arch, tune_log_dir, repeat, shapes, no_peers, profile, top, as_json, markdown, precision,
          quantize, group_size, calib, calib_method, calib_percentile, max_error, smooth, fp8_convs, fp8_stem):
    """Time MODELS (.onnx, .pt2) with smelt (untuned, tuned) beside onnxruntime / torch, with errors."""
    from . import CompileOptions, PipelineOptions, TargetOptions
    from .benchmark import bench as run_bench

    opts = CompileOptions(TargetOptions(target, arch), pipeline=PipelineOptions(precision=_PRECISION[precision]),
                          quantize=_quantize_config(quantize, group_size, calib, calib_method, calib_percentile,
                                                    max_error, smooth, fp8_convs, fp8_stem))
    input_shapes = dict(_parse_shape(s) for s in shapes) or None
    results = [run_bench(m, target, name=Path(m).stem.replace("-", "_").replace(".", "_"), tune_log_dir=tune_log_dir or None,
                         repeat=repeat, profile=profile, peers=not no_peers, input_shapes=input_shapes, options=opts)
               for m in models]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
        return
    click.echo("\n".join(format_bench(results, markdown, top)))


def format_bench(results, markdown: bool = False, top: int = 10) -> list[str]:
    """Results as a text table per model (or one markdown table), with ratios and the profile."""
    lines = []
    if markdown:
        runners = list(dict.fromkeys(t.runner for r in results for t in r.timings))
        lines.append("| model | " + " | ".join(f"{x} ms" for x in runners) + " | best smelt vs peers |")
        lines.append("|---" * (len(runners) + 2) + "|")
        for r in results:
            ms = {t.runner: t.ms for t in r.timings}
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.ratios().items())
            lines.append(f"| {r.model} | " + " | ".join(f"{ms[x]:.3f}" if x in ms else "-" for x in runners)
                         + f" | {ratios} |")
        return lines
    for r in results:
        lines.append(f"smelt bench {r.model} ({r.target}, smelt in {r.build}; median of timed calls after a warm-up)")
        rows = [("runner", "ms", "error vs reference", "peer / best smelt", "")]
        best = r.best_smelt().ms
        for t in r.timings:
            rows.append((t.runner, f"{t.ms:.3f}", "-" if t.rel_err is None else f"{t.rel_err:.1e}",
                         "" if t.runner.startswith("smelt") else f"{t.ms / best:.2f}x", t.note))
        lines += _table(rows, 2)
        if r.tuned_kernels == 0:
            lines.append("  no tuning records apply to this model (no tuned column)")
        if r.profile:
            lines.append(f"  top kernels ({len(r.profile)} in all; per run):")
            lines += _table([("kernel", "ms", "share", "calls", "GB/s", "arguments (outputs last)")] +
                            [(p.kernel, f"{p.ms:.3f}", f"{100 * p.share:.1f} %", f"{p.calls:g}", f"{p.gbps():.1f}",
                              p.shapes) for p in r.profile[:top]], 4)
    return lines


@main.command("quantize-report")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--quantize", default="int8", show_default=True, type=click.Choice(["int8", "fp8", "w8", "w4"]),
              help="The scheme to measure (see compile --quantize).")
@click.option("--eval", "eval_data", type=click.Path(exists=True),
              help="Evaluation data, same forms as --calib (default: the calibration data).")
@_quantize_options
@click.option("-t", "--target", default="cpu", show_default=True, type=click.Choice(_targets()))
@click.option("--name", "names", multiple=True, help="Model names, one per model, in order.")
@click.option("--input-shape", "shapes", multiple=True, metavar="[MODEL.]INPUT=D1,D2,…")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize_report(models, quantize, calib, eval_data, calib_method, calib_percentile, max_error, smooth,
                    fp8_convs, fp8_stem, group_size, target, names, shapes, as_json):
    """Per-layer and end-to-end error of quantizing MODELS, measured on evaluation data."""
    from . import quantize_report as measure

    if names and len(names) != len(models):
        raise click.BadParameter(f"{len(names)} --name values for {len(models)} models", param_hint="--name")
    if quantize not in ("int8", "fp8") and not eval_data:
        raise click.UsageError(f"--quantize {quantize} needs --eval (evaluation data)")
    config = _quantize_config(quantize, group_size, calib, calib_method, calib_percentile, max_error, smooth,
                              fp8_convs, fp8_stem)
    input_shapes = dict(_parse_shape(s) for s in shapes)
    r = measure(list(models), config, eval_data, target, names=list(names) or None, input_shapes=input_shapes or None)
    click.echo(json.dumps(r.to_json(), indent=1) if as_json else format_quantize_report(r))


def format_quantize_report(r) -> str:
    """The report as the CLI prints it."""
    s = r.scheme
    how = (f"{s['scheme']} ({s['method']}, {r.calibration_batches} calibration batches)" if s["scheme"] in ("int8", "fp8")
           else f"{s['scheme']} weight-only (groups of {s['group_size']} rows)")
    samples = max((o.samples for o in r.outputs), default=0)
    lines = [f"smelt quantize-report: {how}, {r.target}; evaluated on {samples} samples ({r.batches} batches)"]
    rows = [("model", "output", "max abs err", "mean abs err", "max err / range", "cosine mean", "cosine min",
             "top-1 agreement")]
    for o in r.outputs:
        rows.append((o.model, o.output, f"{o.max_abs:.4g}", f"{o.mean_abs:.4g}", f"{100 * o.rel_max:.2f} %",
                     f"{o.cosine_mean:.5f}", f"{o.cosine_min:.5f}",
                     "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f} %"))
    lines += _table(rows, 2)
    ratio = r.weight_bytes_after / r.weight_bytes_before if r.weight_bytes_before else float("nan")
    lines.append(f"  weights: {_mb(r.weight_bytes_before)} -> {_mb(r.weight_bytes_after)} ({ratio:.2f}x)")
    lines.append("  layers, most sensitive first (estimated relative error):")
    lines += _table([("layer", "error", "status")] + [(n, "-" if e is None else f"{100 * e:.2f} %", st)
                                                      for n, e, st in r.layers], 4)
    return "\n".join(lines)


def _flops(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _target_str(m: dict) -> str:
    t = m.get("target", {})
    return " ".join(str(t[k]) for k in ("arch", "mcpu", "mtriple") if k in t) or m.get("backend", "")


def _table(rows, indent=0) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return [" " * indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-m", "--model", help="Model to run (default: the only one).")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input array.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write outputs (.npy for one, .npz for all).")
@click.option("--device", "device_id", default=0, show_default=True, help="Device index.")
def run(artifact, model, inputs, output, device_id):
    """Run one model of a compiled ARTIFACT on .npy inputs."""
    import numpy as np

    from . import load

    rt = load(artifact, device_id)
    if model is None:
        if len(rt.models) != 1:
            raise click.UsageError(f"the artifact holds {len(rt.models)} models ({', '.join(rt.models)}); pass --model")
        model = next(iter(rt.models))
    feeds = {}
    for item in inputs:
        name, eq, file = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r}: expected NAME=FILE.npy", param_hint="--input")
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{file}: cannot read a .npy array ({e})", param_hint="--input") from None
    outs = rt.run_named(model, **feeds)
    if output:
        if output.endswith(".npz"):
            np.savez(output, **outs)
        elif len(outs) == 1:
            np.save(output, next(iter(outs.values())))
        else:
            raise click.BadParameter(f"model {model!r} has {len(outs)} outputs; write them to a .npz file",
                                     param_hint="--output")
    for name, a in outs.items():
        click.echo(f"{name}: {a.dtype}{list(a.shape)} min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--merge", is_flag=True, help="Say what compiling these models together would share.")
@click.option("--share-inputs", is_flag=True, help="With --merge: share inputs of equal name, shape and dtype.")
@click.option("--share-input", "share_pairs", multiple=True, metavar="A.X=B.Y", help="With --merge: share these.")
@click.option("--name", "names", multiple=True, help="With --merge: model names, one per model in order.")
@click.option("--graph", type=click.Path(dir_okay=False), help="With --merge: draw the merged graph (.svg, .png, .dot).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(paths, merge, share_inputs, share_pairs, names, graph, as_json):
    """Describe model files (.onnx, .pt2) or compiled artifact folders; with --merge, what merging shares."""
    if merge:
        _inspect_merge(paths, share_inputs, share_pairs, names, graph, as_json)
        return
    if graph or share_inputs or share_pairs:
        raise click.UsageError("--graph, --share-inputs and --share-input go with --merge")
    docs = [_inspect_artifact(Path(p)) if Path(p).is_dir() else _inspect_model(Path(p)) for p in paths]
    if as_json:
        click.echo(json.dumps(docs if len(docs) > 1 else docs[0], indent=1))
        return
    for d in docs:
        click.echo("\n".join(_format_inspect(d)))


def _inspect_merge(paths, share_inputs, share_pairs, names, graph, as_json) -> None:
    from . import analyze_merge
    from .ir.graph import merged_dot, render

    pairs = dict(_share_pairs(share_pairs))
    a = analyze_merge(list(paths), names=list(names) or None, share_inputs=share_inputs, share_input=pairs)
    if graph:
        render(merged_dot(a.module["__all__"], a.users, a.models), graph)
    if as_json:
        click.echo(json.dumps(a.report, indent=1))
        return
    click.echo("\n".join(format_merge_report(a.report)))
    if graph:
        click.echo(f"merged graph drawn to {graph}")


def format_merge_report(r: dict) -> list[str]:
    lines = [f"merging {len(r['models'])} models: {', '.join(r['models'])}"]
    shared_inputs = {k: v for k, v in r["inputs"].items() if not v.startswith(k.split('.')[0] + "__")}
    lines.append("  shared inputs: " + (", ".join(f"{k} reads {v.replace('__', '.', 1)}"
                                                 for k, v in shared_inputs.items()) or "none"))
    rows = [("model", "FLOPs shared", "weights shared", "bindings shared")]
    for m in r["models"]:
        rows.append((m, f"{100 * r['shared_flops_fraction'][m]:.1f}%", f"{100 * r['shared_weights_fraction'][m]:.1f}%",
                     str(r["shared_bindings"][m])))
    lines += _table(rows, indent=2)
    h = r.get("horizontal")
    if h:
        for g in h.get("groups", []):
            lines.append(f"  fused horizontally: {', '.join(g.get('models', []))}: "
                         f"{g.get('fused', 0)} ops fused, {g.get('fell_back', 0)} left per model")
    if r["not_merged"]:
        lines.append("  not merged (first difference):")
        seen = set()
        for x in r["not_merged"]:
            key = (x["model_a"], x["model_b"], x["reason"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"    {x['model_a']}.{x['var_a']} vs {x['model_b']}: {x['reason']}")
    return lines


def _inspect_model(path: Path) -> dict:
    from . import frontend
    from .ir import summarize

    m = frontend.load(path)
    program = frontend.build_program([m])
    (name, info), = program.models.items()
    s = summarize(program.mod, [name], program.weights, info.weights)
    return {"kind": "model", "path": str(path), "models": {name: {
        "inputs": [str(t) for t in info.inputs], "outputs": [str(t) for t in info.outputs],
        "params": s.params, "param_bytes": s.param_bytes, "flops": s.flops, "flops_per_unit_batch": s.symbolic,
        "ops": dict(s.ops.most_common())}}}


def _inspect_artifact(path: Path) -> dict:
    from .artifact import read_manifest, verify
    from .errors import ArtifactError

    m = read_manifest(path)
    try:
        verify(path, m)
        status = "ok"
    except ArtifactError as e:
        status = f"FAILED: {e}"
    return {"kind": "artifact", "path": str(path), "backend": m["backend"], "target": m["target"],
            "smelt": m.get("smelt"), "tvm": m.get("tvm"), "passes": m.get("passes", []),
            "models": {n: {"inputs": [_spec(t) for t in mi["inputs"]], "outputs": [_spec(t) for t in mi["outputs"]],
                           "weights": len(mi["weights"])} for n, mi in m["models"].items()},
            "files": m.get("files", {}), "verified": status,
            "weights": {"tensors": len(m.get("weights", {})),
                        "bytes": sum(w["nbytes"] for w in m.get("weights", {}).values())}}


def _spec(t: dict) -> str:
    return f"{t['name']}: {t['dtype']}[{', '.join(map(str, t['shape']))}]"


def _format_inspect(d: dict) -> list[str]:
    if d["kind"] == "model":
        lines = [f"{d['path']}:"]
        for name, m in d["models"].items():
            lines.append(f"  model {name}")
            lines.append(f"    inputs:  {'; '.join(m['inputs'])}")
            lines.append(f"    outputs: {'; '.join(m['outputs'])}")
            per = " per unit of each symbolic dim" if m["flops_per_unit_batch"] else ""
            lines.append(f"    parameters: {m['params']:,} ({_mb(m['param_bytes'])}); FLOPs: {_flops(m['flops'])}{per}")
            lines.append("    ops: " + ", ".join(f"{k} {v}" for k, v in m["ops"].items()))
        return lines
    lines = [f"{d['path']}: smelt artifact for {d['backend']} ({_target_str(d)}), smelt {d['smelt']}, TVM {d['tvm']}",
             f"  integrity: {d['verified']}"]
    for name, m in d["models"].items():
        lines.append(f"  model {name}: inputs {'; '.join(m['inputs'])} -> outputs {'; '.join(m['outputs'])}"
                     f" ({m['weights']} weights)")
    lines.append(f"  weights: {d['weights']['tensors']} tensors, {_mb(d['weights']['bytes'])}")
    lines.append(f"  passes: {', '.join(d['passes'])}")
    lines.append("  files: " + ", ".join(f"{f} sha256:{h[:12]}" for f, h in d["files"].items()))
    return lines


@main.command()
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@click.option("-t", "--target", default="cpu", show_default=True, type=click.Choice(_targets()),
              help="Backend to tune for.")
@click.option("--arch", help="sm_XX for cuda, gfxNNN for rocm, an LLVM CPU name for cpu (default: host/local GPU).")
@click.option("--name", "names", multiple=True, help="Model names, one per model, in order (default: file stems).")
@click.option("--trials", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Total trials over all tasks (records already in the database count).")
@click.option("--trials-per-task", type=click.IntRange(min=1), help="At most this many new trials per task.")
@click.option("--time", "wall", metavar="DURATION", help="Wall-time budget, e.g. 90s, 20m, 1h.")
@click.option("--log-dir", default="tune_logs", show_default=True, type=click.Path(file_okay=False),
              help="Records folder (one subfolder per target key).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, exists=True),
              help="Print what a records folder holds (per task: weight, best latency, trials) and exit.")
@click.option("--prune", "prune_dir", type=click.Path(file_okay=False, exists=True),
              help="Keep only the best record per kernel, where it beats the default schedule, and exit.")
@click.option("--keep-slower", is_flag=True,
              help="With --prune: keep the best record of kernels whose default is faster too (to tune on from).")
@click.option("--min-speedup", type=click.FloatRange(min=1.0), default=1.0, show_default=True,
              help="With --prune: keep only records at least this many times faster than the default "
                   "(e.g. 1.1 drops gains within a noisy machine's timing spread).")
@click.option("--import-records", "imports", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Add the records of this folder (a tune job elsewhere) to --log-dir and exit; repeatable.")
@click.option("--merge", is_flag=True, help="Tune what `smelt compile --merge` builds (shared stems, fused layers).")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(list(_PRECISION)),
              help="Tune what `smelt compile --precision` builds.")
@click.option("--share-inputs", is_flag=True, help="With --merge: share inputs of equal name, shape and dtype.")
@click.option("--libs", metavar="LIB[,LIB]|none", help="Tune what `smelt compile --libs` builds.")
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Measure on the devices registered at this TVM RPC tracker.")
@click.option("--rpc-key", metavar="KEY", help="The key those devices registered under.")
@click.option("--devices", metavar="0,1,...", help="Measure on these local GPUs in parallel, one pinned measuring worker each.")
@click.option("--builders", type=click.IntRange(min=1), help="Parallel build processes (default: one per core).")
@click.option("--plot", "plot_to", type=click.Path(dir_okay=False),
              help="PNG of estimated model latency against tuning time (default: <record folder>/progress.png).")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tune(models, target, arch, names, trials, trials_per_task, wall, log_dir, report_dir, prune_dir, keep_slower,
         min_speedup, imports, merge, precision, share_inputs, libs, rpc_tracker, rpc_key, devices, builders, plot_to, quiet, as_json):
    """Tune the kernels of MODELS with MetaSchedule; records go to LOG_DIR/<target key>/.

    Re-running the same command resumes from the records. Compiles with the same
    --log-dir (default tune_logs) apply the best records automatically.
    """
    from . import autotune

    if sum(map(bool, (report_dir, prune_dir, imports))) > 1 or (models and (report_dir or prune_dir or imports)):
        raise click.UsageError("--report, --prune and --import-records take folders and no models, one at a time")
    if imports:
        for key, added in autotune.merge(imports, log_dir).items():
            click.echo(f"{key}: {added} records added to {Path(log_dir) / key}")
        return
    if report_dir or prune_dir:
        if prune_dir:
            for key, (before, after) in autotune.prune(prune_dir, keep_slower, min_speedup).items():
                click.echo(f"{key}: {before} -> {after} records")
            return
        reps = autotune.report(report_dir)
        if as_json:
            click.echo(json.dumps([r.to_json() for r in reps], indent=1))
            return
        for r in reps:
            click.echo(f"{r.target_key} ({r.path})")
            click.echo("\n".join(_tune_table(r.workloads)))
        return
    if not models:
        raise click.UsageError("give MODELS to tune, or --report DIR / --prune DIR / --import-records DIR")
    if names and len(names) != len(models):
        raise click.BadParameter(f"{len(names)} --name values for {len(models)} models", param_hint="--name")
    opts = autotune.TuneOptions(trials=trials, trials_per_task=trials_per_task,
                                seconds=_duration(wall) if wall else None, builders=builders,
                                rpc_tracker=rpc_tracker, rpc_key=rpc_key, devices=_device_list(devices),
                                progress=not (quiet or as_json))
    try:
        rep = autotune.tune(list(models), target, arch, log_dir=log_dir, names=list(names) or None, merge=merge,
                            share_inputs=share_inputs, precision=_PRECISION[precision], options=opts,
                            plot_to=plot_to, libs=_libs(libs))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: every batch measured so far is in {log_dir}/; run the same command to resume",
                   err=True)
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1))
        return
    click.echo(f"{len(rep.tasks)} tasks, {rep.new_trials} new trials in {rep.seconds:.0f} s "
               f"({rep.trials_per_minute:.1f} trials/min on {rep.devices} device(s)) -> {rep.record_dir}")
    click.echo("\n".join(_tune_table(rep.tasks)))
    if rep.default_estimate_s and rep.tuned_estimate_s:
        click.echo(f"estimated model latency: {rep.default_estimate_s * 1e3:.3f} ms with default schedules -> "
                   f"{rep.tuned_estimate_s * 1e3:.3f} ms tuned ({rep.default_estimate_s / rep.tuned_estimate_s:.2f}x)")
    if rep.skipped:
        click.echo(f"not tuned: {len(rep.skipped)} kernels ({'; '.join(rep.skipped[:3])}"
                   + (" ..." if len(rep.skipped) > 3 else "") + ")")
    if rep.plot:
        click.echo(f"plot: {rep.plot}")


def _tune_table(rows) -> list[str]:
    """Per task: weight, default and best latency, their ratio (as timed in turns where it was),
    trials (largest weighted latency first)."""
    def us(v):
        return "-" if v is None else f"{v * 1e6:.1f} us"

    def speedup(w):
        if w.side_by_side is not None:
            return f"{w.side_by_side:.2f}x side by side"
        return f"{w.default_seconds / w.best_seconds:.2f}x" if w.default_seconds and w.best_seconds else "-"

    return _table([("task", "weight", "default", "best", "speedup", "trials")] + [
        (w.name, "?" if w.weight is None else f"{w.weight:g}", us(w.default_seconds), us(w.best_seconds),
         speedup(w), str(w.trials)) for w in rows], indent=2)


def _device_list(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected GPU indices such as 0,1,2,3", param_hint="--devices") from None


def _duration(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    num, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "s")
    try:
        seconds = float(num) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a duration such as 90s, 20m or 1h", param_hint="--time") from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r}: must be positive", param_hint="--time")
    return seconds


@main.command()
def targets():
    """List the registered backends and what each needs."""
    from .backends import available, get

    for name in sorted(available()):
        try:
            b = get(name)
            click.echo(f"{name:<6} {b.description}\n       needs: {b.requirements}")
        except SmeltError as e:
            click.echo(f"{name:<6} (cannot load: {e})")


if __name__ == "__main__":
    main()
