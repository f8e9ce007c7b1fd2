"""A MetaSchedule builder whose worker processes outlive one batch.

Requires: candidates (scheduled IRModules) for one target.
Guarantees: each is built into a ``.tar`` artifact that MetaSchedule's local and RPC
runners load, exactly as ``LocalBuilder`` does; a build that raises or outlives
``timeout`` gives a failed ``BuilderResult`` naming the reason, never a crash.

Why not ``LocalBuilder``: it starts a fresh process pool for every batch, and its build
function imports ``tvm.s_tir.tensor_intrin`` in every worker. That import takes about
30 s on a 2-core machine, while building one CPU candidate takes 0.05 s, so stock
tuning spent two thirds of its time starting workers. Here the pool lives for
``recycle`` batches (TVM recycles pools because long-lived workers leak), and a
worker imports TVM and smelt's code-generation callbacks once. Tensor intrinsics are
imported only for CUDA, through smelt's fast path (``import_intrinsics``, seconds):
schedules are tensorized in the tuning process, but CUDA code generation of ``mma``
stores calls an index map that the import registers.
"""

from __future__ import annotations

import logging
import os
import tempfile

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.utils import cpu_count
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

log = logging.getLogger(__name__)


def _init_worker() -> None:
    """Register smelt's GPU compile callbacks (arch marker, NVRTC or nvcc) in a fresh worker."""
    from .. import backends

    for kind in ("cuda", "rocm"):
        try:
            backends.get(kind)
        except Exception:  # noqa: BLE001 - a backend that cannot load is not needed on this machine
            pass


def _build(mod, target, config: dict) -> str:
    from tvm.driver import build
    from tvm.ir.transform import PassContext
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    if target.kind.name == "cuda":
        # CUDA code generation of ``mma`` stores calls an index map that only importing TVM's
        # CUDA intrinsics registers (``tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout``):
        # without it, smelt's tensor-core default schedules failed to build in a worker.
        from ..backends.tensor_intrinsics import import_intrinsics

        import_intrinsics()
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    path = os.path.join(tempfile.mkdtemp(prefix="smelt-tune-"), "candidate." + tar.output_format)
    with PassContext(config=config):
        lib = build(mod, target=target)
    lib.export_library(path, fcompile=tar)
    return path


@derived_object
class PersistentBuilder(PyBuilder):
    """Builds candidates in ``workers`` long-lived processes (default: one per logical core),
    under the PassContext ``config`` a compile for the target uses (the backend's ``pass_config``)."""

    def __init__(self, workers: int | None = None, timeout: float = 60.0, recycle: int = 16,
                 config: dict | None = None):
        super().__init__()
        self.config = dict(config or {})
        self.workers = workers or cpu_count(logical=True)
        self.timeout = timeout
        self.recycle = recycle
        self._pool = None
        self._batches = 0

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        if self._pool is None or self._batches >= self.recycle:
            self.shutdown()
            self._pool = PopenPoolExecutor(max_workers=self.workers, timeout=self.timeout,
                                           initializer=_init_worker)
            self._batches = 0
        self._batches += 1
        results = []
        for r in self._pool.map_with_error_catching(lambda x: _build(*x),
                                                    [(b.mod, b.target, self.config) for b in build_inputs]):
            if r.status == StatusKind.COMPLETE:
                results.append(BuilderResult(r.value, None))
            elif r.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout:.0f} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {r.value}"))
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
