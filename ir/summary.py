"""Summaries of a module: op histogram, parameter count and bytes, FLOPs.

Requires: a Relax module (before or after legalization). Guarantees: counts every
Relax op call in the given functions (``call_tir`` counted under the callee's
name prefix), and estimates FLOPs of conv, matmul and elementwise ops from their
static shapes; a symbolic dimension counts as 1 and ``symbolic`` is set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx


@dataclass
class Summary:
    ops: Counter = field(default_factory=Counter)
    flops: int = 0
    params: int = 0
    param_bytes: int = 0
    symbolic: bool = False  # FLOPs counted with symbolic dims as 1

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    def to_json(self) -> dict:
        return {"ops": dict(self.ops.most_common()), "num_ops": self.num_ops, "flops": self.flops,
                "params": self.params, "param_bytes": self.param_bytes, "flops_per_unit_batch": self.symbolic}


def _shape(sinfo) -> tuple[list[int], bool]:
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None or not hasattr(sinfo.shape, "values"):
        return [], True
    dims, sym = [], False
    for d in sinfo.shape.values:
        if isinstance(d, tirx.IntImm):
            dims.append(int(d.value))
        else:
            dims.append(1)
            sym = True
    return dims, sym


def _flops(call: relax.Call) -> tuple[int, bool]:
    name = call.op.name
    out, sym = _shape(call.ty)
    if name == "relax.nn.conv2d" or name == "relax.nn.conv1d" or name == "relax.nn.conv3d":
        w, s2 = _shape(call.args[1].ty)
        groups = int(call.attrs.groups)
        kernel_layout = str(call.attrs.kernel_layout)
        i_axis = kernel_layout.index("I")
        cin_per_group = w[i_axis] if w else 0
        spatial = int(np.prod([w[i] for i, c in enumerate(kernel_layout) if c not in "OI"])) if w else 0
        del groups  # the weight's I axis already is input channels per group
        return 2 * int(np.prod(out)) * cin_per_group * spatial, sym or s2
    if name in ("relax.matmul", "relax.linear"):
        a, s2 = _shape(call.args[0].ty)
        k = a[-1] if a else 0
        return 2 * int(np.prod(out)) * k, sym or s2
    if out and name.removeprefix("relax.") not in _DATA_MOVEMENT:
        return int(np.prod(out)), sym  # one operation per output element
    return 0, sym


_DATA_MOVEMENT = {"reshape", "permute_dims", "concat", "split", "strided_slice", "take", "squeeze",
                  "expand_dims", "flatten", "broadcast_to", "astype", "layout_transform", "call_tir",
                  "tuple_get_item", "dynamic_strided_slice", "repeat", "tile", "gather_elements",
                  "gather_nd", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like"}


def summarize(mod: tvm.IRModule, functions: list[str] | None = None, weights=None, weight_keys=None) -> Summary:
    """Op histogram and FLOPs of ``functions`` (default: every Relax function) of ``mod``.

    ``weights`` (a WeightStore) and ``weight_keys`` give the parameter counts; each
    distinct key counts once.
    """
    summary = Summary()
    names = functions or [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]

    def visit(e):
        if isinstance(e, relax.Call):
            if isinstance(e.op, tvm.ir.Op):
                op = e.op.name.removeprefix("relax.")
                if op == "call_tir" and isinstance(e.args[0], tvm.ir.GlobalVar):
                    op = "call_tir:" + e.args[0].name_hint.rstrip("0123456789").rstrip("_")
                summary.ops[op] += 1
                f, sym = _flops(e)
                summary.flops += f
                summary.symbolic |= sym
            elif isinstance(e.op, tvm.ir.GlobalVar):
                summary.ops["call:" + e.op.name_hint] += 1

    for name in names:
        relax.analysis.post_order_visit(mod[name].body, visit)
    if weights is not None and weight_keys is not None:
        for k in set(weight_keys):
            a = weights[k]
            summary.params += int(a.size)
            summary.param_bytes += int(a.nbytes)
    return summary
