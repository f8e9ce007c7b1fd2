"""TVM's tensor intrinsics modules, imported in seconds instead of about a minute.

Workaround for a TVM 0.27 slowness: importing ``tvm.s_tir.tensor_intrin`` (any submodule of it
imports the package, and the package every target's intrinsics) parses ~250 TVMScript
intrinsics, and every ``@T.prim_func`` calls ``inspect.stack()``, which looks up each frame's
source line; for the import machinery's frames (``<frozen importlib._bootstrap>``, no file)
that scans all of ``sys.modules``. On a 2-core CPU the import took 50-70 s, paid by every
process that compiled for a CPU (the VNNI rule's intrinsic) or a GPU (dlight's WMMA rule,
smelt's tensor-core rule). The parser reads only the frames themselves (their source lines
only for functions defined in a class, which these are not), so the import runs with an
``inspect.stack`` that skips the lookup.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time

log = logging.getLogger(__name__)


def import_intrinsics(name: str = "tvm.s_tir.tensor_intrin.cuda"):
    """TVM's tensor intrinsics module ``name``, imported (which registers them) without the slowness above."""
    if name not in sys.modules:
        original, start = inspect.stack, time.perf_counter()
        inspect.stack = _frames_without_source
        try:
            __import__(name)
        finally:
            inspect.stack = original
        log.debug("imported %s in %.1f s", name, time.perf_counter() - start)
    return sys.modules[name]


def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    frame, frames = sys._getframe(1), []
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                        None, None))
        frame = frame.f_back
    return frames
