"""CPU backend: LLVM code for the host (x86-64 or aarch64) or a named CPU/triple.

Before legalization, convolutions move to NHWC/HWIO (``ConvertConvLayout``), 3x3 stride-1
convolutions with constant weights become Winograd F(2x2, 3x3) (``RewriteConvWinograd``) and
exp, erf, tanh and softmax take TVM's vectorizable fast forms. Kernels without tuning records get
smelt's default CPU schedules (``cpu_schedule``: register-tiled, vectorized, parallel), with
the weights of tiled kernels repacked into panels at compile time (``prepack_weights``).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.backend.cpu_generic import pipeline as _cpu

from ..errors import BackendError
from ..passes.convert_conv_layout import ConvertConvLayout
from ..passes.mutate import mutate_functions, static_shape
from . import cpu_schedule
from .base import TargetOptions, check_libs, host_linker_options
from .apply_default_schedules import ApplyDefaultSchedules
from .prepack_weights import FoldWeightPrepack, MarkWeightOperands

log = logging.getLogger(__name__)

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
            "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def host_triple() -> str:
    machine = platform.machine().lower()
    if machine not in _TRIPLES:
        raise BackendError(f"host CPU {machine!r} is not supported; supported: x86_64, aarch64")
    return _TRIPLES[machine]


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


class CPUBackend:
    name = "cpu"
    description = "LLVM code for CPUs (x86-64, aarch64); the host CPU by default"
    requirements = "nothing beyond TVM (its LLVM is built in)"
    device_type = "cpu"

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        check_libs(opts, ())
        triple = opts.triple or host_triple()
        cpu = opts.arch or (host_cpu() if opts.triple is None else None)
        spec = {"kind": "llvm", "mtriple": triple}
        if cpu:
            if not tvm.target.codegen.llvm_is_valid_cpu(cpu, triple):
                raise BackendError(f"--arch {cpu!r} is not a CPU LLVM knows for {triple}")
            spec["mcpu"] = cpu
        try:
            return tvm.target.Target(spec)
        except Exception as e:
            raise BackendError(f"bad CPU target {spec}: {e}") from None

    def check_toolchain(self, opts: TargetOptions) -> None:
        """Cross-compiling needs a linker for the triple: fail before any work, not at save."""
        host_linker_options(self.target(opts))

    def prelegalize_passes(self, target):
        # TVM's fast exp/erf/tanh (and softmax on fast exp) vectorize; LLVM lowers the plain
        # ones to scalar libm calls (erff: a GELU matmul spent 75 % of its time there).
        # Their largest relative error, measured over the float32 range: 3.7e-7.
        return [ConvertConvLayout("NHWC", "HWIO"), RewriteConvWinograd, relax.transform.FastMathTransform()]

    def postfuse_passes(self, target):
        # Which kernel operands are weights: the default schedules repack those at compile time,
        # and MetaSchedule's RewriteLayout does the same for tuned ones; marked here, before tuning
        # extracts its tasks, a record's kernel and the compiled one are the same and tuning
        # measures the default schedule with its weights repacked, as the model runs it.
        return [MarkWeightOperands]

    def schedule_passes(self, target):
        return [ApplyDefaultSchedules(cpu_schedule.default_rules(), required=False), FoldWeightPrepack]

    def lower_passes(self, target):
        return _cpu.dataflow_lower_passes(target) + _cpu.finalize_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return {}

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        out = []
        for i, m in enumerate(executable.mod.imports):
            if m.kind == "llvm":
                p = out_dir / f"kernels{'' if i == 0 else i}.ll"
                p.write_text(m.inspect_source("ll"))
                out.append(p)
        return out

    def link_objects(self, target) -> list[Path]:
        return []

    def prepare_run(self, target: dict) -> None:
        pass


# Winograd F(2x2, 3x3) (Lavin & Gray): Y = A^T [(G g G^T) * (B^T d B)] A per 2x2 output tile.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], "float64")
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], "float64")
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], "float64")
_WINOGRAD_MIN_CHANNELS = 16  # below, the transforms cost more than the products they save


@tvm.transform.module_pass(opt_level=0, name="RewriteConvWinograd")
def RewriteConvWinograd(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """3x3, stride-1, pad-1 float32 convolutions in NHWC/HWIO with constant weights become Winograd F(2x2, 3x3).

    Each becomes three kernels: the input transform (``winograd_input``: 4x4 tiles of the
    input, overlapping by two, to ``V[16, tiles, C]``), a batched matmul with the transformed
    weights (``U[16, C, K]``, computed here, once), and the output transform
    (``winograd_output``), with which the bias, residual and activation fuse. 2.25 times
    fewer products: the 3x3 convs of ResNet-18 ran at the CPU's FMA peak and took 1.1 ms each
    at 56x56x64 to 7x7x512 (2 Zen 4 cores); the three kernels together take 0.5-0.6 ms.
    Numbers change by rounding only (transform coefficients 0, +-1 and +-1/2; relative error
    below 1e-6 against the direct conv). Requires: ``ConvertConvLayout`` to NHWC/HWIO before it
    and constant weights (possibly transposed); other convolutions are left alone, each with
    the reason logged at debug level. Where: prelegalize phase of the CPU backend.
    """
    mutator = _WinogradMutator(mod)
    return mutate_functions(mutator, mod) if mutator.has_conv(mod) else mod


@relax.expr_functor.mutator
class _WinogradMutator(relax.PyExprMutator):
    _conv = tvm.ir.Op.get("relax.nn.conv2d")
    _permute = tvm.ir.Op.get("relax.permute_dims")

    def has_conv(self, mod) -> bool:
        return any(isinstance(f, relax.Function) and "R.nn.conv2d(" in f.script() for f in mod.functions.values())

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._conv)):
            return call
        weight, why = self._winograd_weight(call)
        if weight is None:
            log.debug("conv2d stays direct: %s", why)
            return call
        x = call.args[0]
        v = self.builder_.emit_te(_winograd_input, x, primfunc_name_hint="winograd_input",
                                  primfunc_attrs={"op_pattern": 8})  # opaque: nothing fuses into it
        m = self.builder_.emit(relax.op.matmul(v, relax.const(weight)))
        return self.builder_.emit_te(_winograd_output, m, *static_shape(x)[:3],
                                     primfunc_name_hint="winograd_output",
                                     primfunc_attrs={"op_pattern": 2})  # injective: the epilogue fuses into it

    def _winograd_weight(self, call):
        """The transformed weights ``U[16, C, K]`` (numpy) for a conv this rewrite takes, else (None, why)."""
        a = call.attrs
        if (a.data_layout, a.kernel_layout, str(a.out_layout)) != ("NHWC", "HWIO", "NHWC"):
            return None, f"layout {a.data_layout}/{a.kernel_layout}"
        if [int(v) for v in a.strides] != [1, 1] or [int(v) for v in a.dilation] != [1, 1] \
                or [int(v) for v in a.padding] != [1, 1, 1, 1] or int(a.groups) != 1:
            return None, "not a 3x3 stride-1 pad-1 ungrouped conv"
        x, w = call.args
        if str(x.ty.dtype) != "float32" or static_shape(x) is None or str(a.out_dtype) not in ("", "float32"):
            return None, "not float32 with a static shape"
        while isinstance(w, relax.Var) and self.lookup_binding(w) is not None:
            w = self.lookup_binding(w)
        permuted, axes = False, None
        if isinstance(w, relax.Call) and w.op.same_as(self._permute) and isinstance(w.args[0], tvm.ir.Constant):
            permuted, axes = True, ([int(v) for v in w.attrs.axes] if w.attrs.axes is not None else None)
            w = w.args[0]
        if not isinstance(w, tvm.ir.Constant):
            return None, "weights are not a constant"
        g = np.transpose(w.value.numpy(), axes) if permuted else w.value.numpy()
        if g.shape[:2] != (3, 3) or min(g.shape[2:]) < _WINOGRAD_MIN_CHANNELS:
            return None, f"weights {g.shape}"
        u = np.einsum("ai,ijck,bj->abck", _WINOGRAD_G, g.astype("float64"), _WINOGRAD_G)
        return u.reshape(16, *g.shape[2:]).astype("float32"), ""


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


def _winograd_input(x):
    n, h, w, c = (int(d) for d in x.shape)
    nh, nw = (h + 1) // 2, (w + 1) // 2

    def tile(ab, p, ch):
        b, ph, pw = p // (nh * nw), p % (nh * nw) // nw, p % nw

        def d(i, j):
            r, s = ph * 2 - 1 + i, pw * 2 - 1 + j
            return tirx.if_then_else(tirx.all(r >= 0, r < h, s >= 0, s < w), x[b, r, s, ch], tirx.const(0.0, "float32"))
        return _select(ab, [_lincomb([(_WINOGRAD_BT[a, i] * _WINOGRAD_BT[bb, j], d(i, j))
                                      for i in range(4) for j in range(4)]) for a in range(4) for bb in range(4)])
    return te.compute((16, n * nh * nw, c), tile, name="winograd_input", attrs={"winograd_tile": 2})


def _winograd_output(m, n, h, w):
    k = int(m.shape[2])
    nh, nw = (h + 1) // 2, (w + 1) // 2

    def out(b, y, x, ch):
        p = b * nh * nw + y // 2 * nw + x // 2
        return _select(y % 2 * 2 + x % 2, [_lincomb([(_WINOGRAD_AT[u, a] * _WINOGRAD_AT[v, bb], m[a * 4 + bb, p, ch])
                                                   for a in range(4) for bb in range(4)])
                                         for u in range(2) for v in range(2)])
    return te.compute((n, h, w, k), out, name="winograd_output", attrs={"winograd_tile": 2})
