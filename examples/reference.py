"""Reference runners used by tests, the demo and benchmarks."""

from __future__ import annotations

import numpy as np


def ort_outputs(model, feeds: dict) -> list[np.ndarray]:
    """Outputs of onnxruntime (CPU) for an ``onnx.ModelProto`` or a path."""
    import onnxruntime as ort

    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
