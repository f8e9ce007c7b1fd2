"""DispatchCutlassConv: FP8 convolutions, their epilogue and the next layer's quantization become
calls of smelt's CUTLASS conv, so that a quantized CNN's activations stay FP8 between layers.

Requires: QuantizeFp8's convolutions (``conv2d`` of a float8_e4m3fn input and a float8_e4m3fn
constant weight into float32, then ``multiply`` by the scales) after ToMixedPrecision (float16)
and ConvertConvLayout (NHWC/OHWI); functions of one dataflow block (epilogue_chains.py).
Guarantees: each chain ``conv2d`` → ``multiply(alpha)`` → ``astype`` float16 [→ ``add(·, bias)``]
[→ ``add(·, residual)``] [→ ``relu``] [→ ``multiply(inv)`` → ``maximum(·, -448)`` →
``minimum(·, 448)`` → ``astype`` float8_e4m3fn], where the conv has one group, dilation 1,
symmetric padding and input and output channels that are multiples of 16, becomes one
``call_dps_packed("smelt_cutlass_conv2d[_residual]", (x, W, bias, [residual], pad_h, pad_w,
stride_h, stride_w, alpha', [beta'], epilogue), [y, workspace])`` with ``y`` float16, or
float8_e4m3fn when the chain ends in the quantization (the next FP8 conv's input, written once).
The scales fold into the call: ``alpha' = alpha * inv``, the bias becomes ``bias * inv`` in
float32, and a residual that is a dequantized FP8 tensor (``astype`` of it times a scale, as
QuantizeFp8 leaves a ResNet block's shortcut) is read as that FP8 tensor with ``beta' = scale *
inv`` (else as float16, ``beta' = inv``). The dequantization then has no user left and dead code
elimination removes it. Other convs stay for the passes after this one, with the reason recorded
for ``--explain``.
Where: in the CUDA backend's pre-legalize passes, before DispatchCublasLt (which would take the
1×1 convs as GEMMs with float16 results), when the target is sm_90 and its ``libs`` names
``cutlass``; the backend links the routine (``backends/cutlass_conv.cu``) into the artifact.
Why: cuDNN's legacy API (DispatchCudnn) has no FP8 convolution, and cuBLASLt's FP8 GEMMs take
no FP8 residual; with float16 results each FP8 layer's input needs a quantize kernel of its own
(ResNet-50 at batch 32: 176 M elements, 527 MB of traffic per batch).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..ir.weights import exact_const
from .dispatch_cudnn import weight_values
from .epilogue_chains import FP8, Chain, ChainRewriter, chain_pass, constant, op_is
from .mutate import static_shape

FUNCTION = "smelt_cutlass_conv2d"  # + "_residual"


def _dequantized(e: relax.Expr, values: dict) -> tuple[relax.Expr, float] | None:
    """(q, scale) when ``e`` is ``astype(q)`` [→ ``astype``] times a scalar constant ``scale``,
    ``q`` a float8_e4m3fn tensor; else None."""
    v = values.get(e)
    if not op_is(v, "relax.multiply"):
        return None
    for t, s in (v.args, v.args[::-1]):
        c = constant(s, values)
        if c is None or c.value.numpy().size != 1:
            continue
        while op_is(values.get(t), "relax.astype"):
            t = values[t].args[0]
            if str(t.ty.dtype) == FP8:
                return t, float(c.value.numpy().reshape(()))
    return None


class _Rewriter(ChainRewriter):
    quantized_outputs = True

    def start(self, value, values):
        if not op_is(value, "relax.nn.conv2d"):
            return None, ""
        x = value.args[0]
        if str(x.ty.dtype) != FP8:
            return None, ""  # not an FP8 conv: DispatchCudnn's or the generated code's
        a = value.attrs
        if str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "OHWI" or str(a.out_layout) != "NHWC":
            return None, f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout}, not NHWC/OHWI/NHWC"
        top, left, bottom, right = (int(v) for v in a.padding)
        if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or (top, left) != (bottom, right):
            return None, f"groups {int(a.groups)}, dilation {[int(d) for d in a.dilation]}, padding " \
                f"{[top, left, bottom, right]}: CUTLASS's FP8 conv takes one group, no dilation, symmetric padding"
        w = weight_values(value.args[1], values)
        if w is None or str(w.dtype) != FP8:
            return None, "the kernel is not an FP8 weight"
        k, _, _, c = w.shape
        if c % 16 or k % 16:
            return None, f"{c} input and {k} output channels; CUTLASS's FP8 conv needs multiples of 16"
        if str(a.out_dtype) != "float32":
            return None, f"out_dtype {a.out_dtype}, not float32"
        return Chain(x, exact_const(w), k, "float32"), ""

    def finish(self, chain):
        if chain.dtype not in ("float16", FP8):
            return f"the result is {chain.dtype}; the FP8 conv writes float16 or float8_e4m3fn"
        if chain.saturated and chain.dtype != FP8:
            return "the result is clipped but not cast to float8_e4m3fn"
        return ""

    def call(self, chain, values, result_ty, sub):
        a = values[chain.members[0]].attrs
        top, left, _, _ = (int(v) for v in a.padding)
        inv = chain.out_scale
        bias = np.zeros(chain.n, np.float32) if chain.bias is None else \
            chain.bias.value.numpy().astype(np.float32).reshape(-1)
        args = [sub(chain.x), chain.w, exact_const(bias * np.float32(inv))]
        beta, residual = None, ""
        if chain.residual is not None:
            deq = _dequantized(chain.residual, values)
            r, scale = deq if deq is not None else (chain.residual, 1.0)
            args.append(sub(r))
            beta, residual = scale * inv, f", residual {r.ty.dtype}"
        args += [relax.prim_value(v) for v in (top, left, *(int(s) for s in a.strides))]
        args += [relax.prim_value(tvm.tirx.FloatImm("float64", chain.alpha * inv))]
        args += [relax.prim_value(tvm.tirx.FloatImm("float64", beta))] if beta is not None else []
        args.append(chain.epilogue())
        func = FUNCTION + ("_residual" if chain.residual is not None else "")
        _, kh, kw, c = static_shape(chain.w)
        what = f"{chain.parts('conv2d')} to CUTLASS in FP8 -> {chain.dtype}{residual}, {kh}x{kw} stride " \
            f"{'x'.join(str(int(s)) for s in a.strides)}, {c}->{chain.n} channels"
        return chain.library_call(func, args, result_ty), what


DispatchCutlassConv = chain_pass("DispatchCutlassConv", _Rewriter, "See the module docstring.")
