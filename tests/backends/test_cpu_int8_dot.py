"""Int8DotTile: INT8 convolutions and matmuls on x86's dot products (VNNI, AVX2) compute the same integers.

A quantized CNN and transformer encoder compile with the rule and without it (TileReduction
then widens to int32): the outputs must be equal bit for bit, as both add the same integers
and run the same float epilogue. Executing needs a CPU with AVX-512 VNNI or AVX2 (skipped
elsewhere; the host's best instruction is the one tested); which kernels the rule takes, and
which it declines, is checked on any x86 host by compiling for ``znver4``, ``haswell`` and
``sandybridge`` (AVX without AVX2).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.target.codegen import target_has_features

import smelt
from smelt.backends import cpu_int8_dot, cpu_schedule
from smelt.backends.base import TargetOptions
from smelt.backends.cpu import CPUBackend
from smelt.examples import zoo

HOST = CPUBackend().target(TargetOptions())
needs_dot = pytest.mark.skipif(not ("x86" in str(HOST.attrs.get("mtriple", "")) and
                                    target_has_features("avx2", HOST)), reason="needs AVX2 or AVX-512 VNNI")

MODELS = {
    # a narrow ResNet-18 (16 channels: 3x3, strided and 1x1 convs) with a 16-class head, and an encoder
    "resnet18": (lambda: zoo.resnet(18, size=32, classes=16, width=16), "input", (3, 32, 32)),
    "encoder": (lambda: zoo.transformer_encoder(layers=1, seq=16, d_model=64, heads=4, ffn=128), "hidden", (16, 64)),
}


def _compile(name, arch=None, vnni=True, monkeypatch=None):
    build, inp, shape = MODELS[name]
    rng = np.random.default_rng(0)
    calib = [{inp: rng.standard_normal((1, *shape)).astype("float32")} for _ in range(4)]
    if not vnni:
        rules = cpu_schedule.default_rules
        monkeypatch.setattr(cpu_schedule, "default_rules",
                            lambda: [r for r in rules() if type(r).__name__ != "Int8DotTile"])
    opts = smelt.CompileOptions(TargetOptions("cpu", arch), tune_log_dir=None)
    return smelt.compile([build()], target="cpu", quantize=smelt.Int8(calib=calib), options=opts)


@pytest.mark.parametrize("arch", ["znver4", "haswell"])
def test_takes_the_int8_kernels_it_can(arch):
    """Every quantized conv and matmul of 16k output channels is taken, the RGB stem too
    (QuantizeInt8 pads its 3 input channels to 4), with VNNI (znver4) or AVX2 (haswell)."""
    rules = _compile("resnet18", arch=arch).report.schedules
    sites = {k: v for k, v in rules.items() if "conv2d" in k or "matmul" in k}
    assert len(sites) >= 9 and set(sites.values()) == {"Int8DotTile"}, sites  # shared kernels count once


def test_avx2_code_multiplies_bytes_with_7_bit_weights():
    art = _compile("encoder", arch="haswell")
    asm = "".join(m.inspect_source("asm") for m in art.executable.mod.imports if m.kind == "llvm")
    assert "vpmaddubsw" in asm and "vpdpbusd" not in asm
    assert art.report.quantization["weight_bits"] == 7
    assert _compile("encoder", arch="znver4").report.quantization["weight_bits"] == 8


def _u8_s8_matmul(m: int, k: int, n: int) -> tvm.tirx.PrimFunc:
    a = te.placeholder((m, k), "uint8", "a")
    w = te.placeholder((k, n), "int8", "w")
    r = te.reduce_axis((0, k), "r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("int32") * w[r, j].astype("int32"), axis=r), name="c")
    return te.create_prim_func([a, w, c]).with_attr({"global_symbol": "main", "layout_free_buffers": [1]})


@needs_dot
def test_extreme_products_do_not_saturate():
    """255 x ±limit in every product (vpmaddubsw's int16 pair sums at their largest) and mixed
    signs: the same integers as numpy."""
    dot = cpu_int8_dot.dot_for(HOST)
    limit = dot.weight_limit
    rng = np.random.default_rng(0)
    a = np.full((8, 64), 255, "uint8")
    a[4:] = rng.integers(0, 256, (4, 64))
    w = np.where(rng.random((64, 32)) < 0.5, limit, -limit).astype("int8")
    w[:, :8] = limit
    sch = cpu_int8_dot.Int8DotTile().apply(_u8_s8_matmul(8, 64, 32), HOST, False)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=HOST)
    out = tvm.runtime.tensor(np.zeros((8, 32), "int32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), a.astype(np.int64) @ w.astype(np.int64))


def test_declined_without_avx2():
    rules = _compile("resnet18", arch="sandybridge").report.schedules
    assert "Int8DotTile" not in rules.values() and "TileReduction" in rules.values()


@needs_dot
@pytest.mark.parametrize("name", list(MODELS))
def test_same_integers_as_widening(name, tmp_path, monkeypatch):
    _, inp, shape = MODELS[name]
    x = np.random.default_rng(1).standard_normal((1, *shape)).astype("float32")
    outs = []
    for vnni in (True, False):
        art = _compile(name, vnni=vnni, monkeypatch=monkeypatch)
        assert ("Int8DotTile" in art.report.schedules.values()) == vnni
        rt = smelt.load(art.save(tmp_path / str(vnni)))
        (fn,) = rt.models
        outs.append(np.asarray(rt.run(fn, **{inp: x})))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0
