"""CPU backend: LLVM code for the host (x86-64 or aarch64) or a named CPU/triple.

Before legalization, convolutions move to NHWC/HWIO (``ConvertConvLayout``), 3x3 stride-1
convolutions with constant weights become Winograd F(2x2, 3x3) (``RewriteConvWinograd``) and
exp, erf, tanh and softmax take TVM's vectorizable fast forms. Kernels without tuning records get
smelt's default CPU schedules (``cpu_schedule``: register-tiled, vectorized, parallel), with
the weights of tiled kernels repacked into panels at compile time (``prepack_weights``).
"""

from __future__ import annotations

import platform
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as _cpu

from ..errors import BackendError
from ..passes.convert_conv_layout import ConvertConvLayout
from ..passes.emulate_e4m3_round_trips import EmulateE4M3RoundTrips
from ..passes.rewrite_conv_winograd import RewriteConvWinograd
from . import cpu_int8_dot, cpu_schedule
from .base import TargetOptions, check_libs, host_linker_options
from .apply_default_schedules import ApplyDefaultSchedules
from .prepack_weights import FoldWeightPrepack, MarkWeightOperands

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
            "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def host_triple() -> str:
    machine = platform.machine().lower()
    if machine not in _TRIPLES:
        raise BackendError(f"host CPU {machine!r} is not supported; supported: x86_64, aarch64")
    return _TRIPLES[machine]


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


class CPUBackend:
    name = "cpu"
    description = "LLVM code for CPUs (x86-64, aarch64); the host CPU by default"
    requirements = "nothing beyond TVM (its LLVM is built in)"
    device_type = "cpu"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        check_libs(opts, ())
        triple = opts.triple or host_triple()
        cpu = opts.arch or (host_cpu() if opts.triple is None else None)
        spec = {"kind": "llvm", "mtriple": triple}
        if cpu:
            if not tvm.target.codegen.llvm_is_valid_cpu(cpu, triple):
                raise BackendError(f"--arch {cpu!r} is not a CPU LLVM knows for {triple}")
            spec["mcpu"] = cpu
        try:
            return tvm.target.Target(spec)
        except Exception as e:
            raise BackendError(f"bad CPU target {spec}: {e}") from None

    def int8_weight_limit(self, target) -> int:
        """The largest |weight| QuantizeInt8 may emit: 63 where ``Int8DotTile`` multiplies with AVX2's
        ``vpmaddubsw`` (its int16 pair sums saturate with 8-bit weights), else 127."""
        return cpu_int8_dot.weight_limit(target)

    def check_toolchain(self, opts: TargetOptions) -> None:
        """Cross-compiling needs a linker for the triple: fail before any work, not at save."""
        host_linker_options(self.target(opts))

    def prelegalize_passes(self, target):
        # TVM's fast exp/erf/tanh (and softmax on fast exp) vectorize; LLVM lowers the plain
        # ones to scalar libm calls (erff: a GELU matmul spent 75 % of its time there).
        # Their largest relative error, measured over the float32 range: 3.7e-7.
        # FP8 round trips inside a kernel would lose their rounding (EmulateE4M3RoundTrips).
        return [ConvertConvLayout("NHWC", "HWIO"), RewriteConvWinograd(), EmulateE4M3RoundTrips(),
                relax.transform.FastMathTransform()]

    def postfuse_passes(self, target):
        # Which kernel operands are weights: the default schedules repack those at compile time,
        # and MetaSchedule's RewriteLayout does the same for tuned ones; marked here, before tuning
        # extracts its tasks, a record's kernel and the compiled one are the same and tuning
        # measures the default schedule with its weights repacked, as the model runs it.
        return [MarkWeightOperands]

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules(cpu_schedule.default_rules(), required=False), FoldWeightPrepack]

    def lower_passes(self, target):
        return _cpu.dataflow_lower_passes(target) + _cpu.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return dict(cpu_schedule.TAIL_PASS_CONFIG)

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        out = []
        for i, m in enumerate(executable.mod.imports):
            if m.kind == "llvm":
                p = out_dir / f"kernels{'' if i == 0 else i}.ll"
                p.write_text(m.inspect_source("ll"))
                out.append(p)
        return out

    def link_objects(self, target) -> list[Path]:
        return []

    def prepare_run(self, target: dict) -> None:
        pass
