"""ONNX frontend errors: every bad input gives a ``FrontendError`` (or its subclass
``UnsupportedOpsError``) with one line naming the file or model, the node, the op and
the values involved, and never another exception type. Nothing here compiles a model
past import, so the file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import smelt
from smelt.examples import zoo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # TVM warns when it renames inputs


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),), name="g"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 8
    return m


def _import_error(source, exc=smelt.FrontendError, **kwargs) -> str:
    """Import ``source`` through the public API; return the one-line message of the error."""
    with pytest.raises(exc) as info:
        smelt.frontend.load(source, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert "Traceback" not in msg and len(msg) < 600, msg
    return msg


# -- files ----------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    assert _import_error(path) == f"{path}: no such file"


def test_folder(tmp_path):
    assert _import_error(tmp_path) == f"{tmp_path}: is a folder, not an ONNX file"


def test_random_bytes(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _import_error(path)
    assert msg.startswith(f"{path}: not ") and "ONNX model" in msg


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_never_escape_as_other_errors(tmp_path, seed):
    """Whatever protobuf makes of garbage (a decode error or a strange model), the error is a FrontendError."""
    path = tmp_path / "x.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(256 + 97 * seed))
    assert str(path) in _import_error(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file,\nnot an ONNX model\n")
    msg = _import_error(path)
    assert msg.startswith(f"{path}: not ") and "ONNX model" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert _import_error(path) == f"{path}: not an ONNX model (no graph found in the file)"


def test_compile_reports_the_same_error(tmp_path):
    """``smelt.compile`` raises the frontend's error unchanged."""
    path = tmp_path / "nope.onnx"
    with pytest.raises(smelt.FrontendError, match="no such file"):
        smelt.compile([path], target="cpu")


def test_external_data_missing(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(zoo.mlp(), str(path), save_as_external_data=True, location="mlp.data", size_threshold=0)
    (tmp_path / "mlp.data").unlink()
    msg = _import_error(path)
    assert msg.startswith(f"{path}: cannot read its external data") and "mlp.data" in msg


def test_model_proto_with_unloaded_external_data(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(zoo.mlp(), str(path), save_as_external_data=True, location="mlp.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    msg = _import_error(model)
    assert "initializer 'fc_w0'" in msg and "not loaded" in msg and "pass the .onnx path" in msg


def test_invalid_model():
    """A node reading a value nothing defines: onnx's checker rejects it, named as an invalid model."""
    m = _model([helper.make_node("Relu", ["ghost"], ["y"], name="r")], [_f32("x", [2])], [_f32("y", [2])])
    msg = _import_error(m)
    assert msg.startswith("<onnx:g>: invalid ONNX model:") and "ghost" in msg


# -- ops --------------------------------------------------------------------------
def _unsupported_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Celu", ["x"], ["a"], name="celu_1"),
             helper.make_node("Fancy", ["a"], ["b"], name="my_fancy", domain="com.example"),
             helper.make_node("Relu", ["b"], ["c"], name="relu_ok"),
             helper.make_node("Celu", ["c"], ["y"], name="celu_2")]
    return _model(nodes, [_f32("x", [2, 3])], [_f32("y", [2, 3])], opsets=(("", 17), ("com.example", 1)),
                  name="uns")


def test_unsupported_ops_listed_together():
    """Two op types (one TVM lacks, one custom-domain) in ONE error with node names and the opset."""
    msg = _import_error(_unsupported_model(), smelt.UnsupportedOpsError)
    assert msg == ("<onnx:uns>: 2 unsupported op type(s) at opset 17: Celu (nodes: celu_1, celu_2); "
                   "com.example.Fancy (nodes: my_fancy)")


def test_unsupported_ops_attributes_and_compile():
    with pytest.raises(smelt.UnsupportedOpsError) as info:
        smelt.compile([_unsupported_model()], target="cpu", names=["uns"])
    err = info.value
    assert err.ops == {"Celu": ["celu_1", "celu_2"], "com.example.Fancy": ["my_fancy"]}
    assert err.opset == 17


def test_unsupported_op_inside_if_branch():
    """Ops in subgraphs count too; an unnamed node is named by its output."""
    branch = helper.make_graph([helper.make_node("Celu", ["x"], ["t"])], "then", [], [_f32("t", [2])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [_f32("e", [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="if0")]
    m = _model(nodes, [_f32("x", [2]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
               [_f32("y", [2])])
    msg = _import_error(m, smelt.UnsupportedOpsError)
    assert "1 unsupported op type(s) at opset 17: Celu (nodes: <unnamed: output t>)" in msg


def _matmul_model(name: str) -> onnx.ModelProto:
    """Shapes [2, 3] @ [4, 5]: onnx's checker (no shape inference) lets it through."""
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], [_f32("x", [2, 3])], [_f32("y", [2, 5])],
               [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")], name="bad")
    onnx.checker.check_model(m)
    return m


def test_converter_failure_names_node_and_op():
    msg = _import_error(_matmul_model("bad_matmul"))
    assert msg.startswith("<onnx:bad>: node 'bad_matmul' (op MatMul, opset 17) failed to convert with inputs "
                          "(float32[2, 3], float32[4, 5]): ")
    assert "reduction" in msg


def test_converter_failure_unnamed_node_names_its_output():
    msg = _import_error(_matmul_model(""))
    assert "unnamed node with output 'y' (op MatMul, opset 17)" in msg


def test_te_function_without_relax_equivalent():
    """A converter path that only has a TE function (Resize of a 3-D tensor) fails clearly at its node."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", name="resize1d")]
    m = _model(nodes, [_f32("x", [1, 2, 8])], [_f32("y", [1, 2, 16])],
               [numpy_helper.from_array(np.array([1, 1, 2], np.float32), "scales")])
    msg = _import_error(m)
    assert "node 'resize1d' (op Resize, opset 18)" in msg and "TE function" in msg


# -- input shapes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    return zoo.mlp(batch="N")


def test_override_names_missing_input(mlp):
    msg = _import_error(mlp, input_shapes={"feature": [1, 64]})
    assert msg == "<onnx:mlp>: input_shapes names 'feature', which is not an input; inputs are features"


def test_override_names_a_weight(mlp):
    msg = _import_error(mlp, input_shapes={"fc_w0": [64, 256]})
    assert "'fc_w0', which is a weight (initializer), not an input; inputs are features" in msg


def test_override_wrong_rank(mlp):
    msg = _import_error(mlp, input_shapes={"features": [1, 64, 1]})
    assert msg == "<onnx:mlp>: input 'features' has rank 2 ['N', 64], the override gives rank 3 [1, 64, 1]"


@pytest.mark.parametrize("bad", [-1, None, 2.5, True, ""])
def test_override_bad_dim(mlp, bad):
    msg = _import_error(mlp, input_shapes={"features": [bad, 64]})
    assert msg.startswith(f"<onnx:mlp>: input_shapes['features'] dim 0 is {bad!r}; a dim is an int >= 0")


@pytest.mark.parametrize("bad", [5, "N,64"])
def test_override_not_a_list(mlp, bad):
    msg = _import_error(mlp, input_shapes={"features": bad})
    assert msg == f"<onnx:mlp>: input_shapes['features'] is {bad!r}; give a list of dims"


def test_override_through_compile_names_model(mlp):
    """``model.input`` keys reach the right model; the error is the frontend's."""
    with pytest.raises(smelt.FrontendError, match="rank 2"):
        smelt.compile([mlp], target="cpu", names=["m"], input_shapes={"m.features": [64]})


def test_input_of_unsupported_dtype():
    inp = helper.make_tensor_value_info("s", TensorProto.STRING, [2])
    m = _model([helper.make_node("Identity", ["s"], ["y"])], [inp],
               [helper.make_tensor_value_info("y", TensorProto.STRING, [2])])
    msg = _import_error(m)
    assert msg == "<onnx:g>: input 's' has element type STRING, which smelt does not take"
