"""Typed errors: everything smelt raises on bad input is a ``SmeltError``.

The CLI prints ``str(error)`` on one line and exits non-zero; the message must
name the file, model, node, op, expected and actual values involved.
"""

from __future__ import annotations


class SmeltError(Exception):
    """Base class of every error smelt reports to a user."""


class FrontendError(SmeltError):
    """A model could not be read or converted (file, format, op, export)."""


class UnsupportedOpsError(FrontendError):
    """One or more ops have no converter; ``ops`` lists (op_type, node names, opset)."""

    def __init__(self, path: str, ops: dict[str, list[str]], opset: int):
        self.path, self.ops, self.opset = path, ops, opset
        listing = "; ".join(
            f"{op} (nodes: {', '.join(names[:5])}{', …' if len(names) > 5 else ''})"
            for op, names in sorted(ops.items())
        )
        super().__init__(f"{path}: {len(ops)} unsupported op type(s) at opset {opset}: {listing}")


class PassError(SmeltError):
    """A pass failed or left the module ill-formed."""


class BackendError(SmeltError):
    """A target is unknown, misconfigured, or its toolchain is missing."""


class ArtifactError(SmeltError):
    """An artifact is missing, tampered with, or does not fit this runtime."""


class InputError(SmeltError):
    """Inputs given to a compiled model do not match its signature."""
