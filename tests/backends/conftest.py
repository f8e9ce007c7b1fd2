"""Backend test gates: compile-only GPU tests need a toolchain, not a GPU, and skip cleanly without one.

``requires_cuda_compiler`` (tests/conftest.py): nvcc on PATH (what builds and checks PTX here).
``requires_rocm_toolchain``: ld.lld and the ROCm device libraries.
Use them as ``pytestmark = pytest.mark.usefixtures("requires_rocm_toolchain")``, or name them as
parameters of module-scoped fixtures that build (those are set up before a test's own marks).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def requires_rocm_toolchain():
    from smelt.errors import BackendError
    from smelt.backends import get
    from smelt.backends.base import TargetOptions

    try:
        get("rocm").check_toolchain(TargetOptions("rocm", "gfx942"))
    except BackendError as e:
        pytest.skip(f"needs the ROCm toolchain: {e}")
