"""CPU backend: host detection and cross-compilation to aarch64."""

from __future__ import annotations

import platform
import shutil

import pytest

import smelt
from smelt import CompileOptions, TargetOptions
from smelt.backends import get
from smelt.examples import zoo

OTHER = "aarch64-linux-gnu" if platform.machine() in ("x86_64", "AMD64") else "x86_64-linux-gnu"
ELF_MACHINE = {"aarch64-linux-gnu": 183, "x86_64-linux-gnu": 62}


def test_host_target_names_this_cpu():
    t = get("cpu").target(TargetOptions("cpu"))
    assert t.kind.name == "llvm" and str(t.attrs["mtriple"]).split("-")[0] == platform.machine()
    assert t.attrs.get("mcpu")


def test_unknown_cpu_name():
    with pytest.raises(smelt.BackendError, match="not a CPU LLVM knows"):
        get("cpu").target(TargetOptions("cpu", arch="pentium9000"))


def test_cross_compile_without_linker_says_what_to_install(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if OTHER.split("-")[0] in name else real(name))
    with pytest.raises(smelt.BackendError, match=f"apt-get install g\\+\\+-{OTHER.split('-')[0]}-linux-gnu"):
        smelt.compile([zoo.mlp()], options=CompileOptions(TargetOptions("cpu", triple=OTHER)))


@pytest.mark.skipif(shutil.which(f"{OTHER}-g++") is None, reason=f"needs {OTHER}-g++ (.ci/run installs it)")
def test_cross_compiled_artifact_is_for_the_other_cpu(tmp_path):
    art = smelt.compile([zoo.mlp()], options=CompileOptions(TargetOptions("cpu", triple=OTHER)))
    out = art.save(tmp_path / "cross")
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE[OTHER]
    with pytest.raises(smelt.ArtifactError, match=f"built for {OTHER}"):
        smelt.load(out)
