"""Backends: one plugin per device kind behind the ``Backend`` interface."""

from .base import Backend, TargetOptions
from .registry import available, get

__all__ = ["Backend", "TargetOptions", "available", "get"]
