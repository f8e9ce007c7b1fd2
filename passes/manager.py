"""The pass manager: runs a pipeline of named passes with timing, IR dumps and checks.

Guarantees: each pass's wall time is recorded; with ``dump_ir`` the module is
written as TVMScript to ``NN-<pass>.py`` after every pass (``00-input.py`` first),
tensor constants shown as extra parameters so that the file parses back with
``tvm.script.from_source``; with ``verify_each`` every pass is followed by
``relax.analysis.well_formed``; a failing or ill-forming pass raises ``PassError``
naming it and the passes before it.

Known TVM 0.27 limit: between ``CallTIRRewrite`` and ``LowerAllocTensor`` TVM prints
``R.builtin.alloc_tensor(..., ty_args=...)``, which its own parser rejects, so those
dumps (lower phase) do not parse back; ``tests/passes/test_manager.py`` shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from ..errors import PassError, SmeltError, error_line
from ..ir.weights import lift_constants

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One entry of a pipeline: the phase it belongs to and the pass."""

    phase: str
    pass_: tvm.transform.Pass

    @property
    def name(self) -> str:
        return self.pass_.info.name


@dataclass
class PassTiming:
    """Wall time of one pass of one run."""

    phase: str
    name: str
    seconds: float


@dataclass
class PassManager:
    """Runs ``steps`` in order on a module."""

    steps: list[Step]
    dump_ir: Path | None = None
    verify_each: bool = False
    on_step: Callable[[Step, int, int], None] | None = None  # progress: (step, index, total)
    after_phase: Callable[[str, tvm.IRModule], None] | None = None  # (phase, module) when a phase ends
    config: dict = field(default_factory=dict)  # PassContext config (backend options)
    timings: list[PassTiming] = field(default_factory=list)

    def run(self, mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
        """Run every step on ``mod``; ``timings`` then holds this run's pass times."""
        self.timings = []
        if self.dump_ir:
            self.dump_ir.mkdir(parents=True, exist_ok=True)
            _dump(self.dump_ir / "00-input.py", mod)
        done: list[str] = []
        with tvm.transform.PassContext(opt_level=3, config=self.config):
            for i, step in enumerate(self.steps, 1):
                if self.on_step:
                    self.on_step(step, i, len(self.steps))
                t0 = time.perf_counter()
                try:
                    if target is not None:
                        with target:
                            mod = step.pass_(mod)
                    else:
                        mod = step.pass_(mod)
                except SmeltError:
                    raise
                except Exception as e:
                    raise PassError(f"pass {step.name} ({step.phase}) failed: {error_line(e, with_type=True)}"
                                    f"; passes before it: {', '.join(done) or 'none'}") from e
                dt = time.perf_counter() - t0
                self.timings.append(PassTiming(step.phase, step.name, dt))
                log.debug("%-28s %7.3f s", step.name, dt)
                if self.verify_each:
                    try:
                        relax.analysis.well_formed(mod)
                    except Exception as e:
                        raise PassError(f"pass {step.name} ({step.phase}) left the module ill-formed: "
                                        f"{error_line(e)}; "
                                        f"passes before it: {', '.join(done) or 'none'}") from None
                done.append(step.name)
                if self.dump_ir:
                    _dump(self.dump_ir / f"{i:02d}-{step.name}.py", mod)
                last_of_phase = i == len(self.steps) or self.steps[i].phase != step.phase
                if self.after_phase and last_of_phase:
                    self.after_phase(step.phase, mod)
        return mod

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase of the last run."""
        out: dict[str, float] = {}
        for t in self.timings:
            out[t.phase] = out.get(t.phase, 0.0) + t.seconds
        return out


_DUMP_HEADER = ("# Tensor constants are shown as extra trailing parameters w<i> (values not dumped),\n"
                "# so that this file parses back with tvm.script.from_source.\n")


def _dump(path: Path, mod: tvm.IRModule) -> None:
    """Write ``mod`` as TVMScript that parses back.

    ``show_meta=False`` alone would print ``metadata[...]`` references that do not
    parse, and ``show_meta=True`` would write every weight into every dump.
    """
    shown = tvm.IRModule({}, attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = lift_constants(func, min_elements=0)
            if func.attrs is not None and "params" in func.attrs:
                func = func.without_attr("params")
        shown[gv] = func
    path.write_text(_DUMP_HEADER + shown.script(show_meta=False))
