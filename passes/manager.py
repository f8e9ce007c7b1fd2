"""The pass manager: runs a pipeline of named passes with timing, IR dumps and checks.

Guarantees: each pass's wall time is recorded; with ``dump_ir`` the module is
written as TVMScript to ``NN-<pass>.py`` after every pass (``00-input.py`` first);
with ``verify_each`` every pass is followed by ``relax.analysis.well_formed``; a
failing or ill-forming pass raises ``PassError`` naming it and the passes before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from ..errors import PassError, SmeltError

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
                    msg = str(e).strip().splitlines()
                    raise PassError(f"pass {step.name} ({step.phase}) failed: {msg[-1] if msg else type(e).__name__}"
                                    f"; passes before it: {', '.join(done) or 'none'}") from e
                dt = time.perf_counter() - t0
                self.timings.append(PassTiming(step.phase, step.name, dt))
                log.debug("%-28s %7.3f s", step.name, dt)
                if self.verify_each:
                    try:
                        relax.analysis.well_formed(mod)
                    except Exception as e:
                        first = str(e).strip().splitlines()
                        raise PassError(f"pass {step.name} ({step.phase}) left the module ill-formed: "
                                        f"{first[-1] if first else e}; passes before it: "
                                        f"{', '.join(done) or 'none'}") from None
                done.append(step.name)
                if self.dump_ir:
                    _dump(self.dump_ir / f"{i:02d}-{step.name}.py", mod)
                last_of_phase = i == len(self.steps) or self.steps[i].phase != step.phase
                if self.after_phase and last_of_phase:
                    self.after_phase(step.phase, mod)
        return mod

    def phase_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.timings:
            out[t.phase] = out.get(t.phase, 0.0) + t.seconds
        return out


def _dump(path: Path, mod: tvm.IRModule) -> None:
    path.write_text(mod.script(show_meta=False))
