"""INT8 post-training quantization: ranges, calibration data, accuracy against float32 references.

Tolerances: random-weight zoo models against onnxruntime float32, cosine >= 0.999 and
largest deviation <= 5 % of the largest output (measured: ResNet-18 1.6 %, cosine
0.9999); the digits CNN (trained here on scikit-learn's digits) loses at most one point
of accuracy, as the quantization issue asks.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import smelt
from smelt.errors import SmeltError
from smelt.examples import zoo
from smelt.passes.calibration import Histogram, affine


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_streaming_histogram_matches_numpy_on_all_of_the_data():
    rng = np.random.default_rng(0)
    x = rng.laplace(size=300_000).astype(np.float32) * np.linspace(0.1, 3, 300_000, dtype=np.float32)
    h = Histogram(2048)
    for chunk in np.array_split(x, 30):  # the range grows chunk by chunk: bins merge
        h.add(chunk)
    assert h.counts.shape == (2048,) and h.counts.sum() == x.size
    assert (h.min, h.max) == (float(x.min()), float(x.max()))
    lo, hi = h.range("percentile", 99.9)
    # each bound is the edge of the bin in which the data's own quantile lies
    assert np.sum(x < lo) < 300 <= np.sum(x < lo + h.width)
    assert np.sum(x < hi - h.width) < 299_700 <= np.sum(x < hi)


@pytest.mark.parametrize("data", ["gauss", "relu"])
def test_entropy_clips_tails_but_not_the_body(data):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200_000)
    if data == "relu":
        x = np.maximum(x, 0)  # half exact zeros: must not pull the threshold down
    h = Histogram()
    h.add(x)
    lo, hi = h.range("entropy")
    assert 3.0 < hi < x.max() + 1e-6 and (lo == 0.0 if data == "relu" else -hi - 1e-6 <= lo < -3.0)


def test_zero_is_exact():
    for lo, hi in [(-1.3, 4.2), (0.0, 6.0), (-5.0, -1.0)]:
        scale, zero = affine(lo, hi)
        assert -128 <= zero <= 127 and (np.round(0.0 / scale) + zero - zero) * scale == 0.0


def _calib_file(tmp_path, model, n=32, seed=0):
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    data = rng.standard_normal((n, *shape[1:])).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, **{inp.name: data})
    return path, inp.name, shape


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("model", ["resnet18", "mlp"])
def test_int8_against_onnxruntime_float32(tmp_path, model, method):
    m = zoo.resnet(18, batch=1, size=64) if model == "resnet18" else zoo.mlp(batch=4)
    path, name, shape = _calib_file(tmp_path, m)
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x})[0]
    art = smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(path), method=method),
                        options=smelt.CompileOptions(tune_log_dir=None))
    float_bytes = sum(t.dims and int(np.prod(t.dims)) * 4 for t in m.graph.initializer)
    q = art.report.quantization
    assert q["batches"] == 32 // shape[0]
    assert len(q["quantized"]) + len(q["fallback"]) == (21 if model == "resnet18" else 3) and not q["skipped"]
    assert len(q["quantized"]) >= (len(q["quantized"]) + len(q["fallback"])) // 2, q
    if not q["fallback"]:
        assert art.report.weight_bytes < 0.3 * float_bytes
    y = np.asarray(smelt.load(art.save(tmp_path / "out")).run("m", **{name: x}))
    assert _cos(y, ref) >= 0.999
    assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()


def test_int8_with_float16_in_between(tmp_path):
    """INT8 convolutions with the rest of the network (epilogues, residual adds, pooling) in float16:
    the integer convs keep their int32 accumulators (ToMixedPrecision runs after QuantizeInt8).
    Tolerance: that of INT8 alone, float16 rounding adds about 1e-3."""
    m = zoo.resnet(18, batch=1, size=64)
    path, name, shape = _calib_file(tmp_path, m, n=8)
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x})[0]
    art = smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(path)), precision="float16",
                        options=smelt.CompileOptions(tune_log_dir=None))
    assert len(art.report.quantization["quantized"]) >= 10
    y = np.asarray(smelt.load(art.save(tmp_path / "out")).run("m", **{name: x}))
    assert _cos(y, ref) >= 0.999
    assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()


def test_layers_over_the_error_limit_stay_float32(tmp_path):
    m = zoo.mlp(batch=4)
    path, name, shape = _calib_file(tmp_path, m)
    art = smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(path), max_error=0.0),
                        options=smelt.CompileOptions(tune_log_dir=None))
    q = art.report.quantization
    assert not q["quantized"] and len(q["fallback"]) == 3 and all(v > 0 for v in q["fallback"].values())
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {name: x})[0]
    y = np.asarray(smelt.load(art.save(tmp_path / "out")).run("m", **{name: x}))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)  # float32 throughout


def test_calibration_from_a_python_iterable_and_a_folder(tmp_path):
    m = zoo.mlp(batch=4)
    path, name, shape = _calib_file(tmp_path, m)
    data = np.load(path)[name]
    batches = ({name: data[i:i + 4]} for i in range(0, 32, 4))
    a = smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=batches), options=smelt.CompileOptions(tune_log_dir=None))
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / f"{name}.npy", data)
    b = smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(folder)),
                      options=smelt.CompileOptions(tune_log_dir=None))
    assert a.report.quantization["batches"] == b.report.quantization["batches"] == 8
    assert a.report.quantization["quantized"] == b.report.quantization["quantized"]


def test_bad_calibration_data_is_a_clear_error(tmp_path):
    m = zoo.mlp(batch=4)
    name = m.graph.input[0].name
    opts = smelt.CompileOptions(tune_log_dir=None)
    np.savez(tmp_path / "other.npz", y=np.zeros((8, 64), np.float32))
    with pytest.raises(SmeltError, match=rf"no calibration data for input {name} of model m"):
        smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(tmp_path / "other.npz")), options=opts)
    np.savez(tmp_path / "shape.npz", **{name: np.zeros((8, 63), np.float32)})
    with pytest.raises(SmeltError, match=rf"calibration input m.{name}: expected shape \(4, 64\), got \(4, 63\)"):
        smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(tmp_path / "shape.npz")), options=opts)
    with pytest.raises(SmeltError, match="no such calibration file"):
        smelt.compile([m], names=["m"], quantize=smelt.Int8(calib=str(tmp_path / "missing.npz")), options=opts)
    with pytest.raises(SmeltError, match="calibration method 'kl'"):
        smelt.Int8(calib="x.npz", method="kl")


def test_cli_quantize_int8(tmp_path):
    from click.testing import CliRunner

    from smelt.cli import main

    m = zoo.mlp(batch=4)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    path, _, _ = _calib_file(tmp_path, m)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--quantize", "int8",
                                  "--calib", str(path), "--calib-method", "percentile", "--tune-log-dir", ""])
    assert r.exit_code == 0, r.output
    assert "int8 (percentile, 8 calibration batches): 3 layers" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["quantize"]["method"] == "percentile"
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"), "--quantize", "int8"])
    assert r.exit_code != 0 and "--quantize int8 needs --calib" in r.output
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o3"), "--calib", str(path)])
    assert r.exit_code != 0 and "--calib goes with --quantize int8" in r.output


def test_digits_cnn_int8_within_one_point_of_float32(tmp_path):
    """A small CNN trained here on scikit-learn's 8x8 digits: INT8 accuracy within 1 point of float32."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    torch = pytest.importorskip("torch")
    from torch import nn

    digits = sklearn_datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                                      nn.Linear(64, 10))

        def forward(self, x):
            return self.body(x)

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(15):
        for i in range(0, len(train), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    net.eval()
    batch = 397  # the whole held-out set in one call
    xs = x[test][:batch]
    with torch.no_grad():
        fp32 = float((net(torch.from_numpy(xs)).argmax(1).numpy() == y[test][:batch]).mean())
    assert fp32 > 0.95  # the float32 model learned the task
    calib = [{"x": x[train][i:i + batch]} for i in range(0, 794, batch)]  # 2 batches of training images
    art = smelt.compile([(net, (torch.from_numpy(xs),))], names=["digits"],
                        quantize=smelt.Int8(calib=calib, method="entropy"),
                        options=smelt.CompileOptions(tune_log_dir=None))
    q = art.report.quantization
    assert len(q["quantized"]) == 4, q
    rt = smelt.load(art.save(tmp_path / "digits"))
    pred = np.asarray(rt.run("digits", x=xs)).argmax(1)
    int8 = float((pred == y[test][:batch]).mean())
    assert int8 >= fp32 - 0.01, (int8, fp32)
