"""Backend discovery through the ``smelt.backends`` entry points, proven with the plugin in tests/plugins.

Nothing is installed: each test writes a ``.dist-info`` folder (METADATA and the
plugin's entry points, read from its pyproject.toml) onto a temporary ``sys.path``
entry, which is all ``importlib.metadata`` looks for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import smelt
from smelt.backends import registry
from smelt.errors import BackendError
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs

tomllib = pytest.importorskip("tomllib")

PLUGIN = Path(__file__).parents[1] / "plugins" / "smelt_dummy_backend"


def declared_entry_points() -> dict[str, str]:
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    return project["entry-points"][registry.GROUP]


def write_dist(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = [f"[{registry.GROUP}]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh sys.path entry for dist-info folders, the plugin importable, smelt's backend cache empty."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.delitem(sys.modules, "smelt_dummy_backend", raising=False)
    yield site
    sys.modules.pop("smelt_dummy_backend", None)


@pytest.fixture
def dummy(site):
    write_dist(site, "smelt-dummy-backend", declared_entry_points())
    return site


def test_plugin_is_discovered_and_loaded_lazily(dummy):
    known = registry.available()
    assert known["dummy"] == "smelt_dummy_backend:DummyBackend"
    assert {"cpu", "cuda", "rocm"} <= set(known)
    assert "smelt_dummy_backend" not in sys.modules, "listing backends must not import plugins"
    backend = registry.get("dummy")
    assert "smelt_dummy_backend" in sys.modules
    assert type(backend).__name__ == "DummyBackend" and isinstance(backend, smelt.backends.Backend)
    assert registry.get("dummy") is backend  # instantiated once


def test_compile_for_plugin_target_runs(dummy, tmp_path, rng):
    model = zoo.mlp()
    art = smelt.compile([model], target="dummy")
    assert art.backend == "dummy"
    rt = smelt.load(art.save(tmp_path / "art"))
    x = rng.standard_normal((1, 64)).astype("float32")
    ref = ort_outputs(model, {"features": x})[0]
    np.testing.assert_allclose(rt.run("mlp", features=x), ref, rtol=1e-5, atol=1e-5)


def test_name_clash_names_both(dummy):
    write_dist(dummy, "smelt-other-plugin", {"dummy": "smelt_dummy_backend:NotABackend"})
    with pytest.raises(BackendError, match=r"'dummy' is registered twice: "
                                           r"smelt_dummy_backend:DummyBackend \(smelt-dummy-backend\) and "
                                           r"smelt_dummy_backend:NotABackend \(smelt-other-plugin\)|"
                                           r"'dummy' is registered twice: "
                                           r"smelt_dummy_backend:NotABackend \(smelt-other-plugin\) and "
                                           r"smelt_dummy_backend:DummyBackend \(smelt-dummy-backend\)"):
        registry.get("dummy")


def test_clash_with_a_builtin_names_both(site):
    write_dist(site, "smelt-hijack", {"cpu": "smelt_dummy_backend:DummyBackend"})
    with pytest.raises(BackendError, match=r"'cpu' is registered twice: smelt\.backends\.cpu:CPUBackend \(smelt\) "
                                           r"and smelt_dummy_backend:DummyBackend \(smelt-hijack\)"):
        registry.available()


def test_same_plugin_found_twice_is_no_clash(dummy, tmp_path, monkeypatch):
    again = tmp_path / "site2"
    write_dist(again, "smelt-dummy-backend", declared_entry_points())
    monkeypatch.syspath_prepend(str(again))
    assert registry.available()["dummy"] == "smelt_dummy_backend:DummyBackend"


def test_class_without_the_interface_is_refused(site):
    write_dist(site, "smelt-broken", {"broken": "smelt_dummy_backend:NotABackend"})
    with pytest.raises(BackendError, match=r"backend 'broken' \(smelt_dummy_backend:NotABackend\) does not "
                                           r"implement smelt's Backend interface: missing .*target"):
        registry.get("broken")


def test_plugin_that_cannot_be_imported(site):
    write_dist(site, "smelt-missing", {"ghost": "smelt_no_such_module:Backend"})
    with pytest.raises(BackendError, match=r"backend 'ghost' \(smelt_no_such_module:Backend\) cannot be "
                                           r"loaded: No module named 'smelt_no_such_module'"):
        registry.get("ghost")


def test_unknown_name_lists_plugins_too(dummy):
    with pytest.raises(BackendError, match=r"unknown target 'tpu'; known targets: cpu, cuda, dummy, rocm"):
        registry.get("tpu")
