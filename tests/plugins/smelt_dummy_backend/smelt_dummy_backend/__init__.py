"""A minimal smelt backend plugin: the CPU backend under another name.

Registered in ``pyproject.toml`` under the entry-point group ``smelt.backends`` as
``dummy``. smelt imports this module only when the ``dummy`` backend is asked for.
"""

from __future__ import annotations

from pathlib import Path

from smelt.backends import TargetOptions
from smelt.backends.cpu import CPUBackend


class DummyBackend:
    """Delegates every phase to smelt's CPU backend."""

    name = "dummy"
    description = "test plugin: the host CPU under another name"
    requirements = "nothing beyond smelt"
    device_type = "cpu"

    def __init__(self):
        self._cpu = CPUBackend()

    def target(self, opts: TargetOptions):
        return self._cpu.target(opts)

    def check_toolchain(self, opts: TargetOptions) -> None:
        self._cpu.check_toolchain(opts)

    def prelegalize_passes(self, target):
        return self._cpu.prelegalize_passes(target)

    def postfuse_passes(self, target):
        return self._cpu.postfuse_passes(target)

    def schedule_passes(self, target):
        return self._cpu.schedule_passes(target)

    def lower_passes(self, target):
        return self._cpu.lower_passes(target)

    def pass_config(self, opts: TargetOptions) -> dict:
        return self._cpu.pass_config(opts)

    def emit_source(self, executable, out_dir: Path) -> list[Path]:
        return self._cpu.emit_source(executable, out_dir)

    def link_objects(self, target) -> list[Path]:
        return self._cpu.link_objects(target)

    def prepare_run(self, target: dict) -> None:
        self._cpu.prepare_run(target)


class NotABackend:
    """Lacks the Backend interface: smelt must refuse it with a BackendError."""

    name = "broken"
