"""FuseHorizontal: same-shaped layers of different models run as one wider op in ``__all__``.

Requires: the module after MergeCommonStems: a function ``__all__`` whose body is one
dataflow block and whose attribute ``smelt.merge`` (JSON) names, for every binding, the
models using it; weights bound as constants; ops not yet legalized.
Guarantees: in ``__all__`` only (the model functions are not touched), models whose
private bindings (used by that model alone) are isomorphic up to constant values (same
ops, attributes, operand types; constants of equal shape and dtype; each model's own input
of equal type) form a group, chosen greedily in model order. Their bindings are zipped by
position and each position becomes one computation on a *merged* value: the N per-model
pieces stacked on a new axis 1, right after the batch axis (piece ``(B, d1..dk)`` → merged
``(B, N, d1..dk)``), or a reshape of it in the producer's layout (a conv's
``(B, N*O, H, W)``) so that the elementwise ops after a conv or matmul still fuse into it.
Per-model weights are concatenated or stacked in numpy at compile time. Rules: conv1d/2d/3d
(channels-first) of a merged input become one grouped conv (``groups * N``), of a shared
input one conv with the weights concatenated along O; pools the same way; matmul a
broadcast batched matmul (one plain matmul with the weights side by side on a shared
rank-2 input); elementwise ops; reshape-likes that keep the batch axis; ``permute_dims``
keeping axis 0; softmax, reductions, ``concat``, layer and RMS norm (per-model scales as one
multiply and add) with their axes shifted. A position no rule takes is emitted per model on
the pieces (one ``split`` of the merged value along the model axis, then views); after the
isomorphic prefix of a group each model's bindings follow one by one. Each group formed and
each position that fell back is recorded, with the reason, in the Explainer (``--explain``)
and in ``self.report``; fallbacks are also logged. ``__all__`` keeps its parameters and
returns the same values. ``smelt.merge`` gains ``horizontal`` (the groups) and its ``users``
name the new bindings. A module without ``__all__``, one already fused, or one whose models
have nothing to zip is returned unchanged (the same object). Weight memory: the stacked
weights are new constants next to each model's own (the model functions still use those).
Where: merge phase, right after MergeCommonStems (before quantize and legalization).
"""

from __future__ import annotations

import heapq
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from ..errors import PassError
from ..ir.weights import exact_const
from .canonicalize_ops import attr_fields
from .explain import Explainer
from .merge_common_stems import MERGED
from .mutate import map_vars

log = logging.getLogger(__name__)

MODEL_AXIS = 1

_UNARY = {
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "bitwise_not", "ceil", "cos", "cosh", "exp",
    "floor", "log", "logical_not", "negative", "round", "rsqrt", "sigmoid", "sign", "sin", "sinh", "square",
    "sqrt", "tan", "tanh", "trunc", "clip", "erf", "isfinite", "isinf", "isnan", "astype",
    "nn.relu", "nn.relu6", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.selu", "nn.softplus", "nn.leakyrelu",
}
_BROADCAST = {
    "add", "subtract", "multiply", "divide", "floor_divide", "power", "maximum", "minimum", "mod", "floor_mod",
    "atan2", "equal", "not_equal", "greater", "greater_equal", "less", "less_equal", "logical_and",
    "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "where",
}
_RESHAPES = {"reshape", "flatten", "squeeze", "expand_dims"}
_REDUCTIONS = {"sum", "mean", "max", "min", "prod", "variance", "std"}
_POOLS = {f"nn.{kind}_pool{d}d" for kind in ("max", "avg") for d in (1, 2, 3)} | \
         {f"nn.adaptive_avg_pool{d}d" for d in (1, 2, 3)}
_CONVS = {"nn.conv1d", "nn.conv2d", "nn.conv3d"}


class _NoRule(Exception):
    """A rule's precondition failed; the message says which."""


def _op_name(value) -> str:
    if isinstance(value, relax.Call):
        op = value.op
        return op.name.removeprefix("relax.") if isinstance(op, tvm.ir.Op) else f"call:{getattr(op, 'name_hint', op)}"
    return type(value).__name__


def _is_tensor_const(e) -> bool:
    return isinstance(e, tvm.ir.Constant) and isinstance(getattr(e, "value", None), tvm.runtime.Tensor)


def _rank(ty) -> int | None:
    if isinstance(ty, relax.TensorType) and ty.ndim >= 0:
        return int(ty.ndim)
    return None


def _dims(ty) -> list | None:
    """The shape of a tensor type as a list of PrimExprs, or None when unknown."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _same_dim(a, b) -> bool:
    static = (int, tirx.IntImm)
    if isinstance(a, static) and isinstance(b, static):
        return int(a) == int(b)
    return bool(tvm_ffi.structural_equal(a, b))


def _vars_in(e, out: list) -> list:
    if isinstance(e, relax.Var):
        out.append(e)
    elif isinstance(e, relax.Call):
        for a in e.args:
            _vars_in(a, out)
    elif isinstance(e, relax.Tuple):
        for f in e.fields:
            _vars_in(f, out)
    elif isinstance(e, relax.TupleGetItem):
        _vars_in(e.tuple_value, out)
    return out


# -- isomorphism ----------------------------------------------------------------------------

def _arg_key(a, own: dict):
    """How a binding reads operand ``a``: its model's own binding by position, an input by its
    type (each model may read its own), a shared value by name, a constant by its type."""
    if isinstance(a, relax.Var):
        return own[a] if a in own else ("s", a.name)
    if _is_tensor_const(a):
        return ("c", tuple(a.value.shape), str(a.value.dtype))
    if isinstance(a, relax.Tuple):
        return ("t", tuple(_arg_key(f, own) for f in a.fields))
    if isinstance(a, relax.TupleGetItem):
        return ("g", _arg_key(a.tuple_value, own), a.index)
    return ("e", tvm_ffi.structural_hash(a))


def _key(b: relax.VarBinding, own: dict) -> tuple:
    """What must be equal for two bindings of different models to be zipped (constants by type)."""
    v = b.value
    if isinstance(v, relax.Call):
        head = ("call", _op_name(v), tvm_ffi.structural_hash(v.attrs) if v.attrs is not None else 0,
                tuple(_arg_key(a, own) for a in v.args))
    else:
        head = ("expr", _arg_key(v, own))
    return head + (tvm_ffi.structural_hash(b.var.ty),)


def _describe_arg(k) -> str:
    kind = k[0]
    if kind == "p":
        return f"its own binding #{k[1]}"
    if kind == "i":
        return "an input"
    if kind == "s":
        return f"shared {k[1]}"
    if kind == "c":
        return f"a constant {k[2]}{list(k[1])}"
    if kind == "t":
        return "a tuple (" + ", ".join(_describe_arg(f) for f in k[1]) + ")"
    if kind == "g":
        return f"field {k[2]} of {_describe_arg(k[1])}"
    return "an expression"


def _difference(a: relax.VarBinding, b: relax.VarBinding, ka: tuple, kb: tuple) -> str:
    """The first difference between two bindings whose keys differ."""
    va, vb = a.value, b.value
    na, nb = _op_name(va), _op_name(vb)
    if ka[0] != kb[0] or na != nb:
        return f"op {na} vs {nb}"
    if ka[0] == "call":
        if ka[2] != kb[2]:
            for key in attr_fields(va.attrs):
                if not tvm_ffi.structural_equal(getattr(va.attrs, key), getattr(vb.attrs, key)):
                    return f"attribute {key} of {na}: {getattr(va.attrs, key)} vs {getattr(vb.attrs, key)}"
            return f"attributes of {na}"
        if len(ka[3]) != len(kb[3]):
            return f"{na} with {len(ka[3])} vs {len(kb[3])} operands"
        for i, (x, y) in enumerate(zip(ka[3], kb[3])):
            if x != y:
                if x[0] == y[0] == "i":
                    return f"operand {i} of {na}: an input of type {va.args[i].ty} vs {vb.args[i].ty}"
                return f"operand {i} of {na}: {_describe_arg(x)} vs {_describe_arg(y)}"
    elif ka[1] != kb[1]:
        return f"{na} of {_describe_arg(ka[1])} vs {_describe_arg(kb[1])}"
    return f"result type of {na}: {a.var.ty} vs {b.var.ty}"


def _common_prefix(ka: list, kb: list, limit: int) -> int:
    n = min(len(ka), len(kb), limit)
    for i in range(n):
        if ka[i] != kb[i]:
            return i
    return n


# -- the pass -------------------------------------------------------------------------------

@dataclass
class _Group:
    """Models whose first ``length`` private bindings are zipped."""

    index: int
    models: list[str]
    length: int
    seqs: dict  # model -> its private bindings
    merged: dict = field(default_factory=dict)  # position -> merged Var (B, N, d1..dk)
    # position -> the merged value in its producer's layout, a reshape of (B, N, d1..dk) such as
    # a conv's (B, N*O, H, W): elementwise consumers work on it directly, so that TVM still fuses
    # them into the conv (a reshape right after a conv or matmul would stop FuseOps).
    folded: dict = field(default_factory=dict)
    pieces: dict = field(default_factory=dict)  # position -> per-model Vars (None: not sliced yet)
    fused: int = 0
    fell_back: list = field(default_factory=list)  # {"position", "op", "reason"}

    @property
    def n(self) -> int:
        return len(self.models)


@dataclass
class _Arg:
    """One operand of a zipped binding, seen across the group's models.

    ``kind``: ``M`` the merged value of position ``pos``; ``S`` one value every model reads
    (a shared variable or equal constants) in ``value``; ``C`` per-model constants in
    ``arrays``; ``E`` an equal non-tensor expression in ``value``; ``T`` a tuple of ``fields``;
    ``X`` anything else.
    """

    kind: str
    ty: object = None
    pos: int = -1
    direct: object = None  # M: a merged value that is no position (inputs stacked)
    value: object = None
    arrays: list | None = None
    fields: list | None = None


@tvm.transform.module_pass(opt_level=0, name="FuseHorizontal")
class FuseHorizontal:
    """See the module docstring. ``self.report`` (of the last run): ``{"groups": [{"models",
    "positions" (bindings zipped per model), "fused" (positions run as one op), "fell_back" (positions
    run per model), "fallbacks" ([{"position", "op", "reason"}]), "per_model_after" (bindings after
    the zipped prefix, per model)}], "alone": [models in no group]}``."""

    def __init__(self, explain: Explainer | None = None):
        self.explain = explain or Explainer("FuseHorizontal")
        self.report: dict = {"groups": [], "alone": []}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report = {"groups": [], "alone": []}
        if not any(gv.name_hint == MERGED for gv in mod.get_global_vars()):
            return mod
        func = mod[MERGED]
        if func.attrs is None or "smelt.merge" not in func.attrs:
            return mod
        meta = json.loads(str(func.attrs["smelt.merge"]))
        if "horizontal" in meta:
            return mod  # already fused: its slices would look like one more zippable layer
        body = func.body
        if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1 or not all(
                isinstance(b, relax.VarBinding) for b in body.blocks[0].bindings):
            self.explain.skip(func, f"{MERGED} is not one block of plain bindings")
            return mod
        bindings = list(body.blocks[0].bindings)
        names = [b.var.name for b in bindings]
        if len(set(names)) != len(names):
            self.explain.skip(func, f"{MERGED} has two bindings of one name: smelt.merge is ambiguous")
            return mod
        users = meta.get("users", {})
        models = list(meta["models"])
        seqs = {m: [b for b in bindings if users.get(b.var.name) == [m]] for m in models}
        groups = self._group(models, seqs, list(func.params))
        if not groups:
            self.report["alone"] = models
            return mod
        new_func, fused = _Rewriter(self, func, bindings, users, groups).run(meta)
        for g in groups:
            self.report["groups"].append({
                "models": g.models, "positions": g.length, "fused": g.fused, "fell_back": len(g.fell_back),
                "fallbacks": g.fell_back, "per_model_after": {m: len(g.seqs[m]) - g.length for m in g.models}})
        grouped = {m for g in groups for m in g.models}
        self.report["alone"] = [m for m in models if m not in grouped]
        if not fused:
            return mod
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        out[MERGED] = new_func
        return out

    def _group(self, models: list[str], seqs: dict, params: list) -> list[_Group]:
        """Greedy, in model order: a model joins the group it shares the longest prefix with
        when that saves more bindings than the group loses by getting shorter."""
        keys = {}
        inputs = {p: ("i", tvm_ffi.structural_hash(p.ty)) for p in params}
        for m in models:
            own = dict(inputs)
            own.update({b.var: ("p", j) for j, b in enumerate(seqs[m])})
            keys[m] = [_key(b, own) for b in seqs[m]]
        groups: list[_Group] = []
        for m in models:
            if not keys[m]:
                continue
            best, best_len = None, 0
            for g in groups:
                n = _common_prefix(keys[m], keys[g.models[0]], g.length)
                if n > best_len:
                    best, best_len = g, n
            # joining saves best_len bindings of m but makes the others stop at best_len
            if best is not None and best.n * best_len >= (best.n - 1) * best.length:
                if best_len < best.length:
                    rep = best.models[0]
                    self.explain.skip(seqs[rep][best_len].value,
                                      f"{', '.join(best.models)} zipped with {m} for {best_len} bindings only; "
                                      f"then {self._why(rep, m, best_len, keys, seqs)}")
                best.models.append(m)
                best.length = best_len
                continue
            if best is not None:
                rep = best.models[0]
                self.explain.skip(seqs[m][best_len].value if best_len < len(seqs[m]) else seqs[m][0].value,
                                  f"{m} not zipped with {', '.join(best.models)}: only {best_len} of "
                                  f"{best.length} bindings match; then {self._why(rep, m, best_len, keys, seqs)}")
            groups.append(_Group(len(groups), [m], len(keys[m]), {}))
        out = []
        for g in groups:
            if g.n < 2:
                m = g.models[0]
                others = [o for o in models if o != m and keys[o]]
                if others:
                    o = max(others, key=lambda o: _common_prefix(keys[m], keys[o], len(keys[m])))
                    n = _common_prefix(keys[m], keys[o], len(keys[m]))
                    if n == 0:
                        self.explain.skip(seqs[m][0].value, f"{m} zipped with no other model: "
                                                            f"first binding vs {o}'s: {self._why(m, o, 0, keys, seqs)}")
                continue
            g.seqs = {m: seqs[m] for m in g.models}
            g.index = len(out)
            out.append(g)
            self.explain.fired(seqs[g.models[0]][0].value,
                               f"models {', '.join(g.models)}: {g.length} bindings zipped into one each")
        return out

    def _why(self, a: str, b: str, j: int, keys: dict, seqs: dict) -> str:
        ka, kb = keys[a], keys[b]
        if j >= len(ka) or j >= len(kb):
            return f"{a} has {len(ka)} private bindings, {b} {len(kb)}"
        return f"binding #{j} ({seqs[a][j].var.name} vs {seqs[b][j].var.name}): " + \
            _difference(seqs[a][j], seqs[b][j], ka[j], kb[j])


class _Rewriter:
    """Builds the new ``__all__``: plain bindings as they were, zipped positions fused."""

    def __init__(self, owner: FuseHorizontal, func: relax.Function, bindings: list, users: dict,
                 groups: list[_Group]):
        self.owner, self.func, self.bindings, self.users, self.groups = owner, func, bindings, users, groups
        self.bb = relax.BlockBuilder()
        self.vmap: dict = {p: p for p in func.params}
        self.params = set(func.params)
        self.prefix: dict = {}  # original var of a zipped position -> (group, position, member)
        for g in groups:
            for i, m in enumerate(g.models):
                for j in range(g.length):
                    self.prefix[g.seqs[m][j].var] = (g, j, i)
        self.new_users: dict[str, list[str]] = {}
        self.names: set[str] = {p.name for p in func.params}
        self.fused = 0
        self.memo: dict = {}

    # -- emission helpers -------------------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.names:
            name, k = f"{hint}_{k}", k + 1
        self.names.add(name)
        return name

    def emit(self, expr, hint: str, users: list[str], output: bool = False) -> relax.Var:
        name = self._fresh(hint)
        var = self.bb.emit_output(expr, name_hint=name) if output else self.bb.emit(expr, name_hint=name)
        if users:
            self.new_users[name] = list(users)
        return var

    def emit_once(self, expr, hint: str, users: list[str]) -> relax.Var:
        """Emit ``expr`` unless an equal value was emitted already (a common input expanded or a
        merged value folded for several consumers)."""
        expr = self.bb.normalize(expr)
        h = tvm_ffi.structural_hash(expr)
        for e, var in self.memo.get(h, []):
            if tvm_ffi.structural_equal(e, expr):
                return var
        var = self.emit(expr, hint, users)
        self.memo.setdefault(h, []).append((expr, var))
        return var

    def resolve(self, v: relax.Var):
        if v in self.prefix:
            g, j, i = self.prefix[v]
            return self.piece(g, j, i)
        return self.vmap[v]

    def piece(self, g: _Group, j: int, i: int) -> relax.Var:
        """Model ``i``'s value of position ``j``: the merged value split once along the model axis."""
        pieces = g.pieces.setdefault(j, [None] * g.n)
        if pieces[i] is None:
            split = self.emit_once(relax.op.split(self.merged(g, j), g.n, axis=MODEL_AXIS),
                                   f"h{g.index}__split", g.models)
            m = g.models[i]
            part = self.emit(relax.TupleGetItem(split, i), f"{g.seqs[m][j].var.name}_part", [m])
            pieces[i] = self.emit(relax.op.squeeze(part, [MODEL_AXIS]), g.seqs[m][j].var.name, [m])
        return pieces[i]

    def mshape(self, g: _Group, j: int) -> list | None:
        """The merged shape (B, N, d1..dk) of position ``j``."""
        d = _dims(g.seqs[g.models[0]][j].var.ty)
        return None if not d else [d[0], g.n] + d[1:]

    def merged(self, g: _Group, j: int) -> relax.Var:
        """The merged value of position ``j``: a view of its producer's layout, or stacked from its
        pieces when it fell back."""
        if j not in g.merged:
            if j in g.folded:
                g.merged[j] = self.emit_once(relax.op.reshape(g.folded[j], self.mshape(g, j)),
                                             f"h{g.index}__unfold", g.models)
            else:
                g.merged[j] = self.emit(relax.op.stack(list(g.pieces[j]), axis=MODEL_AXIS),
                                        f"h{g.index}__stack", g.models)
        return g.merged[j]

    def view(self, g: _Group, j: int, shape: list) -> relax.Var:
        """The merged value of position ``j`` reshaped to ``shape`` (from its producer's layout)."""
        for base in (g.folded.get(j), g.merged.get(j)):
            if base is not None and _same_shape(_dims(base.ty), shape):
                return base
        base = g.folded[j] if j in g.folded else self.merged(g, j)
        return self.emit_once(relax.op.reshape(base, shape), f"h{g.index}__view", g.models)

    # -- the block ----------------------------------------------------------------------------
    def run(self, meta: dict) -> tuple[relax.Function, int]:
        items = self._items()
        attrs = {k: v for k, v in self.func.attrs.items()} if self.func.attrs is not None else {}
        with self.bb.function(MERGED, list(self.func.params), attrs=attrs, private=False):
            with self.bb.dataflow():
                for item in items:
                    self._emit_item(item)
            self.bb.emit_func_output(map_vars(self.func.body.body, self.resolve))
        new = self.bb.get()[MERGED]
        meta = dict(meta)
        meta["users"] = self.new_users
        meta["horizontal"] = [{"models": g.models, "positions": g.length, "fused": g.fused} for g in self.groups]
        new = new.with_attr("smelt.merge", json.dumps(meta))
        return new, self.fused

    def _items(self) -> list:
        """Every plain binding and every zipped position, in an order that defines before use:
        a zipped position comes where the last of its models had it."""
        items, seen = [], set()
        for b in self.bindings:
            if b.var in self.prefix:
                g, j, _ = self.prefix[b.var]
                if (g.index, j) in seen:
                    continue
                seen.add((g.index, j))
                items.append(["zip", g, j, [g.seqs[m][j] for m in g.models]])
            else:
                items.append(["plain", b])
        index = {b.var: i for i, b in enumerate(self.bindings)}
        prio, item_of = [], {}
        for k, it in enumerate(items):
            if it[0] == "zip":
                for b in it[3]:
                    item_of[b.var] = k
                prio.append(max(index[b.var] for b in it[3]))
            else:
                item_of[it[1].var] = k
                out = not isinstance(it[1].var, relax.DataflowVar)
                prio.append(len(self.bindings) + index[it[1].var] if out else index[it[1].var])
        users_of: list[list[int]] = [[] for _ in items]
        indeg = [0] * len(items)
        for k, it in enumerate(items):
            values = [b.value for b in it[3]] if it[0] == "zip" else [it[1].value]
            ds = {item_of[v] for val in values for v in _vars_in(val, []) if v in item_of}
            ds.discard(k)
            for d in ds:
                users_of[d].append(k)
            indeg[k] = len(ds)
        heap = [(prio[k], k) for k in range(len(items)) if indeg[k] == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            _, k = heapq.heappop(heap)
            order.append(items[k])
            for u in users_of[k]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, (prio[u], u))
        if len(order) != len(items):
            raise PassError(f"FuseHorizontal: the bindings of {MERGED} have a cycle")
        return order

    def _emit_item(self, item) -> None:
        if item[0] == "plain":
            b = item[1]
            value = map_vars(b.value, self.resolve)
            output = not isinstance(b.var, relax.DataflowVar)
            self.vmap[b.var] = self.emit(value, b.var.name, self.users.get(b.var.name, []), output=output)
        else:
            self._zip(*item[1:])

    def _zip(self, g: _Group, j: int, members: list) -> None:
        values = [b.value for b in members]
        rep = values[0]
        op = _op_name(rep)
        try:
            if not isinstance(rep, relax.Call) or not isinstance(rep.op, tvm.ir.Op):
                raise _NoRule(f"{op} is not an operator call")
            for v in values[1:]:
                if not tvm_ffi.structural_equal(v.attrs, rep.attrs):
                    raise _NoRule("attributes differ")
            args = [self._classify(g, [v.args[a] for v in values]) for a in range(len(rep.args))]
            rule = _rule_for(op)
            if rule is None:
                raise _NoRule(f"no rule for {op}")
            out = rule(_Zip(self, g, op, rep, args, members[0].var.ty))
        except _NoRule as e:
            g.fell_back.append({"position": j, "op": op, "reason": str(e)})
            self.owner.explain.skip(rep, f"{', '.join(g.models)} #{j} ({members[0].var.name}): "
                                         f"{e}; one {op} per model")
            log.info("FuseHorizontal: %s #%d %s stays per model: %s", ",".join(g.models), j, op, e)
            g.pieces[j] = [self.emit(map_vars(b.value, self.resolve), b.var.name, [m])
                           for m, b in zip(g.models, members)]
            return
        if isinstance(out, _Folded):
            self._check_folded(g, out.var, j, op)
            g.folded[j] = out.var
        else:
            self._check_merged(g, out, members[0].var.ty, op)
            g.merged[j] = out
        g.fused += 1
        self.fused += 1

    def _check_merged(self, g: _Group, var, piece_ty, op: str) -> None:
        got, want = _dims(var.ty), _dims(piece_ty)
        ok = got is not None and want is not None and len(got) == len(want) + 1 and \
            _same_dim(got[0], want[0]) and _same_dim(got[1], g.n) and \
            all(_same_dim(a, b) for a, b in zip(got[2:], want[1:])) and str(var.ty.dtype) == str(piece_ty.dtype)
        if not ok:
            raise PassError(f"FuseHorizontal: the {op} rule made {var.ty} for pieces {piece_ty} of "
                            f"{g.n} models (a bug in the rule)")

    def _check_folded(self, g: _Group, var, j: int, op: str) -> None:
        got, want = _dims(var.ty), self.mshape(g, j)
        ok = got is not None and want is not None and str(var.ty.dtype) == str(g.seqs[g.models[0]][j].var.ty.dtype)
        if ok and all(isinstance(d, (int, tirx.IntImm)) for d in got + want):
            ok = int(np.prod([int(d) for d in got])) == int(np.prod([int(d) for d in want]))
        if not ok:
            raise PassError(f"FuseHorizontal: the {op} rule made {var.ty}, not a layout of {want} "
                            f"(a bug in the rule)")

    def _classify(self, g: _Group, vals: list) -> _Arg:
        first = vals[0]
        if all(isinstance(v, relax.Var) for v in vals):
            where = [self.prefix.get(v) for v in vals]
            if all(w is not None and w[0] is g and w[1] == where[0][1] for w in where):
                return _Arg("M", ty=first.ty, pos=where[0][1])
            if all(v.same_as(first) for v in vals) and first not in self.prefix:
                return _Arg("S", ty=first.ty, value=self.vmap[first])
            if all(v in self.params for v in vals):  # each model its own input: stack them once
                stacked = self.emit_once(relax.op.stack(list(vals), axis=MODEL_AXIS), f"h{g.index}__inputs", g.models)
                return _Arg("M", ty=first.ty, direct=stacked)
            return _Arg("X")
        if all(_is_tensor_const(v) for v in vals):
            if all(tvm_ffi.structural_equal(v, first) for v in vals[1:]):
                return _Arg("S", ty=first.ty, value=first)
            arrays = [v.value.numpy() for v in vals]
            if any(a.shape != arrays[0].shape or a.dtype != arrays[0].dtype for a in arrays):
                return _Arg("X")
            return _Arg("C", ty=first.ty, arrays=arrays)
        if all(isinstance(v, relax.Tuple) and len(v.fields) == len(first.fields) for v in vals):
            return _Arg("T", fields=[self._classify(g, [v.fields[k] for v in vals]) for k in range(len(first.fields))])
        if not _vars_in(first, []) and all(tvm_ffi.structural_equal(v, first) for v in vals[1:]):
            return _Arg("E", value=first)
        return _Arg("X")


# -- rules --------------------------------------------------------------------------------------

@dataclass
class _Folded:
    """A rule's result in its producer's layout (a reshape of the merged shape)."""

    var: relax.Var


def _same_shape(a: list | None, b: list | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _is_one(d) -> bool:
    return isinstance(d, (int, tirx.IntImm)) and int(d) == 1


@dataclass
class _Zip:
    """One zipped position handed to a rule."""

    rw: _Rewriter
    g: _Group
    op: str
    call: relax.Call
    args: list[_Arg]
    ty: object  # the type of one model's result

    @property
    def n(self) -> int:
        return self.g.n

    def emit(self, expr, what: str = "") -> relax.Var:
        return self.rw.emit_once(expr, f"h{self.g.index}__{what or self.op.replace('nn.', '')}", self.g.models)

    def merged(self, a: _Arg) -> relax.Var:
        return a.direct if a.direct is not None else self.rw.merged(self.g, a.pos)

    def view(self, a: _Arg, shape: list) -> relax.Var:
        if a.direct is None:
            return self.rw.view(self.g, a.pos, shape)
        if _same_shape(_dims(a.direct.ty), shape):
            return a.direct
        return self.emit(relax.op.reshape(a.direct, shape), "view")

    def folded_shape(self, a: _Arg) -> list | None:
        var = self.g.folded.get(a.pos) if a.direct is None else None
        return None if var is None else _dims(var.ty)

    def mshape(self, a: _Arg) -> list | None:
        return _dims(a.direct.ty) if a.direct is not None else self.rw.mshape(self.g, a.pos)

    def rank(self) -> int:
        r = _rank(self.ty)
        if r is None or r < 1:
            raise _NoRule(f"result of rank {r}: no batch axis to put the model axis after")
        return r

    def dims(self, ty) -> list:
        d = _dims(ty)
        if d is None:
            raise _NoRule("a shape is not known")
        return d


def _rule_for(op: str):
    if op in _UNARY or op in _BROADCAST:
        return _elementwise
    if op in _RESHAPES:
        return _reshape
    if op in _REDUCTIONS:
        return _reduce
    if op in _POOLS:
        return _pool
    if op in _CONVS:
        return _conv
    return {"matmul": _matmul, "permute_dims": _permute, "nn.softmax": _softmax, "nn.log_softmax": _softmax,
            "nn.layer_norm": _layer_norm, "nn.rms_norm": _rms_norm, "concat": _concat}.get(op)


def _need_rank(a: _Arg) -> int:
    r = _rank(a.ty)
    if r is None:
        raise _NoRule("an operand of unknown rank")
    return r


def _const_aligned(a: _Arg, r: int) -> np.ndarray:
    """A constant operand (common or per-model) of a rank-``r`` broadcasting op, as an array of
    rank ``r + 1`` that broadcasts against the merged result."""
    if a.kind == "C":
        pad = (1,) * (r - a.arrays[0].ndim)
        return np.stack([x.reshape(pad + x.shape) for x in a.arrays], axis=MODEL_AXIS)
    arr = a.value.value.numpy()
    if arr.ndim == r:
        return np.expand_dims(arr, MODEL_AXIS)
    return arr.reshape((1,) * (r + 1 - arr.ndim) + arr.shape)


def _aligned(z: _Zip, a: _Arg, r: int):
    """Operand ``a`` of a broadcasting op with rank-``r`` pieces, in the merged layout, and whether
    it has the model axis: a merged value as is, a common value of rank ``r`` with a unit model
    axis, per-model constants stacked on the model axis. Lower-rank common values broadcast as
    they are: their dims line up with the pieces' trailing dims, which the model axis does not touch."""
    if a.kind == "M":
        return z.merged(a), True
    if a.kind == "S":
        if _need_rank(a) < r:
            return a.value, False
        if _is_tensor_const(a.value):
            return exact_const(_const_aligned(a, r)), False
        return z.emit(relax.op.expand_dims(a.value, MODEL_AXIS), "expand"), False
    if a.kind == "C":
        return exact_const(_const_aligned(a, r)), True
    return a.value, False  # E: attributes-like operands (clip bounds)


def _check_operands(z: _Zip, r: int, allowed: str = "MSCE") -> None:
    """Every operand is usable in a rank-``r`` broadcasting op over merged values."""
    for k, a in enumerate(z.args):
        if a.kind not in allowed:
            raise _NoRule(f"operand {k} is neither a zipped value, a common value nor per-model constants")
        if a.kind == "M" and _need_rank(a) != r:
            raise _NoRule(f"a zipped operand of rank {_rank(a.ty)} in a rank-{r} result")
        if a.kind in "SC" and _need_rank(a) > r:
            raise _NoRule("an operand of higher rank than the result")


def _fold_groups(ms: list, fs: list) -> list | None:
    """For each axis of the layout ``fs``, the axes of the merged shape ``ms`` it joins (unit axes
    of ``ms`` belong to none), when ``fs`` is a reshape of ``ms`` that only joins neighbours."""
    nonunit = [a for a, d in enumerate(ms) if not _is_one(d)]
    groups, k = [], 0
    for f in fs:
        if _is_one(f):
            groups.append([])
            continue
        if k >= len(nonunit):
            return None
        if not isinstance(f, (int, tirx.IntImm)):
            if not _same_dim(ms[nonunit[k]], f):
                return None
            groups.append([nonunit[k]])
            k += 1
            continue
        prod, group = 1, []
        while k < len(nonunit) and prod < int(f):
            if not isinstance(ms[nonunit[k]], (int, tirx.IntImm)):
                return None
            prod *= int(ms[nonunit[k]])
            group.append(nonunit[k])
            k += 1
        if prod != int(f):
            return None
        groups.append(group)
    return groups if k == len(nonunit) else None


def _folded_operand(z: _Zip, a: _Arg, r: int, ms: list, groups: list):
    """Operand ``a`` of an elementwise op laid out like the folded result, or None."""
    if a.kind == "E" or (a.kind == "S" and _need_rank(a) == 0):
        return a.value
    if a.kind == "C" or _is_tensor_const(a.value):
        arr = _const_aligned(a, r)
        if not all(isinstance(d, (int, tirx.IntImm)) for g in groups for d in (ms[x] for x in g)):
            return None
        full = list(arr.shape)
        for group in groups:
            if len({arr.shape[x] for x in group}) > 1:  # some axes broadcast, some not: expand them
                for x in group:
                    full[x] = int(ms[x])
        arr = np.broadcast_to(arr, full)
        return exact_const(np.ascontiguousarray(arr).reshape(
            [int(np.prod([arr.shape[x] for x in g], dtype=np.int64)) for g in groups]))
    # a common non-constant value: a reshape, when no group mixes broadcast and full axes
    dims = z.dims(a.ty)
    dims = [dims[0], 1] + dims[1:] if len(dims) == r else [1] * (r + 1 - len(dims)) + dims
    shape = []
    for group in groups:
        if all(_is_one(dims[x]) for x in group):
            shape.append(1)
        elif all(_same_dim(dims[x], ms[x]) for x in group):
            d = ms[group[0]]
            for x in group[1:]:
                d = d * ms[x]
            shape.append(d)
        else:
            return None
    return z.emit(relax.op.reshape(a.value, shape), "view")


def _elementwise(z: _Zip):
    r = z.rank()
    _check_operands(z, r)
    if not any(a.kind in "MC" for a in z.args):
        raise _NoRule("no operand differs between the models")
    ms = [z.dims(z.ty)[0], z.n] + z.dims(z.ty)[1:]
    # In the producer's layout when a zipped operand has one, so the op fuses into its producer.
    for a in z.args:
        fs = z.folded_shape(a) if a.kind == "M" else None
        groups = _fold_groups(ms, fs) if fs is not None else None
        if groups is None or not all(_same_shape(z.mshape(b), ms) for b in z.args if b.kind == "M"):
            continue
        new = [z.view(b, fs) if b.kind == "M" else _folded_operand(z, b, r, ms, groups) for b in z.args]
        if all(e is not None for e in new):
            return _Folded(z.emit(relax.Call(z.call.op, new, z.call.attrs, z.call.ty_args)))
        break
    new = [_aligned(z, a, r)[0] for a in z.args]
    return z.emit(relax.Call(z.call.op, new, z.call.attrs, z.call.ty_args))


def _reshape(z: _Zip) -> relax.Var:
    """reshape/flatten/squeeze/expand_dims keep the element order: one reshape of the merged value
    to ``(B, N, rest...)`` when the batch axis stays axis 0."""
    x = z.args[0]
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    src, dst = z.dims(x.ty), z.dims(z.ty)
    if not src or not dst or not _same_dim(src[0], dst[0]):
        raise _NoRule("axis 0 (batch) does not stay axis 0")
    return z.view(x, [dst[0], z.n] + dst[1:])


def _permute(z: _Zip) -> relax.Var:
    x = z.args[0]
    r = z.rank()
    axes = z.call.attrs.axes
    if x.kind != "M" or axes is None:
        raise _NoRule("input is not a zipped value" if x.kind != "M" else "axes reversed (axis 0 moves)")
    axes = [int(a) % r for a in axes]
    if axes[0] != 0:
        raise _NoRule(f"axes {axes} move axis 0")
    return z.emit(relax.op.permute_dims(z.merged(x), [0, MODEL_AXIS] + [a + 1 for a in axes[1:]]))


def _shift(axis: int, r: int) -> int:
    """Piece axis → merged axis."""
    axis = axis % r
    return axis if axis == 0 else axis + 1


def _softmax(z: _Zip) -> relax.Var:
    x = z.args[0]
    r = z.rank()
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    fn = relax.op.nn.softmax if z.op == "nn.softmax" else relax.op.nn.log_softmax
    return z.emit(fn(z.merged(x), _shift(int(z.call.attrs.axis), r)))


def _reduce(z: _Zip) -> relax.Var:
    x = z.args[0]
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    r = _need_rank(x)
    if r < 1 or z.call.attrs.axis is None:
        raise _NoRule("reduces every axis: no batch axis left")
    axes = sorted({int(a) % r for a in z.call.attrs.axis})
    keep = bool(z.call.attrs.keepdims)
    if 0 in axes and not keep:
        raise _NoRule("reduces the batch axis away")
    fn = getattr(relax.op, z.op)
    return z.emit(fn(z.merged(x), [_shift(a, r) for a in axes], keep))


def _pool(z: _Zip) -> _Folded:
    """Pools work per channel: pool the models' channels side by side."""
    x = z.args[0]
    attrs = z.call.attrs
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    layout = str(attrs.layout)
    if not layout.startswith("NC") or str(attrs.out_layout) != layout:
        raise _NoRule(f"layout {layout}/{attrs.out_layout} is not channels-first")
    src = z.dims(x.ty)
    folded = z.view(x, [src[0], src[1] * z.n] + src[2:])
    return _Folded(z.emit(relax.Call(z.call.op, [folded], attrs, z.call.ty_args)))


def _conv(z: _Zip) -> _Folded:
    """A conv of a zipped input is one grouped conv over the channels of all models; of one
    common input, one conv with every model's filters."""
    x, w = z.args[0], z.args[1]
    attrs = z.call.attrs
    spatial = int(z.op[len("nn.conv")])  # nn.conv2d -> 2
    layout = "NC" + "DHW"[3 - spatial:]
    kernel = "OI" + layout[2:]
    if str(attrs.data_layout) != layout or str(attrs.kernel_layout) != kernel or \
            str(attrs.out_layout or layout) != layout:
        raise _NoRule(f"layouts {attrs.data_layout}/{attrs.kernel_layout}/{attrs.out_layout} are not "
                      f"{layout}/{kernel}")
    groups = int(attrs.groups)
    fn = getattr(relax.op.nn, z.op.removeprefix("nn."))

    def conv(data, weight, groups):
        return fn(data, weight, strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                  groups=groups, data_layout=layout, kernel_layout=kernel, out_layout=layout,
                  out_dtype=attrs.out_dtype)

    if x.kind == "M" and w.kind == "C":
        src = z.dims(x.ty)
        data = z.view(x, [src[0], src[1] * z.n] + src[2:])
        return _Folded(z.emit(conv(data, exact_const(np.concatenate(w.arrays, axis=0)), groups * z.n)))
    if x.kind == "M" and w.kind == "S":
        src = z.dims(x.ty)  # the models as more batch: (B*N, C, H, W)
        data = z.view(x, [src[0] * z.n] + src[1:])
        return _Folded(z.emit(relax.Call(z.call.op, [data, w.value], attrs, z.call.ty_args)))
    if x.kind == "S" and w.kind == "C":
        if groups != 1:
            raise _NoRule(f"a grouped conv (groups={groups}) of a common input: the output channels "
                          "would interleave the models")
        return _Folded(z.emit(conv(x.value, exact_const(np.concatenate(w.arrays, axis=0)), 1)))
    raise _NoRule(f"input {x.kind}, weight {w.kind}: needs a zipped or common input and constant weights")


def _matmul(z: _Zip):
    x, y = z.args
    r = z.rank()
    _check_operands(z, r, "MSC")
    if _need_rank(x) < 2 or _need_rank(y) < 2:
        raise _NoRule("a vector operand")
    if not any(a.kind in "MC" for a in z.args):
        raise _NoRule("no operand differs between the models")

    def matmul(a, b):
        return relax.Call(z.call.op, [a, b], z.call.attrs, z.call.ty_args)

    if r >= 3:
        return z.emit(matmul(_aligned(z, x, r)[0], _aligned(z, y, r)[0]))
    # Rank-2 pieces: axis 0 is the rows; the model axis goes between rows and columns.
    dst = z.dims(z.ty)
    if y.kind == "M":
        raise _NoRule("the right operand is a zipped rank-2 value (its axis 0 is not a batch axis)")
    if x.kind == "M":
        if y.kind == "S":
            return z.emit(matmul(z.merged(x), y.value))
        rows = z.view(x, [dst[0], z.n, 1, z.dims(x.ty)[1]])
        return _Folded(z.emit(matmul(rows, exact_const(np.stack(y.arrays)))))
    if x.kind == "S" and y.kind == "C":
        return _Folded(z.emit(matmul(x.value, exact_const(np.concatenate(y.arrays, axis=1)))))
    raise _NoRule("per-model constants on the left of a rank-2 matmul")


def _concat(z: _Zip) -> relax.Var:
    (t,) = z.args
    r = z.rank()
    if t.kind != "T" or not t.fields or any(f.kind != "M" for f in t.fields):
        raise _NoRule("concatenates values that are not all zipped")
    return z.emit(relax.op.concat([z.merged(f) for f in t.fields], _shift(int(z.call.attrs.axis), r)))


def _norm_axes(z: _Zip, r: int) -> list[int]:
    axes = [int(a) % r for a in z.call.attrs.axes]
    if 0 in axes:
        raise _NoRule("normalizes over the batch axis")
    return axes


def _per_model_scale(a: _Arg, axes: list[int], r: int) -> relax.Expr:
    """Per-model scales or shifts over ``axes``, laid out to broadcast against the merged result."""
    if sorted(axes) != axes:
        raise _NoRule(f"axes {axes} not ascending")
    if a.kind not in "SC" or a.kind == "S" and not _is_tensor_const(a.value):
        raise _NoRule("a scale or shift is not constant")
    arrays = a.arrays if a.kind == "C" else [a.value.value.numpy()]
    shape = [1] * r
    for k, ax in enumerate(axes):
        shape[ax] = arrays[0].shape[k]
    return exact_const(np.stack([x.reshape(shape) for x in arrays], axis=MODEL_AXIS))


def _layer_norm(z: _Zip) -> relax.Var:
    """Per-model gamma/beta: normalize once with ones and zeros, then one multiply and one add."""
    x, gamma, beta = z.args
    r = z.rank()
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    attrs = z.call.attrs
    axes = _norm_axes(z, r)
    shifted = [_shift(a, r) for a in axes]
    if gamma.kind == "S" and beta.kind == "S":
        return z.emit(relax.op.nn.layer_norm(z.merged(x), gamma.value, beta.value, shifted, float(attrs.epsilon),
                                             bool(attrs.center), bool(attrs.scale)))
    if not (bool(attrs.center) and bool(attrs.scale)):
        raise _NoRule("per-model gamma/beta with center or scale off")
    scale, shift = _per_model_scale(gamma, axes, r), _per_model_scale(beta, axes, r)
    like = gamma.arrays[0] if gamma.kind == "C" else gamma.value.value.numpy()
    normed = z.emit(relax.op.nn.layer_norm(z.merged(x), exact_const(np.ones_like(like)),
                                           exact_const(np.zeros_like(like)), shifted, float(attrs.epsilon)))
    return z.emit(relax.op.add(z.emit(relax.op.multiply(normed, scale), "scale"), shift), "shift")


def _rms_norm(z: _Zip) -> relax.Var:
    """Per-model weights: normalize once with ones, then one multiply."""
    x, weight = z.args
    r = z.rank()
    if x.kind != "M":
        raise _NoRule("input is not a zipped value")
    axes = _norm_axes(z, r)
    shifted = [_shift(a, r) for a in axes]
    eps = float(z.call.attrs.epsilon)
    if weight.kind == "S":
        return z.emit(relax.op.nn.rms_norm(z.merged(x), weight.value, shifted, eps))
    scale = _per_model_scale(weight, axes, r)
    normed = z.emit(relax.op.nn.rms_norm(z.merged(x), exact_const(np.ones_like(weight.arrays[0])), shifted, eps))
    return z.emit(relax.op.multiply(normed, scale), "scale")
