"""ApplyDefaultSchedules: dlight's default GPU schedules, one rule at a time, crash-safe.

Requires: legalized, fused PrimFuncs and a GPU target in scope (or on the function's
``target`` attribute).
Guarantees: every PrimFunc not already scheduled (tuned records come first) gets
the first dlight rule that applies; a rule that raises on a function is logged
with the reason and the next rule is tried, so one bad kernel (seen on the H200:
dlight's Matmul rule asserting on MobileNetV3 at batch 32) costs that kernel its
fast schedule, not the whole compile. ``report`` maps function → rule used (or
``tuned``); ``fallbacks`` maps function → the rules that raised, with their reasons.
A function no rule schedules raises ``BackendError``.
Where: schedule phase of the CUDA and ROCm backends.

TVM's ``dl.ApplyDefaultSchedule`` stops at the first exception, hence this loop.

Some rules apply and produce wrong code without raising. ``MISCOMPILES`` lists each
such rule with the compute blocks it must not take; the next rule schedules those
kernels. Seen on the H200 (sm_90): dlight's Reduction rule on a grouped 1×1 conv
(block ``group_conv2d_nchw``, what horizontal fusion of several CNNs makes) gave a
relative error of 0.59; ``tests/backends/test_cuda_execution.py`` checks it. Likewise
``BREAKS_CODEGEN`` lists rules whose schedule for kernels with some input dtype does not
build at all.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from ..errors import BackendError, error_line

log = logging.getLogger(__name__)


def default_rules() -> list:
    """dlight's GPU rules in TVM's order: the most specific first, ``Fallback`` last."""
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


# rule name -> prefixes of block names whose kernels that rule miscompiles (see the docstring)
MISCOMPILES: dict[str, tuple[str, ...]] = {"Reduction": ("group_conv2d",)}
# rule name -> (block name prefixes, buffer dtypes all present) of kernels whose schedule by
# that rule does not build: dlight's Matmul tensorizes int8 x int8 -> int32 matmuls and
# convolutions with wmma and TVM's CUDA codegen fails ("fragment_info_" check, seen
# building INT8 BERT and ResNet-50 for sm_90).
BREAKS_CODEGEN: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "Matmul": (("matmul", "conv"), frozenset({"int8", "int32"}))}


def _block_names(func: tirx.PrimFunc) -> set[str]:
    # TVM 0.27's Python API has no TIR statement visitor; the printed blocks name them all.
    return set(re.findall(r'T\.sblock\("([^"]+)"', func.script()))


def _buffer_dtypes(func: tirx.PrimFunc) -> set[str]:
    # nor a buffer map: the printed parameters and allocations give every buffer's dtype
    return set(re.findall(r'(?:T\.Buffer|alloc_buffer)\(.*?, "(\w+)"\)', func.script()))


@tvm.transform.module_pass(opt_level=0, name="ApplyDefaultSchedules")
class ApplyDefaultSchedules:
    """See the module docstring. ``rules`` defaults to ``default_rules()``."""

    def __init__(self, rules=None):
        self.rules = list(rules) if rules is not None else default_rules()
        self.report: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = gv.name_hint
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                self.report[name] = "tuned"
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target or tvm.target.Target.current(allow_none=False)
            sch, failures = None, []
            blocks = dtypes = None
            for rule in self.rules:
                rule_name = type(rule).__name__
                if rule_name in MISCOMPILES:
                    blocks = _block_names(func) if blocks is None else blocks
                    bad = [b for b in blocks if b.startswith(MISCOMPILES[rule_name])]
                    if bad:
                        failures.append(f"{rule_name}: skipped, it miscompiles {bad[0]}")
                        continue
                if rule_name in BREAKS_CODEGEN:
                    prefixes, kinds = BREAKS_CODEGEN[rule_name]
                    dtypes = _buffer_dtypes(func) if dtypes is None else dtypes
                    blocks = _block_names(func) if blocks is None else blocks
                    bad = [b for b in blocks if b.startswith(prefixes)]
                    if bad and kinds <= dtypes:
                        failures.append(f"{rule_name}: skipped, its code for {bad[0]} on "
                                        f"{'/'.join(sorted(kinds))} does not build")
                        continue
                try:
                    space = rule.apply(func, target, False)
                except Exception as e:  # dlight rules assert on shapes they do not expect
                    failures.append(f"{rule_name}: {error_line(e, last=True, with_type=True)}")
                    log.warning("schedule rule %s failed on %s (%s); trying the next rule",
                                rule_name, name, error_line(e, last=True, with_type=True))
                    continue
                if space is None:
                    continue
                sch = space if isinstance(space, s_tir.Schedule) else space[0]
                self.report[name] = rule_name
                break
            if failures:
                self.fallbacks[name] = "; ".join(failures)
            if sch is None:
                tried = ", ".join(type(r).__name__ for r in self.rules)
                why = f" (failures: {'; '.join(failures)})" if failures else ""
                raise BackendError(f"no default GPU schedule applies to kernel {name}; tried {tried}{why}")
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if not updated:
            return mod
        mod = mod.clone()  # ``mod[gv] = ...`` writes in place; the caller's module must not change
        for gv, func in updated.items():
            mod[gv] = func
        return mod
