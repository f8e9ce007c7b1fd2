"""FenceExpandingBroadcasts: keep a broadcast that expands a matmul's or conv's result out of its kernel.

Requires: a Relax module after ``LegalizeOps`` and ``AnnotateTIROpPattern`` (every op a
``call_tir`` whose PrimFunc carries ``op_pattern``), before ``FuseOps``.
Guarantees: where an elementwise/broadcast ``call_tir`` takes an operand that a matmul or
convolution (TVM's kOutEWiseFusable) produced, through elementwise ops of that same shape,
and its output is larger than that operand, the call is pointed at a copy of its PrimFunc
marked injective (``<name>_fenced``); nothing else changes, and the numbers are the same.
``FuseOps`` fuses a kOutEWiseFusable op only with broadcast-or-simpler consumers, so the
reduction and its own-shaped epilogue stay one kernel and the expanding op starts the next.
Why: TVM's ``FuseOps`` otherwise fuses it. MobileNetV3's squeeze-excitation computes
``x * hardsigmoid(conv1x1(pool(x)))``: fused, the 1x1 conv ([N, 1, 1, C]) sits under the
[N, H, W, C] loop of the multiply, no GEMM schedule takes the kernel (the cache-write stage
cannot hold an output larger than itself) and the fallback recomputes the conv per pixel: on
an H200 at batch 32 one such kernel took 0.41 ms, a quarter of the model.
Where: the fuse phase, between ``AnnotateTIROpPattern`` and ``FuseOps`` (every target).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from .explain import Explainer
from .mutate import BROADCAST, INJECTIVE, OUT_EWISE_FUSABLE, static_shape


def _elements(e: relax.Expr) -> int | None:
    shape = static_shape(e)
    return None if shape is None else math.prod(shape)


@tvm.transform.module_pass(opt_level=0, name="FenceExpandingBroadcasts")
class FenceExpandingBroadcasts:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("FenceExpandingBroadcasts")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fenced: dict[str, tvm.ir.GlobalVar] = {}
        bb = relax.BlockBuilder(mod)
        call_tir = tvm.ir.Op.get("relax.call_tir")

        def pattern(call) -> int | None:
            if not isinstance(call, relax.Call) or call.op != call_tir:
                return None
            func = mod[call.args[0]]
            attr = func.attrs.get("op_pattern") if func.attrs is not None else None
            return int(attr) if attr is not None else None

        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            # variables holding a matmul/conv result, possibly through same-shape elementwise ops
            reduced: set[relax.Var] = set()
            rewrites: dict[relax.Var, relax.Call] = {}
            for block in func.body.blocks:
                for binding in block.bindings:
                    value, kind = binding.value, pattern(binding.value)
                    if kind == OUT_EWISE_FUSABLE:
                        reduced.add(binding.var)
                    if kind is None or kind > BROADCAST:
                        continue
                    out = _elements(binding.var)
                    args = list(_call_args(value))
                    small = [a for a in args if a in reduced and _elements(a) not in (None, out)]
                    if not small:
                        if any(a in reduced for a in args):
                            reduced.add(binding.var)
                        continue
                    name = value.args[0].name_hint
                    if name not in fenced:
                        fenced[name] = bb.add_func(mod[value.args[0]].with_attr("op_pattern", INJECTIVE),
                                                   f"{name}_fenced")
                    rewrites[binding.var] = relax.Call(value.op, [fenced[name], *value.args[1:]], value.attrs,
                                                       value.ty_args)
                    self.explain.fired(value, f"{name}: an operand of {_elements(small[0])} elements "
                                              f"from a matmul/conv is expanded to {out}")
            if rewrites:
                bb.update_func(gv, _replace_values(func, rewrites))
        return bb.get()


def _call_args(call: relax.Call):
    """The tensor arguments of a ``call_tir``."""
    args = call.args[1]
    return args.fields if isinstance(args, relax.Tuple) else [args]


def _replace_values(func: relax.Function, rewrites: dict) -> relax.Function:
    blocks = []
    for block in func.body.blocks:
        bindings = [relax.VarBinding(b.var, rewrites[b.var]) if b.var in rewrites else b for b in block.bindings]
        blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(bindings))
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
