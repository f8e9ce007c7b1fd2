"""The unified multi-model IR: a ``Program``.

Requires: one Relax function per model, whose first ``num_input`` parameters are
the model's inputs and whose remaining parameters are weights.
Guarantees: every model is a function of one ``IRModule`` named after the model;
weights of at least ``MIN_WEIGHT_ELEMENTS`` elements live once in a content-addressed
``WeightStore`` and each model records the keys of its weight parameters in order;
smaller tensors (scalars, small biases) are inline constants. ``bind()`` gives the
module with weights as constants (what passes work on), ``Program.from_module``
takes such a module back by lifting them again (``from_module(bind())`` is the
identity); ``save``/``load`` and ``script()``/``tvm.script.from_source`` round-trip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm
from tvm import relax, tirx

from ..errors import SmeltError
from .weights import WeightEntry, WeightStore, lift_constants, stays_inline

Dim = int | str
# The function that runs every model of a merged program at once (``merge=True``).
MERGED = "__all__"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (symbolic dimensions as names) and dtype of one input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass
class ModelInfo:
    """What a user calls: a model's name, inputs, outputs, origin and weight keys."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str = ""
    weights: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelInfo":
        return cls(d["name"], [TensorSpec.from_json(t) for t in d["inputs"]],
                   [TensorSpec.from_json(t) for t in d["outputs"]], d.get("source", ""), list(d["weights"]))


def _dim(d) -> Dim:
    if isinstance(d, tirx.IntImm):
        return int(d.value)
    if isinstance(d, tirx.Var):
        return d.name
    return str(d)


def tensor_specs(sinfo: relax.Type, names: list[str] | None = None, prefix: str = "output") -> list[TensorSpec]:
    """Flatten a (tuple of) tensor struct info into specs, named by ``names`` or ``prefix<i>``."""
    leaves = []

    def walk(s):
        if isinstance(s, relax.TupleType):
            for f in s.fields:
                walk(f)
        else:
            leaves.append(s)

    walk(sinfo)
    specs = []
    for i, s in enumerate(leaves):
        name = names[i] if names and i < len(names) else f"{prefix}{i}"
        if isinstance(s, relax.TensorType) and s.shape is not None and hasattr(s.shape, "values"):
            specs.append(TensorSpec(name, tuple(_dim(d) for d in s.shape.values), str(s.dtype)))
        else:
            specs.append(TensorSpec(name, (), str(getattr(s, "dtype", "unknown"))))
    return specs


def valid_model_name(name: str) -> str:
    """A model name usable as a function name: letters, digits and '_' , not starting with a digit."""
    clean = re.sub(r"\W", "_", name)
    return clean if clean and not clean[0].isdigit() else f"m_{clean}"


def _num_input(func: relax.Function) -> int:
    if func.attrs is not None and "num_input" in func.attrs:
        return int(func.attrs["num_input"])
    return len(func.params)


class Program:
    """N named models in one Relax ``IRModule`` with one weight store."""

    FORMAT = 1

    def __init__(self, mod: tvm.IRModule | None = None, models: dict[str, ModelInfo] | None = None,
                 weights: WeightStore | None = None):
        self.mod = mod if mod is not None else tvm.IRModule()
        self.models: dict[str, ModelInfo] = dict(models or {})
        self.weights = weights if weights is not None else WeightStore()

    # -- building -----------------------------------------------------------
    def add_model(self, name: str, func: relax.Function, inputs: list[TensorSpec],
                  output_names: list[str] | None = None, source: str = "") -> ModelInfo:
        """Add ``func`` (inputs first, weights after, TVM's ``params`` attribute holding their data)."""
        if name in self.models:
            raise SmeltError(f"two models are named {name!r}; give one of them another name")
        func = lift_constants(func)
        n_in = _num_input(func)
        data = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else []
        if len(data) != len(func.params) - n_in:
            raise SmeltError(f"model {name!r}: {len(func.params) - n_in} weight parameters but {len(data)} values")
        # Small weights become inline constants, as lift_constants leaves them after lowering,
        # so that bind() followed by from_module() gives this function back unchanged.
        small = {p: relax.const(t) for p, t in zip(func.params[n_in:], data) if stays_inline(t.shape)}
        if small:
            func = func.bind_params(small).with_attr("num_input", n_in)
            data = [t for t in data if not stays_inline(t.shape)]
        keys = [self.weights.add(t.numpy()) for t in data]
        func = func.without_attr("params").with_attr("num_input", n_in).with_attr("global_symbol", name)
        self.mod[name] = func
        outputs = tensor_specs(func.ret_ty, output_names)
        info = ModelInfo(name, inputs, outputs, source, keys)
        self.models[name] = info
        return info

    # -- views --------------------------------------------------------------
    def bind(self) -> tvm.IRModule:
        """The module with every weight bound as a constant (shared weights share one tensor)."""
        mod = self.mod
        for name, info in self.models.items():
            func = mod[name]
            n_in = _num_input(func)
            binding = {p: relax.const(self.weights.tensor(k)) for p, k in zip(func.params[n_in:], info.weights)}
            if binding:
                func = func.bind_params(binding).with_attr("num_input", n_in)
                mod = mod.with_function(name, func) if hasattr(mod, "with_function") else _replace(mod, name, func)
        return mod

    @classmethod
    def from_module(cls, mod: tvm.IRModule, models: dict[str, ModelInfo],
                    store: WeightStore | None = None) -> "Program":
        """Lift the large constants of each model function of ``mod`` into a new weight store."""
        store = store if store is not None else WeightStore()
        new_models = {}
        for name, info in models.items():
            func = lift_constants(mod[name])
            data = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else []
            keys = [store.add(t.numpy()) for t in data]
            mod = _replace(mod, name, func.without_attr("params") if data else func)
            new_models[name] = ModelInfo(info.name, info.inputs, info.outputs, info.source, keys)
        return cls(mod, new_models, store)

    def script(self) -> str:
        """TVMScript of the whole module that parses back (``tvm.script.from_source``).

        Weights are parameters; the few small constants left inline (fewer than
        ``MIN_WEIGHT_ELEMENTS``) are printed in the metadata section at the end.
        """
        return self.mod.script(show_meta=True)

    def __repr__(self) -> str:
        return f"Program({', '.join(self.models)}; {len(self.weights)} weights, {self.weights.nbytes / 1e6:.1f} MB)"

    # -- persistence --------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``program.json`` (IR and signatures) and ``weights.bin`` into folder ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            index = self.weights.save(tmp / "weights.bin")
            doc = {
                "format": self.FORMAT,
                "models": [m.to_json() for m in self.models.values()],
                "weights": {k: e.to_json() for k, e in index.items()},
                "ir": tvm.ir.save_json(self.mod),
            }
            (tmp / "program.json").write_text(json.dumps(doc))
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Program":
        path = Path(path)
        try:
            doc = json.loads((path / "program.json").read_text())
        except (OSError, ValueError) as e:
            raise SmeltError(f"{path}: not a saved smelt program ({e})") from None
        if doc.get("format") != cls.FORMAT:
            raise SmeltError(f"{path}: program format {doc.get('format')}, this smelt reads {cls.FORMAT}")
        index = {k: WeightEntry.from_json(v) for k, v in doc["weights"].items()}
        store = WeightStore.load(path / "weights.bin", index, mmap=False)
        models = {m["name"]: ModelInfo.from_json(m) for m in doc["models"]}
        return cls(tvm.ir.load_json(doc["ir"]), models, store)


def _replace(mod: tvm.IRModule, name: str, func: relax.Function) -> tvm.IRModule:
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod[name] = func
    return mod


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``; an old ``dest`` disappears only after."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
