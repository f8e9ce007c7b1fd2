"""DispatchCublasLt: weight GEMMs and their bias/residual/ReLU epilogue become calls of cuBLASLt.

Requires: a Relax module whose functions are one dataflow block each (as importers and the
canonicalize phase leave them), static shapes.
Guarantees: each chain ``matmul(x, W)`` (or a 1×1, stride-1, unpadded NHWC/OHWI ``conv2d``,
the same GEMM with x's pixels as its rows) [→ ``astype``] [→ ``add(·, bias)``]
[→ ``add(·, residual)``] [→ ``relu``], with ``reshape``s anywhere after the matmul that keep N
last, where ``W`` is a 2-D constant [K, N] (or ``permute_dims`` of a constant [N, K]; for the
conv, its [N, 1, 1, K] weight, a ``permute_dims`` of a [N, K, 1, 1] constant), ``x`` and ``W``
are float16, bfloat16 or float32 of one dtype, ``bias`` is a constant of N elements (or a
``permute_dims`` of one), ``residual`` a computed
tensor of the result's shape and dtype, and every intermediate result has this chain as its
only user, becomes one ``call_dps_packed("smelt_cublaslt_matmul[_bias][_residual]",
(x, W, [bias], [residual], trans_b, epilogue), [D, workspace])`` with D the chain's result
(same shape and dtype). Products are accumulated in float32, as the
matmul's ``out_dtype="float32"`` asks for after ToMixedPrecision; float32 GEMMs stay exact
float32 (no TF32). Anything else (batched matmuls with two activations, such as attention's)
is left to the generated kernels, with the reason recorded for ``--explain``.
Where: in the CUDA backend's pre-legalize passes after ``ConvertConvLayout`` (convs are NHWC
then) and before ``SplitKMatmul``, when the target's ``libs`` names ``cublaslt``; the backend
links the implementation (``backends/cublaslt.cc``) into the artifact.
Why: on an H200 cuBLASLt's Hopper kernels (wgmma, TMA) run BERT-base's GEMMs at about
530 TFLOP/s; smelt's generated tensor-core kernels (mma.sync) reach 190-230. A 1×1 conv is
the same GEMM (ResNet-50's 1×1 convs carry about half its FLOPs, with its bias, residual and ReLU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
from tvm import relax

from ..ir.weights import exact_const
from .explain import Explainer
from .mutate import map_vars, static_shape

FUNCTION = "smelt_cublaslt_matmul"  # + "_bias" and/or "_residual"
EPILOGUE_NONE, EPILOGUE_RELU = 0, 1
# cuBLASLt's recommended workspace on Hopper. Relax plans it like any tensor; each GEMM's is
# dead when the next one runs, so one buffer serves them all.
WORKSPACE_BYTES = 32 << 20
DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class _Chain:
    x: relax.Expr
    w: relax.Expr
    trans_b: bool
    n: int
    dtype: str  # of D so far
    bias: relax.Expr | None = None
    residual: relax.Expr | None = None
    relu: bool = False
    members: list = field(default_factory=list)  # bound variables, first the matmul's


def _op(e, name: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def _start(value: relax.Expr, values: dict) -> tuple[_Chain | None, str]:
    """The chain a ``matmul`` starts, or None and why not (``values``: the block's bindings)."""
    x, w = value.args
    w = values.get(w, w)
    xs, ys = static_shape(x), static_shape(value)
    xd, out = str(x.ty.dtype) if isinstance(x.ty, relax.TensorType) else "?", str(value.attrs.out_dtype)
    trans_b = False
    if _op(w, "relax.permute_dims") and isinstance(w.args[0], tvm.ir.Constant) and \
            len(static_shape(w.args[0]) or []) == 2 and (w.attrs.axes is None or [int(a) for a in w.attrs.axes] == [1, 0]):
        w, trans_b = w.args[0], True
    if not isinstance(w, tvm.ir.Constant):
        return None, "B is computed, not a weight (a batched matmul of two activations)"
    ws = static_shape(w) or []
    if len(ws) != 2:
        return None, f"the weight has shape {ws}, not rank 2"
    if xs is None or ys is None or len(xs) < 2:
        return None, "x is not a static tensor of rank 2 or more"
    if xd not in DTYPES or str(w.ty.dtype) != xd:
        return None, f"operands are {xd} and {w.ty.dtype}; cuBLASLt is called for one of {', '.join(DTYPES)}"
    if out not in ("", "void", "None", xd, "float32"):
        return None, f"out_dtype {out}"
    k, n = (ws[1], ws[0]) if trans_b else ws
    if xs[-1] != k or math.prod(xs) == 0 or n == 0:
        return None, f"x {xs} does not match the weight's K={k}"
    return _Chain(x, w, trans_b, int(n), out if out not in ("", "void", "None") else xd), ""


def _constant(e: relax.Expr, values: dict) -> tvm.ir.Constant | None:
    """The constant ``e`` is, or holds in the same memory order: a ``permute_dims`` (as
    ConvertConvLayout puts on weights and biases) that moves only axes of extent 1."""
    e = values.get(e, e)
    if isinstance(e, tvm.ir.Constant):
        return e
    if _op(e, "relax.permute_dims") and isinstance(e.args[0], tvm.ir.Constant):
        shape = static_shape(e.args[0]) or []
        axes = [int(a) for a in e.attrs.axes] if e.attrs.axes is not None else list(range(len(shape)))[::-1]
        moved = [a for a in axes if shape[a] != 1]
        if moved == sorted(moved):
            return e.args[0]
    return None


def _start_conv(value: relax.Call, values: dict) -> tuple[_Chain | None, str]:
    """The chain a 1×1 ``conv2d`` starts: in NHWC it is ``x @ W.T`` with W [N, K]."""
    a = value.attrs
    x = value.args[0]
    if str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "OHWI" or str(a.out_layout) != "NHWC":
        return None, f"layout {a.data_layout}/{a.kernel_layout}, not NHWC/OHWI"
    ws = static_shape(value.args[1]) or []
    if len(ws) != 4 or ws[1:3] != [1, 1]:
        return None, f"a {'x'.join(map(str, ws[1:3])) or '?'} kernel is no plain GEMM"
    if int(a.groups) != 1 or [int(v) for v in a.strides] != [1, 1] or any(int(v) for v in a.padding) \
            or [int(v) for v in a.dilation] != [1, 1]:
        return None, "a strided, padded, dilated or grouped 1x1 conv is no plain GEMM"
    w = _constant(value.args[1], values)
    if w is None:
        return None, "the kernel is computed, not a weight"
    xd, out = str(x.ty.dtype), str(a.out_dtype)
    if xd not in DTYPES or str(w.ty.dtype) != xd:
        return None, f"operands are {xd} and {w.ty.dtype}; cuBLASLt is called for one of {', '.join(DTYPES)}"
    if out not in ("", "void", "None", xd, "float32"):
        return None, f"out_dtype {out}"
    n, k = ws[0], ws[3]
    w2 = exact_const(w.value.numpy().reshape(n, k))
    return _Chain(x, w2, True, int(n), out if out not in ("", "void", "None") else xd), ""


def _extend(chain: _Chain, value: relax.Expr, values: dict) -> bool:
    """Take ``value`` (the only user of the chain's result) into the chain when cuBLASLt's
    epilogue computes it; in that case update ``chain``."""
    untouched = chain.bias is None and chain.residual is None and not chain.relu
    if _op(value, "relax.astype") and untouched and chain.dtype == "float32" \
            and str(value.attrs.dtype) in ("float16", "bfloat16"):
        chain.dtype = str(value.attrs.dtype)
        return True
    if _op(value, "relax.reshape"):
        return (static_shape(value) or [None])[-1] == chain.n
    if _op(value, "relax.add") and chain.residual is None and not chain.relu:
        a, b = value.args
        bias_arg, bias = next(((e, c) for e in (b, a) if (c := _constant(e, values)) is not None), (None, None))
        bs = static_shape(bias_arg) if bias is not None else None  # as broadcast, after any permute_dims
        if chain.bias is None and bs and str(bias.ty.dtype) == chain.dtype and math.prod(bs) == chain.n \
                and bs[-1] == chain.n and len(bs) <= len(static_shape(value) or []):
            chain.bias = bias
            return True
        other = b if a.same_as(chain.members[-1]) else a
        if bias is None and not other.same_as(chain.members[-1]) and static_shape(other) == static_shape(value) \
                and str(other.ty.dtype) == chain.dtype:
            chain.residual = other
            return True
    if _op(value, "relax.nn.relu") and not chain.relu:
        chain.relu = True
        return True
    return False


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


class _Rewriter:
    def __init__(self, explain: Explainer):
        self.explain = explain

    def chains(self, block: relax.DataflowBlock, values: dict, output: relax.Expr) -> dict:
        """{last variable of a chain: chain} (``values``: the block's bindings)."""
        uses = _users(block, output)
        user_of = {}
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, lambda e, v=b.var: user_of.setdefault(e, v)
                                            if isinstance(e, relax.Var) else None)
        out, claimed = {}, set()
        for b in block.bindings:
            if _op(b.value, "relax.matmul"):
                chain, why = _start(b.value, values)
            elif _op(b.value, "relax.nn.conv2d"):
                chain, why = _start_conv(b.value, values)
            else:
                continue
            if chain is None:
                self.explain.skip(b.value, why)
                continue
            chain.members.append(b.var)
            last = b.var
            # An add of two matmuls is the first one's residual, not both chains'.
            while uses.get(last, 0) == 1 and user_of.get(last) in values and user_of[last] not in claimed \
                    and isinstance(last, relax.DataflowVar) and _extend(chain, values[user_of[last]], values):
                last = user_of[last]
                chain.members.append(last)
            claimed.update(chain.members)
            out[last] = chain
        return out

    def call(self, chain: _Chain, result_ty: relax.TensorType, sub) -> relax.Expr:
        args = [sub(chain.x), chain.w] + ([chain.bias] if chain.bias is not None else []) + \
            ([sub(chain.residual)] if chain.residual is not None else [])
        args += [relax.prim_value(int(chain.trans_b)), relax.prim_value(EPILOGUE_RELU if chain.relu else EPILOGUE_NONE)]
        out_ty = [relax.TensorType(result_ty.shape, chain.dtype), relax.TensorType([WORKSPACE_BYTES], "uint8")]
        func = FUNCTION + ("_bias" if chain.bias is not None else "") + ("_residual" if chain.residual is not None else "")
        return relax.call_dps_packed(func, relax.Tuple(args), out_ty)

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
                        outs = bb.emit(self.call(chain, b.var.ty, sub))
                        value = relax.TupleGetItem(outs, 0)
                        op = values[chain.members[0]].op.name.rpartition(".")[2]
                        parts = [op] + (["bias"] if chain.bias is not None else []) + \
                            (["residual"] if chain.residual is not None else []) + (["relu"] if chain.relu else [])
                        self.explain.fired(values[chain.members[0]], f"{' + '.join(parts)} to cuBLASLt, "
                                                    f"K={static_shape(chain.x)[-1]} N={chain.n}"
                                                    f"{' (weight transposed)' if chain.trans_b else ''}")
                    else:
                        value = sub(b.value)
                    env[b.var] = bb.emit_output(value) if not isinstance(b.var, relax.DataflowVar) else bb.emit(value)
                result = sub(body.body)
            bb.emit_func_output(result)
        new = bb.get()["f"]
        # The builder names the function "f"; the original's attributes (its symbol too) return.
        return new.without_attr("global_symbol").with_attrs(func.attrs) if func.attrs is not None else \
            new.without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="DispatchCublasLt")
class DispatchCublasLt:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("DispatchCublasLt")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(self.explain)
        funcs = {}
        for gv, func in mod.functions_items():
            funcs[gv] = rewriter.function(func) if isinstance(func, relax.Function) else func
        return tvm.IRModule(funcs, attrs=mod.attrs)
