"""DispatchCublasLt: weight GEMMs and their bias/residual/ReLU epilogue become calls of cuBLASLt.

Requires: a Relax module whose functions are one dataflow block each (as importers and the
canonicalize phase leave them); a GEMM's K and N static (its leading dimensions, an ONNX model's
batch, may be symbolic: the routine reads M per call and plans each M it meets once).
Guarantees: each chain ``matmul(x, W)`` (or a 1×1, stride-1, unpadded NHWC/OHWI ``conv2d``,
the same GEMM with x's pixels as its rows) [→ ``astype``] [→ ``add(·, bias)``]
[→ ``add(·, residual)``] [→ ``relu``], with ``reshape``s anywhere after the matmul that keep N
last, where ``W`` is a 2-D constant [K, N] (or ``permute_dims`` of a constant [N, K]; for the
conv, its [N, 1, 1, K] weight, a ``permute_dims`` of a [N, K, 1, 1] constant), ``x`` and ``W``
are float16, bfloat16 or float32 of one dtype or both float8_e4m3fn (QuantizeFp8's; then W is
[N, K], K a multiple of 16 and N of 8, and a ``multiply`` by a float32 scalar right after the
matmul, the operands' scales, becomes the GEMM's alpha), ``bias`` is a constant of N elements (or a
``permute_dims`` of one), ``residual`` a computed
tensor of the result's shape and dtype, and every intermediate result has this chain as its
only user, becomes one ``call_dps_packed("smelt_cublaslt_matmul[_bias][_residual]",
(x, W, [bias], [residual], trans_b, epilogue, alpha), [D, workspace])`` with D the chain's result
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

import tvm
from tvm import relax

from ..ir.weights import exact_const
from .epilogue_chains import DTYPES, FP8, Chain, ChainRewriter, chain_pass, constant, last_dim, op_is, result_dtype
from .mutate import permutation, static_shape

FUNCTION = "smelt_cublaslt_matmul"  # + "_bias" and/or "_residual"


def _start(value: relax.Expr, values: dict) -> tuple[Chain | None, str]:
    """The chain a ``matmul`` starts, or None and why not (``values``: the block's bindings)."""
    x, w = value.args
    w = values.get(w, w)
    xd, out = str(x.ty.dtype) if isinstance(x.ty, relax.TensorType) else "?", str(value.attrs.out_dtype)
    trans_b = False
    if op_is(w, "relax.permute_dims") and isinstance(w.args[0], tvm.ir.Constant) and permutation(w) == [1, 0]:
        w, trans_b = w.args[0], True
    if not isinstance(w, tvm.ir.Constant):
        return None, "B is computed, not a weight (a batched matmul of two activations)"
    ws = static_shape(w) or []
    if len(ws) != 2:
        return None, f"the weight has shape {ws}, not rank 2"
    dims = getattr(x.ty, "shape", None)
    if not isinstance(dims, relax.ShapeExpr) or len(dims.values) < 2:
        return None, "x is not a tensor of known rank 2 or more"
    if why := _operands(xd, str(w.ty.dtype)):
        return None, why
    if (dtype := result_dtype(out, xd)) is None:
        return None, f"out_dtype {out}"
    k, n = (ws[1], ws[0]) if trans_b else ws
    if last_dim(x) != k or k == 0 or n == 0 or 0 in (static_shape(x) or []):
        return None, f"x {list(dims.values)} does not match the weight's K={k}"
    if xd == FP8 and (why := _fp8_shape(k, n, trans_b)):
        return None, why
    return Chain(x, w, int(n), dtype, trans_b), ""


def _operands(xd: str, wd: str) -> str:
    """Why cuBLASLt is not called for operands of dtypes ``xd`` and ``wd``, else ""."""
    if wd == xd and (xd in DTYPES or xd == FP8):
        return ""
    return f"operands are {xd} and {wd}; cuBLASLt is called for one of {', '.join(DTYPES)} or both {FP8}"


def _fp8_shape(k: int, n: int, trans_b: bool) -> str:
    """Why cuBLASLt's FP8 kernels do not take a GEMM of this K and N, else ""."""
    if not trans_b:
        return "an FP8 weight stored [K, N]; cuBLASLt's FP8 kernels read it as [N, K]"
    if k % 16 or n % 8:
        return f"FP8 with K={k}, N={n}: cuBLASLt's FP8 kernels need K a multiple of 16 and N of 8"


def _start_conv(value: relax.Call, values: dict) -> tuple[Chain | None, str]:
    """The chain a 1×1 ``conv2d`` starts: in NHWC it is ``x @ W.T`` with W [N, K]."""
    a = value.attrs
    x = value.args[0]
    if str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "OHWI" or str(a.out_layout) != "NHWC":
        return None, f"layout {a.data_layout}/{a.kernel_layout}, not NHWC/OHWI"
    ws = static_shape(value.args[1]) or []
    if last_dim(x) is None:
        return None, "x has no known number of channels"
    if len(ws) != 4 or ws[1:3] != [1, 1]:
        return None, f"a {'x'.join(map(str, ws[1:3])) or '?'} kernel is no plain GEMM"
    if int(a.groups) != 1 or [int(v) for v in a.strides] != [1, 1] or any(int(v) for v in a.padding) \
            or [int(v) for v in a.dilation] != [1, 1]:
        return None, "a strided, padded, dilated or grouped 1x1 conv is no plain GEMM"
    w = constant(value.args[1], values)
    if w is None:
        return None, "the kernel is computed, not a weight"
    xd, out = str(x.ty.dtype), str(a.out_dtype)
    if why := _operands(xd, str(w.ty.dtype)):
        return None, why
    if (dtype := result_dtype(out, xd)) is None:
        return None, f"out_dtype {out}"
    n, k = ws[0], ws[3]
    if xd == FP8 and (why := _fp8_shape(k, n, True)):
        return None, why
    return Chain(x, exact_const(w.value.numpy().reshape(n, k)), int(n), dtype, True), ""


class _Rewriter(ChainRewriter):
    def start(self, value, values):
        if op_is(value, "relax.matmul"):
            return _start(value, values)
        if op_is(value, "relax.nn.conv2d"):
            return _start_conv(value, values)
        return None, ""

    def call(self, chain, values, result_ty, sub):
        args = [sub(chain.x), chain.w] + ([chain.bias] if chain.bias is not None else []) + \
            ([sub(chain.residual)] if chain.residual is not None else [])
        args += [relax.prim_value(int(chain.trans_b)), chain.epilogue(), chain.scale()]
        func = FUNCTION + ("_bias" if chain.bias is not None else "") + ("_residual" if chain.residual is not None else "")
        op = values[chain.members[0]].op.name.rpartition(".")[2]
        what = f"{chain.parts(op)} to cuBLASLt, K={last_dim(chain.x)} N={chain.n}" \
            f"{' (weight transposed)' if chain.trans_b else ''}{f' in FP8, alpha {chain.alpha:.4g}' if str(chain.x.ty.dtype) == FP8 else ''}"
        return chain.library_call(func, args, result_ty), what


DispatchCublasLt = chain_pass("DispatchCublasLt", _Rewriter, "See the module docstring.")
