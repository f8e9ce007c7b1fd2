"""The content-addressed weight store and the constant/parameter conversions around it.

Requires: weights as numpy arrays (any dtype numpy or ml_dtypes knows).
Guarantees: a tensor is keyed by the SHA-256 of its dtype, shape and bytes, so
identical weights of different models are stored once; ``save``/``load`` write
one raw ``weights.bin`` (64-byte aligned, memory-mappable) and return its index.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

ALIGN = 64
# Constants with fewer elements stay inline in the IR (scalars, small shape tensors).
MIN_WEIGHT_ELEMENTS = 16


def weight_key(array: np.ndarray) -> str:
    """Content address of a tensor: SHA-256 over dtype, shape and bytes (hex, 32 chars)."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(array).view(np.uint8).data)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class WeightEntry:
    """Where one tensor lives in ``weights.bin``."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, d: dict) -> "WeightEntry":
        return cls(d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]))


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends; shipped with TVM

        return np.dtype(getattr(ml_dtypes, name))


class WeightStore:
    """Tensors keyed by content. ``add`` returns the key; adding the same bytes twice is free."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}
        self._tensors: dict[str, tvm.runtime.Tensor] = {}
        self.added_bytes = 0  # bytes offered, duplicates included: shows what dedup saved

    def add(self, array: np.ndarray) -> str:
        array = np.asarray(array, order="C")  # not ascontiguousarray: that makes 0-d arrays 1-d
        key = weight_key(array)
        self.added_bytes += array.nbytes
        self._arrays.setdefault(key, array)
        return key

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def keys(self):
        return self._arrays.keys()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def tensor(self, key: str) -> tvm.runtime.Tensor:
        """The tensor as a TVM CPU tensor, converted once and shared by every user."""
        if key not in self._tensors:
            self._tensors[key] = tvm.runtime.tensor(self._arrays[key])
        return self._tensors[key]

    def subset(self, keys) -> "WeightStore":
        """A store holding only ``keys`` (what one artifact needs)."""
        out = WeightStore()
        for k in keys:
            out._arrays[k] = self._arrays[k]
        out.added_bytes = self.added_bytes
        return out

    def slices(self, max_parts: int = 64, min_bytes: int = 1024) -> dict[str, tuple[str, int]]:
        """Tensors whose bytes are one of the equal parts of a larger tensor of the same dtype:
        ``key -> (larger key, byte offset)``. Stacking the weights of N models into one wider
        operator (FuseHorizontal) makes such tensors; stored as parts they cost no bytes."""
        by_size: dict[tuple[str, int], dict[bytes, str]] = {}
        for key, a in self._arrays.items():
            if a.nbytes >= min_bytes:
                digest = hashlib.blake2b(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data).digest()
                by_size.setdefault((a.dtype.str, a.nbytes), {}).setdefault(digest, key)
        found: dict[str, tuple[str, int]] = {}
        for key, a in sorted(self._arrays.items(), key=lambda kv: -kv[1].nbytes):
            if key in found:
                continue
            raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            for parts in range(2, max_parts + 1):
                if a.nbytes % parts or (a.dtype.str, a.nbytes // parts) not in by_size:
                    continue
                size, candidates = a.nbytes // parts, by_size[(a.dtype.str, a.nbytes // parts)]
                for i in range(parts):
                    part = candidates.get(hashlib.blake2b(raw[i * size:(i + 1) * size].data).digest())
                    if part is not None and part != key and part not in found and \
                            np.array_equal(raw[i * size:(i + 1) * size], self._arrays[part].reshape(-1).view(np.uint8)):
                        found[part] = (key, i * size)
        # a part of a part: point at the outermost tensor
        for key, (base, off) in list(found.items()):
            while base in found:
                base, extra = found[base]
                off += extra
            found[key] = (base, off)
        return found

    def save(self, path: str | Path) -> dict[str, WeightEntry]:
        """Write every tensor once into ``path``; return the index to record beside it. A tensor
        that is a part of a larger one (``slices``) is recorded at its place inside that one."""
        index: dict[str, WeightEntry] = {}
        parts = self.slices()
        with open(path, "wb") as f:
            offset = 0
            for key in sorted(self._arrays):
                if key in parts:
                    continue
                a = self._arrays[key]
                pad = (-offset) % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(a.reshape(-1).view(np.uint8).data if a.nbytes else b"")  # reshape: 0-d views fail
                index[key] = WeightEntry(str(a.dtype), tuple(a.shape), offset, a.nbytes)
                offset += a.nbytes
            f.flush()
            os.fsync(f.fileno())
        for key, (base, off) in parts.items():
            a = self._arrays[key]
            index[key] = WeightEntry(str(a.dtype), tuple(a.shape), index[base].offset + off, a.nbytes)
        return index

    @classmethod
    def load(cls, path: str | Path, index: dict[str, WeightEntry], mmap: bool = True) -> "WeightStore":
        """Read tensors back (memory-mapped by default: nothing is copied until used)."""
        store = cls()
        if os.path.getsize(path) == 0:  # no weights at all: np.memmap refuses an empty file
            raw = np.empty(0, dtype=np.uint8)
        else:
            raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
        for key, e in index.items():
            dt = _np_dtype(e.dtype)
            store._arrays[key] = raw[e.offset : e.offset + e.nbytes].view(dt).reshape(e.shape)
        store.added_bytes = store.nbytes
        return store


def stays_inline(shape, min_elements: int = MIN_WEIGHT_ELEMENTS) -> bool:
    """Whether a tensor of ``shape`` is an inline constant rather than a stored weight."""
    return len(shape) == 0 or int(np.prod(shape, dtype=np.int64)) < min_elements


def exact_const(array: np.ndarray) -> tvm.ir.Constant:
    """A Relax constant of exactly ``array``'s shape and dtype.

    Use this, not ``relax.const(array)``: that one narrows int64 to int32 and float64
    to float32 (its documented default), which silently changes types and values.
    Unlike ``np.ascontiguousarray`` this keeps a 0-d array 0-d.
    """
    return relax.const(tvm.runtime.tensor(np.array(array, order="C")))


@relax.expr_functor.mutator
class _ConstantLifter(relax.PyExprMutator):
    """Replaces every tensor constant of at least ``min_elements`` by a fresh parameter."""

    def __init__(self, min_elements: int):
        super().__init__()
        self.min_elements = min_elements
        self.params: list[relax.Var] = []
        self.data: list[tvm.runtime.Tensor] = []
        self._by_handle: dict = {}

    def visit_generic_const_(self, op) -> relax.Expr:
        if not isinstance(op.value, tvm.runtime.Tensor):
            return op  # dtype and other non-tensor constants of lowered code
        if stays_inline(op.value.shape, self.min_elements):
            return op
        handle = op.value  # TVM objects hash and compare by identity of the underlying tensor
        var = self._by_handle.get(handle)
        if var is None:
            var = relax.Var(f"w{len(self.params)}", op.ty)
            self._by_handle[handle] = var
            self.params.append(var)
            self.data.append(op.value)
        return var


def lift_constants(func: relax.Function, min_elements: int = MIN_WEIGHT_ELEMENTS) -> relax.Function:
    """Turn large constants of ``func`` into trailing parameters.

    The lifted tensors are recorded TVM's way: attribute ``params`` holds the data
    of every parameter after the first ``num_input`` ones.
    """
    lifter = _ConstantLifter(min_elements)
    body = lifter.visit_expr(func.body)
    if not lifter.params:
        return func
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    old = list(func.attrs["params"]) if func.attrs and "params" in func.attrs else []
    new = relax.Function(list(func.params) + lifter.params, body, func.ret_ty, func.is_pure,
                         func.attrs, func.span)
    new = new.with_attr("num_input", num_input)
    return new.with_attr("params", old + lifter.data)
