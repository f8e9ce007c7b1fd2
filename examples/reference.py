"""Reference runners used by tests, the demo and benchmarks."""

from __future__ import annotations

import numpy as np


def ort_outputs(model, feeds: dict) -> list[np.ndarray]:
    """Outputs of onnxruntime (CPU) for an ``onnx.ModelProto`` or a path."""
    import onnxruntime as ort

    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


ORT_CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def ort_quantize_static(model_path, out_path, batches: list[dict], method: str = "minmax",
                        op_types: list[str] | None = None) -> None:
    """onnxruntime's ``quantize_static`` as its users run it for INT8 on CPU: QDQ format,
    per-channel int8 weights, int8 activations, calibrated on ``batches`` by ``method``;
    ``op_types`` limits it to those ops (e.g. ``["MatMul"]``), else it quantizes all it can."""
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    ortq.quantize_static(str(model_path), str(out_path), Reader(), quant_format=ortq.QuantFormat.QDQ,
                         per_channel=True, activation_type=ortq.QuantType.QInt8, weight_type=ortq.QuantType.QInt8,
                         calibrate_method=getattr(ortq.CalibrationMethod, ORT_CALIBRATION[method]),
                         op_types_to_quantize=op_types)
