"""Epilogue chains: the machinery the passes that hand ops to vendor libraries share.

A chain is one op that a library computes (a weight GEMM, a convolution) followed by what the
library's epilogue computes with it: [``multiply`` by a scalar constant, the operands' scales
of an FP8 op] [``astype`` float32 → 16-bit] [``add(·, bias)``]
[``add(·, residual)``] [``relu``], with shape-preserving ``reshape``s that keep the last axis,
each intermediate result used only by the next. ``ChainRewriter`` finds the chains of a
function (one dataflow block; leading dimensions may be symbolic), asks its subclass which ops
start one and what call replaces it, and rebuilds the function with the calls; every op it
leaves gets a reason for ``--explain``. Used by DispatchCublasLt and DispatchCudnn, which are the passes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax

from .explain import Explainer
from .mutate import map_vars, moves_only_unit_axes, static_shape
from .quantize_fp8 import E4M3_MAX, FP8  # QuantizeFp8's operands, which the libraries multiply into float32

EPILOGUE_NONE, EPILOGUE_RELU = 0, 1
DTYPES = ("float16", "bfloat16", "float32")  # what cuBLASLt and cuDNN are called for
# cuBLASLt's recommended workspace on Hopper, which cuDNN's convolutions fit in too. Relax plans
# it like any tensor; each call's is dead when the next one runs, so one buffer serves them all.
WORKSPACE_BYTES = 32 << 20


@dataclass
class Chain:
    x: relax.Expr
    w: relax.Expr
    n: int  # the result's last axis (GEMM columns, output channels)
    dtype: str  # of the result so far
    trans_b: bool = False
    bias: relax.Expr | None = None
    residual: relax.Expr | None = None
    relu: bool = False
    alpha: float = 1.0  # scales the product (FP8 operands' scales), before bias and residual
    out_scale: float = 1.0  # scales the result after the epilogue (the next FP8 op's inverse scale)
    saturated: bool = False  # the scaled result is clipped to E4M3's range (its cast saturates alike)
    members: list = field(default_factory=list)  # bound variables, first the op's

    def parts(self, op: str) -> str:
        """``op + bias + residual + relu``, what the chain computes."""
        return " + ".join([op] + (["bias"] if self.bias is not None else []) +
                          (["residual"] if self.residual is not None else []) + (["relu"] if self.relu else []))

    def epilogue(self) -> relax.Expr:
        return relax.prim_value(EPILOGUE_RELU if self.relu else EPILOGUE_NONE)

    def scale(self) -> relax.Expr:
        return relax.prim_value(tvm.tirx.FloatImm("float64", self.alpha))

    def library_call(self, func: str, args: list, result_ty: relax.TensorType) -> relax.Expr:
        """``call_dps_packed(func, args)`` writing the chain's result (``result_ty``'s shape, the
        chain's dtype) and a workspace."""
        out_ty = [relax.TensorType(result_ty.shape, self.dtype), relax.TensorType([WORKSPACE_BYTES], "uint8")]
        return relax.call_dps_packed(func, relax.Tuple(args), out_ty)


def result_dtype(out_dtype, operands: str) -> str | None:
    """What an op with ``out_dtype`` (unset: the operands' dtype) writes, when a library computes
    it: the operands' dtype or float32 (accumulated); None for anything else."""
    out = str(out_dtype)
    if out in ("", "void", "None"):
        return operands if operands in DTYPES else None
    return out if out in (operands, "float32") else None


def op_is(e, name: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def constant(e: relax.Expr, values: dict) -> tvm.ir.Constant | None:
    """The constant ``e`` is, or holds in the same memory order: a ``permute_dims`` (as
    ConvertConvLayout puts on weights and biases) that moves only axes of extent 1."""
    e = values.get(e, e)
    if isinstance(e, tvm.ir.Constant):
        return e
    if op_is(e, "relax.permute_dims") and isinstance(e.args[0], tvm.ir.Constant) and moves_only_unit_axes(e):
        return e.args[0]
    return None


def extend(chain: Chain, value: relax.Expr, values: dict, quantized_outputs: bool = False) -> bool:
    """Take ``value`` (the only user of the chain's result) into the chain when a library's
    epilogue computes it; in that case update ``chain``. With ``quantized_outputs`` (a library
    that writes FP8), an FP8 op's chain takes the quantization of its 16-bit result too:
    ``multiply`` by a positive scalar, ``maximum``/``minimum`` at E4M3's ±448, ``astype`` E4M3."""
    untouched = chain.bias is None and chain.residual is None and not chain.relu
    if quantized_outputs and str(chain.x.ty.dtype) == FP8 and chain.dtype in ("float16", "bfloat16"):
        if op_is(value, "relax.multiply") and chain.out_scale == 1.0 and not chain.saturated \
                and (scale := _scalar(value, chain.members[-1], values, chain.dtype)) is not None and scale > 0:
            chain.out_scale = scale
            return True
        bound = -E4M3_MAX if op_is(value, "relax.maximum") else E4M3_MAX if op_is(value, "relax.minimum") else None
        if bound is not None and _scalar(value, chain.members[-1], values, chain.dtype) == bound:
            chain.saturated = True
            return True
        if op_is(value, "relax.astype") and str(value.attrs.dtype) == FP8:
            chain.dtype = FP8
            return True
        if chain.out_scale != 1.0 or chain.saturated:
            return False
    if op_is(value, "relax.multiply") and untouched and chain.dtype == "float32" and chain.alpha == 1.0 \
            and str(chain.x.ty.dtype) == FP8 and (alpha := _scalar(value, chain.members[-1], values)) is not None:
        chain.alpha = alpha
        return True
    if op_is(value, "relax.astype") and untouched and chain.dtype == "float32" \
            and str(value.attrs.dtype) in ("float16", "bfloat16"):
        chain.dtype = str(value.attrs.dtype)
        return True
    if op_is(value, "relax.reshape"):
        return last_dim(value) == chain.n
    if op_is(value, "relax.add") and chain.residual is None and not chain.relu:
        a, b = value.args
        bias_arg, bias = next(((e, c) for e in (b, a) if (c := constant(e, values)) is not None), (None, None))
        bs = static_shape(bias_arg) if bias is not None else None  # as broadcast, after any permute_dims
        # cuBLASLt's FP8 GEMMs add a bias of float32 results in bfloat16: not taken
        fp8_f32 = str(chain.x.ty.dtype) == FP8 and chain.dtype == "float32"
        if chain.bias is None and bs and not fp8_f32 and str(bias.ty.dtype) == chain.dtype and math.prod(bs) == chain.n \
                and bs[-1] == chain.n and len(bs) <= value.ty.ndim:
            chain.bias = bias
            return True
        other = b if a.same_as(chain.members[-1]) else a
        if bias is None and not other.same_as(chain.members[-1]) and _same_shape(other, value) \
                and str(other.ty.dtype) == chain.dtype:
            chain.residual = other
            return True
    if op_is(value, "relax.nn.relu") and not chain.relu:
        chain.relu = True
        return True
    return False


def _scalar(value: relax.Call, operand: relax.Expr, values: dict, dtype: str = "float32") -> float | None:
    """The ``dtype`` constant of one element that ``value`` combines ``operand`` with, else None."""
    a, b = value.args
    other = b if a.same_as(operand) else a
    c = constant(other, values)
    if c is None or str(c.ty.dtype) != dtype or c.value.numpy().size != 1:
        return None
    return float(c.value.numpy().reshape(()))


def last_dim(e: relax.Expr) -> int | None:
    """A tensor's last dimension when it is static (the others may be symbolic), else None."""
    shape = getattr(e.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not shape.values or not isinstance(shape.values[-1], tvm.tirx.IntImm):
        return None
    return int(shape.values[-1])


def _same_shape(a: relax.Expr, b: relax.Expr) -> bool:
    """Whether two tensors have one shape, symbolic dimensions (a dynamic batch) included."""
    sa, sb = (getattr(e.ty, "shape", None) for e in (a, b))
    return isinstance(sa, relax.ShapeExpr) and isinstance(sb, relax.ShapeExpr) and tvm_ffi.structural_equal(sa, sb)


def _users(block: relax.DataflowBlock, output: relax.Expr) -> dict:
    """{variable: number of uses} in ``block`` and the function's result."""
    counts: dict = {}

    def count(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    for b in block.bindings:
        relax.analysis.post_order_visit(b.value, count)
    relax.analysis.post_order_visit(output, count)
    return counts


class ChainRewriter(ABC):
    """Replaces each chain a subclass starts with the call it builds (see the module docstring)."""

    quantized_outputs = False  # whether the library writes FP8 results (see ``extend``)

    def __init__(self, explain: Explainer):
        self.explain = explain

    @abstractmethod
    def start(self, value: relax.Call, values: dict) -> tuple[Chain | None, str]:
        """The chain ``value`` starts, or None and why not; None and "" for ops not the library's."""

    def finish(self, chain: Chain) -> str:
        """Why the library cannot compute the whole chain (then it is left), else ""."""
        return ""

    @abstractmethod
    def call(self, chain: Chain, values: dict, result_ty: relax.TensorType, sub) -> tuple[relax.Expr, str]:
        """The call computing ``chain`` (``sub`` renames its operands) and what ``--explain`` says of it."""

    def chains(self, block: relax.DataflowBlock, values: dict, output: relax.Expr) -> dict:
        """{last variable of a chain: chain} (``values``: the block's bindings)."""
        uses = _users(block, output)
        user_of = {}
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, lambda e, v=b.var: user_of.setdefault(e, v)
                                            if isinstance(e, relax.Var) else None)
        out, claimed = {}, set()
        for b in block.bindings:
            if not isinstance(b.value, relax.Call):
                continue
            chain, why = self.start(b.value, values)
            if chain is None:
                if why:
                    self.explain.skip(b.value, why)
                continue
            chain.members.append(b.var)
            last = b.var
            # An add of two chains' results is the first one's residual, not both chains'.
            while uses.get(last, 0) == 1 and user_of.get(last) in values and user_of[last] not in claimed \
                    and isinstance(last, relax.DataflowVar) \
                    and extend(chain, values[user_of[last]], values, self.quantized_outputs):
                last = user_of[last]
                chain.members.append(last)
            if why := self.finish(chain):
                self.explain.skip(b.value, why)
                continue
            claimed.update(chain.members)
            out[last] = chain
        return out

    def function(self, func: relax.Function) -> relax.Function:
        body = func.body
        if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1 or \
                not isinstance(body.blocks[0], relax.DataflowBlock):
            self.explain.skip(func, "the function is not one dataflow block")
            return func
        block = body.blocks[0]
        values = {b.var: b.value for b in block.bindings}
        chains = self.chains(block, values, body.body)
        if not chains:
            return func
        absorbed = {v for c in chains.values() for v in c.members[:-1]}
        env: dict = {}

        def sub(e):
            return map_vars(e, lambda v: env.get(v, v))

        bb = relax.BlockBuilder()
        attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else None
        with bb.function("f", list(func.params), attrs=attrs, pure=True):
            with bb.dataflow():
                for b in block.bindings:
                    if b.var in absorbed:
                        continue
                    if b.var in chains:
                        chain = chains[b.var]
                        call, what = self.call(chain, values, b.var.ty, sub)
                        value = relax.TupleGetItem(bb.emit(call), 0)
                        self.explain.fired(values[chain.members[0]], what)
                    else:
                        value = sub(b.value)
                    env[b.var] = bb.emit_output(value) if not isinstance(b.var, relax.DataflowVar) else bb.emit(value)
                result = sub(body.body)
            bb.emit_func_output(result)
        new = bb.get()["f"]
        # The builder names the function "f"; the original's attributes (its symbol too) return.
        return new.without_attr("global_symbol").with_attrs(func.attrs) if func.attrs is not None else \
            new.without_attr("global_symbol")

    def module(self, mod: tvm.IRModule) -> tvm.IRModule:
        funcs = {gv: self.function(f) if isinstance(f, relax.Function) else f for gv, f in mod.functions_items()}
        return tvm.IRModule(funcs, attrs=mod.attrs)


def chain_pass(name: str, rewriter_cls: type[ChainRewriter], doc: str):
    """A module pass named ``name`` running ``rewriter_cls(explainer)`` over every Relax function;
    the instance keeps its ``Explainer`` as ``.explain`` for ``--explain``."""

    class _Pass:
        __doc__ = doc

        def __init__(self, explain: Explainer | None = None):
            self.explain = explain or Explainer(name)

        def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            return rewriter_cls(self.explain).module(mod)

    _Pass.__name__ = _Pass.__qualname__ = name
    return tvm.transform.module_pass(opt_level=0, name=name)(_Pass)
