"""ApplyDefaultSchedules: default schedules (dlight's rules and smelt's), one rule at a time, crash-safe.

Requires: legalized, fused PrimFuncs and a target in scope (or on the function's
``target`` attribute); ``rules`` default to the GPU ones (``default_rules()``), the CPU
backend passes ``cpu_schedule.default_rules()``.
Guarantees: every PrimFunc not already scheduled (tuned records come first) gets
the first dlight rule that applies; a rule that raises on a function is logged
with the reason and the next rule is tried, so one bad kernel (seen on the H200:
dlight's Matmul rule asserting on MobileNetV3 at batch 32) costs that kernel its
fast schedule, not the whole compile. ``report`` maps function → rule used (or
``tuned``); ``fallbacks`` maps function → the rules that raised, with their reasons.
A function no rule schedules raises ``BackendError`` when ``required`` (GPUs: an
unscheduled kernel does not build), and keeps TVM's default lowering otherwise (CPUs).
Where: schedule phase of every backend.

TVM's ``dl.ApplyDefaultSchedule`` stops at the first exception, hence this loop.

Some rules apply without raising but give wrong code, or code that does not build.
``AVOID`` lists each such rule with the kernels it must not take (by compute block and
buffer dtypes); the next rule schedules those kernels. Seen on the H200 (sm_90):
dlight's Reduction rule on a grouped 1×1 conv (block ``group_conv2d_nchw``, what
horizontal fusion of several CNNs makes) gave a relative error of 0.59
(``tests/backends/test_cuda_execution.py`` checks it); its Matmul rule tensorizes
int8 x int8 -> int32 matmuls and convolutions with wmma, and TVM's CUDA codegen fails
on them ("fragment_info_" check, INT8 BERT and ResNet-50).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from ..errors import BackendError, error_line
from .short_rows import ShortRows
from .small_reduction import SmallReduction
from .tensorcore_matmul import TensorCoreMatmul
from .vectorized_elementwise import VectorizedElementwise
from .warp_row_reduction import WarpRowReduction

log = logging.getLogger(__name__)


def default_rules() -> list:
    """smelt's tensor-core GEMM rule, then dlight's GPU rules in TVM's order (``Fallback`` last), with
    smelt's ``SmallReduction`` (depthwise convs, pooling) ahead of dlight's reduction rules, its
    ``WarpRowReduction`` (softmax, norms) ahead of ``GeneralReduction`` and its
    ``VectorizedElementwise`` and ``ShortRows`` (an image's NCHW -> NHWC) ahead of ``Fallback``."""
    return [TensorCoreMatmul(), dl.gpu.Matmul(), dl.gpu.GEMV(), SmallReduction(), dl.gpu.Reduction(),
            WarpRowReduction(), dl.gpu.GeneralReduction(), VectorizedElementwise(), ShortRows(),
            dl.gpu.Fallback()]


@dataclass(frozen=True)
class Avoid:
    """``rule`` must not schedule kernels with a block named ``blocks*`` and buffers of all ``dtypes``."""

    rule: str
    blocks: tuple[str, ...]
    dtypes: frozenset[str]
    why: str

    def bad_block(self, blocks: set[str], dtypes: set[str]) -> str | None:
        """The first offending block of a kernel with these blocks and buffer dtypes, else None."""
        if not self.dtypes <= dtypes:
            return None
        return next((b for b in sorted(blocks) if b.startswith(self.blocks)), None)


AVOID = [Avoid("Reduction", ("group_conv2d",), frozenset(), "it miscompiles"),
         Avoid("Matmul", ("matmul", "conv"), frozenset({"int8", "int32"}), "its int8 code does not build for")]


def _blocks_and_dtypes(func: tirx.PrimFunc) -> tuple[set[str], set[str]]:
    # TVM 0.27's Python API has no TIR statement visitor nor a buffer map: the printed
    # function names every block and gives every parameter's and allocation's dtype.
    text = func.script()
    return (set(re.findall(r'T\.sblock\("([^"]+)"', text)),
            set(re.findall(r'(?:T\.Buffer|alloc_buffer)\(.*?, "(\w+)"\)', text)))


@tvm.transform.module_pass(opt_level=0, name="ApplyDefaultSchedules")
class ApplyDefaultSchedules:
    """See the module docstring. ``rules`` defaults to ``default_rules()``."""

    def __init__(self, rules=None, required: bool = True):
        self.rules = list(rules) if rules is not None else default_rules()
        self.required = required
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
            seen = None  # (blocks, dtypes), printed once and only when a rule has something to avoid
            for rule in self.rules:
                rule_name = type(rule).__name__
                avoid = [a for a in AVOID if a.rule == rule_name]
                if avoid:
                    seen = seen or _blocks_and_dtypes(func)
                    bad = next(((a, b) for a in avoid if (b := a.bad_block(*seen))), None)
                    if bad:
                        failures.append(f"{rule_name}: skipped, {bad[0].why} {bad[1]}")
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
            if sch is None and not self.required:
                continue
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
