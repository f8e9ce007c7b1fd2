"""SinkReshapes: move reshapes below elementwise ops, so that epilogues fuse into the matmul before them.

Requires: a Relax module with static shapes where it matters (dynamic ones are left alone).
Guarantees: ``op(reshape(x, B), ...)`` becomes ``reshape(op(x, ...), B)`` for elementwise
``op`` (casts, activations, arithmetic), and for softmax, layer and RMS norm over the last
axis when the reshape keeps that axis. The other operand of a binary op is reshaped the
same way when it has the output's shape, and kept when it broadcasts over trailing axes
the reshape keeps (a bias). Reshapes that meet cancel (TVM's ``RemoveRedundantReshape``
runs after). A ``permute_dims`` that moves only axes of extent 1 becomes the reshape it is
first. Numbers do not change: each rewrite only renames elements.
Why: ``torch.export`` writes ``nn.Linear`` on a [batch, seq, d] tensor as
``view -> addmm -> view``; the view between the matmul and its GELU or residual add is
an injective op, which TVM's ``FuseOps`` does not fuse into a matmul's epilogue. A BERT
layer then ran its GELU, its two residual adds and its attention scaling as four kernels
of their own, each a round trip through memory. Likewise a CNN's head in NHWC: its pooled
[N, 1, 1, C] went through a ``permute_dims`` to NCHW before the quantize or cast that the
pooling's kernel now computes.
Where: fuse phase, before ``LegalizeOps`` (after ``ToMixedPrecision``, whose casts it moves too).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .canonicalize_ops import with_attr_field
from .explain import Explainer
from .mutate import moves_only_unit_axes, mutate_functions, static_shape as _shape

_UNARY = {"relax.astype", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid",
          "relax.tanh", "relax.exp", "relax.erf", "relax.sqrt", "relax.rsqrt", "relax.negative", "relax.clip",
          "relax.abs", "relax.square", "relax.nn.leakyrelu"}
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
           "relax.power"}
_LAST_AXIS = {"relax.nn.softmax", "relax.nn.layer_norm", "relax.nn.rms_norm"}


def _trailing_equal(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@relax.expr_functor.mutator
class _Sinker(relax.PyExprMutator):
    def __init__(self, mod, explain: Explainer):
        super().__init__(mod)
        self.explain = explain

    def _reshaped(self, e: relax.Expr):
        """(source, its shape) when ``e`` is a variable bound to a static reshape (of a reshape...:
        the first source), else None."""
        found = None
        while isinstance(e, relax.Var):
            bound = self.lookup_binding(e)
            if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op) or \
                    bound.op.name != "relax.reshape":
                break
            shape = _shape(bound.args[0])
            if shape is None:
                break
            e = bound.args[0]
            found = (e, shape)
        return found

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.permute_dims":
            return self._as_reshape(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _UNARY | _BINARY | _LAST_AXIS:
            return call
        out = _shape(call)
        if out is None:
            return call
        name = call.op.name
        args = list(call.args)
        attrs = call.attrs
        if name in _BINARY:
            moved = self._binary(args, out)
            if moved is None:
                return call
            args, src_shape = moved
        else:
            found = self._reshaped(args[0])
            if found is None:
                return call
            args[0], src_shape = found
            if name in _LAST_AXIS:
                if src_shape[-1] != out[-1] or not self._last_axis_only(call, len(out)):
                    self.explain.skip(call, "the reshape does not keep the normalized last axis")
                    return call
                attrs = self._with_last_axis(call)
        inner = self.builder_.emit(relax.Call(call.op, args, attrs, call.ty_args))
        self.explain.fired(call, f"reshape {src_shape} -> {out} moved below {name.removeprefix('relax.')}")
        return relax.op.reshape(inner, out)

    def _as_reshape(self, call: relax.Call) -> relax.Expr:
        """A ``permute_dims`` that moves only axes of extent 1 (a CNN's pooled [N, 1, 1, C] to
        NCHW) as the reshape it is, which then sinks like any other."""
        out = _shape(call)
        if out is None or not moves_only_unit_axes(call):
            return call
        self.explain.fired(call, f"permute_dims of {_shape(call.args[0])} moves only axes of extent 1: a reshape "
                                 f"to {out}")
        return relax.op.reshape(call.args[0], out)

    def _binary(self, args: list, out: list[int]):
        """The binary op's operands on the reshape's source shape, and that shape; None if not possible."""
        found = [self._reshaped(a) if _shape(a) == out else None for a in args]
        pick = next((f for f in found if f is not None), None)
        if pick is None:
            return None
        src_shape = pick[1]
        kept = _trailing_equal(src_shape, out)
        shapes = [_shape(a) for a in args]
        if any(not (f is not None and f[1] == src_shape) and shape != out and (shape is None or len(shape) > kept)
               for f, shape in zip(found, shapes)):
            return None  # an operand that neither has the output's shape nor broadcasts over kept axes
        new = []
        for a, f, shape in zip(args, found, shapes):
            if f is not None and f[1] == src_shape:
                new.append(f[0])
            elif shape == out:
                new.append(self.builder_.emit(relax.op.reshape(a, src_shape)))
            else:
                new.append(a)  # broadcasts over the kept trailing axes
        return new, src_shape

    @staticmethod
    def _last_axis_only(call: relax.Call, rank: int) -> bool:
        attrs = call.attrs
        if call.op.name == "relax.nn.softmax":
            return int(attrs.axis) in (-1, rank - 1)
        axes = [int(a) for a in attrs.axes]
        return axes in ([-1], [rank - 1])

    @staticmethod
    def _with_last_axis(call: relax.Call):
        if call.op.name == "relax.nn.softmax":
            return with_attr_field(call.attrs, axis=-1)
        return with_attr_field(call.attrs, axes=[-1])


@tvm.transform.module_pass(opt_level=0, name="SinkReshapes")
class SinkReshapes:
    """See the module docstring."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("SinkReshapes")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mutate_functions(_Sinker(mod, self.explain), mod)
        return tvm.transform.Sequential([relax.transform.RemoveRedundantReshape(),
                                         relax.transform.DeadCodeElimination()])(mod)
