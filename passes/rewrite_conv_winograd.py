"""RewriteConvWinograd: 3x3 stride-1 convolutions become Winograd F(2x2, 3x3) (Lavin & Gray).

Requires: Relax before ``LegalizeOps``, convolutions in NHWC/HWIO (``ConvertConvLayout``)
with constant weights (possibly behind a ``permute_dims``).
Guarantees: each float32 ``conv2d`` with a 3x3 kernel, stride 1, pad 1, no dilation, one
group, a static shape and at least 16 input and output channels becomes three kernels: the
input transform (``winograd_input``, opaque: 4x4 tiles of the input, overlapping by two, to
``V[16, tiles, C]``), a batched ``matmul`` with the transformed weights (``U[16, C, K]``,
computed here, once) and the output transform (``winograd_output``, injective: the bias,
residual and activation after it fuse into it). Its blocks carry ``winograd_tile``, which
``cpu_schedule.WinogradTransform`` schedules. Numbers change by rounding only (transform
coefficients 0, +-1 and +-1/2; relative error below 1e-6 against the direct conv). Other
convolutions stay, each with its reason recorded for ``--explain``.
Where: fuse phase, before ``LegalizeOps``, in the CPU backend's ``prelegalize_passes``
after ``ConvertConvLayout``.
Why: 2.25 times fewer products. The 3x3 convs of ResNet-18 ran at the CPU's FMA peak and
took 1.1 ms each at 56x56x64 to 7x7x512 (2 Zen 4 cores); the three kernels together take
0.5-0.6 ms.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from .explain import Explainer
from .mutate import INJECTIVE, OPAQUE, mutator_pass, static_shape

# Y = A^T [(G g G^T) * (B^T d B)] A per 2x2 output tile.
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], "float64")
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], "float64")
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], "float64")
MIN_CHANNELS = 16  # below, the transforms cost more than the products they save

# TVM's own Winograd (topi ``conv2d_winograd_nhwc``) is not used: in TVM 0.27 the variant
# with pre-transformed weights raises "LEGACY-FLOW triggered", and the other is one PrimFunc
# of four reductions (weight transform at run time, te.sum transforms) that only dlight's
# generic Reduction rule takes: 1415 ms at 56x56x64 on 2 Zen 4 cores against 0.5 ms here.


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    _conv = tvm.ir.Op.get("relax.nn.conv2d")
    _permute = tvm.ir.Op.get("relax.permute_dims")

    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._conv)):
            return call
        weight, why = self._weight(call)
        if weight is None:
            self.explain.skip(call, why)
            return call
        x = call.args[0]
        self.explain.fired(call, f"3x3 conv {static_shape(x)} x {list(weight.shape[1:])} as Winograd F(2x2, 3x3)")
        v = self.builder_.emit_te(winograd_input, x, primfunc_name_hint="winograd_input",
                                  primfunc_attrs={"op_pattern": OPAQUE})  # nothing fuses into it
        m = self.builder_.emit(relax.op.matmul(v, relax.const(weight)))
        # Returned, not emitted: emitted, the conv's own binding would become a var-to-var
        # alias of it, which FuseOps treats as opaque, and the epilogue stayed a kernel of its own.
        return self.builder_.call_te(winograd_output, m, *static_shape(x)[:3], primfunc_name_hint="winograd_output",
                                     primfunc_attrs={"op_pattern": INJECTIVE})

    def _weight(self, call):
        """The transformed weights ``U[16, C, K]`` (numpy) for a conv this rewrite takes, else (None, why)."""
        a = call.attrs
        if (a.data_layout, a.kernel_layout, str(a.out_layout)) != ("NHWC", "HWIO", "NHWC"):
            return None, f"layout {a.data_layout}/{a.kernel_layout}: only NHWC/HWIO is rewritten"
        x, w = call.args
        kernel = static_shape(w)
        if kernel is None or kernel[:2] != [3, 3]:
            return None, f"kernel {kernel and kernel[:2]}: only 3x3 is rewritten"
        strides, dilation = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        padding, groups = [int(v) for v in a.padding], int(a.groups)
        if strides != [1, 1] or dilation != [1, 1] or padding != [1, 1, 1, 1] or groups != 1:
            return None, (f"strides {strides}, dilation {dilation}, padding {padding}, groups {groups}: "
                          "only stride 1, pad 1, no dilation, one group is rewritten")
        dtypes = {str(x.ty.dtype), str(a.out_dtype)} - {"", "void", "None"}  # unset: the input's
        if dtypes != {"float32"} or static_shape(x) is None:
            return None, f"input {x.ty}: only float32 with a static shape is rewritten"
        if min(kernel[2:]) < MIN_CHANNELS:
            return None, f"{kernel[2]} -> {kernel[3]} channels: below {MIN_CHANNELS} the transforms cost more than they save"
        while isinstance(w, relax.Var) and self.lookup_binding(w) is not None:
            w = self.lookup_binding(w)
        permuted, axes = False, None
        if isinstance(w, relax.Call) and w.op.same_as(self._permute) and isinstance(w.args[0], tvm.ir.Constant):
            permuted, axes = True, ([int(v) for v in w.attrs.axes] if w.attrs.axes is not None else None)
            w = w.args[0]
        if not isinstance(w, tvm.ir.Constant):
            return None, "weights are not a constant: the transform is computed at compile time"
        g = np.transpose(w.value.numpy(), axes) if permuted else w.value.numpy()
        u = np.einsum("ai,ijck,bj->abck", WINOGRAD_G, g.astype("float64"), WINOGRAD_G)
        return u.reshape(16, *g.shape[2:]).astype("float32"), ""


RewriteConvWinograd = mutator_pass("RewriteConvWinograd", _Rewriter, "See the module docstring.")


def _lincomb(terms):
    """sum(c * e) over the nonzero coefficients, +-1 without a multiplication."""
    out = None
    for c, e in terms:
        if c:
            t = e if c == 1 else -e if c == -1 else e * tirx.const(float(c), "float32")
            out = t if out is None else out + t
    return out if out is not None else tirx.const(0.0, "float32")


def _select(index, exprs):
    """``exprs[index]``: folds to one expression once the schedule unrolls ``index``."""
    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == k, exprs[k], out)
    return out


def winograd_input(x: te.Tensor) -> te.Tensor:
    """``V[16, tiles, C]``: ``B^T d B`` of each 4x4 input tile ``d`` (zero outside the input)."""
    n, h, w, c = (int(d) for d in x.shape)
    nh, nw = (h + 1) // 2, (w + 1) // 2

    def tile(ab, p, ch):
        b, ph, pw = p // (nh * nw), p % (nh * nw) // nw, p % nw

        def d(i, j):
            r, s = ph * 2 - 1 + i, pw * 2 - 1 + j
            return tirx.if_then_else(tirx.all(r >= 0, r < h, s >= 0, s < w), x[b, r, s, ch], tirx.const(0.0, "float32"))
        return _select(ab, [_lincomb([(WINOGRAD_BT[a, i] * WINOGRAD_BT[bb, j], d(i, j))
                                      for i in range(4) for j in range(4)]) for a in range(4) for bb in range(4)])
    return te.compute((16, n * nh * nw, c), tile, name="winograd_input", attrs={"winograd_tile": 2})


def winograd_output(m: te.Tensor, n: int, h: int, w: int) -> te.Tensor:
    """The NHWC output: ``A^T M A`` of each tile of ``M[16, tiles, K]``, cut to ``h x w``."""
    k = int(m.shape[2])
    nh, nw = (h + 1) // 2, (w + 1) // 2

    def out(b, y, x, ch):
        p = b * nh * nw + y // 2 * nw + x // 2
        return _select(y % 2 * 2 + x % 2, [_lincomb([(WINOGRAD_AT[u, a] * WINOGRAD_AT[v, bb], m[a * 4 + bb, p, ch])
                                                   for a in range(4) for bb in range(4)])
                                         for u in range(2) for v in range(2)])
    return te.compute((n, h, w, k), out, name="winograd_output", attrs={"winograd_tile": 2})
