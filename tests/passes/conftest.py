"""Helpers shared by the pass tests: run a Relax module on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax


def run_relax(mod: tvm.IRModule, *inputs: np.ndarray, func: str = "main") -> np.ndarray:
    """Compile ``mod`` for LLVM and run ``func`` on ``inputs`` with the Relax VM."""
    exe = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm[func](*[tvm.runtime.tensor(a) for a in inputs])
    return out.numpy()


@pytest.fixture
def run():
    return run_relax
