"""MergeCommonStems: models sharing a stem compute it once in ``__all__``; each model alone is unchanged.

Tolerances: fp32 through different kernels, rtol 1e-4 and atol 1e-4 × max|reference|.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import smelt
from smelt import cli
from smelt.examples import zoo
from smelt.ir import summarize


def close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def merged_ops(analysis) -> dict:
    return dict(summarize(analysis.module, ["__all__"]).ops)


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for out in (8, 16, 16):
            layers += [torch.nn.Conv2d(c, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
            c = out
        self.features = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x).mean((2, 3))


class Head(torch.nn.Module):
    def __init__(self, backbone, classes):
        super().__init__()
        self.backbone, self.fc = backbone, torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    backbone = Backbone()
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return Head(backbone, 10).eval(), Head(backbone, 4).eval(), torch.randn(1, 3, 16, 16)


def test_two_heads_share_their_backbone(heads, tmp_path):
    h1, h2, x = heads
    models = [(h1, (x,)), (h2, (x,))]
    a = smelt.analyze_merge(models, names=["cls", "aux"], share_inputs=True)
    assert merged_ops(a)["nn.conv2d"] == 3  # the backbone's convs once, not twice
    assert a.report["shared_flops_fraction"]["cls"] > 0.99
    art = smelt.compile(models, names=["cls", "aux"], merge=True, share_inputs=True)
    rt = smelt.load(art.save(tmp_path / "heads"))
    outs = rt.run_all(**{"cls.x": x.numpy()})
    with torch.no_grad():
        close(outs["cls"], h1(x).numpy())
        close(outs["aux"], h2(x).numpy())
    np.testing.assert_array_equal(outs["cls"], rt.run("cls", x=x.numpy()))


def test_without_shared_input_nothing_is_shared(heads):
    h1, h2, x = heads
    a = smelt.analyze_merge([(h1, (x,)), (h2, (x,))], names=["cls", "aux"], horizontal=False)
    assert merged_ops(a)["nn.conv2d"] == 6 and a.report["shared_bindings"] == {"cls": 0, "aux": 0}


def test_fine_tuned_variants_share_the_frozen_layers(tmp_path, rng):
    """Three variants: first two conv blocks identical (frozen), later layers fine-tuned apart."""
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
    variants = []
    for k in range(3):
        torch.manual_seed(10 + k)
        tail = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
        variants.append(torch.nn.Sequential(base, tail).eval())
    x = torch.randn(1, 3, 12, 12)
    models = [(v, (x,)) for v in variants]
    names = ["v0", "v1", "v2"]
    a = smelt.analyze_merge(models, names=names, share_inputs=True, horizontal=False)
    assert merged_ops(a)["nn.conv2d"] == 2 + 3  # two shared, one per variant
    reasons = {m["reason"] for m in a.report["not_merged"]}
    assert any("weight" in r and "nn.conv2d" in r for r in reasons), reasons
    art = smelt.compile(models, names=names, merge=True, share_inputs=True)
    rt = smelt.load(art.save(tmp_path / "variants"))
    (shared_input,) = rt.models["__all__"].inputs  # one input for all three
    outs = rt.run_all(**{shared_input.name: x.numpy()})
    with torch.no_grad():
        for n, v in zip(names, variants):
            close(outs[n], v(x).numpy())


def test_models_with_nothing_in_common_share_nothing(tmp_path, rng):
    models = [zoo.mlp(batch=1), zoo.resnet(18, size=32, classes=10, width=8)]
    a = smelt.analyze_merge(models, names=["m", "r"], share_inputs=True)
    assert a.report["shared_bindings"] == {"m": 0, "r": 0}
    separate = smelt.compile(models, names=["m", "r"])
    merged = smelt.compile(models, names=["m", "r"], merge=True, share_inputs=True)
    # the merged entry adds no weights: every tensor it uses is a model's own, stored once
    assert merged.report.weight_bytes == separate.report.weight_bytes
    rt = smelt.load(merged.save(tmp_path / "apart"))
    f = rng.standard_normal((1, 64)).astype("float32")
    x = rng.standard_normal((1, 3, 32, 32)).astype("float32")
    outs = rt.run_all(**{"m.features": f, "r.input": x})
    np.testing.assert_array_equal(outs["m"], rt.run("m", features=f))
    np.testing.assert_array_equal(outs["r"], rt.run("r", input=x))


def _onnx_with_stem(conv: torch.nn.Conv2d, head: np.ndarray) -> onnx.ModelProto:
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], name="stem"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=0, name="pool"),
             helper.make_node("MatMul", ["m", "H"], ["y"], name="head")]
    g = helper.make_graph(nodes, "onnx_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, head.shape[1]])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
                           numpy_helper.from_array(head, "H")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads
    return model


class StemNet(torch.nn.Module):
    def __init__(self, stem, classes):
        super().__init__()
        self.stem, self.fc = stem, torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.stem(x)).mean((2, 3)))


def test_onnx_and_torch_models_share_a_stem(tmp_path, rng):
    torch.manual_seed(3)
    stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    net = StemNet(stem, 5).eval()
    onnx_model = _onnx_with_stem(stem, rng.standard_normal((8, 4)).astype("float32"))
    x = torch.randn(1, 3, 16, 16)
    models = [(net, (x,)), onnx_model]
    a = smelt.analyze_merge(models, names=["t", "o"], share_inputs=True)
    assert merged_ops(a)["nn.conv2d"] == 1 and a.report["shared_bindings"]["o"] >= 3
    art = smelt.compile(models, names=["t", "o"], merge=True, share_inputs=True)
    rt = smelt.load(art.save(tmp_path / "mixed"))
    outs = rt.run_all(**{"t.x": x.numpy()})
    from smelt.examples.reference import ort_outputs

    with torch.no_grad():
        close(outs["t"], net(x).numpy())
    close(outs["o"], ort_outputs(onnx_model, {"x": x.numpy()})[0])
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["summary"]["merge"]["shared_bindings"]["o"] >= 3


def test_share_input_errors():
    m = zoo.mlp(batch=1)
    with pytest.raises(smelt.SmeltError, match="no input 'b.nope'"):
        smelt.compile([m, m], names=["a", "b"], merge=True, share_input={"a.features": "b.nope"})
    r = zoo.resnet(18, size=32, classes=10, width=8)
    with pytest.raises(smelt.SmeltError, match="differ in shape or dtype"):
        smelt.compile([m, r], names=["a", "b"], merge=True, share_input={"a.features": "b.input"})


def test_cli_merge_and_report(tmp_path):
    onnx.save(zoo.resnet(18, size=32, classes=10, width=8), tmp_path / "a.onnx")
    onnx.save(zoo.resnet(18, size=32, classes=10, width=8), tmp_path / "b.onnx")
    onnx.save(zoo.resnet(18, size=32, classes=10, width=8, seed=5), tmp_path / "c.onnx")
    paths = [str(tmp_path / f"{n}.onnx") for n in "abc"]
    r = CliRunner().invoke(cli.main, ["inspect", "--merge", "--share-inputs", *paths, "--graph", str(tmp_path / "g.dot")])
    assert r.exit_code == 0, r.output
    assert "b.input reads a.input" in r.output and "100.0%" in r.output
    assert "c.lv vs a: weight (operand 1 of nn.conv2d" in r.output
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and "shared" in dot
    r = CliRunner().invoke(cli.main, ["compile", *paths, "--merge", "--share-inputs", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli.main, ["compile", paths[0], "--share-inputs", "-o", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "go with --merge" in r.output
