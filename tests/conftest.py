"""Shared test setup: device markers that skip cleanly, references, seeds.

Markers: ``cuda`` / ``rocm`` tests execute on a GPU and skip without one (compile-only
GPU tests carry no marker and always run); ``slow`` tests run only with ``--runslow``
or when selected with ``-m slow``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _has(device: str) -> bool:
    try:
        import tvm

        return bool(tvm.runtime.device(device, 0).exist)
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    selected_slow = "slow" in (config.getoption("-m") or "")
    skips = {
        "cuda": None if _has("cuda") else pytest.mark.skip(reason="needs an NVIDIA GPU (marker cuda)"),
        "rocm": None if _has("rocm") else pytest.mark.skip(reason="needs an AMD GPU (marker rocm)"),
        "slow": None if (config.getoption("--runslow") or selected_slow)
        else pytest.mark.skip(reason="slow: run with --runslow or -m slow"),
    }
    for item in items:
        for name, mark in skips.items():
            if mark is not None and name in item.keywords:
                item.add_marker(mark)


@pytest.fixture(scope="session")
def requires_cuda_compiler():
    """Compile-only CUDA tests: nvcc on PATH, no GPU needed."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc on PATH (CUDA toolkit) to build CUDA code")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def onnx_reference():
    """onnxruntime (CPU) outputs for an ``onnx.ModelProto``: ``onnx_reference(model, feeds)``."""
    from smelt.examples.reference import ort_outputs

    return ort_outputs
