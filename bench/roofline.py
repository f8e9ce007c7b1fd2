"""The speed-of-light time of ResNet-50 on a GPU: compute-only, bandwidth-only and per layer.

What a batch must take at best, from shapes alone (no weights, no GPU): each conv, the pooling
and the classifier read their input and weights and write their output once (a residual add
reads the shortcut once more, inside the conv that takes it), at ``--bytes`` per element. Per
layer the floor is max(FLOPs / peak, bytes / bandwidth); their sum is what perfect kernels, one
per layer, would take. Defaults: the H200's measured fp16 dense peak (``bench/gemm.py``: ~790
TFLOP/s) and its 4.8 TB/s.
Network: ResNet-50 v1.5 (stride on the 3x3 conv), written out here.
Usage: python bench/roofline.py [--batch 32] [--tflops 790] [--tbps 4.8] [--bytes 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(cin, mid, 1), nn.Conv2d(mid, mid, 3, stride, 1), nn.Conv2d(mid, mid * 4, 1)
        self.down = nn.Conv2d(cin, mid * 4, 1, stride) if stride != 1 or cin != mid * 4 else None

    def forward(self, x):
        return (self.c3(self.c2(self.c1(x))) + (self.down(x) if self.down is not None else x)).relu()


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)).eval()


def layers(model: nn.Module, x: torch.Tensor, elem_bytes: int) -> list[tuple[str, float, float]]:
    """(layer, FLOPs, bytes) of every conv, linear and max pool, in execution order."""
    rows: list[tuple[str, float, float]] = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            flops = 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:  # the classifier's products; pooling's comparisons are not FLOPs of the peak
            flops = 2 * out.numel() * mod.in_features if isinstance(mod, nn.Linear) else 0
        weights = sum(p.numel() for p in mod.parameters(recurse=False))
        rows.append((type(mod).__name__, flops, elem_bytes * (inp[0].numel() + out.numel() + weights)))

    def shortcut(mod, inp, out):  # the residual the last conv's epilogue reads
        name, flops, b = rows[-1]
        rows[-1] = (name, flops, b + elem_bytes * out.numel())

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d)):
            m.register_forward_hook(hook)
        if isinstance(m, Bottleneck):
            m.register_forward_hook(shortcut)
    with torch.no_grad():
        model(x)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tflops", type=float, default=790.0)
    ap.add_argument("--tbps", type=float, default=4.8)
    ap.add_argument("--bytes", type=int, default=2, help="per element: 2 for fp16, 1 for int8/fp8")
    args = ap.parse_args()
    peak, bw = args.tflops * 1e12, args.tbps * 1e12
    rows = layers(resnet50(), torch.zeros(args.batch, 3, 224, 224), args.bytes)
    flops, moved = sum(r[1] for r in rows), sum(r[2] for r in rows)
    per_layer = sum(max(f / peak, b / bw) for _, f, b in rows)
    bound = sum(1 for _, f, b in rows if b / bw > f / peak)
    print(f"ResNet-50, batch {args.batch}: {len(rows)} layers, {flops / 1e9:.1f} GFLOP, {moved / 1e6:.0f} MB moved "
          f"at {args.bytes} B per element")
    print(f"compute only {1e3 * flops / peak:.3f} ms | bandwidth only {1e3 * moved / bw:.3f} ms | "
          f"per layer max(compute, memory) {1e3 * per_layer:.3f} ms ({bound} of {len(rows)} layers memory-bound)")


if __name__ == "__main__":
    main()
