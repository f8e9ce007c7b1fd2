"""SplitKMatmul: a matmul with few output tiles and a long K becomes S partial matmuls and a sum.

Requires: a Relax module; fp16/bf16 ``matmul(x, w, out_dtype="float32")`` with a 2-D
``w`` [K, N] and static shapes (x [..., M, K]).
Guarantees: where the output has fewer than ``min_tiles`` tiles of ``tile`` x ``tile``
(less than half a large GPU) and K is at least ``min_k``, ``matmul(x, w)`` becomes ``sum(P, axis=0)`` with
``P[s, i, j] = sum_k x[i, s, k] * w[s, k, j]`` over S slices of K (x and w reshaped,
free views); S is the largest of 8, 4, 2 that keeps ``S * tiles <= 4 * min_tiles``
and slices of at least ``min_slice`` elements that are multiples of 32. The result is the
same up to the order of float32 additions. The sum is a reduction, so the matmul's
epilogue (bias, activation, residual, cast) fuses into it.
Why: a GPU schedule gives each output tile one thread block. BERT-base at batch 1 has
128 x 768 outputs for its 3072-long FFN down-projection: 24 blocks of 64 x 64 on an
H200's 132 SMs, each running all 96 steps of K. Split in 8, 192 blocks run 12 steps each.
Where: the CUDA backend's pre-legalize passes (the GPU's size sets ``min_tiles``).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te

from .explain import Explainer
from .mutate import OUT_EWISE_FUSABLE, mutate_functions, static_shape


def _partial_products(x, w):
    """P[s, i, j] = sum_k x[i, s, k] * w[s, k, j], accumulated in float32 (block ``matmul``)."""
    _, _, kc = x.shape
    k = te.reduce_axis((0, kc), "k")
    return te.compute((w.shape[0], x.shape[0], w.shape[2]),
                      lambda s, i, j: te.sum(x[i, s, k].astype("float32") * w[s, k, j].astype("float32"), axis=k),
                      name="matmul")


def _sum_slices(parts):
    s = te.reduce_axis((0, parts.shape[0]), "s")
    return te.compute(parts.shape[1:], lambda i, j: te.sum(parts[s, i, j], axis=s), name="sum_split_k")


@relax.expr_functor.mutator
class _Splitter(relax.PyExprMutator):
    def __init__(self, mod, opts: SplitKMatmul):
        super().__init__(mod)
        self.opts = opts

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul" or \
                str(call.attrs.out_dtype) != "float32":
            return call
        x, w = call.args
        xs, ws, ys = static_shape(x), static_shape(w), static_shape(call)
        if xs is None or ws is None or ys is None or len(ws) != 2 or len(xs) < 2 or \
                str(x.ty.dtype) not in ("float16", "bfloat16") or str(w.ty.dtype) != str(x.ty.dtype):
            return call
        opts, rows, (k, n) = self.opts, math.prod(xs[:-1]), ws
        tiles = -(-rows // opts.tile) * -(-n // opts.tile)
        if tiles >= opts.min_tiles or k < opts.min_k:
            return call
        split = next((s for s in (8, 4, 2) if s * tiles <= 4 * opts.min_tiles and k % (32 * s) == 0
                      and k // s >= opts.min_slice), None)
        if split is None:
            opts.explain.skip(call, f"{tiles} tiles, but K={k} does not split into slices of {opts.min_slice}+")
            return call
        bb = self.builder_
        x3 = bb.emit(relax.op.reshape(x, [rows, split, k // split]))
        w3 = bb.emit(relax.op.reshape(w, [split, k // split, n]))
        parts = bb.emit(bb.call_te(_partial_products, x3, w3, primfunc_name_hint="matmul_split_k"))
        opts.explain.fired(call, f"{tiles} output tiles: K={k} split in {split}")
        # Marked like a matmul (TVM's kOutEWiseFusable) so that FuseOps fuses the epilogue into the
        # sum; as a plain reduction (kCommReduce) it would keep the epilogue in a kernel of its own.
        total = bb.call_te(_sum_slices, parts, primfunc_name_hint="sum_split_k",
                           primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})
        # The call itself is the binding's value: a variable alias in between would keep FuseOps apart.
        return total if ys == [rows, n] else relax.op.reshape(bb.emit(total), ys)


@tvm.transform.module_pass(opt_level=0, name="SplitKMatmul")
class SplitKMatmul:
    """See the module docstring."""

    def __init__(self, min_tiles: int = 64, tile: int = 64, min_k: int = 2048, min_slice: int = 256,
                 explain: Explainer | None = None):
        self.min_tiles, self.tile, self.min_k, self.min_slice = min_tiles, tile, min_k, min_slice
        self.explain = explain or Explainer("SplitKMatmul")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return mutate_functions(_Splitter(mod, self), mod)
