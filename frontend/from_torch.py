"""PyTorch importer: an ``nn.Module`` with example inputs, an ``ExportedProgram`` or a
saved ``.pt2`` file becomes one model of a ``Program``.

Requires: torch (the ``torch`` extra). Guarantees: the module is exported in eval
mode with ``torch.export``; ``dynamic_batch=True`` marks dim 0 of every tensor
input dynamic (``torch.export.Dim``); a failed export reports torch's reason and a
hint; the ExportedProgram is converted by TVM's frontend with parameters kept as
inputs, buffers and constants lifted into the weight store by the Program.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FrontendError
from ..ir import TensorSpec, tensor_specs
from .common import ImportedModel

_HINT = ("hint: torch.export needs a traceable forward (no data-dependent Python control flow, "
         "no unsupported Python objects as inputs); see torch.export's docs on graph breaks, or "
         "export the module yourself and pass the ExportedProgram or a .pt2 file")


def _torch():
    try:
        import torch
    except ImportError:
        raise FrontendError("PyTorch models need torch: pip install 'smelt[torch]'") from None
    return torch


def export(module, example_args, dynamic_batch: bool = False):
    """``torch.export`` with smelt's error reporting."""
    torch = _torch()
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in example_args)
    try:
        return torch.export.export(module.eval(), example_args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FrontendError(f"torch.export failed for {type(module).__name__}: {reason}\n{_HINT}") from None


def load_pt2(path: str | Path):
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise FrontendError(f"{path}: not a readable torch.export .pt2 file ({type(e).__name__}: {e})") from None


def import_exported(ep, name: str, source: str) -> ImportedModel:
    """Convert an ``ExportedProgram``."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise FrontendError(f"{source}: TVM's torch frontend failed: {msg[-1] if msg else type(e).__name__}") from None
    func = mod["main"]
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(user_inputs)
    specs = tensor_specs(relax.TupleType([p.ty for p in func.params[:n_in]]), user_inputs, "input")
    outputs = [f"output{i}" if n is None else str(n) for i, n in enumerate(sig.user_outputs)]
    return ImportedModel(name, func, specs, outputs, source)


def import_torch(source, example_args=None, name: str | None = None, dynamic_batch: bool = False) -> ImportedModel:
    """Convert ``source``: an nn.Module (with ``example_args``), an ExportedProgram or a .pt2 path."""
    torch = _torch()
    if isinstance(source, (str, Path)):
        ep = load_pt2(source)
        return import_exported(ep, name or Path(source).stem, str(source))
    if isinstance(source, torch.export.ExportedProgram):
        return import_exported(source, name or "exported", "<ExportedProgram>")
    if isinstance(source, torch.nn.Module):
        if example_args is None:
            raise FrontendError(f"{type(source).__name__}: a torch module needs example inputs: (module, (x,))")
        ep = export(source, example_args, dynamic_batch)
        return import_exported(ep, name or type(source).__name__.lower(), f"<torch:{type(source).__name__}>")
    raise FrontendError(f"cannot import a {type(source).__name__} as a torch model")


from tvm import relax  # noqa: E402  (after the lazy torch helpers; tvm is always present)
