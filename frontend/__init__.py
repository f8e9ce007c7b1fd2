"""Frontends: ONNX files and PyTorch models into the unified IR.

``load(source)`` accepts an ONNX path or ``ModelProto``, a ``.pt2`` path, an
``ExportedProgram``, or a ``(torch_module, example_args)`` tuple, and returns an
``ImportedModel``; ``build_program`` puts several of them into one ``Program``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import FrontendError, SmeltError
from ..ir import Program, valid_model_name
from .common import ImportedModel

log = logging.getLogger(__name__)

ACCEPTED = ("an .onnx path or onnx.ModelProto, a .pt2 path (torch.export.save), a torch ExportedProgram, "
            "or a (torch.nn.Module, example_inputs) tuple")


def load(source, name: str | None = None, input_shapes: dict | None = None,
         dynamic_batch: bool = False) -> ImportedModel:
    """Import one model from any supported source."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".pt2":
            from .from_torch import import_torch

            return import_torch(path, name=name, dynamic_batch=dynamic_batch)
        from .from_onnx import import_onnx

        return import_onnx(path, name=name, input_shapes=input_shapes)
    if type(source).__name__ == "ModelProto":
        from .from_onnx import import_onnx

        return import_onnx(source, name=name, input_shapes=input_shapes)
    if isinstance(source, tuple) and len(source) == 2:
        from .from_torch import import_torch

        return import_torch(source[0], source[1], name=name, dynamic_batch=dynamic_batch)
    if type(source).__name__ == "ExportedProgram" or hasattr(source, "forward"):
        from .from_torch import import_torch

        return import_torch(source, name=name, dynamic_batch=dynamic_batch)
    raise FrontendError(f"cannot import a {type(source).__name__}: smelt takes {ACCEPTED}")


def build_program(models: list[ImportedModel]) -> Program:
    """One Program holding every model; clashing names get a numeric suffix (logged)."""
    program = Program()
    for m in models:
        name = valid_model_name(m.name)
        base, k = name, 1
        while name in program.models:
            k += 1
            name = f"{base}_{k}"
        if name != m.name:
            log.info("model %r is named %r in the program", m.name, name)
        program.add_model(name, m.func, m.inputs, m.output_names, m.source)
    return program


def _as_list(models) -> list:
    if isinstance(models, (str, Path)) or isinstance(models, tuple) and len(models) == 2 and \
            not isinstance(models[0], (str, Path)) and hasattr(models[0], "forward"):
        return [models]
    if hasattr(models, "graph") or hasattr(models, "forward") or \
            type(models).__name__ in ("ExportedProgram", "ModelProto"):
        return [models]
    return list(models)


def import_models(models, names: Sequence[str] | None = None, input_shapes: dict | None = None,
                  dynamic_batch: bool = False) -> Program:
    """Import every model into one Program.

    ``input_shapes`` maps an input name (applies to every model with that input) or
    ``model.input`` to a shape; a key that matches nothing is an error.
    """
    sources = _as_list(models)
    if names is not None and len(names) != len(sources):
        raise SmeltError(f"{len(names)} names for {len(sources)} models")
    imported = []
    used: set[str] = set()
    for i, src in enumerate(sources):
        name = names[i] if names else _default_name(src)
        shapes = _shapes_for(input_shapes, name, src, used)
        imported.append(load(src, name=names[i] if names else None, input_shapes=shapes,
                                      dynamic_batch=dynamic_batch))
    unused = set(input_shapes or {}) - used
    if unused:
        raise SmeltError(f"--input-shape {', '.join(sorted(unused))}: no model has such an input")
    return build_program(imported)


def _default_name(src) -> str | None:
    return Path(src).stem if isinstance(src, (str, Path)) else None


def _input_names(src) -> set[str] | None:
    """Input names of an ONNX source (None when unknown without importing)."""
    try:
        import onnx

        model = src if isinstance(src, onnx.ModelProto) else (
            onnx.load(str(src), load_external_data=False) if str(src).endswith(".onnx") else None)
    except Exception:
        return None
    if model is None:
        return None
    inits = {t.name for t in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name not in inits}


def _shapes_for(input_shapes: dict | None, model: str | None, src, used: set) -> dict | None:
    """The overrides for one model: ``model.input`` keys for it, plain keys naming one of its inputs."""
    if not input_shapes:
        return None
    inputs = _input_names(src)
    out = {}
    for key, shape in input_shapes.items():
        prefix, dot, rest = key.partition(".")
        if dot and model is not None and prefix == model:
            out[rest] = shape
            used.add(key)
        elif inputs is None or key in inputs:
            out[key] = shape
            if inputs is not None:
                used.add(key)
    return out or None


__all__ = ["ImportedModel", "build_program", "import_models", "load"]
