"""QuantizeFp8: calibrated FP8 (E4M3) post-training quantization of GEMMs and convolutions, for
the tensor cores of Ada and Hopper.

Requires: the quantize phase (after merging, before ToMixedPrecision and legalization), float32
weights bound as constants, calibration data for the models to quantize (``calibration``).
Guarantees: every site whose estimated error stays under ``max_error`` computes float8_e4m3fn ×
float8_e4m3fn -> float32, where a site is a matmul with a 2-D constant weight whose K is a
multiple of 16 and N of 8 (what cuBLASLt's FP8 kernels take), or an NCHW conv2d of one group
and no dilation whose input and output channels are multiples of 16 (with ``convs="gemm"``:
only a 1×1, stride-1, unpadded one, K a multiple of 16 and N of 8). The activation is scaled
per tensor into E4M3's ±448 from its calibrated range and clipped before the cast (TVM 0.27's
LLVM cast wraps out-of-range values instead of saturating); a tensor several sites read with
one scale is quantized once. The weight is scaled per tensor from its largest magnitude (a
matmul's stored as [N, K], the operand order of cuBLASLt's FP8 kernels), and the float32
product is multiplied by one scalar, the two scales, which DispatchCublasLt and
DispatchCutlassConv fold into the library call's alpha. With ``convs="all"``, a residual add
that reads a tensor FP8 convs read takes its FP8 value, dequantized (``astype`` float32 times
its scale): a ResNet block's output then exists only in FP8, which DispatchCutlassConv writes
from the conv computing it and reads as the next block's shortcut. ToMixedPrecision leaves the
FP8 operands alone and computes the rescaling multiply in float32. Sites over ``max_error`` stay
as they are, in the compute precision, and are listed in ``report`` with their error; so are
sites the pass does not handle, with the reason.

Per-tensor scales for both operands: cuBLASLt's FP8 GEMMs on Hopper take one scalar per operand,
and on all-MiniLM-L6-v2's real weights per-tensor E4M3 kept the embeddings' cosine to float32 at
0.99777 (per channel: 0.99798; bench/results/cpu_quantize_runs.json's fp8_accuracy_minilm).
E4M3's exponent covers activation outliers that symmetric INT8 loses (0.95613 per tensor
there), so no smoothing, and no clipping either: smelt's FP8 MiniLM kept 0.99782 mean / 0.99737 worst with ``minmax``
ranges, 0.96454 / 0.95155 with ``percentile`` (99.99) ones, which cut the outliers off.

The error estimate, per site, on the first calibration batch: the relative error of the GEMM's
output (a conv's at up to 8192 sampled output positions), float32 against both operands rounded
to E4M3 (with ml_dtypes, which rounds as the GPU does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from ..errors import SmeltError
from ..ir.weights import exact_const
from .calibration import Calibration, Site, calibrate, check_method, choose, describe, rel_error, rewrite_sites, sites

log = logging.getLogger(__name__)

FP8 = "float8_e4m3fn"
E4M3_MAX = 448.0
# The activation's scale is applied as a multiply in the compute precision: its inverse stays a
# float16 number (finite, and the same value in float32), so both precisions quantize alike.
_MAX_INV_SCALE = 32768.0


@dataclass(frozen=True)
class Fp8:
    """``quantize=`` of ``smelt.compile``: calibrated FP8 (E4M3) GEMMs and convolutions.

    ``calib``: a ``.npz`` path, a folder of ``<input>.npy`` files or an iterable of
    ``{input: array}`` batches; ``method``: minmax, percentile or entropy (the activation's
    range); ``max_error``: layers whose estimated relative error exceeds it stay unquantized;
    ``convs``: ``"all"`` (every conv of one group with channels in multiples of 16) or
    ``"gemm"`` (only the 1×1 stride-1 ones); ``stem``: with ``convs="all"``, strided convs over
    fewer than 16 channels (a CNN's stem) are rewritten to take 16 or more
    (RewriteConvSpaceToDepth) and run in FP8 too; None (the default): where the target's
    backend runs FP8 convs in a library kernel (``fp8_stem(target)``: CUTLASS's on Hopper), else
    not.
    """

    calib: object
    method: str = "minmax"
    percentile: float = 99.99
    max_error: float = 0.1
    bins: int = 2048
    convs: str = "all"
    stem: bool | None = None

    def __post_init__(self):
        check_method(self.method, self.percentile)
        if self.convs not in CONVS:
            raise SmeltError(f"Fp8(convs={self.convs!r}): expected one of {', '.join(CONVS)}")

    def to_json(self) -> dict:
        return {"scheme": "fp8", "calib": describe(self.calib), "method": self.method, "percentile": self.percentile,
                "max_error": self.max_error, "convs": self.convs, "stem": self.stem}


def to_e4m3(x: np.ndarray, inv_scale: float) -> np.ndarray:
    """``x * inv_scale`` clipped to ±448 and rounded to E4M3."""
    return np.clip(np.asarray(x, np.float32) * np.float32(inv_scale), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def e4m3_clip(e: relax.Expr, bound) -> tuple[relax.Expr, list[tuple[relax.Call, int]]] | None:
    """QuantizeFp8's clip into E4M3's range: (what ``e`` clips, its calls outermost first, each
    with the index of its tensor operand) when ``e`` is ``clip(x, -448, 448)`` or that clip as
    ``minimum`` at 448 and ``maximum`` at -448 (in either order); else None. ``bound(e, op)``:
    the call of ``op`` bound to ``e``, or None (a pass may ask that its result has one user)."""
    if (clip := bound(e, "relax.clip")) is not None:
        return (clip.args[0], [(clip, 0)]) if [float(v.value) for v in clip.args[1:]] == [-E4M3_MAX, E4M3_MAX] \
            else None
    calls, bounds = [], {}
    while len(calls) < 2:
        call = bound(e, "relax.minimum")
        if call is None and (call := bound(e, "relax.maximum")) is None:
            break
        # i: the tensor operand's index, the other one a scalar constant
        i = next((1 - j for j, c in enumerate(call.args)
                  if isinstance(c, tvm.ir.Constant) and c.value.numpy().size == 1), None)
        if i is None:
            return None
        bounds[call.op.name] = float(call.args[1 - i].value.numpy().reshape(()))
        calls.append((call, i))
        e = call.args[i]
    return (e, calls) if bounds == {"relax.minimum": E4M3_MAX, "relax.maximum": -E4M3_MAX} else None


CONVS = ("all", "gemm")
_SAMPLE_ROWS = 8192  # output positions of a conv whose error the estimate computes


def _operands(s: Site, convs: str, x: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Why the site is not quantized ("" if it is), its weight as a [K, N] GEMM operand and
    ``x`` as rows of K (for a conv, up to ``_SAMPLE_ROWS`` sampled output positions' windows)."""
    call = s.binding.value
    w = call.args[1].value.numpy()
    if call.op.name != "relax.nn.conv2d":
        if w.ndim != 2:
            return f"weight of rank {w.ndim} (2-D weights only)", w, None
        k, n = w.shape
        why = f"K={k}, N={n}: cuBLASLt's FP8 GEMMs need K a multiple of 16 and N of 8" if k % 16 or n % 8 else ""
        return why, w, None if x is None else x.reshape(-1, x.shape[-1])
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        return f"layout {a.data_layout}/{a.kernel_layout} (NCHW/OIHW only)", w, None
    kout, c, r, t = w.shape
    strides, pad = [int(v) for v in a.strides], [int(v) for v in a.padding]
    if int(a.groups) != 1 or any(int(v) != 1 for v in a.dilation):
        return f"a conv of {int(a.groups)} groups, dilation {[int(v) for v in a.dilation]}", w, None
    if convs == "gemm":
        if (r, t) != (1, 1) or strides != [1, 1] or any(pad):
            return (f"a {r}x{t} conv (stride {strides}): with convs='gemm' FP8 covers the convs that are GEMMs "
                    f"(1x1, stride 1, unpadded)"), w, None
        if c % 16 or kout % 8:
            return f"K={c}, N={kout}: cuBLASLt's FP8 GEMMs need K a multiple of 16 and N of 8", w, None
    elif c % 16 or kout % 16:
        return f"{c} input and {kout} output channels: FP8 convs need multiples of 16", w, None
    w2 = w.reshape(kout, -1).T
    if x is None:
        return "", w2, None
    xp = np.pad(x, [(0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])])
    win = np.lib.stride_tricks.sliding_window_view(xp, (r, t), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    nb, _, ho, wo = win.shape[:4]
    pick = np.random.default_rng(0).choice(nb * ho * wo, min(_SAMPLE_ROWS, nb * ho * wo), replace=False)
    ni, hi, wi = np.unravel_index(pick, (nb, ho, wo))
    return "", w2, win[ni, :, hi, wi].reshape(len(pick), -1)


def _quantize(x: relax.Expr, inv_scale: float) -> relax.Expr:
    """``x * inv_scale`` clipped to ±448 and cast to E4M3 (``to_e4m3`` in Relax)."""
    return relax.op.astype(relax.op.clip(relax.op.multiply(x, relax.const(np.float32(inv_scale))),
                                         -E4M3_MAX, E4M3_MAX), FP8)


def _dequantize(xq: relax.Expr, scale: float) -> relax.Expr:
    """E4M3 ``xq`` widened to float32 and multiplied by ``scale``."""
    return relax.op.multiply(relax.op.astype(xq, "float32"), relax.const(np.float32(scale)))


@dataclass(frozen=True)
class Shortcut:
    """A residual add of two conv sites' results (each plus a constant bias, each used once): the
    ``index`` of its operand (the variable ``operand``) to hold in E4M3, calibrated under ``key``;
    ``sites``: the two sites' keys."""

    add: relax.Var
    index: int
    operand: relax.Var
    key: str
    sites: tuple[str, str]
    name: str


def conv_shortcuts(func_name: str, func: relax.Function, ss: Sequence[Site]) -> list[Shortcut]:
    """The residual adds of ``func`` whose operands are both conv sites' results (a ResNet block
    whose shortcut is a projection conv). The later conv's result is the one held in E4M3: its
    conv then writes it in FP8 and the other conv's epilogue reads it as an FP8 residual, where
    both would move it as float16."""
    convs = {s.binding.var: s for s in ss if s.binding.value.op.name == "relax.nn.conv2d"}
    if not convs:
        return []
    order = {s.binding.var: i for i, s in enumerate(ss)}
    values = {b.var: b.value for b in func.body.blocks[0].bindings}
    uses: dict = {}
    for v in [*values.values(), func.body.body]:
        relax.analysis.post_order_visit(v, lambda e: uses.__setitem__(e, uses.get(e, 0) + 1)
                                        if isinstance(e, relax.Var) else None)

    def site_of(e) -> Site | None:
        """The conv site whose result ``e`` is (plus a constant), each used once."""
        v = values.get(e)
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.add" and \
                uses.get(e) == 1:
            e = next((a for a, b in (v.args, v.args[::-1]) if isinstance(b, tvm.ir.Constant)), None)
        return convs.get(e) if uses.get(e) == 1 else None

    out = []
    for var, v in values.items():
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.add"):
            continue
        a, b = (site_of(e) for e in v.args)
        if a is None or b is None or a is b or any(isinstance(e, tvm.ir.Constant) for e in v.args) or \
                list(v.args[0].ty.shape.values) != list(v.args[1].ty.shape.values):
            continue
        index = int(order[b.binding.var] > order[a.binding.var])
        out.append(Shortcut(var, index, v.args[index], f"{func_name}:shortcut:{var.name}", (a.key, b.key),
                            f"{func_name}/add {var.name}"))
    return out


@tvm.transform.module_pass(opt_level=0, name="QuantizeFp8")
class QuantizeFp8:
    """See the module docstring. ``report``: method, batches, quantized sites with their
    estimated error, ``fallback`` (site -> error) and ``skipped`` (site -> reason)."""

    def __init__(self, config: Fp8, models: Sequence[str]):
        self.config = config
        self.models = list(models)
        self.report: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rep = {"scheme": "fp8", "method": self.config.method, "batches": 0, "quantized": {}, "fallback": {},
               "skipped": {}}
        self.report = rep
        names = {gv.name_hint for gv in mod.get_global_vars()}
        funcs: dict[str, list[Site]] = {}
        for m in self.models:
            if m not in names or not isinstance(mod[m], relax.Function):
                continue
            for s in sites(m, mod[m]):
                why, _, _ = _operands(s, self.config.convs)
                if why:
                    rep["skipped"][s.name] = why
                else:
                    funcs.setdefault(m, []).append(s)
        if not funcs:
            log.warning("FP8: no GEMM with a constant weight to quantize")
            return mod
        share = self.config.convs == "all"
        shortcuts = {m: conv_shortcuts(m, mod[m], ss) for m, ss in funcs.items()} if share else {}
        cal = calibrate(mod, funcs, self.config.calib, self.config.bins,
                        tensors={m: [(r.key, r.operand) for r in rs] for m, rs in shortcuts.items()})
        rep["batches"] = cal.batches
        plans = choose(funcs, cal, self._plan, self.config.max_error, rep)
        if rep["fallback"]:
            log.info("FP8: %d GEMMs stay unquantized (estimated error over %g): %s", len(rep["fallback"]),
                     self.config.max_error, ", ".join(f"{k} {v:.3g}" for k, v in rep["fallback"].items()))
        emitter = _Emitter(share)
        for r in (r for rs in shortcuts.values() for r in rs if all(k in plans for k in r.sites)):
            if (inv := self._inverse_scale(cal, r.key)) is not None:
                emitter.shortcuts[r.add] = (r.index, inv)
                rep.setdefault("fp8_shortcuts", []).append(r.name)
        return rewrite_sites(mod, funcs, plans, emitter, emitter.rest)

    def _inverse_scale(self, cal: Calibration, key: str) -> float | None:
        """What the activation calibrated under ``key`` is multiplied by before its cast to E4M3
        (a float16 number), or None where calibration saw no finite nonzero value."""
        lo, hi = cal.hists[key].range(self.config.method, self.config.percentile)
        amax = max(abs(lo), abs(hi))
        if not math.isfinite(amax) or amax == 0:
            return None
        return float(np.float16(min(E4M3_MAX / amax, _MAX_INV_SCALE)))

    def _plan(self, s: Site, cal: Calibration) -> tuple[dict | None, str]:
        if (inv_x := self._inverse_scale(cal, s.key)) is None:
            return None, "no finite nonzero activation seen in calibration"
        _, w, x = _operands(s, self.config.convs, cal.first[s.key])
        wmax = float(np.abs(w).max())
        if wmax == 0:
            return None, "an all-zero weight"
        inv_w = E4M3_MAX / wmax
        wq = to_e4m3(w, inv_w)
        approx = to_e4m3(x, inv_x).astype(np.float32) @ wq.astype(np.float32) / np.float32(inv_x * inv_w)
        return {"inv_x": inv_x, "wq": wq, "alpha": 1.0 / (inv_x * inv_w), "error": rel_error(x @ w, approx)}, ""


class _Emitter:
    """Emits each planned site's FP8 computation (see the module docstring), for one rewrite.

    A tensor that several sites read with one scale (a ResNet block's input, read by its first
    conv and its shortcut's) is quantized once. With ``share``, the residual adds that read a
    tensor FP8 convs read take its FP8 value, dequantized: the conv computing the tensor then
    writes only that (DispatchCutlassConv folds the quantize into its epilogue, and the
    residual's dequantization into the next conv's), so the activations stay 1 byte wide."""

    def __init__(self, share: bool):
        self.share = share
        self.quantized: dict = {}  # (x, inverse scale) -> x in E4M3
        self.dequantized: dict = {}  # x -> its E4M3 value in float32
        self.shortcuts: dict = {}  # residual add's variable -> (its operand to hold in E4M3, inverse scale)

    def __call__(self, bb: relax.BlockBuilder, call: relax.Call, plan: dict) -> relax.Expr:
        x, wq = call.args[0], plan["wq"]  # wq: [K, N]
        key = (x, plan["inv_x"])
        if (xq := self.quantized.get(key)) is None:
            xq = self.quantized[key] = bb.emit(_quantize(x, plan["inv_x"]))
            if self.share and call.op.name == "relax.nn.conv2d":
                self.dequantized[x] = (xq, 1.0 / plan["inv_x"])
        if call.op.name == "relax.nn.conv2d":
            a = call.attrs
            shape = call.args[1].value.numpy().shape
            w = exact_const(np.ascontiguousarray(wq.T).reshape(shape))
            acc = bb.emit(relax.op.nn.conv2d(xq, w, a.strides, a.padding, a.dilation, a.groups, a.data_layout,
                                             a.kernel_layout, a.out_layout, out_dtype="float32"))
        else:  # the weight as [N, K] in memory, as cuBLASLt's FP8 kernels read it
            w = bb.emit(relax.op.permute_dims(exact_const(np.ascontiguousarray(wq.T)), [1, 0]))
            acc = bb.emit(relax.op.matmul(xq, w, out_dtype="float32"))
        return relax.op.multiply(acc, relax.const(np.float32(plan["alpha"])))

    def rest(self, bb: relax.BlockBuilder, binding: relax.VarBinding, value: relax.Expr) -> relax.Expr:
        """``value`` (no site) with its add operands that FP8 convs read replaced by their FP8
        values, and a shortcut's (``conv_shortcuts``) by its value rounded to E4M3."""
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.add"):
            return value
        index, inv = self.shortcuts.get(binding.var, (None, 0.0))
        args = []
        for i, e in enumerate(value.args):
            if i == index:
                e = bb.emit(_dequantize(bb.emit(_quantize(e, inv)), 1.0 / inv))
            elif isinstance(e, relax.Var) and e in self.dequantized:
                e = bb.emit(_dequantize(*self.dequantized[e]))
            args.append(e)
        return relax.op.add(*args)
