"""Summaries of a module: op histogram, parameter count and bytes, FLOPs.

Requires: a Relax module (before or after legalization). Guarantees: counts every
Relax op call in the given functions (``call_tir`` counted under the callee's
name prefix), and estimates FLOPs from static shapes, a multiply-add counting 2:
conv and transposed conv (per group), matmul, pooling (window per output),
reductions (one per input element), inference BatchNorm (two per element) and one
per output element for other computing ops (layout and data movement count 0). A
symbolic dimension counts as 1 and ``symbolic`` is set. Ops already lowered to
``call_tir`` count 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx


@dataclass
class Summary:
    """Op histogram, FLOPs and parameter counts of some functions of a module."""

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


def _shape(ty) -> tuple[list[int], bool]:
    """Static dims of a tensor type (a symbolic dim counts as 1) and whether any was symbolic."""
    if not isinstance(ty, relax.TensorType):
        return [], False  # tuples and other non-tensors: no FLOPs of their own, nothing symbolic
    if ty.shape is None or not hasattr(ty.shape, "values"):
        return [], True
    dims, sym = [], False
    for d in ty.shape.values:
        if isinstance(d, tirx.IntImm):
            dims.append(int(d.value))
        else:
            dims.append(1)
            sym = True
    return dims, sym


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _conv_kernel(call: relax.Call) -> tuple[list[int], bool, str]:
    w, sym = _shape(call.args[1].ty)
    return w, sym, str(call.attrs.kernel_layout)


def op_flops(call: relax.Call) -> tuple[int, bool]:
    """FLOPs of one call, counting a multiply-add as 2."""
    name = call.op.name.removeprefix("relax.")
    out, sym = _shape(call.ty)
    if name in ("nn.conv1d", "nn.conv2d", "nn.conv3d"):
        # Each output element: a dot product over input channels per group x kernel window;
        # the weight's I axis already is the input channels per group.
        w, s2, layout = _conv_kernel(call)
        if not w:
            return 0, True
        window = _prod([w[i] for i, c in enumerate(layout) if c not in "OI"])
        return 2 * _prod(out) * w[layout.index("I")] * window, sym or s2
    if name in ("nn.conv1d_transpose", "nn.conv2d_transpose"):
        # Each input element is scattered to (output channels per group) x kernel window outputs.
        x, s1 = _shape(call.args[0].ty)
        w, s2, layout = _conv_kernel(call)
        if not w or not x:
            return 0, True
        window = _prod([w[i] for i, c in enumerate(layout) if c not in "OI"])
        return 2 * _prod(x) * w[layout.index("O")] * window, sym or s1 or s2
    if name == "matmul":
        a, s2 = _shape(call.args[0].ty)
        k = a[-1] if a else 0
        return 2 * _prod(out) * k, sym or s2
    if name == "nn.batch_norm":  # a tuple; inference is one multiply and one add per element
        x, s1 = _shape(call.args[0].ty)
        return 2 * _prod(x), s1
    if name in _POOLS:
        return _prod(out) * _prod([int(k) for k in call.attrs.pool_size]), sym
    if name in _REDUCTIONS or name.startswith("nn.adaptive_avg_pool"):
        x, s1 = _shape(call.args[0].ty)
        return _prod(x), sym or s1  # every input element is combined once
    if out and name not in _DATA_MOVEMENT:
        return _prod(out), sym  # one operation per output element
    return 0, sym


_POOLS = {"nn.max_pool1d", "nn.max_pool2d", "nn.max_pool3d", "nn.avg_pool1d", "nn.avg_pool2d", "nn.avg_pool3d"}
_REDUCTIONS = {"sum", "mean", "max", "min", "prod", "variance", "std", "argmax", "argmin"}
_DATA_MOVEMENT = {"reshape", "permute_dims", "concat", "split", "strided_slice", "take", "squeeze",
                  "expand_dims", "flatten", "broadcast_to", "astype", "layout_transform", "call_tir",
                  "tuple_get_item", "dynamic_strided_slice", "repeat", "tile", "gather_elements",
                  "gather_nd", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like"}


def summarize(mod: tvm.IRModule, functions: list[str] | None = None, weights=None, weight_keys=None) -> Summary:
    """Op histogram and FLOPs of ``functions`` (default: every Relax function) of ``mod``.

    ``weights`` (a WeightStore) and ``weight_keys`` give the parameter counts of a
    Program's (unbound) module: each distinct key counts once, and so does each small
    tensor constant left inline in the functions.
    """
    summary = Summary()
    names = functions or [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    inline: dict = {}

    def visit(e):
        if isinstance(e, tvm.ir.Constant) and isinstance(e.value, tvm.runtime.Tensor) and len(e.value.shape):
            inline[e.value] = e.value
        elif isinstance(e, relax.Call):
            if isinstance(e.op, tvm.ir.Op):
                op = e.op.name.removeprefix("relax.")
                if op == "call_tir" and isinstance(e.args[0], tvm.ir.GlobalVar):
                    op = "call_tir:" + e.args[0].name_hint.rstrip("0123456789").rstrip("_")
                summary.ops[op] += 1
                f, sym = op_flops(e)
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
        for t in inline.values():
            a = t.numpy()
            summary.params += int(a.size)
            summary.param_bytes += int(a.nbytes)
    return summary
