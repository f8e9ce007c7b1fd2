"""The backend interface every target plugin implements.

A backend turns target options into a TVM target, supplies the ``schedule`` and
``lower`` phases of the pipeline, checks its toolchain before any work starts,
names the runtime device and writes generated source for ``--emit-source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import tvm


@dataclass(frozen=True)
class TargetOptions:
    """What the user asked for: ``kind`` (backend name), ``arch`` (sm_90, gfx942, or a CPU
    name such as ``skylake``), ``triple`` (CPU cross-compilation), ``cuda_graph`` and ``libs``,
    the vendor libraries generated code may call (None: the backend's default; ``()``: none)."""

    kind: str = "cpu"
    arch: str | None = None
    triple: str | None = None
    cuda_graph: bool = True
    libs: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "arch": self.arch, "triple": self.triple, "cuda_graph": self.cuda_graph,
                "libs": None if self.libs is None else list(self.libs)}


@runtime_checkable
class Backend(Protocol):
    """A code generator for one kind of device.

    Optional: ``int8_weight_limit(target) -> int``, the largest |weight| QuantizeInt8 may emit
    for ``target`` (127 where absent), for instructions that multiply narrower weights exactly;
    ``fp8_unsupported(target) -> str``, why ``target`` cannot run QuantizeFp8's E4M3 kernels
    ("" where it can; absent: it can)."""

    name: ClassVar[str]
    description: ClassVar[str]
    requirements: ClassVar[str]  # what must be installed, in words
    device_type: ClassVar[str]  # tvm.runtime.device() name used to run artifacts

    def target(self, opts: TargetOptions) -> tvm.target.Target:
        """The TVM target (with its host) for ``opts``; raises BackendError on bad options."""

    def check_toolchain(self, opts: TargetOptions) -> None:
        """Raise BackendError saying what to install when code cannot be generated here."""

    def prelegalize_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """Target-specific Relax rewrites before LegalizeOps (first in the fuse phase): preferred
        layouts, faster implementations of an op."""

    def postfuse_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """Passes after FuseOps/FuseTIR (last in the fuse phase): facts about the fused kernels
        that tuning and the schedules both read, such as which operands are weights. Tuning
        extracts its tasks after them, so records and compiles see the same kernels."""

    def schedule_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """Passes that give every PrimFunc a schedule (after tuned records were applied)."""

    def lower_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """Relax dataflow lowering and VM finalization passes."""

    def pass_config(self, opts: TargetOptions) -> dict:
        """PassContext config entries for this backend."""

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        """Write generated source (CUDA C, LLVM IR, AMDGPU assembly) into ``out_dir``."""

    def link_objects(self, target: tvm.target.Target) -> list[Path]:
        """Object files linked into the artifact's library: the library routines that code
        generated for ``target`` calls (``target``'s ``libs``)."""

    def prepare_run(self, target: dict) -> None:
        """Before an artifact built for ``target`` (its manifest JSON) loads: make what its
        library calls at run time loadable; raise ArtifactError saying what is missing."""


def check_libs(opts: TargetOptions, known: tuple[str, ...]) -> tuple[str, ...]:
    """``opts.libs`` (the backend's default ``known`` when None), each one checked against ``known``."""
    from ..errors import BackendError

    libs = known if opts.libs is None else tuple(opts.libs)
    for lib in libs:
        if lib not in known:
            raise BackendError(f"--libs {lib!r}: target {opts.kind} calls "
                               f"{'one of ' + ', '.join(known) if known else 'no libraries'}")
    return libs


def module_tree(mod) -> list:
    """``mod`` and every module it imports, depth first, each once (host, then device code)."""
    out, stack = [], [mod]
    while stack:
        m = stack.pop()
        if any(m.same_as(seen) for seen in out):
            continue
        out.append(m)
        stack.extend(reversed(list(m.imports)))
    return out


def _triple_arch(triple: str) -> str:
    return triple.split("-")[0].replace("amd64", "x86_64").replace("arm64", "aarch64")


def host_linker_options(target: tvm.target.Target) -> dict:
    """``export_library`` options for the host code of ``target``: the system compiler for this
    machine's architecture, ``<triple>-g++`` for another one (cross-compilation).

    Raises BackendError naming the package to install when no cross linker is found.
    """
    import platform
    import shutil

    from ..errors import BackendError

    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) if host.kind.name == "llvm" else ""
    here = _triple_arch(platform.machine().lower())
    if not triple or _triple_arch(triple) == here:
        return {}
    arch = _triple_arch(triple)
    for cxx in (f"{triple}-g++", f"{arch}-linux-gnu-g++"):
        if shutil.which(cxx):
            from tvm.support import cc

            return {"fcompile": cc.cross_compiler(cxx)}
    raise BackendError(f"linking code for {triple} on this {here} machine needs a cross linker "
                       f"({arch}-linux-gnu-g++): apt-get install g++-{arch}-linux-gnu")
