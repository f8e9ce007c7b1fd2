"""Example and test models built in code, with fixed seeds (nothing is downloaded).

Requires: ``onnx`` and ``numpy``. Guarantees: every builder returns a checked
``onnx.ModelProto`` whose weights come from ``numpy.random.default_rng(seed)``,
so two calls with the same arguments give byte-identical models.

The architectures follow the classic papers closely enough to have the same
op mix and weight sizes (ResNet-50: 25.5 M parameters, 4.1 GFLOP at 224²),
which is what the compiler's passes and benchmarks care about. BatchNorm scales
(gamma / sqrt(var)) average about 1 and the last BatchNorm of each residual branch
is scaled by ``RESIDUAL_GAMMA``, so outputs stay O(1..100) at any depth and size
(ResNet-101 at 224²: |logits| < 50), which keeps numerical comparisons meaningful.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# The last BatchNorm of each residual branch scales by about this much, so activations
# stay O(1..100) however deep the network is (as with zero-init residual gammas in training).
RESIDUAL_GAMMA = 0.2


class GraphBuilder:
    """Small helper that names nodes and initializers and keeps shapes honest."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def fresh(self, prefix: str) -> str:
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}{n}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, shape, scale: float | None = None, prefix: str = "w") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        scale = scale if scale is not None else float(np.sqrt(2.0 / max(fan_in, 1)))
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), prefix)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self.fresh(op_type.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    # -- layers -------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             bias: bool = False) -> str:
        w = self.weight((cout, cin // groups, k, k), prefix="conv_w")
        inputs = [x, w] + ([self.weight((cout,), 0.1, prefix="conv_b")] if bias else [])
        p = k // 2
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[p, p, p, p], group=groups)

    def bn(self, x: str, c: int, gamma_scale: float = 1.0) -> str:
        r = self.rng
        gamma = self.const(((r.random(c) * 0.5 + 0.6) * gamma_scale).astype(np.float32), "bn_gamma")
        beta = self.const((r.standard_normal(c) * 0.1).astype(np.float32), "bn_beta")
        mean = self.const((r.standard_normal(c) * 0.1).astype(np.float32), "bn_mean")
        var = self.const((r.random(c) * 0.5 + 0.5).astype(np.float32), "bn_var")
        return self.op("BatchNormalization", [x, gamma, beta, mean, var], epsilon=1e-5)

    def conv_bn(self, x, cin, cout, k, stride=1, groups=1, act: str | None = "Relu",
                gamma_scale: float = 1.0) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, groups), cout, gamma_scale)
        if act == "Relu":
            y = self.op("Relu", [y])
        elif act == "HardSwish":
            y = self.op("HardSwish", [y])
        return y

    def linear(self, x: str, din: int, dout: int) -> str:
        w = self.weight((din, dout), scale=float(np.sqrt(1.0 / din)), prefix="fc_w")
        b = self.weight((dout,), 0.02, prefix="fc_b")
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, d: int) -> str:
        g = self.const((1 + 0.1 * self.rng.standard_normal(d)).astype(np.float32), "ln_g")
        b = self.const((0.1 * self.rng.standard_normal(d)).astype(np.float32), "ln_b")
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-5)

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="smelt.examples")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _image_input(batch, size, channels=3):
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])


def _logits_output(batch, classes):
    return helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])


def _resnet_backbone(g: GraphBuilder, blocks: list[int], bottleneck: bool, width: int) -> list[tuple[str, int]]:
    """The stem (7x7 stride-2 conv, max pool) and the residual stages of a ResNet, with
    BatchNorm after every conv: each stage's output and its channels."""
    x = g.conv_bn("input", 3, width, 7, 2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin, stages = width, []
    for stage, n in enumerate(blocks):
        mid = width * 2**stage
        cout = mid * 4 if bottleneck else mid
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            if bottleneck:
                y = g.conv_bn(x, cin, mid, 1)
                y = g.conv_bn(y, mid, mid, 3, stride)
                y = g.conv_bn(y, mid, cout, 1, act=None, gamma_scale=RESIDUAL_GAMMA)
            else:
                y = g.conv_bn(x, cin, mid, 3, stride)
                y = g.conv_bn(y, mid, cout, 3, act=None, gamma_scale=RESIDUAL_GAMMA)
            short = x if (stride == 1 and cin == cout) else g.conv_bn(x, cin, cout, 1, stride, act=None)
            x = g.op("Relu", [g.op("Add", [y, short])])
            cin = cout
        stages.append((x, cout))
    return stages


def resnet(depth: int = 50, batch: int | str = 1, size: int = 224, classes: int = 1000,
           width: int = 64, seed: int = 0, head_seed: int | None = None) -> onnx.ModelProto:
    """ResNet-18/34 (basic blocks) or 50/101 (bottlenecks) with BatchNorm after every conv.

    ``head_seed`` draws the classifier's weights from another seed: models with one
    ``seed`` and different ``head_seed`` share their backbone and differ in the head
    (task heads fine-tuned on a frozen backbone)."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    g = GraphBuilder(f"resnet{depth}", seed)
    x, cin = _resnet_backbone(g, blocks, depth >= 50, width)[-1]
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    if head_seed is not None:
        g.rng = np.random.default_rng(head_seed)
    x = g.op("Gemm", [x, g.weight((classes, cin), prefix="fc_w"), g.weight((classes,), 0.02, prefix="fc_b")],
             transB=1)
    g.nodes[-1].output[0] = "logits"
    return g.model([_image_input(batch, size)], [_logits_output(batch, classes)])


def detector(batch: int | str = 1, size: int = 320, classes: int = 80, anchors: int = 3, width: int = 64,
             seed: int = 0) -> onnx.ModelProto:
    """Single-stage detector: a ResNet-18-style backbone and a YOLO-style head on each of its
    stride-8, 16 and 32 features (3x3 conv + ReLU, then a 1x1 conv to ``anchors * (5 + classes)``
    channels: 255 for 80 classes). Its outputs are NCHW feature maps ``p3``, ``p4``, ``p5``
    (``[batch, 255, size/8, size/8]`` ...), not logits: what a camera pipeline's detector hands on."""
    g = GraphBuilder("detector", seed)
    features = _resnet_backbone(g, [2, 2, 2, 2], False, width)[1:]
    outputs, per_cell = [], anchors * (5 + classes)
    for level, (f, c) in zip(("p3", "p4", "p5"), features):
        h = g.conv_bn(f, c, c, 3)
        g.conv(h, c, per_cell, 1, bias=True)
        g.nodes[-1].output[0] = level
        side = size // {"p3": 8, "p4": 16, "p5": 32}[level]
        outputs.append(helper.make_tensor_value_info(level, TensorProto.FLOAT, [batch, per_cell, side, side]))
    return g.model([_image_input(batch, size)], outputs)


def mobilenet(batch: int | str = 1, size: int = 224, classes: int = 1000, width: float = 1.0,
              seed: int = 0) -> onnx.ModelProto:
    """MobileNet-style network: inverted residuals with depthwise 3×3 convs and HardSwish."""
    def c(n):
        return max(8, int(n * width))

    # (expansion, out channels, stride, activation)
    cfg = [(1, 16, 1, "Relu"), (4, 24, 2, "Relu"), (3, 24, 1, "Relu"), (3, 40, 2, "HardSwish"),
           (3, 40, 1, "HardSwish"), (6, 80, 2, "HardSwish"), (6, 80, 1, "HardSwish"),
           (6, 112, 1, "HardSwish"), (6, 160, 2, "HardSwish"), (6, 160, 1, "HardSwish")]
    g = GraphBuilder("mobilenet", seed)
    x = g.conv_bn("input", 3, c(16), 3, 2, act="HardSwish")
    cin = c(16)
    for exp, out, stride, act in cfg:
        hidden, cout = cin * exp, c(out)
        y = g.conv_bn(x, cin, hidden, 1, act=act) if exp != 1 else x
        y = g.conv_bn(y, hidden, hidden, 3, stride, groups=hidden, act=act)
        residual = stride == 1 and cin == cout
        y = g.conv_bn(y, hidden, cout, 1, act=None, gamma_scale=RESIDUAL_GAMMA if residual else 1.0)
        x = g.op("Add", [x, y]) if residual else y
        cin = cout
    x = g.conv_bn(x, cin, c(960), 1, act="HardSwish")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    x = g.op("Gemm", [x, g.weight((classes, c(960)), prefix="fc_w"), g.weight((classes,), 0.02, prefix="fc_b")],
             transB=1)
    g.nodes[-1].output[0] = "logits"
    return g.model([_image_input(batch, size)], [_logits_output(batch, classes)])


def transformer_encoder(layers: int = 2, batch: int | str = 1, seq: int = 32, d_model: int = 128,
                        heads: int = 4, ffn: int = 512, seed: int = 0) -> onnx.ModelProto:
    """BERT-style post-LayerNorm encoder: multi-head attention, LayerNorm and GELU (erf)."""
    g = GraphBuilder("transformer_encoder", seed)
    dh = d_model // heads
    shape_bshd = g.const(np.array([0, seq, heads, dh], dtype=np.int64), "shape")
    shape_bsd = g.const(np.array([0, seq, d_model], dtype=np.int64), "shape")
    scale = g.const(np.array(1.0 / np.sqrt(dh), dtype=np.float32), "scale")
    half = g.const(np.array(0.5, dtype=np.float32), "c")
    one = g.const(np.array(1.0, dtype=np.float32), "c")
    rsqrt2 = g.const(np.array(1.0 / np.sqrt(2.0), dtype=np.float32), "c")
    x = "hidden"
    for _ in range(layers):
        def heads_of(t):
            return g.op("Transpose", [g.op("Reshape", [t, shape_bshd])], perm=[0, 2, 1, 3])
        q, k, v = (heads_of(g.linear(x, d_model, d_model)) for _ in range(3))
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, kt]), scale])], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3]), shape_bsd])
        x = g.layer_norm(g.op("Add", [x, g.linear(ctx, d_model, d_model)]), d_model)
        h = g.linear(x, d_model, ffn)
        h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [one, g.op("Erf", [g.op("Mul", [h, rsqrt2])])])])
        x = g.layer_norm(g.op("Add", [x, g.linear(h, ffn, d_model)]), d_model)
    g.nodes[-1].output[0] = "encoded"
    inp = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [batch, seq, d_model])
    out = helper.make_tensor_value_info("encoded", TensorProto.FLOAT, [batch, seq, d_model])
    return g.model([inp], [out])


def mlp(batch: int | str = 1, dims=(64, 256, 256, 10), seed: int = 0) -> onnx.ModelProto:
    """A plain multi-layer perceptron with ReLU between layers."""
    g = GraphBuilder("mlp", seed)
    x = "features"
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        x = g.linear(x, din, dout)
        if i < len(dims) - 2:
            x = g.op("Relu", [x])
    g.nodes[-1].output[0] = "scores"
    inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, dims[0]])
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, dims[-1]])
    return g.model([inp], [out])


def embedding_classifier(batch: int | str = 1, seq: int = 16, vocab: int = 1000, dim: int = 64,
                         classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Token ids (int64) → embedding lookup (Gather) → mean over the sequence → MLP.

    Two outputs: ``pooled`` (the mean embedding, [batch, dim]) and ``logits``.
    """
    g = GraphBuilder("embedding_classifier", seed)
    table = g.weight((vocab, dim), scale=1.0, prefix="embedding")
    x = g.op("Gather", [table, "tokens"], axis=0)
    g.op("ReduceMean", [x], axes=[1], keepdims=0)  # opset 17: axes is an attribute
    g.nodes[-1].output[0] = pooled = "pooled"
    h = g.op("Relu", [g.linear(pooled, dim, dim)])
    g.linear(h, dim, classes)
    g.nodes[-1].output[0] = "logits"
    inp = helper.make_tensor_value_info("tokens", TensorProto.INT64, [batch, seq])
    outs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, dim]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return g.model([inp], outs)
