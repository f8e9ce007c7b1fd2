"""HoistQuantizeOverMaxPool: an FP8 quantization of a max pool's result moves to the pool's input,
and the pool takes the maximum of the FP8 values, reading and writing one byte per element.

Requires: QuantizeFp8's quantizations (``multiply`` by a positive scalar constant → ``clip`` to
±448, or ``maximum`` at -448 → ``minimum`` at 448 → ``astype`` float8_e4m3fn), in any float
precision; Relax before LegalizeOps, the layouts final.
Guarantees: where such a quantization reads ``max_pool2d(y)``, is the pool's only user, and ``y``
is an FP8 conv's result (through epilogue ops: scale, cast, bias, ReLU), it reads ``y`` instead,
and one kernel (``max_pool2d_e4m3``: each element widened to y's dtype, TOPI's max pool with the
same attributes, rounded to E4M3; where ``y`` is a ReLU's result, the same pool over the E4M3
bits as int8, 16 values per vector) pools its result. The result is
bit-identical: scaling by a positive number, clipping and rounding are all monotone (never
decreasing), a monotone map commutes with a maximum, widening and narrowing E4M3 values are
exact, and the pool's padding is never the maximum of a window that holds one input element.
The dead float16 pool is removed.
Where: the CUDA backend's pre-legalize passes, after ConvertConvLayout and before
DispatchCutlassConv, whose conv computing ``y`` then takes the quantization into its epilogue
and writes FP8. In ResNet-50 the stem's output, 32 × 64 × 112² elements at batch 32, was written
in float16 and read back by the pool for its quantization. The kernel is one TE function, not
``astype`` → ``max_pool2d``: FuseOps would not fuse a cast into the pool (an out-elementwise
fusable op takes only what follows it), and the cast's kernel would write float16 again.
"""

from __future__ import annotations

import tvm
from tvm import relax, topi

from .epilogue_chains import op_is
from .explain import Explainer
from .mutate import mutate_functions
from .quantize_fp8 import FP8, e4m3_clip


EPILOGUE_OPS = ("relax.multiply", "relax.astype", "relax.add", "relax.nn.relu")


def max_pool2d_e4m3(x: tvm.te.Tensor, attrs, dtype: str, nonnegative: bool = False) -> tvm.te.Tensor:
    """TOPI's max pool (``attrs``: relax's ``max_pool2d`` attributes) of E4M3 ``x``, computed in
    ``dtype`` and rounded back to E4M3 (exact: the maximum is one of the inputs). With
    ``nonnegative`` (``x`` holds no value below zero: a ReLU's result), on ``x``'s bits as int8
    instead: E4M3 is sign and magnitude, so its non-negative values (0x00 to 0x7E) order as
    their bits do, and -0 (0x80, -128) is the smallest, as is the padding (int8's minimum, the
    same -0). The kernel then moves 16 values per vector (SmallReduction), where a cast to E4M3
    limits it to 4."""
    def pool(t):
        return topi.nn.pool2d(t, kernel=attrs.pool_size, stride=attrs.strides, dilation=attrs.dilation,
                              padding=attrs.padding, pool_type="max", ceil_mode=attrs.ceil_mode, layout=attrs.layout)

    if not nonnegative:
        return topi.cast(pool(topi.cast(x, dtype)), FP8)
    bits = tvm.te.compute(x.shape, lambda *i: tvm.tirx.reinterpret("int8", x(*i)), name="bits")
    pooled = pool(bits)
    return tvm.te.compute(pooled.shape, lambda *i: tvm.tirx.reinterpret(FP8, pooled(*i)), name="e4m3")


def _scalar(call: relax.Call) -> float | None:
    """The scalar constant ``call``'s second operand is, else None."""
    c = call.args[1]
    if not isinstance(c, tvm.ir.Constant) or c.value.numpy().size != 1:
        return None
    return float(c.value.numpy().reshape(()))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain
        self.uses: dict = {}
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, self._count)

    def _count(self, e) -> None:
        if isinstance(e, relax.Var):
            self.uses[e] = self.uses.get(e, 0) + 1

    def _bound(self, e: relax.Expr, op: str) -> relax.Call | None:
        """The value bound to ``e`` when it is a call of ``op`` whose result only its user reads."""
        v = self.lookup_binding(e) if isinstance(e, relax.Var) and self.uses.get(e, 0) == 1 else None
        return v if op_is(v, op) else None

    def _clip(self, e: relax.Expr):
        """(what is clipped, a function emitting the same clipping of another tensor) when ``e`` is
        clipped to E4M3's range (``e4m3_clip``), each step its input's only user; else (None, None)."""
        if (match := e4m3_clip(e, self._bound)) is None:
            return None, None
        bb = self.builder_

        def clip(t):
            for call, i in reversed(match[1]):
                t = bb.emit(relax.Call(call.op, [t if j == i else a for j, a in enumerate(call.args)], call.attrs))
            return t
        return match[0], clip

    def _from_fp8_conv(self, y: relax.Expr) -> bool:
        """Whether ``y`` is an FP8 conv's result, through the epilogue ops a library conv takes
        (``multiply``, ``astype``, ``add``, ``relu``), each its input's only user, and the pool
        ``y``'s (else the conv could not take the quantization into its epilogue)."""
        v = self.lookup_binding(y) if isinstance(y, relax.Var) and self.uses.get(y, 0) == 1 else None
        while v is not None and any(op_is(v, op) for op in EPILOGUE_OPS):
            nxt = v.args[0]
            if op_is(v, "relax.add") and not isinstance(nxt, relax.Var):
                nxt = v.args[1]
            v = self.lookup_binding(nxt) if isinstance(nxt, relax.Var) and self.uses.get(nxt, 0) == 1 else None
        return op_is(v, "relax.nn.conv2d") and str(v.args[0].ty.dtype) == FP8

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not op_is(call, "relax.astype") or str(call.attrs.dtype) != FP8:
            return call
        clipped, clip = self._clip(call.args[0])
        scaled = self._bound(clipped, "relax.multiply") if clipped is not None else None
        scale = _scalar(scaled) if scaled is not None else None
        pool = self._bound(scaled.args[0], "relax.nn.max_pool2d") if scale is not None and scale > 0 else None
        if pool is None:
            return call
        y = pool.args[0]
        a = pool.attrs
        if not self._from_fp8_conv(y):
            self.explain.skip(pool, "its input is no FP8 conv's result: quantized apart, it would cost a kernel")
            return call
        if str(a.out_layout) != str(a.layout):
            self.explain.skip(pool, f"layouts {a.layout} -> {a.out_layout}: TOPI's pool keeps its layout")
            return call
        bb = self.builder_
        q = bb.emit(relax.op.astype(clip(bb.emit(relax.op.multiply(y, scaled.args[1]))), FP8))
        self.explain.fired(pool, f"the quantization to {FP8} runs before the max pool, which reads FP8")
        nonnegative = isinstance(y, relax.Var) and op_is(self.lookup_binding(y), "relax.nn.relu")
        return bb.call_te(max_pool2d_e4m3, q, a, str(y.ty.dtype), nonnegative, primfunc_name_hint="max_pool2d_e4m3")


@tvm.transform.module_pass(opt_level=0, name="HoistQuantizeOverMaxPool")
class HoistQuantizeOverMaxPool:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("HoistQuantizeOverMaxPool")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fired = self.explain.num_fired
        mod = mutate_functions(_Rewriter(mod, self.explain), mod)
        # the float16 pools and their quantizations: dead, and read by nothing a chain may extend over
        return relax.transform.DeadCodeElimination()(mod) if self.explain.num_fired > fired else mod
