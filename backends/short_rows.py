"""ShortRows: layout changes into a short innermost axis (an image's NCHW -> NHWC) a row per thread.

Requires: a GPU target; a PrimFunc that, after inlining its producers and consumers, is one
spatial block with static extents whose innermost output axis holds 2, 4 or 8 elements of at
most 16 bytes in all (a network input's channels, padded to 4 for cuDNN's stem),
or up to 64 bytes in 16-byte pieces of 2 to 16 elements (an FP8 space-to-depth stem's input,
64 channels), and a number of rows with a divisor of 64 to 256 (the threads of a block,
``dividing_threads``). Declines the rest (``apply``: None).
Guarantees: the same function. A thread computes one innermost row in registers, reading its
elements where they are (from NCHW: one element of each channel plane, neighbouring threads at
neighbouring addresses), and stores it with one vector store per 16 bytes.
A whole row per thread, not a 16-byte piece: the row's index arithmetic (divisions, bounds) is
computed once, where a space-to-depth stem's 4 pieces each computed it.
Rows split evenly over blocks of ``dividing_threads``. The kernel is index arithmetic
more than memory: each element's address and bounds depend on its pixel's coordinates, which
take divisions and remainders of a thread's flat index, computed once a row. The FP8 space-to-depth stem's kernel (ResNet-50 at batch 32: 26 MB, 64 elements a thread
from 12 planes) compiled to about 2100 instructions a thread while each element's load was a
branch (37.8 us on an H100, its issue rate alone 29 us); with the loads clamped into the image
and masked (RewriteConvSpaceToDepth) its code is 2.2x smaller. A thread block per row of pixels
(no division of the thread's index) then saved nothing more: the same code size.
Why not dlight: its ``Fallback`` gives a thread one element, a warp 8 pixels of 4 channels:
32-byte pieces of three planes per load, 2-byte stores. On an H200, ResNet-50's
input at batch 32 (fp32 NCHW -> fp16 NHWC padded to 4 channels) took 22 us, where its 32 MB
take 7 us at the memory's speed.
Where: ``apply_default_schedules.default_rules()``, after ``VectorizedElementwise`` (kernels
reading and writing one layout), before ``Fallback``.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from ..passes.mutate import static_ints
from .rule_blocks import VECTOR_BYTES, dividing_threads, one_spatial_block


# Rows of up to this many bytes are taken, in 16-byte pieces: the input of a space-to-depth stem
# (RewriteConvSpaceToDepth) in FP8 has rows of 64 channels.
LONGEST_ROW_BYTES = 64


class ShortRows(GPUScheduleRule):
    """See the module docstring."""

    def __init__(self, threads: int = 256):
        self.threads = threads

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """The schedule of ``func`` for ``target``, or None where the rule does not apply."""
        if (opened := one_spatial_block(self, func, target)) is None:
            return None
        sch, block = opened
        out = sch.get(block).writes[0].source
        shape = static_ints(out.shape)
        if shape is None:
            return None
        bits = tvm.DataType(str(out.dtype)).bits
        piece = shape[-1] if shape[-1] * bits <= VECTOR_BYTES * 8 else VECTOR_BYTES * 8 // bits
        if piece not in (2, 4, 8, 16) or shape[-1] % piece or shape[-1] * bits > LONGEST_ROW_BYTES * 8:
            return None
        *outer, row = sch.get_loops(block)
        if (threads := dividing_threads(math.prod(shape[:-1]), self.threads)) is None:
            return None
        bx, tx = sch.split(sch.fuse(*outer), [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.unroll(row)
        store = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(store, tx)
        pieces, lanes = sch.split(sch.get_loops(store)[-1], [None, piece])
        sch.unroll(pieces)
        sch.vectorize(lanes)
        return sch
