"""PyTorch importer: an ``nn.Module`` with example inputs, an ``ExportedProgram`` or a
saved ``.pt2`` file becomes one model of a ``Program``.

Requires: torch (the ``torch`` extra). Guarantees: the module is exported in eval
mode with ``torch.export``; input names are ``forward()``'s argument names, output
names follow what it returns (``output``; ``output0``, ``output1``… for a tuple; the
keys of a dict); ``dynamic_batch=True`` marks dim 0 of every tensor input as one
dynamic size named ``batch`` (``torch.export.Dim``; a batch-1 example is repeated to
batch 2 first, since torch specializes sizes 0 and 1); examples are checked against
``forward()``'s signature and must be tensors; a failed export reports torch's
reason, the line of ``forward`` that caused it and a hint; a ``.pt2`` file that is
not a ``torch.export.save`` archive is named as such before torch reads it; the
ExportedProgram is converted by TVM's frontend with parameters kept as inputs,
buffers and constants lifted into the weight store by the Program.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
import zipfile
from pathlib import Path

from tvm import relax, tirx

from ..errors import FrontendError, error_line
from ..ir import tensor_specs
from .common import ImportedModel

log = logging.getLogger(__name__)

BATCH = "batch"

_HINT = ("hint: torch.export needs a traceable forward (no data-dependent Python control flow, "
         "no unsupported Python objects as inputs); see torch.export's docs on graph breaks, or "
         "export the module yourself and pass the ExportedProgram or a .pt2 file")
_HINT_DATA_DEPENDENT = ("hint: forward() branches on the value of a tensor (data-dependent control flow), "
                        "which torch.export cannot trace; express the branch with torch.where or torch.cond, "
                        "or move it out of forward()")
_HINT_DYNAMIC = ("hint: dynamic_batch=True makes dim 0 of every tensor input one free size; this model fixes "
                 "or constrains it (a reshape to a constant batch, inputs with different batch sizes); "
                 "compile without dynamic_batch, or export it yourself with suitable dynamic_shapes")
_HINT_PT2 = ("save a model for smelt with torch.export.save(torch.export.export(model, example_args), path); "
             "torch.save files hold a pickled module or state dict, not an exported graph")


def _torch():
    try:
        import torch
    except ImportError:
        raise FrontendError("PyTorch models need torch: pip install 'smelt[torch]'") from None
    return torch


def _export_failure(module, e: Exception, dynamic_batch: bool) -> FrontendError:
    """torch's reason (first line, its listed violations, the user's line) and a hint that fits it."""
    text = str(e).strip()
    lines = text.splitlines()
    reason = re.sub(r"\s*For more information.*$", "", lines[0].strip()) if lines else type(e).__name__
    # Listed violations, without torch's advice on its own APIs (mark_dynamic, Dim.DYNAMIC).
    details = [re.split(r"\. If you're using", ln.strip()[2:])[0]
               for ln in lines[1:] if ln.strip().startswith("- ")]
    if details:
        reason += ": " + "; ".join(details)
    # torch names the user's line under "The following call raised this error:".
    where = ""
    tail = text.split("The following call raised this error:", 1)
    m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)', tail[1]) if len(tail) == 2 else None
    if m:
        where = f" (at {m[1]}:{m[2]} in {m[3]}: {m[4].strip()})"
    if type(e).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in reason:
        hint = _HINT_DATA_DEPENDENT
    elif dynamic_batch and "Constraints violated" in reason:
        hint = _HINT_DYNAMIC
    else:
        hint = _HINT
    return FrontendError(f"torch.export failed for {type(module).__name__}: {reason}{where}\n{hint}")


def _check_examples(torch, module, example_args: tuple) -> None:
    """One example per forward() argument, and every example a tensor (or a tuple/list/dict of them)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C++ forward: let torch.export judge
        sig = None
    if sig is not None:
        try:
            sig.bind(*example_args)
        except TypeError as e:
            raise FrontendError(f"{type(module).__name__}.forward{sig} does not take the {len(example_args)} "
                                f"example input(s) given: {e}; pass (module, (x, ...)) with one example per "
                                f"argument") from None
    names = list(sig.parameters) if sig is not None else []
    for i, a in enumerate(example_args):
        if not isinstance(a, (torch.Tensor, tuple, list, dict)):
            # torch.export bakes such a value into the graph but keeps a placeholder for it,
            # which TVM's frontend then fails on ("'float' object has no attribute 'shape'").
            arg = repr(names[i]) if i < len(names) and not names[i].startswith("*") else f"#{i}"
            raise FrontendError(f"{type(module).__name__}.forward: example input {arg} is a {type(a).__name__} "
                                f"({a!r}); smelt compiles tensor inputs only: pass it as a tensor, or wrap the "
                                f"module so that forward() takes only tensors and fixes this value")


def _batch_examples(torch, example_args: tuple) -> tuple[tuple, tuple]:
    """Example args with batch ≥ 2 (torch specializes 1) and the dynamic_shapes marking dim 0."""
    batch = torch.export.Dim(BATCH, min=1)
    out, shapes = [], []
    for a in example_args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            if a.shape[0] == 1:
                a = a.expand(2, *a.shape[1:]).clone()
            out.append(a)
            shapes.append({0: batch})
        else:
            out.append(a)
            shapes.append(None)
    if any(isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == 1 for a in example_args):
        log.info("dynamic_batch: batch-1 examples repeated to batch 2 for torch.export, which would "
                 "otherwise fix the batch at 1")
    return tuple(out), tuple(shapes)


def export(module, example_args, dynamic_batch: bool = False):
    """``torch.export`` with smelt's error reporting."""
    torch = _torch()
    if isinstance(example_args, list):
        example_args = tuple(example_args)
    elif not isinstance(example_args, tuple):
        example_args = (example_args,)
    _check_examples(torch, module, example_args)
    dynamic_shapes = None
    if dynamic_batch:
        example_args, dynamic_shapes = _batch_examples(torch, example_args)
        if all(s is None for s in dynamic_shapes):
            raise FrontendError(f"{type(module).__name__}: dynamic_batch=True, but no example input is a tensor "
                                f"with a batch dimension")
    try:
        return torch.export.export(module.eval(), example_args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise _export_failure(module, e, dynamic_batch) from None


def load_pt2(path: str | Path):
    """Read a ``torch.export.save`` archive; anything else is named for what it is."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise FrontendError(f"{path}: not a .pt2 archive (not a zip file: empty, truncated or corrupt); "
                            f"{_HINT_PT2}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FrontendError(f"{path}: not a readable .pt2 archive ({e})") from None
    if not any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        kind = "a torch.save file" if any(n.endswith("data.pkl") for n in names) else "a zip file"
        raise FrontendError(f"{path}: {kind}, not a torch.export archive; {_HINT_PT2}")
    try:
        with warnings.catch_warnings():
            # torch's own deprecation notices about its pytree internals; nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            return torch.export.load(str(path))
    except Exception as e:
        raise FrontendError(f"{path}: not a readable torch.export .pt2 file ({type(e).__name__}: {e})") from None


def _name_batch(func: relax.Function, n_in: int) -> relax.Function:
    """Rename torch's symbol (``s0``, ``s77``…) for the batch dim of the inputs to ``batch``."""
    syms = set()
    for p in func.params[:n_in]:
        ty = p.ty
        if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values") \
                and len(ty.shape.values) >= 1 and isinstance(ty.shape.values[0], tirx.Var):
            syms.add(ty.shape.values[0].name)
    if len(syms) != 1:
        log.info("dynamic_batch: inputs have batch symbols %s; names kept", sorted(syms) or "none")
        return func
    (old,) = syms
    func = func.bind_symbolic_vars({old: tirx.Var(BATCH, "int64")})
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        if func.attrs is not None and key in func.attrs:
            bounds = {(BATCH if str(k) == old else str(k)): int(v) for k, v in func.attrs[key].items()}
            func = func.with_attr(key, bounds)
    return func


def _dtype_hint(ep) -> str:
    """TVM 0.27's torch frontend hard-codes ``out_dtype="float32"`` for matmul, linear and conv, so
    float16/bfloat16 graphs fail with a dtype mismatch; say so instead of leaving the user guessing."""
    dtypes = {str(getattr(n.meta.get("val"), "dtype", "")) for n in ep.graph.nodes if n.op == "placeholder"}
    low = sorted(d.removeprefix("torch.") for d in dtypes & {"torch.float16", "torch.bfloat16"})
    if not low:
        return ""
    return (f"\nhint: the model is {'/'.join(low)}; TVM's torch frontend computes matmul, linear and conv "
            f"in float32 only: export the model in float32 (model.float())")


def _output_names(ep, n: int) -> list[str]:
    """Names from the structure forward() returns: ``output`` for one tensor, ``output0``,
    ``output1``… for a tuple, dict keys for a dict (``b.0`` for ``{"b": (t, u)}["b"][0]``).

    torch's own output names are graph node names (``linear_2``, ``add``), which say nothing
    to a user and repeat when forward returns one tensor twice."""
    from torch.utils import _pytree as pytree

    default = ["output"] if n == 1 else [f"output{i}" for i in range(n)]
    spec = getattr(getattr(ep, "call_spec", None), "out_spec", None)
    if spec is None or spec.num_leaves != n:
        return default
    names = []
    for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(n)), spec))[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts:
            names.append("output")
        elif isinstance(path[0], pytree.SequenceKey):
            names.append(".".join([f"output{parts[0]}"] + parts[1:]))
        else:
            names.append(".".join(parts))
    if len(set(names)) != n:
        log.info("output names %s are not unique; using %s", names, default)
        return default
    return names


def import_exported(ep, name: str, source: str, dynamic_batch: bool = False) -> ImportedModel:
    """Convert an ``ExportedProgram``."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise FrontendError(f"{source}: TVM's torch frontend failed: {error_line(e, last=True)}"
                            f"{_dtype_hint(ep)}") from None
    func = mod["main"]
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(user_inputs)
    if dynamic_batch:
        func = _name_batch(func, n_in)
    specs = tensor_specs(relax.TupleType([p.ty for p in func.params[:n_in]]), user_inputs, "input")
    if dynamic_batch and specs and all(s.shape and isinstance(s.shape[0], int) for s in specs):
        log.warning("%s: dynamic_batch ignored: this ExportedProgram fixes the batch (%s); export it with "
                    "dynamic_shapes to make dim 0 dynamic", source, ", ".join(map(str, specs)))
    outputs = _output_names(ep, len(sig.user_outputs))
    return ImportedModel(name, func, specs, outputs, source)


def import_torch(source, example_args=None, name: str | None = None, dynamic_batch: bool = False) -> ImportedModel:
    """Convert ``source``: an nn.Module (with ``example_args``), an ExportedProgram or a .pt2 path."""
    torch = _torch()
    if isinstance(source, (str, Path)):
        ep = load_pt2(source)
        return import_exported(ep, name or Path(source).stem, str(source), dynamic_batch)
    if isinstance(source, torch.export.ExportedProgram):
        return import_exported(source, name or "exported", "<ExportedProgram>", dynamic_batch)
    if isinstance(source, torch.nn.Module):
        if example_args is None:
            raise FrontendError(f"{type(source).__name__}: a torch module needs example inputs: (module, (x,))")
        ep = export(source, example_args, dynamic_batch)
        return import_exported(ep, name or type(source).__name__.lower(), f"<torch:{type(source).__name__}>",
                               dynamic_batch)
    raise FrontendError(f"cannot import a {type(source).__name__} as a torch model")


__all__ = ["export", "import_exported", "import_torch", "load_pt2"]
