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


def error_line(e: BaseException, last: bool = False, with_type: bool = False) -> str:
    """One informative line of an exception's message, for one-line reports.

    Python errors put the point first; TVM errors often put it last, after context,
    and append remarks such as ``# Metadata omitted``, which are skipped.
    """
    lines = [ln.strip() for ln in str(e).strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        return type(e).__name__
    line = lines[-1] if last else lines[0]
    return f"{type(e).__name__}: {line}" if with_type else line


def _register_with_tvm() -> None:
    """Let smelt's errors cross TVM's FFI (a pass raising BackendError inside TVM's pass
    infrastructure comes back as BackendError, not as a generic RuntimeError)."""
    try:
        import tvm_ffi
    except ImportError:  # pragma: no cover - TVM is a hard dependency
        return
    for cls in (SmeltError, FrontendError, UnsupportedOpsError, PassError, BackendError, ArtifactError, InputError):
        tvm_ffi.register_error(f"smelt.{cls.__name__}", cls)


_register_with_tvm()
