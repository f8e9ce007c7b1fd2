"""Frontends: ONNX files and PyTorch models into the unified IR.

``load(source)`` accepts an ONNX path or ``ModelProto``, a ``.pt2`` path, an
``ExportedProgram``, or a ``(torch_module, example_args)`` tuple, and returns an
``ImportedModel``; ``build_program`` puts several of them into one ``Program``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FrontendError
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


__all__ = ["ImportedModel", "build_program", "load"]
