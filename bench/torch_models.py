"""Benchmark-sized PyTorch models built in code (random weights, fixed seeds).

ResNet-50 comes from torchvision when it is installed (its architecture, random
weights); a BERT-base encoder is written out here so that it needs nothing but torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.out(ctx))
        return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))


class BertEncoder(nn.Module):
    """BERT-base's encoder stack (12 × 768, 12 heads, FFN 3072) on embedded tokens."""

    def __init__(self, layers: int = 12, d: int = 768, heads: int = 12, ffn: int = 3072):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def resnet50() -> nn.Module:
    torch.manual_seed(0)
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError:
        raise RuntimeError("ResNet-50 needs torchvision") from None
    m = tv_resnet50()
    # Realistic BatchNorm statistics instead of the (0, 1) defaults.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.0)
    return m.eval()


def bert_base(layers: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return BertEncoder(layers).eval()


def mobilenet_v3_large() -> nn.Module:
    torch.manual_seed(0)
    try:
        from torchvision.models import mobilenet_v3_large as tv_mnv3
    except ImportError:
        raise RuntimeError("MobileNetV3 needs torchvision") from None
    return _calibrate_batch_norm(tv_mnv3())


def _calibrate_batch_norm(m: nn.Module, size: int = 224) -> nn.Module:
    """BatchNorm statistics measured on random images (their plain average), so that every
    layer's output keeps unit scale. With the default (0, 1) statistics MobileNetV3's logits
    shrink to about 1e-9, below float16's range, and no error could be measured."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, size, size))
    return m.eval()
