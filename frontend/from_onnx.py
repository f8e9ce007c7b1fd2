"""ONNX importer: an ONNX file or ``ModelProto`` becomes one model of a ``Program``.

Requires: a path (external data is read from beside the file) or a ``ModelProto``
with its external data loaded.
Guarantees: the model is checked; local functions are inlined; every unsupported
op type is reported at once (op type, node names, opset); the model is converted
to another opset when TVM's importer has no converter written for its own (newer
than ``MAX_OPSET``, older than ``MIN_OPSET``, or an op whose only converters
implement a later version of its schema); TVM's ONNX frontend converts it with
weights kept as parameters; symbolic dims stay symbolic unless ``input_shapes``
overrides them, and one dim name is one symbol across all inputs; a converter
failure names the node, its op and its input shapes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
from onnx import external_data_helper
import tvm
from tvm import relax, tirx, topi
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from ..errors import FrontendError, UnsupportedOpsError, error_line
from ..ir import TensorSpec
from .common import ImportedModel

log = logging.getLogger(__name__)

# Opsets TVM 0.27's importer has converters for; models outside are converted first.
MIN_OPSET, MAX_OPSET = 7, 23
_DEFAULT_DOMAINS = ("", "ai.onnx")
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _first_line(e: BaseException) -> str:
    return error_line(e)


def _last_line(e: BaseException) -> str:
    # TVM's op errors start with the whole repr of the op ("In ir.Op(span=None, ..., name="relax.add", ...), ").
    return re.sub(r'In ir\.Op\(.*?name="([\w.]+)".*?support_level=\d+\), ', r"In \1: ", error_line(e, last=True))


# -- reading ------------------------------------------------------------------
def read_onnx(source: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Load a model (with its external data); return it with a printable origin."""
    if isinstance(source, onnx.ModelProto):
        origin = f"<onnx:{source.graph.name or 'model'}>"
        external = [t.name for t in source.graph.initializer if external_data_helper.uses_external_data(t)]
        if external:
            more = f" and {len(external) - 1} more" if len(external) > 1 else ""
            raise FrontendError(f"{origin}: initializer {external[0]!r}{more} keep data in an external file that "
                                f"was not loaded; pass the .onnx path instead")
        return source, origin
    path = Path(source)
    if path.is_dir():
        raise FrontendError(f"{path}: is a folder, not an ONNX file")
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError (and others on garbage)
        raise FrontendError(f"{path}: not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(model, onnx.ModelProto) or (not model.graph.node and not model.graph.output):
        raise FrontendError(f"{path}: not an ONNX model (no graph found in the file)")
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # a missing or short data file: OSError, ValueError
        raise FrontendError(f"{path}: cannot read its external data ({type(e).__name__}: {_first_line(e)})") from None
    return model, str(path)


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) opset the model imports."""
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
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
    for i, node in enumerate(_all_nodes(model.graph)):  # i: a last resort for nodes with no name, no output
        default = node.domain in _DEFAULT_DOMAINS
        if not default or node.op_type not in known:
            op = node.op_type if default else f"{node.domain}.{node.op_type}"
            unnamed = f"<unnamed: output {node.output[0] if node.output else i}>"
            missing.setdefault(op, []).append(node.name or unnamed)
    if missing:
        raise UnsupportedOpsError(origin, missing, default_opset(model))


# -- opsets -------------------------------------------------------------------
def _converter_versions(op_type: str) -> list[int]:
    cls = _tvm_onnx._get_convert_map().get(op_type)
    if cls is None:
        return []
    return sorted(int(m[len("_impl_v"):]) for m in dir(cls) if re.fullmatch(r"_impl_v\d+", m))


def _since(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except Exception:  # no such op at that opset
        return None


def _upsample_needs_resize(nodes: list[onnx.NodeProto]) -> bool:
    """Whether to let the version converter turn Upsample into Resize.

    TVM's Upsample converter reads only Upsample-7's ``scales`` attribute (it fails on
    Upsample-9's input) and rounds nearest-neighbour coordinates half-to-even where
    ONNX floors them (wrong pixels). Resize from the version converter is right for
    ``nearest``; for ``linear`` the converter drops the asymmetric coordinate mode,
    while TVM's Upsample is right, so a model with a linear Upsample is left alone.
    """
    modes = {next((a.s for a in n.attribute if a.name == "mode"), b"nearest").decode()
             for n in nodes if n.op_type == "Upsample"}
    return modes == {"nearest"}


def stale_ops(model: onnx.ModelProto, opset: int) -> dict[str, int]:
    """Ops whose every TVM converter implements a later schema than ``opset`` has.

    TVM then uses its oldest converter anyway, which reads the later schema's
    inputs and attributes (Slice-9 read as Slice-13 fails; Resize-10 read as
    Resize-18 fails). Maps op type to the opset of that oldest converter.
    """
    nodes = [n for n in _all_nodes(model.graph) if n.domain in _DEFAULT_DOMAINS]
    out = {}
    for op in sorted({n.op_type for n in nodes} - {"Upsample"}):
        versions = _converter_versions(op)
        if versions and versions[0] > opset and _since(op, opset) != _since(op, versions[0]):
            out[op] = versions[0]
    if _upsample_needs_resize(nodes):
        out["Upsample"] = _converter_versions("Resize")[0]
    return out


def choose_opset(model: onnx.ModelProto, requested: int | None = None) -> tuple[int, str]:
    """The opset to import the model at, and why it is not the model's own ("" when it is)."""
    have = default_opset(model)
    if requested is not None:
        if not MIN_OPSET <= requested <= MAX_OPSET:
            raise FrontendError(f"opset {requested} requested; TVM's importer takes opsets "
                                f"{MIN_OPSET}..{MAX_OPSET}")
        return requested, "" if requested == have else "requested"
    if have > MAX_OPSET:
        return MAX_OPSET, f"TVM's importer knows opsets up to {MAX_OPSET}"
    target, why = max(have, MIN_OPSET), []
    if target != have:
        why.append(f"TVM's importer knows opsets from {MIN_OPSET}")
    stale = stale_ops(model, target)
    if stale:
        target = max(stale.values())
        why.append(f"TVM's converters for {', '.join(f'{op} (from opset {v})' for op, v in stale.items())} "
                   f"implement a later schema")
    return target, "; ".join(why)


def _convert_opset(model: onnx.ModelProto, origin: str, requested: int | None) -> onnx.ModelProto:
    have = default_opset(model)
    target, why = choose_opset(model, requested)
    if target == have:
        return model
    log.info("%s: converting opset %d to %d: %s", origin, have, target, why)
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as e:
        reason = _last_line(e)
        if MIN_OPSET <= have <= MAX_OPSET and requested is None:
            # Only an upgrade for stale converters failed: TVM may still convert the model.
            log.warning("%s: cannot convert opset %d to %d (%s); importing at opset %d", origin, have, target,
                        reason, have)
            return model
        raise FrontendError(f"{origin}: cannot convert opset {have} to {target} ({why}): {reason}") from None


# -- inputs -------------------------------------------------------------------
def _override_dims(origin: str, name: str, dims: list | None, given) -> list[int | str]:
    if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
        raise FrontendError(f"{origin}: input_shapes[{name!r}] is {given!r}; give a list of dims")
    given = list(given)
    if dims is not None and len(given) != len(dims):
        raise FrontendError(f"{origin}: input {name!r} has rank {len(dims)} {dims}, "
                            f"the override gives rank {len(given)} {given}")
    out: list[int | str] = []
    for k, d in enumerate(given):
        if isinstance(d, str) and d.strip():
            out.append(d.strip())
            continue
        try:
            v = operator.index(d) if not isinstance(d, bool) else -1
        except TypeError:
            v = -1
        if v < 0:
            raise FrontendError(f"{origin}: input_shapes[{name!r}] dim {k} is {d!r}; a dim is an int >= 0 "
                                f"or a name (a symbolic dim)")
        out.append(v)
    return out


def _model_dims(name: str, t: onnx.TypeProto.Tensor) -> list[int | str] | None:
    if not t.HasField("shape"):
        return None
    dims: list[int | str] = []
    for k, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.dim_param and d.dim_param != "?":
            dims.append(d.dim_param)
        else:  # unnamed: a symbol of its own (TVM would share one symbol "" between all of them)
            dims.append(re.sub(r"\W", "_", f"{name}_dim{k}"))
    return dims


def input_specs(model: onnx.ModelProto, origin: str, overrides: dict | None
                ) -> tuple[list[TensorSpec], dict[str, list], dict[str, str]]:
    """Specs of the graph inputs, and the shape and dtype dicts for TVM's importer.

    Every input's shape is given to TVM with one ``tirx.Var`` per dim name, so the
    same name in two inputs (or in an override) is the same symbol.
    """
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    overrides = dict(overrides or {})
    for k in overrides:
        if k not in names:
            what = "a weight (initializer), not an input" if k in initializers else "not an input"
            raise FrontendError(f"{origin}: input_shapes names {k!r}, which is {what}; inputs are "
                                f"{', '.join(names) or 'none'}")
    symbols: dict[str, tirx.Var] = {}
    specs, shapes, dtypes = [], {}, {}
    for i in graph_inputs:
        if i.type.WhichOneof("value") != "tensor_type":
            raise FrontendError(f"{origin}: input {i.name!r} is a {i.type.WhichOneof('value') or 'value of no type'}; "
                                f"smelt takes tensor inputs")
        t = i.type.tensor_type
        dtype = _DTYPES.get(t.elem_type)
        if dtype is None:
            raise FrontendError(f"{origin}: input {i.name!r} has element type "
                                f"{onnx.TensorProto.DataType.Name(t.elem_type)}, which smelt does not take")
        dims = _model_dims(i.name, t)
        if i.name in overrides:
            dims = _override_dims(origin, i.name, dims, overrides[i.name])
        elif dims is None:
            raise FrontendError(f"{origin}: input {i.name!r} has no shape in the model; give one with "
                                f"input_shapes={{{i.name!r}: [...]}}")
        # Names are parsed like TVM's importer does ("2*N" is an expression of N).
        shapes[i.name] = [d if isinstance(d, int) else _tvm_onnx.parse_shape_name(d, symbols) for d in dims]
        dtypes[i.name] = dtype
        specs.append(TensorSpec(i.name, tuple(dims), dtype))
    return specs, shapes, dtypes


# -- conversion ---------------------------------------------------------------
def _describe(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "before the first node"
    if node.name:
        return f"node {node.name!r}"
    return f"unnamed node with output {node.output[0]!r}" if node.output else "unnamed node"


def _shape_str(x) -> str:
    if x is None:
        return "none"
    s = getattr(x, "ty", None)
    if isinstance(s, relax.TensorType):
        if s.shape is not None and hasattr(s.shape, "values"):
            dims = (str(d.value) if isinstance(d, tirx.IntImm) else str(d) for d in s.shape.values)
            return f"{s.dtype}[{', '.join(dims)}]"
        return f"{s.dtype}[rank {s.ndim}]"
    return type(s).__name__ if s is not None else type(x).__name__


def _relax_for_te(func, args: tuple, kwargs: dict) -> relax.Expr | None:
    """The Relax op computing ``func(*args)`` for the TE functions TVM's converters emit, else None."""
    if func is topi.maximum or func is topi.minimum:
        tensors = [a for a in args if isinstance(a, relax.Expr)]
        if len(args) != 2 or not tensors:
            return None
        dtype = tensors[0].ty.dtype
        identity = -math.inf if func is topi.maximum else math.inf
        if len(tensors) == 1 and isinstance(args[1], (int, float)) and float(args[1]) == identity:
            return args[0]  # Clip without that bound
        a, b = (x if isinstance(x, relax.Expr) else relax.const(x, dtype) for x in args)
        return relax.op.maximum(a, b) if func is topi.maximum else relax.op.minimum(a, b)
    pad_modes = {topi.nn.pad: "constant", topi.nn.mirror_pad: "reflect", topi.nn.replicate_pad: "replicate",
                 topi.nn.circular_pad: "circular"}
    if func in pad_modes and len(args) >= 3:
        data, before, after, *rest = args
        if func is topi.nn.mirror_pad and (rest[0] if rest else kwargs.get("mode")) != "REFLECT":
            return None
        value = (rest[0] if rest else kwargs.get("pad_value", 0.0)) if func is topi.nn.pad else 0.0
        try:
            width = [operator.index(v) for pair in zip(before, after) for v in pair]
        except TypeError:  # symbolic pads
            return None
        return relax.op.nn.pad(data, width, pad_modes[func], float(value))
    if func is topi.flip:
        axis = kwargs.get("axis", args[1] if len(args) > 1 else 0)
        return relax.op.flip(args[0], int(axis))
    if func is topi.tile:
        try:
            return relax.op.tile(args[0], [operator.index(r) for r in args[1]])
        except TypeError:
            return None
    if func is topi.einsum and all(isinstance(a, relax.Expr) for a in args[1:]):
        return relax.op.einsum(list(args[1:]), args[0])
    return None


class _Builder(relax.BlockBuilder):
    """TVM's BlockBuilder, emitting Relax ops where TVM's converters emit TE functions.

    Workaround: ``emit_te`` adds a TIR function to the importer's module, and an
    ``ImportedModel`` carries only the Relax function, so the call would point at
    nothing (symptom: ``FuseOps`` fails with "There is no definition of
    I.GlobalVar("maximum")" for any ``Clip``). Relax ops are also what our passes
    match. A TE function without a Relax equivalent fails the node's conversion.
    """

    def emit_te(self, func, *args, **kwargs):
        expr = _relax_for_te(func, args, kwargs)
        if expr is None:
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            raise _KeptAsTE(f"TVM's converter lowers it to a TE function ({name}), which smelt cannot keep yet")
        return expr if isinstance(expr, relax.Var) else self.emit(expr)


class _KeptAsTE(Exception):
    """A converter produced a TE function with no Relax equivalent (reported with the node by _Importer)."""


def _constant_of_shape(shape: tvm.ir.GenericConst, attrs: dict) -> relax.Constant:
    """ConstantOfShape with a constant shape, of any rank.

    Workaround: TVM 0.27's converter folds only 1-D shapes; a 0-D one (an empty shape
    tensor, which PyTorch's exporter emits for BERT's embeddings and attention mask)
    becomes ``broadcast_to`` of the 1-element ``value`` to rank 0 and fails.
    """
    value = attrs.get("value")
    value = _tvm_onnx.get_numpy(value) if value is not None else np.zeros(1, np.float32)
    dims = [int(d) for d in shape.value.numpy().ravel()]
    return relax.const(np.full(dims, value.ravel()[0], value.dtype))


class _Importer(_tvm_onnx.ONNXGraphImporter):
    """TVM's importer, with failures tagged by the node that caused them."""

    def __init__(self, origin: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.origin = origin
        self.node: onnx.NodeProto | None = None  # the node being converted
        self.bb = _Builder()

    def _parse_value_proto(self, value_proto):
        if isinstance(value_proto, onnx.NodeProto):  # TVM calls this once per node, before converting it
            self.node = value_proto
        return super()._parse_value_proto(value_proto)

    def _convert_operator(self, op_name, inputs, attrs, opset):
        if op_name == "ConstantOfShape" and inputs and isinstance(inputs[0], tvm.ir.GenericConst):
            return _constant_of_shape(inputs[0], attrs)
        try:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        except FrontendError:
            raise
        except Exception as e:
            shapes = ", ".join(_shape_str(x) for x in inputs)
            raise FrontendError(f"{self.origin}: {_describe(self.node)} (op {op_name}, opset {opset}) failed to "
                                f"convert with inputs ({shapes}): {_last_line(e)}") from None


def import_onnx(source, name: str | None = None, input_shapes: dict | None = None,
                opset: int | None = None) -> ImportedModel:
    """Convert an ONNX model (a path or ``ModelProto``) into one ``ImportedModel``.

    ``input_shapes`` overrides input shapes by input name: a list with an int or a
    name (a symbolic dim) per dim. ``opset`` forces the opset to convert to.
    Raises ``FrontendError`` (``UnsupportedOpsError`` for missing converters).
    """
    model, origin = read_onnx(source)
    if model.functions:
        log.info("%s: inlining %d local function(s)", origin, len(model.functions))
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise FrontendError(f"{origin}: cannot inline its local functions: {_last_line(e)}") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise FrontendError(f"{origin}: invalid ONNX model: {_first_line(e)}") from None
    except Exception as e:  # e.g. ValueError for protos over 2 GB: TVM's importer still can take them
        log.warning("%s: onnx's checker could not run (%s); importing unchecked", origin, _first_line(e))
    check_supported(model, origin)
    model = _convert_opset(model, origin, opset)
    specs, shapes, dtypes = input_specs(model, origin, input_shapes)

    importer = _Importer(origin, shapes, dtypes, keep_params_in_input=True, sanitize=True)
    captured = io.StringIO()
    try:
        # TVM prints every failing node with the repr of all its inputs; the error we raise says it in one line.
        with contextlib.redirect_stdout(captured):
            mod = importer.from_onnx(model.graph, default_opset(model))
    except FrontendError:
        raise
    except Exception as e:
        where = _describe(importer.node) + (f" (op {importer.node.op_type})" if importer.node else "")
        raise FrontendError(f"{origin}: TVM's ONNX importer failed at {where}: {_last_line(e)}") from None
    finally:
        if captured.getvalue():
            log.debug("TVM's ONNX importer printed: %s", captured.getvalue().strip())
    others = sorted(gv.name_hint for gv in mod.functions if gv.name_hint != "main")
    if others:
        raise FrontendError(f"{origin}: TVM's importer made functions besides the model ({', '.join(others)}), "
                            f"which smelt cannot keep yet")
    func = mod["main"]
    if func.attrs is None or "num_input" not in func.attrs:
        func = func.with_attr("num_input", len(specs))
    output_names = [o.name for o in model.graph.output]
    default = Path(origin).stem if not origin.startswith("<") else (model.graph.name or "model")
    return ImportedModel(name or default, func, specs, output_names, origin)
