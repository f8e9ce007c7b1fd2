"""Small PyTorch example models built in code with fixed seeds (nothing is downloaded).

Requires: ``torch`` (the ``torch`` extra). Guarantees: every builder returns
``(module.eval(), example_args)``; weights come from ``torch.manual_seed(seed)``
inside the builder: the same arguments give identical modules and inputs.
BatchNorm layers carry non-trivial running statistics (a few training-mode
passes on random data), so folding them is a real test.

The torch counterparts of ``smelt.examples.zoo``: its op mix (conv + BatchNorm +
residual, attention + LayerNorm + GELU, Linear + BatchNorm1d), compiling in seconds.
"""

from __future__ import annotations

import torch
from torch import nn


def _warm_batch_norm(module: nn.Module, make_input, steps: int = 4) -> None:
    """Give every BatchNorm running statistics far from (0, 1): training-mode passes."""
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(*make_input())
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
    module.eval()


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, a 1x1 conv+BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        # with a bias: the fold absorbs it
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv+BN+ReLU, max-pool, three basic-block stages, a BatchNorm after the last ReLU
    (no conv before it: the fold is a multiply-add), global pool, classifier."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.final_bn = nn.BatchNorm2d(4 * width)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, image):
        x = self.pool(self.stem(image))
        x = self.final_bn(self.layer3(self.layer2(self.layer1(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet(batch: int = 2, size: int = 32, width: int = 16, classes: int = 10, seed: int = 0):
    """A ResNet-style CNN, BatchNorm2d after convs with and without bias; input ``image``."""
    torch.manual_seed(seed)
    model = SmallResNet(width, classes)
    _warm_batch_norm(model, lambda: (torch.randn(8, 3, size, size) * 2 + 0.5,))
    return model.eval(), (torch.randn(batch, 3, size, size),)


class SmallCNN(nn.Module):
    """Two conv+BN+ReLU stages, a classifier: the smallest CNN worth compiling."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, image):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(image), 1), 1))


def small_cnn(batch: int = 1, size: int = 16, width: int = 8, classes: int = 10, seed: int = 0):
    """A two-stage conv+BatchNorm CNN (``examples/demo.py`` exports it); input ``image``."""
    torch.manual_seed(seed)
    model = SmallCNN(width, classes)
    _warm_batch_norm(model, lambda: (torch.randn(8, 3, size, size) * 2 + 0.5,))
    return model.eval(), (torch.randn(batch, 3, size, size),)


class EncoderLayer(nn.Module):
    """Post-LayerNorm encoder layer: multi-head self-attention, GELU feed-forward."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ff(x)))


class TinyEncoder(nn.Module):
    """A Linear token embedding, learned positions, ``layers`` encoders, a GELU head."""

    def __init__(self, d_in: int, seq: int, d_model: int, heads: int, ffn: int, layers: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(approximate="tanh"))

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def transformer(batch: int = 2, seq: int = 16, d_in: int = 24, d_model: int = 32, heads: int = 4,
                ffn: int = 64, layers: int = 2, seed: int = 0):
    """A small transformer encoder (nn.MultiheadAttention, LayerNorm, GELU, dropout); input ``tokens``."""
    torch.manual_seed(seed)
    model = TinyEncoder(d_in, seq, d_model, heads, ffn, layers).eval()
    return model, (torch.randn(batch, seq, d_in),)


class BNMLP(nn.Module):
    """Linear → BatchNorm1d → ReLU, twice, and a Linear classifier."""

    def __init__(self, dims=(32, 64, 48, 10)):
        super().__init__()
        layers: list[nn.Module] = []
        for din, dout in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(din, dout), nn.BatchNorm1d(dout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(dims[-2], dims[-1])

    def forward(self, features):
        return self.out(self.body(features))


def mlp(batch: int = 4, dims=(32, 64, 48, 10), seed: int = 0):
    """An MLP, BatchNorm1d after each hidden Linear; input ``features``."""
    torch.manual_seed(seed)
    model = BNMLP(dims)
    _warm_batch_norm(model, lambda: (torch.randn(16, dims[0]) * 3 - 1,))
    return model.eval(), (torch.randn(batch, dims[0]),)


class TwoHeads(nn.Module):
    """Two inputs, two outputs: class logits, an L2-normalized embedding."""

    def __init__(self, d_in: int, d_ctx: int, hidden: int, classes: int, d_emb: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in + d_ctx, hidden), nn.Tanh())
        self.cls = nn.Linear(hidden, classes)
        self.emb = nn.Linear(hidden, d_emb)

    def forward(self, x, context):
        h = self.trunk(torch.cat([x, context], dim=-1))
        return self.cls(h), nn.functional.normalize(self.emb(h), dim=-1)


def two_outputs(batch: int = 3, d_in: int = 12, d_ctx: int = 4, hidden: int = 32, classes: int = 5,
                d_emb: int = 8, seed: int = 0):
    """A module returning ``(logits, embedding)``; inputs ``x`` and ``context``."""
    torch.manual_seed(seed)
    model = TwoHeads(d_in, d_ctx, hidden, classes, d_emb).eval()
    return model, (torch.randn(batch, d_in), torch.randn(batch, d_ctx))


BUILDERS = {"resnet": resnet, "small_cnn": small_cnn, "transformer": transformer, "mlp": mlp,
            "two_outputs": two_outputs}

__all__ = ["BUILDERS", "mlp", "resnet", "small_cnn", "transformer", "two_outputs"]
