"""``smelt.quantize_report``: what quantization costs a model, measured on the user's data.

Compiles the models twice for the CPU (or the given target), in float32 and quantized,
runs both on the evaluation data and compares every output: largest and mean absolute
error, the largest error relative to the output's range, cosine similarity per sample
(mean and worst), and, for outputs with a class axis (last dimension > 1), how often
the top-1 class agrees. The layers come from the quantization pass: each with its
estimated error (the most sensitive first), the ones kept in float32 and the ones not
handled. Weight sizes before and after are those of the two artifacts' weight stores.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .artifact import load
from .compiler import compile
from .errors import SmeltError
from .passes import Fp8, Int8, WeightOnly
from .passes.calibration import check_batch, read_data


@dataclass
class OutputError:
    """One output of one model, float32 against quantized, over the evaluation set."""

    model: str
    output: str
    samples: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_max: float = 0.0  # max_abs / the float32 output's largest magnitude
    cosine_mean: float = 1.0
    cosine_min: float = 1.0
    top1_agreement: float | None = None  # outputs with a class axis only


@dataclass
class QuantizeReport:
    """``quantize_report``'s result; ``to_json()`` for ``--json``."""

    scheme: dict
    target: str
    batches: int
    outputs: list[OutputError] = field(default_factory=list)
    layers: list[tuple[str, float | None, str]] = field(default_factory=list)  # (layer, error, status)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    calibration_batches: int = 0

    def to_json(self) -> dict:
        return asdict(self)


class _Stats:
    def __init__(self):
        self.n = self.count = 0
        self.max_abs = self.sum_abs = self.peak = 0.0
        self.cos: list[float] = []
        self.agree = self.rows = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        diff = np.abs(ref - got)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.count += diff.size
        self.peak = max(self.peak, float(np.abs(ref).max(initial=0.0)))
        per = ref.reshape(len(ref), -1) if ref.ndim > 1 else ref.reshape(1, -1)
        gper = got.reshape(per.shape)
        den = np.linalg.norm(per, axis=1) * np.linalg.norm(gper, axis=1)
        self.cos += [float(c) for c in np.where(den > 0, (per * gper).sum(axis=1) / np.maximum(den, 1e-300), 1.0)]
        self.n += len(per)
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            self.agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            self.rows += ref.size // ref.shape[-1]

    def result(self, model: str, output: str) -> OutputError:
        return OutputError(model, output, self.n, self.max_abs, self.sum_abs / max(self.count, 1),
                           self.max_abs / self.peak if self.peak > 0 else 0.0,
                           float(np.mean(self.cos)) if self.cos else 1.0, min(self.cos, default=1.0),
                           self.agree / self.rows if self.rows else None)


def quantize_report(models, quantize: Int8 | Fp8 | WeightOnly, eval_data=None, target: str = "cpu", *,
                    names: Sequence[str] | None = None, input_shapes: dict | None = None,
                    precision: str | None = None) -> QuantizeReport:
    """Compile ``models`` in float32 and with ``quantize``; compare them on ``eval_data``
    (same forms as calibration data; the calibration data of an ``Int8`` or ``Fp8`` when None)."""
    if not isinstance(quantize, (Int8, Fp8, WeightOnly)):
        raise SmeltError(f"quantize={quantize!r}: expected smelt.Int8(...), smelt.Fp8(...) or smelt.WeightOnly(...)")
    if eval_data is None:
        if isinstance(quantize, WeightOnly):
            raise SmeltError("weight-only quantization needs evaluation data (eval_data / --eval)")
        eval_data = quantize.calib
    if not isinstance(eval_data, (str, Path)):
        eval_data = list(eval_data)  # read once per model and per artifact
    kw = dict(names=names, input_shapes=input_shapes, precision=precision)
    ref_art = compile(models, target, **kw)
    q_art = compile(models, target, quantize=quantize, **kw)
    q = q_art.report.quantization
    report = QuantizeReport(quantize.to_json(), target, 0, weight_bytes_before=ref_art.report.weight_bytes,
                            weight_bytes_after=q_art.report.weight_bytes, calibration_batches=q.get("batches", 0))
    layers = [(k, v, "quantized") for k, v in q.get("quantized", {}).items()]
    layers += [(k, v, "float32 (over max error)") for k, v in q.get("fallback", {}).items()]
    report.layers = sorted(layers, key=lambda r: -r[1]) + [(k, None, f"not handled: {v}")
                                                           for k, v in q.get("skipped", {}).items()]
    with tempfile.TemporaryDirectory(prefix="smelt-qreport-") as tmp:
        ref_rt, q_rt = load(ref_art.save(Path(tmp) / "float32")), load(q_art.save(Path(tmp) / "quantized"))
        for model, info in ref_rt.models.items():
            stats = [_Stats() for _ in info.outputs]
            for batch in read_data(eval_data, model, info.inputs):
                arrays = check_batch(model, info.inputs, batch, what="evaluation")
                inputs = {t.name: a for t, a in zip(info.inputs, arrays)}
                ref, got = ref_rt.run(model, **inputs), q_rt.run(model, **inputs)
                ref, got = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
                for s, r, g in zip(stats, ref, got):
                    s.add(r, g)
                report.batches += 1
            if not stats or stats[0].n == 0:
                raise SmeltError(f"evaluation data for {model} holds no complete batch")
            report.outputs += [s.result(model, t.name) for s, t in zip(stats, info.outputs)]
    return report
