"""MergeCommonStems: one entry that runs every model, computing what they share once.

Requires: a module with weights bound as constants (``Program.bind``), one Relax
function per model whose body is one dataflow block (what the importers give after
canonicalization), and the list of models with the inputs they share.
Guarantees: a new function ``__all__`` takes the union of the models' inputs (an input
shared by several models is one parameter, named after the first model's input) and
returns a tuple with each model's result in model order. Its body holds every model's
bindings, value-numbered globally: a binding whose op, attributes and operands equal
one already emitted (constants compared by content) reuses it, so identical stems
reading the same input are computed once. The model functions themselves are not
changed: calling one model alone computes only that model. The attribute
``smelt.merge`` (JSON) records which models use each binding of ``__all__``, in
order, for FuseHorizontal and the merge report; ``self.report`` holds the matches and
the first difference of every sibling pair that was not merged.
Where: first pass of the merge phase (after canonicalize, before fuse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from ..errors import PassError
from ..ir import MERGED
from ..ir.summary import op_flops
from .canonicalize_ops import attr_fields
from .explain import Explainer
from .mutate import map_vars


@dataclass
class Mismatch:
    """Two sibling bindings (same operands) of different models that stayed apart, and why."""

    model_a: str
    var_a: str
    model_b: str
    var_b: str
    reason: str


@dataclass
class MergeReport:
    """What MergeCommonStems found: per model, its bindings and which are shared."""

    models: list[str] = field(default_factory=list)
    # merged var name -> models using it, in model order
    users: dict[str, list[str]] = field(default_factory=dict)
    # (model, original var name) -> merged var name, for every binding of every model
    matches: dict[tuple[str, str], str] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=dict)  # merged var name -> FLOPs
    weight_bytes: dict[str, int] = field(default_factory=dict)  # merged var name -> bytes of its constants
    inputs: dict[str, str] = field(default_factory=dict)  # "model.input" -> merged parameter name

    def shared_vars(self, model: str) -> list[str]:
        return [v for v, users in self.users.items() if model in users and len(users) > 1]

    def shared_fraction(self, model: str, what: str = "flops") -> float:
        """The part of ``model``'s FLOPs (or weight bytes) in bindings another model uses too."""
        table = self.flops if what == "flops" else self.weight_bytes
        mine = [v for v, users in self.users.items() if model in users]
        total = sum(table.get(v, 0) for v in mine)
        shared = sum(table.get(v, 0) for v in self.shared_vars(model))
        return shared / total if total else 0.0

    def to_json(self) -> dict:
        return {"models": self.models, "inputs": self.inputs,
                "shared_bindings": {m: len(self.shared_vars(m)) for m in self.models},
                "shared_flops_fraction": {m: round(self.shared_fraction(m), 4) for m in self.models},
                "shared_weights_fraction": {m: round(self.shared_fraction(m, "weights"), 4) for m in self.models},
                "not_merged": [vars(x) for x in self.mismatches[:50]]}


def _subst(e: relax.Expr, vmap: dict) -> relax.Expr:
    """``e`` with its variables replaced through ``vmap``."""
    return map_vars(e, lambda v: vmap.get(v, v))


def _operands(e: relax.Expr) -> list:
    if isinstance(e, relax.Call):
        return list(e.args)
    if isinstance(e, relax.Tuple):
        return list(e.fields)
    if isinstance(e, relax.TupleGetItem):
        return [e.tuple_value]
    return []


def first_difference(a: relax.Expr, b: relax.Expr) -> str:
    """Why two bindings reading the same operands are not the same computation."""
    op_a, op_b = getattr(a, "op", None), getattr(b, "op", None)
    name = lambda op: getattr(op, "name", type(op).__name__).removeprefix("relax.")  # noqa: E731
    if op_a is None or op_b is None or not op_a.same_as(op_b):
        return f"op: {name(op_a)} vs {name(op_b)}"
    if not tvm_ffi.structural_equal(a.attrs, b.attrs):
        for key in attr_fields(a.attrs):
            if not tvm_ffi.structural_equal(getattr(a.attrs, key), getattr(b.attrs, key)):
                return f"attribute {key} of {name(op_a)}: {getattr(a.attrs, key)} vs {getattr(b.attrs, key)}"
        return f"attributes of {name(op_a)}"
    for i, (x, y) in enumerate(zip(a.args, b.args)):
        if isinstance(x, tvm.ir.Constant) and isinstance(y, tvm.ir.Constant) and \
                isinstance(x.value, tvm.runtime.Tensor) and isinstance(y.value, tvm.runtime.Tensor):
            if tuple(x.value.shape) != tuple(y.value.shape) or str(x.value.dtype) != str(y.value.dtype):
                return f"shape of operand {i} of {name(op_a)}: {tuple(x.value.shape)} vs {tuple(y.value.shape)}"
            if not tvm_ffi.structural_equal(x, y):
                return f"weight (operand {i} of {name(op_a)}, shape {tuple(x.value.shape)}) differs"
        elif not tvm_ffi.structural_equal(x, y):
            return f"operand {i} of {name(op_a)} differs"
    return f"{name(op_a)} differs"


def _flat_bindings(func: relax.Function, name: str) -> tuple[list[relax.VarBinding], relax.Expr]:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise PassError(f"model {name}: body is not a sequence of bindings; cannot merge it")
    bindings = []
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise PassError(f"model {name}: binding {b.var.name} is a match_cast; cannot merge it")
            bindings.append(b)
    return bindings, body.body


def _tensor_type_str(t) -> str:
    return f"{t.dtype}{list(t.shape) if t.shape is not None else '[?]'}"


@tvm.transform.module_pass(opt_level=0, name="MergeCommonStems")
class MergeCommonStems:
    """See the module docstring. ``models`` maps each model to its input names (parameter order);
    ``shared`` maps ``model.input`` to the ``model.input`` it reads instead."""

    def __init__(self, models: dict[str, list[str]], shared: dict[str, str] | None = None,
                 explain: Explainer | None = None):
        self.models = list(models)
        self.input_names = {m: list(names) for m, names in models.items()}
        self.shared = dict(shared or {})
        self.explain = explain or Explainer("MergeCommonStems")
        self.report = MergeReport(models=list(models))

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if len(self.models) < 2:
            return mod

        report = self.report
        bb = relax.BlockBuilder()
        params, param_of = [], {}
        funcs = {}
        for name in self.models:
            func = mod[name]
            n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs \
                else len(func.params)
            if n_in != len(func.params):
                raise PassError(f"model {name}: weights must be bound before merging")
            sym_map = {}
            names = self.input_names[name]
            if len(names) != len(func.params):
                raise PassError(f"model {name}: {len(func.params)} inputs but {len(names)} input names")
            for p, input_name in zip(func.params, names):
                key = f"{name}.{input_name}"
                canon = self._canonical(key)
                if canon != key and canon in param_of:
                    other = param_of[canon]
                    if not _same_type(p.ty, other.ty, sym_map):
                        raise PassError(f"cannot share input {key} ({_tensor_type_str(p.ty)}) with {canon} "
                                        f"({_tensor_type_str(other.ty)}): shapes or dtypes differ")
                    param_of[key] = other
                else:
                    var = relax.Var(_identifier(f"{name}__{input_name}"), p.ty)
                    param_of[key] = var
                    params.append(var)
                report.inputs[key] = param_of[key].name
            if sym_map:
                func = func.bind_symbolic_vars(sym_map)
            funcs[name] = func

        table: dict[int, list[tuple[relax.Expr, relax.Var]]] = {}
        readers: dict[relax.Var, list[tuple[relax.Expr, relax.Var, str]]] = {}
        results = []
        owner_model: dict[relax.Var, str] = {}
        with bb.function(MERGED, params, attrs={"num_input": len(params)}):
            with bb.dataflow():
                for name in self.models:
                    func = funcs[name]
                    vmap = {p: param_of[f"{name}.{n}"] for p, n in zip(func.params, self.input_names[name])}
                    bindings, ret = _flat_bindings(func, name)
                    for b in bindings:
                        value = _subst(b.value, vmap)
                        if isinstance(value, (relax.Var, tvm.ir.Constant)):
                            vmap[b.var] = value
                            continue
                        # Normalized first: emitting fills in a value's type, and structural
                        # equality compares types, so compare normalized with normalized.
                        value = bb.normalize(value)
                        h = tvm_ffi.structural_hash(value)
                        hit = next((v for e, v in table.get(h, []) if tvm_ffi.structural_equal(e, value)), None)
                        if hit is not None:
                            vmap[b.var] = hit
                            self._use(hit, name)
                            report.matches[(name, b.var.name)] = hit.name
                            if owner_model[hit] != name:
                                self.explain.fired(value, f"{name}.{b.var.name} = "
                                                          f"{owner_model[hit]}'s {hit.name}")
                            continue
                        self._note_siblings(value, name, b.var.name, readers, owner_model)
                        new = bb.emit(value, name_hint=f"{name}__{b.var.name}")
                        vmap[b.var] = new
                        owner_model[new] = name
                        self._use(new, name)
                        report.matches[(name, b.var.name)] = new.name
                        report.flops[new.name] = op_flops(value)[0] if isinstance(
                            value, relax.Call) and isinstance(value.op, tvm.ir.Op) else 0
                        report.weight_bytes[new.name] = sum(
                            int(np.prod(o.value.shape)) * o.value.dtype.itemsize if hasattr(o.value.dtype, "itemsize")
                            else o.value.numpy().nbytes
                            for o in _operands(value) if isinstance(o, tvm.ir.Constant)
                            and isinstance(o.value, tvm.runtime.Tensor))
                        table.setdefault(h, []).append((value, new))
                        for operand in _operands(value):
                            if isinstance(operand, relax.Var):
                                readers.setdefault(operand, []).append((value, new, name))
                    results.append(_subst(ret, vmap))
                    self._use_expr(results[-1], name)
                out = bb.emit_output(relax.Tuple(results))
            bb.emit_func_output(out)
        merged = bb.get()[MERGED]
        meta = {"models": self.models, "inputs": report.inputs,
                "users": {v: u for v, u in report.users.items()}}
        merged = merged.with_attr("smelt.merge", json.dumps(meta))
        out_mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        out_mod[MERGED] = merged
        return out_mod

    def _canonical(self, key: str) -> str:
        seen = set()
        while key in self.shared and key not in seen:
            seen.add(key)
            key = self.shared[key]
        return key

    def _use(self, var: relax.Var, model: str) -> None:
        users = self.report.users.setdefault(var.name, [])
        if model not in users:
            users.append(model)

    def _use_expr(self, e, model: str) -> None:
        if isinstance(e, relax.Var):
            if e.name in self.report.users:
                self._use(e, model)
        for o in _operands(e):
            self._use_expr(o, model)

    def _note_siblings(self, value, model, var_name, readers, owner_model) -> None:
        """Record why ``value`` differs from the bindings of other models reading the same operand."""
        for operand in _operands(value):
            if not isinstance(operand, relax.Var):
                continue
            for other, other_var, other_model in readers.get(operand, []):
                if other_model != model:
                    why = first_difference(value, other)
                    self.report.mismatches.append(Mismatch(model, var_name, other_model, other_var.name, why))
                    self.explain.skip(value, f"{model}.{var_name} vs {other_model}'s {other_var.name}: {why}")
                    return
            return  # only the first operand's readers: the data input


def _identifier(name: str) -> str:
    import re

    return re.sub(r"\W", "_", name)


def _same_type(a, b, sym_map: dict) -> bool:
    """Equal tensor types; symbolic dims of ``a`` are mapped onto ``b``'s in ``sym_map``."""
    if not (isinstance(a, relax.TensorType) and isinstance(b, relax.TensorType)):
        return tvm_ffi.structural_equal(a, b)
    if str(a.dtype) != str(b.dtype) or a.shape is None or b.shape is None:
        return False
    va, vb = list(a.shape.values), list(b.shape.values)
    if len(va) != len(vb):
        return False
    for x, y in zip(va, vb):
        if isinstance(x, tirx.Var) and isinstance(y, tirx.Var):
            if sym_map.setdefault(x, y) is not y and not sym_map[x].same_as(y):
                return False
        elif isinstance(x, tirx.IntImm) and isinstance(y, tirx.IntImm):
            if int(x.value) != int(y.value):
                return False
        else:
            return False
    return True


def resolve_shared_inputs(models: dict, share_inputs: bool = False,
                          pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """Which ``model.input`` reads which: explicit ``pairs`` (either order; the later model's
    input reads the earlier one's), plus, with ``share_inputs``, every input whose name,
    shape and dtype equal an earlier model's input. ``models``: name → ModelInfo, in order.

    Raises PassError naming the input when a pair names no input or shapes differ.
    """
    order = {name: i for i, name in enumerate(models)}
    specs = {f"{m}.{t.name}": t for m, info in models.items() for t in info.inputs}
    shared: dict[str, str] = {}
    for a, b in pairs:
        for key in (a, b):
            if key not in specs:
                raise PassError(f"--share-input {a}={b}: no input {key!r}; inputs are {', '.join(specs)}")
        if (specs[a].shape, specs[a].dtype) != (specs[b].shape, specs[b].dtype):
            raise PassError(f"--share-input {a}={b}: {specs[a]} and {specs[b]} differ in shape or dtype")
        first, later = sorted((a, b), key=lambda k: order[k.split(".", 1)[0]])
        if first.split(".", 1)[0] == later.split(".", 1)[0]:
            raise PassError(f"--share-input {a}={b}: both inputs belong to one model")
        shared[later] = first
    if share_inputs:
        seen: dict[tuple, str] = {}
        for key, t in specs.items():
            sig = (t.name, t.shape, t.dtype)
            if sig in seen and key not in shared:
                shared[key] = seen[sig]
            seen.setdefault(sig, key)
    return shared
