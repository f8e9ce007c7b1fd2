"""Pictures of a merged program: Graphviz DOT of ``__all__`` with shared and private nodes coloured.

Guarantees: one node per binding (op and output shape) and per input, edges from
operands; a binding used by several models is drawn in the shared colour, one used by
one model in that model's colour (legend included). ``render`` writes SVG/PNG through
Graphviz's ``dot`` and says what to install when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tvm import relax

from ..errors import SmeltError
from .program import _dim

PALETTE = ["#8ecae6", "#ffb703", "#90be6d", "#f28482", "#b5838d", "#a0c4ff", "#ffd6a5", "#caffbf"]
SHARED = "#adb5bd"


def _label(value) -> str:
    op = getattr(getattr(value, "op", None), "name", type(value).__name__).removeprefix("relax.")
    ty = getattr(value, "ty", None)
    shape = ""
    if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values"):
        shape = "\\n" + "×".join(str(_dim(d)) for d in ty.shape.values)
    return op + shape


def merged_dot(func: relax.Function, users: dict[str, list[str]], models: list[str]) -> str:
    """DOT text for the merged function ``func``; ``users`` maps binding names to the models using them."""
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    lines = ["digraph merged {", "  rankdir=TB; node [shape=box, style=filled, fontsize=10, fontname=Helvetica];"]
    ids: dict = {}
    for p in func.params:
        ids[p] = f"n{len(ids)}"
        lines.append(f'  {ids[p]} [label="{p.name.replace("__", ".", 1)}", shape=ellipse, fillcolor=white];')
    for block in func.body.blocks:
        for b in block.bindings:
            ids[b.var] = f"n{len(ids)}"
            who = users.get(b.var.name, [])
            fill = SHARED if len(who) > 1 else colour.get(who[0], "white") if who else "white"
            tooltip = ", ".join(who)
            lines.append(f'  {ids[b.var]} [label="{_label(b.value)}", fillcolor="{fill}", tooltip="{tooltip}"];')
            for o in _operands(b.value):
                if o in ids:
                    lines.append(f"  {ids[o]} -> {ids[b.var]};")
    lines.append('  subgraph cluster_legend { label="legend"; fontsize=10;')
    lines.append(f'    legend_shared [label="shared", fillcolor="{SHARED}"];')
    for m in models:
        lines.append(f'    "legend_{m}" [label="{m} only", fillcolor="{colour[m]}"];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _operands(e):
    if isinstance(e, relax.Call):
        out = []
        for a in e.args:
            out += list(a.fields) if isinstance(a, relax.Tuple) else [a]
        return out
    if isinstance(e, relax.Tuple):
        return list(e.fields)
    if isinstance(e, relax.TupleGetItem):
        return [e.tuple_value]
    return []


def render(dot: str, path: str | Path) -> Path:
    """Write ``dot`` to ``path``: ``.dot`` as text, ``.svg``/``.png``/``.pdf`` through Graphviz."""
    path = Path(path)
    if path.suffix == ".dot":
        path.write_text(dot)
        return path
    exe = shutil.which("dot")
    if exe is None:
        raise SmeltError(f"drawing {path.name} needs Graphviz's dot: apt-get install graphviz "
                         f"(or ask for a .dot file)")
    fmt = path.suffix.lstrip(".") or "svg"
    proc = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SmeltError(f"dot could not draw {path}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return path
