"""ONNX importer: an ONNX file or ``ModelProto`` becomes one model of a ``Program``.

Requires: a path (external data is read from beside the file) or a ``ModelProto``.
Guarantees: the model is checked, converted to a supported opset if needed, and
converted by TVM's ONNX frontend with weights kept as parameters; symbolic dims
stay symbolic unless ``input_shapes`` overrides them; every unsupported op type
is reported at once (op type, node names, opset); a converter failure names the
node, its op and its input shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from ..errors import FrontendError, UnsupportedOpsError
from ..ir import TensorSpec
from .common import ImportedModel

log = logging.getLogger(__name__)

# Opsets TVM 0.27's importer has converters for; models outside are converted first.
MIN_OPSET, MAX_OPSET = 7, 23
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


def read_onnx(source: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Load and check a model; return it with a printable origin."""
    if isinstance(source, onnx.ModelProto):
        return source, f"<onnx:{source.graph.name or 'model'}>"
    path = Path(source)
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf raises DecodeError, external data raises OSError/ValueError
        raise FrontendError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.output:
        raise FrontendError(f"{path}: not an ONNX model (no graph found in the file)")
    return model, str(path)


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def check_supported(model: onnx.ModelProto, origin: str) -> None:
    """Raise one error naming every op type without a converter (not just the first)."""
    known = set(_tvm_onnx._get_convert_map()) | {"If", "Constant"}
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(_all_nodes(model.graph)):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if node.op_type not in known or node.domain not in ("", "ai.onnx"):
            missing.setdefault(op, []).append(node.name or f"#{i}")
    if missing:
        raise UnsupportedOpsError(origin, missing, default_opset(model))


class _Importer(_tvm_onnx.ONNXGraphImporter):
    """TVM's importer, with failures tagged by the node that caused them."""

    origin = ""

    def _convert_operator(self, op_name, inputs, attrs, opset):
        try:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        except FrontendError:
            raise
        except Exception as e:
            node = attrs.get("tvm_custom", {}).get("name", "?")
            shapes = ", ".join(_shape_str(x) for x in inputs)
            raise FrontendError(
                f"{self.origin}: node {node!r} (op {op_name}, opset {opset}) failed to convert "
                f"with inputs ({shapes}): {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
            ) from None


def _shape_str(x) -> str:
    if x is None:
        return "none"
    s = getattr(x, "ty", None)
    if isinstance(s, relax.TensorType) and s.shape is not None:
        return f"{s.dtype}{list(s.shape)}"
    return type(x).__name__


def import_onnx(source, name: str | None = None, input_shapes: dict | None = None,
                opset: int | None = None) -> ImportedModel:
    """Convert an ONNX model. ``input_shapes`` overrides input shapes by name (a dim may be a str)."""
    model, origin = read_onnx(source)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise FrontendError(f"{origin}: invalid ONNX model: {str(e).strip().splitlines()[0]}") from None
    model_opset = default_opset(model)
    target_opset = opset or (model_opset if MIN_OPSET <= model_opset <= MAX_OPSET
                             else min(max(model_opset, MIN_OPSET), MAX_OPSET))
    if target_opset != model_opset:
        log.info("%s: converting opset %d to %d", origin, model_opset, target_opset)
        try:
            model = onnx.version_converter.convert_version(model, target_opset)
        except Exception as e:
            raise FrontendError(f"{origin}: cannot convert opset {model_opset} to {target_opset}: {e}") from None
    check_supported(model, origin)

    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {i.name for i in graph_inputs}
    if unknown:
        raise FrontendError(f"{origin}: no input named {', '.join(sorted(unknown))}; inputs are "
                            f"{', '.join(i.name for i in graph_inputs)}")
    shapes, dtypes, specs = {}, {}, []
    for i in graph_inputs:
        t = i.type.tensor_type
        dtype = _DTYPES.get(t.elem_type)
        if dtype is None:
            raise FrontendError(f"{origin}: input {i.name!r} has element type "
                                f"{onnx.TensorProto.DataType.Name(t.elem_type)}, which smelt does not take")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{i.name}_dim{k}")
                for k, d in enumerate(t.shape.dim)]
        if i.name in input_shapes:
            given = list(input_shapes[i.name])
            if len(given) != len(dims):
                raise FrontendError(f"{origin}: input {i.name!r} has rank {len(dims)} {dims}, "
                                    f"the override gives rank {len(given)} {given}")
            dims = given
            # TVM's importer wants symbolic dims as TIR variables, not names.
            shapes[i.name] = [d if isinstance(d, int) else tirx.Var(str(d), "int64") for d in dims]
        dtypes[i.name] = dtype
        specs.append(TensorSpec(i.name, tuple(dims), dtype))

    importer = _Importer(shapes, dtypes, keep_params_in_input=True, sanitize=True)
    importer.origin = origin
    try:
        mod = importer.from_onnx(model.graph, target_opset)
    except FrontendError:
        raise
    except Exception as e:
        raise FrontendError(f"{origin}: TVM's ONNX importer failed: {e}") from None
    func = mod["main"]
    if func.attrs is None or "num_input" not in func.attrs:
        func = func.with_attr("num_input", len(specs))
    output_names = [o.name for o in model.graph.output]
    default = Path(origin).stem if not origin.startswith("<") else (model.graph.name or "model")
    return ImportedModel(name or default, func, specs, output_names, origin)
