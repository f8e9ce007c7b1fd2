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
from tvm.target.codegen import target_has_features

import smelt
from smelt.backends import cpu_schedule
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


def test_avx2_code_multiplies_int16_pairs():
    art = _compile("encoder", arch="haswell")
    asm = "".join(m.inspect_source("asm") for m in art.executable.mod.imports if m.kind == "llvm")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm


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
