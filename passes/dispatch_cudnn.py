"""DispatchCudnn: convolutions and their bias/residual/ReLU epilogue become calls of cuDNN.

Requires: a Relax module whose functions are one dataflow block each (as importers and the
canonicalize phase leave them), convolutions in NHWC/OHWI (ConvertConvLayout) with a known
number of input channels (the batch, height and width may be symbolic: cuDNN reads them per call).
Guarantees: each chain ``conv2d(x, W)`` [→ ``astype``] [→ ``add(·, bias)``]
[→ ``add(·, residual)``] [→ ``relu``] (epilogue_chains.py), where the conv is NHWC/OHWI with
symmetric padding and one group, ``W`` a constant (or a ``permute_dims`` of one, which is
applied here), ``x`` and ``W`` float16, bfloat16 or float32 of one dtype and the chain's result
of that dtype too, ``bias`` a constant of as many elements as output channels, ``residual`` a
computed tensor of the result's shape and dtype, becomes one
``call_dps_packed("smelt_cudnn_conv2d[_residual]", (x, W, bias, [residual], pad_h, pad_w,
stride_h, stride_w, dil_h, dil_w, groups, epilogue), [y, workspace])``; a chain without a bias
gets a zero one (cuDNN's fused call always adds one); a 16-bit 7×7 conv of 3 channels (an RGB
stem) gets a zero fourth one, in x and W, for cuDNN's first-layer kernel (``_channel_pad``).
Products are accumulated in float32; float32 convs stay exact float32 (no TF32). Everything else keeps smelt's generated kernels,
with the reason recorded for ``--explain``: grouped and depthwise convs, asymmetric padding, a
float32 result of 16-bit operands.
Where: in the CUDA backend's pre-legalize passes after ``DispatchCublasLt`` (which takes the
1×1 convs that are plain GEMMs first), when the target's ``libs`` names ``cudnn``; the backend
links the implementation (``backends/cudnn.cc``) into the artifact.
Why: on an H200, smelt's generated implicit-GEMM convs (mma.sync) ran ResNet-50's 3×3 convs at
about 0.55 ms per batch of 32 and its 7×7 stem at 0.21 ms, where cuDNN's Hopper kernels take
0.35 and 0.06 (bench/results/h200_rn50_b32_kernels.json).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..ir.weights import exact_const
from .epilogue_chains import DTYPES, Chain, ChainRewriter, chain_pass, op_is, result_dtype
from .mutate import permutation, static_shape

FUNCTION = "smelt_cudnn_conv2d"  # + "_residual"


def weight_values(e: relax.Expr, values: dict) -> np.ndarray | None:
    """The values of a constant weight, through a ``permute_dims`` of one, else None."""
    e = values.get(e, e)
    if isinstance(e, tvm.ir.Constant):
        return e.value.numpy()
    if op_is(e, "relax.permute_dims") and isinstance(e.args[0], tvm.ir.Constant):
        return np.ascontiguousarray(e.args[0].value.numpy().transpose(permutation(e)))
    return None


def _channel_pad(c: int, kernel: tuple[int, int], dtype: str) -> int:
    """Zero input channels to add for cuDNN: a 16-bit 7x7 conv of 3 channels (an RGB stem) gets
    one, as cuDNN's Hopper first-layer kernel reads 4; without it cuDNN pads x and W itself in two
    extra kernels per call. On an H200 (float16, batch 32), ResNet-50 ran 1.026 -> 1.011 ms with
    the pad, while MobileNetV3-Large's 3x3 stem, padded alike, ran 0.904 -> 1.210 ms (cuDNN then
    left its own path for a slower one): other convs are left as they are."""
    return 4 - c if dtype in ("float16", "bfloat16") and c < 4 and kernel == (7, 7) else 0


class _Rewriter(ChainRewriter):
    def start(self, value, values):
        if not op_is(value, "relax.nn.conv2d"):
            return None, ""
        a = value.attrs
        x = value.args[0]
        if str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "OHWI" or str(a.out_layout) != "NHWC":
            return None, f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout}, not NHWC/OHWI/NHWC"
        if int(a.groups) != 1:
            return None, f"a conv of {int(a.groups)} groups keeps smelt's kernels"
        top, left, bottom, right = (int(v) for v in a.padding)
        if (top, left) != (bottom, right):
            return None, f"padding {[top, left, bottom, right]} is not symmetric, which cuDNN requires"
        shape = getattr(x.ty, "shape", None)
        if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != 4 \
                or not isinstance(shape.values[3], tvm.tirx.IntImm):
            return None, "x is not NHWC with a known number of channels"
        w = weight_values(value.args[1], values)
        if w is None:
            return None, "the kernel is computed, not a weight"
        xd, out = str(x.ty.dtype), str(a.out_dtype)
        if xd not in DTYPES or str(w.dtype) != xd:
            return None, f"operands are {xd} and {w.dtype}; cuDNN is called for one of {', '.join(DTYPES)}"
        if (dtype := result_dtype(out, xd)) is None:
            return None, f"out_dtype {out}"
        return Chain(x, exact_const(w), int(w.shape[0]), dtype), ""

    def finish(self, chain):
        xd = str(chain.x.ty.dtype)
        if chain.dtype != xd:
            return f"the result is {chain.dtype} of {xd} operands; cuDNN writes the operands' dtype"
        return ""

    def call(self, chain, values, result_ty, sub):
        conv = values[chain.members[0]]
        a = conv.attrs
        top, left, _, _ = (int(v) for v in a.padding)
        bias = chain.bias if chain.bias is not None else exact_const(np.zeros(chain.n, chain.dtype))
        x, w = sub(chain.x), chain.w
        _, kh, kw, c = static_shape(w)
        if (extra := _channel_pad(c, (kh, kw), chain.dtype)):
            # zero channels in x and W add nothing; the pad fuses into the kernel that computes x
            x = relax.op.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, extra])
            w = exact_const(np.pad(w.value.numpy(), [(0, 0)] * 3 + [(0, extra)]))
        args = [x, w, bias] + ([sub(chain.residual)] if chain.residual is not None else [])
        args += [relax.prim_value(v) for v in (top, left, *(int(s) for s in a.strides), *(int(d) for d in a.dilation),
                                               int(a.groups))] + [chain.epilogue()]
        func = FUNCTION + ("_residual" if chain.residual is not None else "")
        what = f"{chain.parts('conv2d')} to cuDNN, {kh}x{kw} stride {'x'.join(str(int(s)) for s in a.strides)}, " \
            f"{c}->{chain.n} channels" + (f" (padded to {c + extra})" if extra else "")
        return chain.library_call(func, args, result_ty), what


DispatchCudnn = chain_pass("DispatchCudnn", _Rewriter, "See the module docstring.")
