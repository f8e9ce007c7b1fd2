"""Backend discovery: plugins register under the entry-point group ``smelt.backends``.

Guarantees: backends load lazily (a plugin is imported when first asked for); two
plugins claiming one name raise an error naming both; an unknown name is answered
with the list of known ones. The three built-in backends are known even when smelt
runs from a source tree without installed metadata.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import BackendError
from .base import Backend

GROUP = "smelt.backends"
_BUILTIN = {
    "cpu": "smelt.backends.cpu:CPUBackend",
    "cuda": "smelt.backends.cuda:CUDABackend",
    "rocm": "smelt.backends.rocm:ROCmBackend",
}
_loaded: dict[str, Backend] = {}
_MEMBERS = tuple(Backend.__annotations__) + tuple(
    n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_"))


def available() -> dict[str, str]:
    """Backend name → ``module:Class`` for every registered backend."""
    found = dict(_BUILTIN)
    sources = {name: "smelt" for name in _BUILTIN}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            raise BackendError(f"backend name {ep.name!r} is registered twice: {found[ep.name]} "
                               f"({sources[ep.name]}) and {ep.value} ({ep.dist.name if ep.dist else '?'})")
        found[ep.name] = ep.value
        sources[ep.name] = ep.dist.name if ep.dist else "?"
    return found


def get(name: str) -> Backend:
    """The backend called ``name`` (instantiated once)."""
    if name in _loaded:
        return _loaded[name]
    known = available()
    if name not in known:
        raise BackendError(f"unknown target {name!r}; known targets: {', '.join(sorted(known))}")
    module, _, attr = known[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BackendError(f"backend {name!r} ({known[name]}) cannot be loaded: {e}") from None
    backend = cls()
    if not isinstance(backend, Backend):
        missing = [m for m in _MEMBERS if not hasattr(backend, m)]
        raise BackendError(f"backend {name!r} ({known[name]}) does not implement smelt's Backend interface: "
                           f"missing {', '.join(missing)}")
    _loaded[name] = backend
    return backend
