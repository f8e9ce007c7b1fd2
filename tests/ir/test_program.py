"""Program: several models in one module with one content-addressed weight store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.errors import SmeltError
from smelt.ir import Program, TensorSpec

SCALE = np.array([0.5, 1.0, 2.0, 4.0], dtype="float32")  # 4 elements: stays inline, not a weight
INPUTS = [TensorSpec("x", (2, 8), "float32")]


def _mlp(w0, b, w1) -> relax.Function:
    """x @ w0 + b -> relu -> @ w1, scaled by an inline constant; weights as parameters (TVM's way)."""

    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w0: R.Tensor((8, 16), "float32"),
                 b: R.Tensor((16,), "float32"), w1: R.Tensor((16, 4), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.matmul(x, w0)
                lv1 = R.add(lv, b)
                lv2 = R.nn.relu(lv1)
                lv3 = R.matmul(lv2, w1)
                gv = R.multiply(lv3, R.const(SCALE))
                R.output(gv)
            return gv

    return Model["main"].with_attr("params", [tvm.runtime.tensor(a) for a in (w0, b, w1)])


@pytest.fixture
def arrays(rng):
    f = np.float32
    return {"w0": rng.standard_normal((8, 16)).astype(f), "b": rng.standard_normal(16).astype(f),
            "w1": rng.standard_normal((16, 4)).astype(f), "w1b": rng.standard_normal((16, 4)).astype(f),
            "w0c": rng.standard_normal((8, 16)).astype(f)}


@pytest.fixture
def program(arrays):
    """Three models: b shares w0 and b with a; c shares b and w1 with a."""
    a = arrays
    p = Program()
    p.add_model("a", _mlp(a["w0"], a["b"], a["w1"]), INPUTS, ["y"], "a.onnx")
    p.add_model("b", _mlp(a["w0"], a["b"], a["w1b"]), INPUTS)
    p.add_model("c", _mlp(a["w0c"], a["b"], a["w1"]), INPUTS)
    return p


def test_two_models_share_weights(arrays):
    a = arrays
    p = Program()
    p.add_model("a", _mlp(a["w0"], a["b"], a["w1"]), INPUTS)
    p.add_model("b", _mlp(a["w0"], a["b"], a["w1b"]), INPUTS)
    assert len(p.weights) == 4
    assert p.weights.nbytes == sum(a[k].nbytes for k in ("w0", "b", "w1", "w1b"))
    assert p.weights.added_bytes == 2 * sum(a[k].nbytes for k in ("w0", "b", "w1"))
    assert p.models["a"].weights[:2] == p.models["b"].weights[:2]
    assert p.models["a"].weights[2] != p.models["b"].weights[2]


def test_three_models(program, arrays):
    assert list(program.models) == ["a", "b", "c"]
    assert len(program.weights) == 5
    assert program.weights.nbytes == sum(a.nbytes for a in arrays.values())
    ka, kb, kc = (program.models[m].weights for m in "abc")
    assert kc[1] == ka[1] == kb[1] and kc[2] == ka[2]
    for key, name in zip(ka, ("w0", "b", "w1")):
        np.testing.assert_array_equal(program.weights[key], arrays[name])
    # Each model is a function of the module, named after it, with its weights as parameters.
    for name in "abc":
        func = program.mod[name]
        assert func.attrs["global_symbol"] == name and int(func.attrs["num_input"]) == 1
        assert len(func.params) == 4 and "params" not in func.attrs
    assert [str(t) for t in program.models["a"].outputs] == ["y: float32[2, 4]"]


def test_small_weight_parameters_become_inline(arrays):
    """A weight parameter below MIN_WEIGHT_ELEMENTS is bound inline, as after lowering."""
    a = arrays

    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w0: R.Tensor((8, 16), "float32"), s: R.Tensor((16,), "float32"),
                 t: R.Tensor((2,), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.multiply(R.matmul(x, w0), s)
                gv = R.add(R.reshape(lv, R.shape([16, 2])), t)
                R.output(gv)
            return gv

    t = np.array([1.0, -1.0], dtype="float32")
    func = Model["main"].with_attr("params", [tvm.runtime.tensor(v) for v in (a["w0"], a["b"], t)])
    p = Program()
    p.add_model("m", func, INPUTS)
    assert len(p.mod["m"].params) == 3 and len(p.weights) == 2
    assert "metadata" in p.script()  # t is printed inline
    tvm.ir.assert_structural_equal(Program.from_module(p.bind(), p.models).mod, p.mod)


def test_duplicate_model_name_rejected(arrays):
    a = arrays
    p = Program()
    p.add_model("a", _mlp(a["w0"], a["b"], a["w1"]), INPUTS)
    with pytest.raises(SmeltError, match="two models are named 'a'"):
        p.add_model("a", _mlp(a["w0"], a["b"], a["w1"]), INPUTS)


def test_bind_then_from_module_round_trip(program):
    bound = program.bind()
    for name in "abc":
        assert len(bound[name].params) == 1  # weights are constants now
    # Shared weights are one tensor in the bound module, not copies.
    w0_in_a = bound["a"].body.blocks[0].bindings[0].value.args[1]
    w0_in_b = bound["b"].body.blocks[0].bindings[0].value.args[1]
    assert w0_in_a.value.same_as(w0_in_b.value)

    back = Program.from_module(bound, program.models)
    tvm.ir.assert_structural_equal(back.mod, program.mod)
    assert sorted(back.weights.keys()) == sorted(program.weights.keys())
    assert back.weights.nbytes == program.weights.nbytes
    for name in "abc":
        assert back.models[name].weights == program.models[name].weights


def test_save_load_round_trip(program, tmp_path):
    program.save(tmp_path / "prog")
    program.save(tmp_path / "prog")  # saving over an earlier save replaces it
    loaded = Program.load(tmp_path / "prog")
    tvm.ir.assert_structural_equal(loaded.mod, program.mod)
    assert loaded.models == program.models
    assert sorted(loaded.weights.keys()) == sorted(program.weights.keys())
    for key in program.weights.keys():
        np.testing.assert_array_equal(loaded.weights[key], program.weights[key])
        assert loaded.weights[key].dtype == program.weights[key].dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog"]  # no temporary folders left


def test_load_errors(program, tmp_path):
    with pytest.raises(SmeltError, match="not a saved smelt program"):
        Program.load(tmp_path)
    program.save(tmp_path / "prog")
    doc = json.loads((tmp_path / "prog" / "program.json").read_text())
    doc["format"] = 99
    (tmp_path / "prog" / "program.json").write_text(json.dumps(doc))
    with pytest.raises(SmeltError, match="program format 99, this smelt reads 1"):
        Program.load(tmp_path / "prog")


def test_printed_ir_round_trip(program):
    text = program.script()
    for name in "abc":
        assert f"def {name}(" in text
    tvm.ir.assert_structural_equal(tvm.script.from_source(text), program.mod)


def test_imported_models_round_trip(tmp_path):
    """The same checks on what the ONNX frontend produces (two MLPs sharing their first layers)."""
    from smelt import import_models
    from smelt.examples import zoo

    program = import_models([zoo.mlp(dims=(16, 32, 8)), zoo.mlp(dims=(16, 32, 4))], names=["m8", "m4"])
    # Same seed: the first layer's weight and bias are drawn identically and stored once;
    # the last biases (8 and 4 elements) are inline constants, not stored weights.
    assert len(program.weights) == 4
    assert program.models["m8"].weights[:2] == program.models["m4"].weights[:2]
    assert [len(program.mod[m].params) for m in ("m8", "m4")] == [4, 4]
    tvm.ir.assert_structural_equal(tvm.script.from_source(program.script()), program.mod)
    tvm.ir.assert_structural_equal(Program.from_module(program.bind(), program.models).mod, program.mod)
    program.save(tmp_path / "p")
    tvm.ir.assert_structural_equal(Program.load(tmp_path / "p").mod, program.mod)
