"""PyTorch frontend: smelt (CPU) against torch eager on the torch zoo; ``.pt2`` files and
ExportedPrograms as sources; ``dynamic_batch``; several outputs; BatchNorm folding;
torch and ONNX models in one artifact; the errors a user meets.

Tolerances: float32 throughout; smelt's kernels sum in a different order than torch's
and BatchNorm is folded in float64 then rounded, so outputs agree to ``rtol=1e-4``
with a small ``atol`` for values near zero (attention and GELU: ``atol=1e-4``). The
differences seen are ~1e-7; a wrong weight, layout or BN statistic is off by >1e-2.
"""

from __future__ import annotations

import inspect
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smelt  # noqa: E402
from smelt.examples import torch_zoo, zoo  # noqa: E402

TOLERANCE = {  # (rtol, atol)
    "resnet": (1e-4, 1e-5),
    "small_cnn": (1e-4, 1e-5),
    "transformer": (1e-4, 1e-4),
    "mlp": (1e-4, 1e-5),
    "two_outputs": (1e-4, 1e-5),
}

# torch.export warns about its own deprecated pytree API (LeafSpec) on every export.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _eager(module, args) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = module(*args)
    return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))


def _feeds(module, args) -> dict[str, np.ndarray]:
    """Inputs by forward()'s argument names, which are the compiled model's input names."""
    names = list(inspect.signature(module.forward).parameters)
    return {n: a.numpy() for n, a in zip(names, args)}


def _as_tuple(out) -> tuple[np.ndarray, ...]:
    return out if isinstance(out, tuple) else (out,)


def _assert_close(got, want, model: str) -> None:
    rtol, atol = TOLERANCE[model]
    got, want = _as_tuple(got), _as_tuple(want)
    assert len(got) == len(want), f"{model}: {len(got)} outputs, torch gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{model} output {i}: shape {g.shape}, torch {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{model} output {i}")


def _saved(art, factory, name: str) -> smelt.Runtime:
    return smelt.load(art.save(factory.mktemp("art") / name))


# -- each zoo module, static shapes -------------------------------------------

ZOO = sorted(torch_zoo.BUILDERS)


@pytest.fixture(scope="module")
def zoo_compiled(tmp_path_factory):
    """Compiles each zoo module once for this file, when a test first asks for it (a
    module-scoped parametrized fixture would recompile whenever tests interleave params)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            module, args = torch_zoo.BUILDERS[name]()
            art = smelt.compile([(module, args)], target="cpu", names=[name])
            cache[name] = name, module, args, art, _saved(art, tmp_path_factory, name)
        return cache[name]

    return get


@pytest.fixture
def zoo_case(request, zoo_compiled):
    """(name, module, example args, artifact, loaded runtime) for the zoo module named by the
    (indirect) parameter."""
    return zoo_compiled(request.param)


@pytest.mark.parametrize("zoo_case", ZOO, indirect=True)
def test_zoo_matches_torch_eager(zoo_case):
    name, module, args, _, rt = zoo_case
    assert [t.name for t in rt.signature(name).inputs] == list(inspect.signature(module.forward).parameters)
    _assert_close(rt.run(name, **_feeds(module, args)), _eager(module, args), name)


@pytest.mark.parametrize("zoo_case", ZOO, indirect=True)
def test_zoo_matches_on_fresh_inputs(zoo_case):
    """Not just the example the module was exported with: new data of the same shape."""
    name, module, args, _, rt = zoo_case
    gen = torch.Generator().manual_seed(1)
    fresh = tuple(torch.randn(a.shape, generator=gen) * 3 for a in args)
    _assert_close(rt.run(name, **_feeds(module, fresh)), _eager(module, fresh), name)


@pytest.mark.parametrize("zoo_case, after_relu", [("resnet", 1), ("mlp", 0)], indirect=["zoo_case"])
def test_batch_norm_folded(zoo_case, after_relu):
    """Folded into the conv/Linear before it: not decomposed into sqrt/divide at run time.
    A BatchNorm after a ReLU (``after_relu`` of them) becomes one multiply and one add."""
    _, module, _, art, _ = zoo_case
    before, after = art.report.ops_before_hist, art.report.ops_after_hist
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in module.modules())
    assert before.get("nn.batch_norm") == n_bn
    assert "nn.batch_norm" not in after, after
    assert not {"sqrt", "divide", "subtract"} & set(after), after
    assert after.get("multiply", 0) == after_relu, after
    for op in ("nn.conv2d", "matmul"):
        assert after.get(op) == before.get(op), op


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_zoo_batch_norm_statistics_matter(name):
    """The zoo's running statistics change the output, so a fold that dropped them would fail."""
    module, args = torch_zoo.BUILDERS[name]()
    before = _eager(module, args)[0]
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.reset_running_stats()
    assert np.abs(_eager(module, args)[0] - before).max() > 1e-2


def test_zoo_is_deterministic():
    m1, a1 = torch_zoo.resnet()
    m2, a2 = torch_zoo.resnet()
    assert torch.equal(a1[0], a2[0])
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


@pytest.mark.parametrize("zoo_case", ["two_outputs"], indirect=True)
def test_two_outputs_give_a_tuple(zoo_case):
    name, module, args, _, rt = zoo_case
    out = rt.run(name, **_feeds(module, args))
    assert isinstance(out, tuple) and len(out) == 2
    assert [o.shape for o in out] == [(3, 5), (3, 8)]
    named = rt.run_named(name, **_feeds(module, args))
    assert list(named) == ["output0", "output1"]
    np.testing.assert_array_equal(named["output1"], out[1])
    np.testing.assert_allclose(np.linalg.norm(out[1], axis=-1), 1.0, rtol=1e-5)  # the L2-normalized head


class DictOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "parts": (x * 2, y)}  # y twice: torch names both outputs after one node


def test_output_names_follow_the_returned_structure(tmp_path):
    torch.manual_seed(0)
    module, x = DictOutputs().eval(), torch.randn(2, 4)
    art = smelt.compile([(module, (x,))], target="cpu", names=["d"])
    assert [t.name for t in art.models["d"].outputs] == ["logits", "parts.0", "parts.1"]
    named = smelt.load(art.save(tmp_path / "art")).run_named("d", x=x.numpy())
    with torch.no_grad():
        want = module(x)
    for key, ref in (("logits", want["logits"]), ("parts.0", want["parts"][0]), ("parts.1", want["parts"][1])):
        np.testing.assert_allclose(named[key], ref.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    mlp, args = torch_zoo.mlp()
    assert [t.name for t in smelt.import_models([(mlp, args)]).models["bnmlp"].outputs] == ["output"]


class NoWeights(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


def test_model_without_weights(tmp_path):
    """An empty weights.bin (once: ValueError 'cannot mmap an empty file' on load)."""
    x = torch.randn(2, 3)
    rt = smelt.load(smelt.compile([(NoWeights(), (x,))], target="cpu", names=["f"]).save(tmp_path / "art"))
    np.testing.assert_allclose(rt.run("f", x=x.numpy()), (x * 2 + 1).numpy(), rtol=1e-6)


# -- other sources ---------------------------------------------------------------

def test_pt2_round_trip(tmp_path):
    module, args = torch_zoo.mlp()
    path = tmp_path / "bn_mlp.pt2"
    torch.export.save(torch.export.export(module, args), str(path))
    art = smelt.compile(path, target="cpu")
    assert list(art.models) == ["bn_mlp"]  # named after the file
    assert art.models["bn_mlp"].source == str(path)
    rt = smelt.load(art.save(tmp_path / "art"))
    _assert_close(rt.run("bn_mlp", **_feeds(module, args)), _eager(module, args), "mlp")


def test_pt2_with_its_own_dynamic_shapes(tmp_path):
    """A .pt2 exported with a torch.export.Dim stays dynamic (torch's symbol name is kept)."""
    module, args = torch_zoo.mlp(batch=4)
    ep = torch.export.export(module, args, dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    torch.export.save(ep, str(tmp_path / "dyn.pt2"))
    art = smelt.compile(tmp_path / "dyn.pt2", target="cpu")
    assert isinstance(art.models["dyn"].inputs[0].shape[0], str)
    rt = smelt.load(art.save(tmp_path / "art"))
    for batch in (1, 5):
        x = (torch.randn(batch, args[0].shape[1]),)
        _assert_close(rt.run("dyn", **_feeds(module, x)), _eager(module, x), "mlp")


def test_exported_program_directly(tmp_path):
    module, args = torch_zoo.two_outputs()
    ep = torch.export.export(module, args)
    art = smelt.compile(ep, target="cpu", names=["heads"])
    assert [t.name for t in art.models["heads"].inputs] == ["x", "context"]
    rt = smelt.load(art.save(tmp_path / "art"))
    _assert_close(rt.run("heads", **_feeds(module, args)), _eager(module, args), "two_outputs")


# -- dynamic batch ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    """One artifact: the transformer (exported at batch 2) and the two-input, two-output
    module (exported at batch 1, which torch would otherwise specialize)."""
    enc, enc_args = torch_zoo.transformer(batch=2)
    heads, heads_args = torch_zoo.two_outputs(batch=1)
    art = smelt.compile([(enc, enc_args), (heads, heads_args)], target="cpu", names=["transformer", "two_outputs"],
                        dynamic_batch=True)
    return {"transformer": enc, "two_outputs": heads}, art, _saved(art, tmp_path_factory, "dynamic")


@pytest.mark.parametrize("model", ["transformer", "two_outputs"])
@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(dynamic, model, batch):
    modules, _, rt = dynamic
    module = modules[model]
    gen = torch.Generator().manual_seed(batch)
    args = tuple(torch.randn(batch, *t.shape[1:], generator=gen) for t in rt.signature(model).inputs)
    _assert_close(rt.run(model, **_feeds(module, args)), _eager(module, args), model)


def test_dynamic_batch_is_one_named_dim(dynamic):
    _, art, rt = dynamic
    for info in art.models.values():
        assert all(t.shape[0] == "batch" for t in info.inputs + info.outputs), info
    x, ctx = np.zeros((3, 12), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(smelt.InputError, match="batch"):
        rt.run("two_outputs", x=x, context=ctx)


# -- torch and ONNX together ----------------------------------------------------

def test_torch_and_onnx_in_one_artifact(tmp_path, onnx_reference):
    bn_mlp, bn_args = torch_zoo.mlp()
    heads, heads_args = torch_zoo.two_outputs()
    onnx_mlp = zoo.mlp()
    art = smelt.compile([(bn_mlp, bn_args), (heads, heads_args), onnx_mlp], target="cpu",
                        names=["bn_mlp", "heads", "onnx_mlp"])
    rt = smelt.load(art.save(tmp_path / "art"))
    assert set(rt.models) == {"bn_mlp", "heads", "onnx_mlp"}
    _assert_close(rt.run("bn_mlp", **_feeds(bn_mlp, bn_args)), _eager(bn_mlp, bn_args), "mlp")
    _assert_close(rt.run("heads", **_feeds(heads, heads_args)), _eager(heads, heads_args), "two_outputs")
    features = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    (want,) = onnx_reference(onnx_mlp, {"features": features})
    np.testing.assert_allclose(rt.run("onnx_mlp", features=features), want, rtol=1e-4, atol=1e-5)


# -- errors -----------------------------------------------------------------------

class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a value: torch.export cannot trace this
            return x * 2
        return x - 1


def test_data_dependent_control_flow_is_explained():
    with pytest.raises(smelt.FrontendError) as info:
        smelt.compile([(DataDependent(), (torch.randn(2, 3),))], target="cpu")
    msg = str(info.value)
    assert "torch.export failed for DataDependent" in msg
    assert "data-dependent expression" in msg  # torch's own reason
    assert "test_torch.py" in msg and "if x.sum() > 0" in msg  # the line that caused it
    assert "hint:" in msg and "torch.cond" in msg


class FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)


def test_dynamic_batch_on_a_fixed_batch_model():
    with pytest.raises(smelt.FrontendError, match=r"(?s)specialized it to be a constant \(2\).*hint: dynamic_batch"):
        smelt.compile([(FixedBatch(), (torch.randn(2, 3),))], target="cpu", dynamic_batch=True)


def _pt2_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pt2"
    module, args = torch_zoo.two_outputs()
    if kind == "garbage":
        path.write_bytes(b"\x00not a zip archive\xff" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.export.save(torch.export.export(module, args), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "torch_save":
        torch.save(module.state_dict(), str(path))
    elif kind == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    return path


@pytest.mark.parametrize("kind, expected", [
    ("garbage", "not a zip file"), ("empty", "not a zip file"), ("truncated", "not a zip file"),
    ("torch_save", "a torch.save file, not a torch.export archive"),
    ("other_zip", "a zip file, not a torch.export archive"),
])
def test_corrupt_pt2(tmp_path, kind, expected):
    path = _pt2_file(tmp_path, kind)
    with pytest.raises(smelt.FrontendError) as info:
        smelt.compile([path], target="cpu")
    msg = str(info.value)
    assert msg.startswith(str(path)) and expected in msg and "torch.export.save" in msg


def test_missing_pt2(tmp_path):
    with pytest.raises(smelt.FrontendError, match="no such file"):
        smelt.compile([tmp_path / "absent.pt2"], target="cpu")


def test_module_without_example_inputs():
    module, _ = torch_zoo.mlp()
    with pytest.raises(smelt.FrontendError, match="needs example inputs"):
        smelt.compile([(module, None)], target="cpu")
    with pytest.raises(smelt.FrontendError, match="needs example inputs"):
        smelt.compile([module], target="cpu")


def test_bare_module_without_a_list():
    module, _ = torch_zoo.mlp()
    with pytest.raises(smelt.FrontendError, match="example"):
        smelt.compile(module, target="cpu")


def test_wrong_number_of_example_inputs():
    module, args = torch_zoo.two_outputs()
    with pytest.raises(smelt.FrontendError, match=r"TwoHeads.forward\(x, context\) does not take the 1 example"):
        smelt.compile([(module, args[:1])], target="cpu")


class Scaled(torch.nn.Module):
    def forward(self, x, k):
        return x * k


def test_non_tensor_example_input():
    with pytest.raises(smelt.FrontendError, match=r"example input 'k' is a float \(2.5\); smelt compiles tensor"):
        smelt.compile([(Scaled(), (torch.randn(2, 3), 2.5))], target="cpu")


def test_float16_model_names_the_tvm_limitation():
    """TVM 0.27's torch frontend hard-codes float32 matmul/linear/conv outputs; the error says so."""
    module = torch.nn.Linear(4, 3).half().eval()
    with pytest.raises(smelt.FrontendError, match=r"(?s)TVM's torch frontend failed.*hint: the model is float16"):
        smelt.compile([(module, (torch.randn(2, 4).half(),))], target="cpu")


def test_example_inputs_as_a_list():
    module, args = torch_zoo.two_outputs()
    ep_list = smelt.import_models([(module, list(args))])
    assert [t.name for t in ep_list.models["twoheads"].inputs] == ["x", "context"]
