"""ApplyDefaultSchedules: dlight's default GPU schedules, one rule at a time, crash-safe.

Requires: legalized, fused PrimFuncs and a GPU target in scope.
Guarantees: every PrimFunc not already scheduled (tuned records come first) gets
the first dlight rule that applies; a rule that raises on a function is logged
with the reason and the next rule is tried, so one bad kernel (seen on the H200:
dlight's Matmul rule asserting on MobileNetV3 at batch 32) costs that kernel its
fast schedule, not the whole compile. ``report`` maps function → rule used.
Where: schedule phase of the CUDA and ROCm backends.

TVM's ``dl.ApplyDefaultSchedule`` stops at the first exception, hence this loop.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from ..errors import BackendError

log = logging.getLogger(__name__)


def default_rules():
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


@tvm.transform.module_pass(opt_level=0, name="ApplyDefaultSchedules")
class ApplyDefaultSchedules:
    """See the module docstring."""

    def __init__(self, rules=None):
        self.rules = list(rules) if rules is not None else default_rules()
        self.report: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                self.report[gv.name_hint] = "tuned"
                continue
            sch = None
            for rule in self.rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as e:  # dlight rules assert on shapes they do not expect
                    reason = str(e).strip().splitlines()
                    reason = reason[-1] if reason else type(e).__name__
                    self.fallbacks[gv.name_hint] = f"{type(rule).__name__}: {reason}"
                    log.warning("schedule rule %s failed on %s (%s); trying the next rule",
                                type(rule).__name__, gv.name_hint, reason)
                    continue
                if space is None:
                    continue
                sch = space[0] if isinstance(space, list) else space
                self.report[gv.name_hint] = type(rule).__name__
                break
            if sch is None:
                raise BackendError(f"no default GPU schedule applies to kernel {gv.name_hint}")
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod
