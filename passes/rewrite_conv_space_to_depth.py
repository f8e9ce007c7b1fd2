"""RewriteConvSpaceToDepth: a strided convolution over few input channels (a CNN's stem, ResNet's
7×7/2 over RGB) becomes a space-to-depth rearrangement of its input and a stride-1 convolution
over ``s²`` times the channels, padded to a multiple of 16.

Requires: Relax before ConvertConvLayout, a ``conv2d`` in NCHW/OIHW whose weight is a constant.
Guarantees: each conv of one group, dilation 1, equal strides ``s >= 2`` in both axes, ``C < 16``
input channels and static shapes becomes ``space_to_depth`` (one TE function: the input,
zero-padded as the conv pads it, as [N, C·s² rounded up to a multiple of 16 (``c``), ...],
each s × s block of pixels in the channels) → ``conv2d`` of stride 1, no padding and a t × t
kernel, t = ⌈k/s⌉ (the weight rearranged alike, its extra taps and channels zero), with the
same output. When t·c <= 64, the kernel's columns move into the channels as well: t
column-shifted copies side by side and a t × 1 kernel over t·c channels (ResNet's stem: 4×1
over 64, one FP8 K-block per tap, where 4×4 over 16 filled a quarter of each; 3.4× the bytes
of the input in FP8). The numbers are the same products summed in another order. Convs whose
bottom or right padding would have to be negative stay.
Where: the quantize phase, before QuantizeFp8, with ``Fp8(convs="all", stem=True)``, which is
what ``stem=None`` (the default) resolves to on Hopper with CUTLASS (the CUDA backend's
``fp8_stem``): FP8 convs need multiples of 16 channels, so a 3-channel stem stays in float16;
rewritten, it is one more FP8 conv, whose epilogue writes the max pool's input in FP8
(HoistQuantizeOverMaxPool, which pools E4M3 bits after a ReLU). Measured on an H100, ResNet-50
at batch 32 (the kernels in graph order, ``bench/gpu_kernels.py --sequence``): the float16 stem
took 10.8 us for the input's layout, 61.3 on cuDNN and 30.8 for the pool with its quantization;
the FP8 stem 19.6 for this rearranging (37.8 while each load under its bounds test was a branch,
see ``space_to_depth``), 38.5 for the 4×1 conv (a persistent CUTLASS kernel) and 13.6 for the
pool: ResNet-50 0.725 ms against 0.757 with the float16 stem, 0.691 on an H200. Before the
persistent convs and the pool over bits it was slower (0.868 ms in all against 0.843); a 4×4
conv over 16 channels, filling a quarter of each K-block, slower still (1.114 ms). The 4 copies
packed in 48 channels rather than 64: the rearranging took 17.4 us against 19.5, but CUTLASS's
conv, whose 64-channel loads then run past the tensor's channels, 73.6 against 37.6 (ResNet-50
0.704 ms against 0.667).

Space-to-depth is the stem of MLPerf's ResNet-50 submissions on TPUs and GPUs for the same
reason: 3 channels fill no tensor-core K-block.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from ..ir.weights import exact_const
from .explain import Explainer
from .mutate import mutator_pass, static_ints

CHANNEL_MULTIPLE = 16  # what FP8 convs (CUTLASS's TMA rows of 16 bytes) need
# Channels up to one K-block of FP8 (CUTLASS's 64-byte K-blocks): a conv's K-block holds one
# kernel tap's channels, so 16 channels would fill a quarter of it.
K_BLOCK = 64


def clamp(index, extent: int):
    """``index`` clamped into ``[0, extent)``."""
    return tvm.tirx.max(tvm.tirx.min(index, extent - 1), 0)


def space_to_depth(x: te.Tensor, s: int, pad: tuple[int, int], depth: int, cols: int, size: tuple[int, int]):
    """NCHW ``x`` [N, C, H, W], padded with zeros by ``pad`` (top, left) and beyond its end, as
    [N, cols·depth, *size]: channel ``b·depth + c·s² + i·s + j`` at (y, z) holds
    ``x[c, s·y + i, s·(z + b) + j]`` (zero for c >= C): ``cols`` column-shifted copies of the
    space-to-depth tensor side by side. One TE function rather than pad, reshape, transpose and
    concat ops: fused, those made each element a chain of selects over index arithmetic."""
    n, c, h, w = (int(d) for d in x.shape)
    top, left = pad

    def value(ni, k, y, z):
        b, ch, i, j = k // depth, k % depth // (s * s), k % (s * s) // s, k % s
        row, col = s * y + i - top, s * (z + b) + j - left
        inside = tvm.tirx.all(row >= 0, row < h, col >= 0, col < w)
        # A load clamped into the image, times 0 or 1, rather than a load under a condition: the
        # GPU's code is then straight-line (each guarded load was a branch with its own index
        # arithmetic: 2100 instructions a thread for ResNet-50's stem). Not a select: TVM's
        # simplifier assumes its condition inside the loaded value and drops the clamps. (A
        # non-finite edge pixel makes the padding it stands in for NaN, not 0: every window over
        # that padding covers the pixel too, so its output is not finite either way.) The
        # channels' condition stays one: unrolled, it is a constant.
        value = x[ni, ch, clamp(row, h), clamp(col, w)] * inside.astype(x.dtype)
        return tvm.tirx.if_then_else(ch < c, value, tvm.tirx.const(0, x.dtype))

    return te.compute((n, cols * depth, *size), value, name="space_to_depth")


def space_to_depth_weight(w: np.ndarray, s: int, channels: int) -> np.ndarray:
    """OIHW ``w`` [O, C, k, k] as the weight of the stride-1 conv over the space-to-depth input:
    [O, channels, ⌈k/s⌉, ⌈k/s⌉], channel ``c·s² + i·s + j`` holding tap ``(a·s + i, b·s + j)``
    at position ``(a, b)``; missing taps and channels are zero."""
    o, c, kh, kw = w.shape
    t = -(-max(kh, kw) // s)
    padded = np.zeros((o, c, t * s, t * s), w.dtype)
    padded[:, :, :kh, :kw] = w
    # [O, C, a, i, b, j] -> [O, C, i, j, a, b] -> [O, C·s², a, b]
    out = padded.reshape(o, c, t, s, t, s).transpose(0, 1, 3, 5, 2, 4).reshape(o, c * s * s, t, t)
    return np.pad(out, [(0, 0), (0, channels - c * s * s), (0, 0), (0, 0)])


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def _why_not(self, call: relax.Call) -> str:
        """Why ``call`` (a conv2d) is not rewritten; "" if it is."""
        a = call.attrs
        x, w = call.args
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            return f"layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW is rewritten"
        if not isinstance(w, tvm.ir.Constant) or static_ints(x.ty.shape.values) is None:
            return "the weight is not a constant or the input's shape is not static"
        strides = [int(v) for v in a.strides]
        if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or strides[0] != strides[1] or strides[0] < 2:
            return f"groups {int(a.groups)}, dilation {[int(d) for d in a.dilation]}, strides {strides}: " \
                "only a conv of one group, no dilation and equal strides of 2 or more"
        return ""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        c = int(call.args[1].ty.shape.values[1])
        if c >= CHANNEL_MULTIPLE:
            return call  # channels enough: nothing to gain
        why = self._why_not(call)
        if why:
            self.explain.skip(call, why)
            return call
        a = call.attrs
        x, w = call.args
        n, _, h, wd = static_ints(x.ty.shape.values)
        s = int(a.strides[0])
        weight = w.value.numpy()
        kh, kw = weight.shape[2:]
        t = -(-max(kh, kw) // s)
        pt, pl, _, _ = (int(v) for v in a.padding)
        oh, ow = (int(v) for v in call.ty.shape.values[2:])
        # rows the new conv reads: s * (oh - 1 + t), of which the image and its top padding are h + pt
        pb, pr = s * (oh - 1 + t) - h - pt, s * (ow - 1 + t) - wd - pl
        if pb < 0 or pr < 0:
            self.explain.skip(call, f"the rearranged input would need negative padding ({pb}, {pr})")
            return call
        depth = -(-c * s * s // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
        kernel = space_to_depth_weight(weight, s, depth)
        cols = t if t > 1 and depth * t <= K_BLOCK else 1  # the kernel's columns that become channels
        if cols > 1:  # [O, depth, a, b] -> [O, b, depth, a] -> [O, t·depth, t, 1]
            kernel = kernel.transpose(0, 3, 1, 2).reshape(kernel.shape[0], t * depth, t, 1)
        self.explain.fired(call, f"{kh}x{kw} stride {s} over {c} channels as {t}x{t // cols} stride 1 over "
                                 f"{depth * cols}")
        deep = self.builder_.call_te(space_to_depth, x, s, (pt, pl), depth, cols, (oh - 1 + t, ow - 1 + t // cols),
                                     primfunc_name_hint="space_to_depth")
        return relax.op.nn.conv2d(deep, exact_const(kernel), strides=1, padding=0, dilation=1, groups=1,
                                  data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW", out_dtype=a.out_dtype)


RewriteConvSpaceToDepth = mutator_pass("RewriteConvSpaceToDepth", _Rewriter, "See the module docstring.")
