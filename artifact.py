"""Artifacts: one folder with the compiled library, the weights and a manifest.

Layout: ``model.so`` (the VM executable with every kernel), ``weights.bin`` (every
distinct weight once, content-addressed), ``manifest.json`` (format version,
smelt/TVM versions, target, models and signatures, passes, SHA-256 of every file)
and, with ``--emit-source``, ``source/``. Written into a temporary sibling folder
and renamed into place; an existing folder is only replaced with ``force``.
``load`` verifies format, versions, hashes and target before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .errors import ArtifactError, InputError
from .ir import MERGED, ModelInfo, TensorSpec, WeightStore
from .ir.program import replace_dir
from .ir.weights import WeightEntry

FORMAT_VERSION = 1
LIBRARY, WEIGHTS, MANIFEST, SOURCE = "model.so", "weights.bin", "manifest.json", "source"


def cpu_threads() -> int:
    """Physical cores this process may run on: the size of TVM's CPU thread pool under smelt."""
    import psutil

    cores = psutil.cpu_count(logical=False) or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, allowed))


def _size_thread_pool() -> None:
    """TVM sizes its CPU thread pool as half the logical CPUs, taking every core to run two
    hyperthreads: on a 2-core machine without them, every CPU kernel ran on one core while
    onnxruntime used two. Unless the user set ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``,
    which TVM also reads), the pool gets one thread per physical core; TVM reads the
    variable when it starts the pool, at the first parallel kernel."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(cpu_threads())


_size_thread_pool()


def smelt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smelt")
    except PackageNotFoundError:
        return "0.1.0+source"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Artifact:
    """A compiled set of models, in memory until ``save``."""

    def __init__(self, executable, models: dict[str, ModelInfo], weights: WeightStore, backend: str,
                 target: tvm.target.Target, options, report, passes: list[str]):
        self.executable, self.models, self.weights = executable, models, weights
        self.backend, self.target, self.options, self.report, self.passes = backend, target, options, report, passes

    def __repr__(self) -> str:
        return f"Artifact({', '.join(self.models)} for {self.backend}; {len(self.weights)} weights)"

    def manifest(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "smelt": smelt_version(),
            "tvm": tvm.__version__,
            "backend": self.backend,
            "target": json.loads(json.dumps(_target_json(self.target))),
            "target_options": self.options.target.to_json(),
            "host": {"machine": platform.machine()},
            "models": {n: m.to_json() for n, m in self.models.items()},
            "passes": self.passes,
            "options": self.options.to_json(),
            "summary": self.report.to_json(),
        }

    def save(self, path: str | Path, force: bool = False, emit_source: bool = False) -> Path:
        """Write the artifact folder atomically; refuse to replace ``path`` unless ``force``."""
        path = Path(path)
        if path.exists() and not force:
            raise ArtifactError(f"{path} exists; pass force=True (--force) to replace it")
        if path.exists() and not (path / MANIFEST).exists() and any(path.iterdir()):
            raise ArtifactError(f"{path} exists and is not a smelt artifact; refusing to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            from .backends import get
            from .backends.base import host_linker_options

            addons = [str(p) for p in get(self.backend).link_objects(self.target)]
            self.executable.export_library(str(tmp / LIBRARY), addons=addons or None,
                                           **host_linker_options(self.target))
            index = self.weights.save(tmp / WEIGHTS)
            files = [LIBRARY, WEIGHTS]
            if emit_source:
                (tmp / SOURCE).mkdir()
                files += [str(p.relative_to(tmp)) for p in get(self.backend).emit_source(self.executable, tmp / SOURCE)]
            manifest = self.manifest()
            manifest["weights"] = {k: e.to_json() for k, e in index.items()}
            manifest["files"] = {f: sha256_file(tmp / f) for f in files}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _target_json(target: tvm.target.Target) -> dict:
    import tvm_ffi

    def clean(v):
        if isinstance(v, (dict, tvm_ffi.Map)):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, tvm_ffi.Array)):
            return [clean(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if hasattr(v, "export"):
            return clean(v.export())
        return str(v)

    return clean(dict(target.export()))


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not a smelt artifact (no {MANIFEST})") from None
    except ValueError as e:
        raise ArtifactError(f"{path / MANIFEST}: not valid JSON ({e})") from None


def verify(path: str | Path, manifest: dict) -> None:
    """Check format, versions and file hashes; raise ArtifactError on any mismatch."""
    path = Path(path)
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')}, this smelt reads {FORMAT_VERSION}")
    if manifest.get("tvm") != tvm.__version__:
        raise ArtifactError(f"{path}: built with TVM {manifest.get('tvm')}, this runtime has TVM {tvm.__version__}; "
                            f"recompile it")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(f"{path}: {name} does not match its SHA-256 in the manifest "
                                f"(expected {digest[:12]}…, found {actual[:12]}…): the artifact was modified")
    for required in (LIBRARY, WEIGHTS):
        if required not in manifest.get("files", {}):
            raise ArtifactError(f"{path}: manifest lists no {required}")


def _device_for(manifest: dict, path: Path, device_id: int):
    backend = manifest["backend"]
    from .backends import get

    dev = tvm.runtime.device(get(backend).device_type, device_id)
    if not dev.exist:
        raise ArtifactError(f"{path}: built for {backend} ({_describe(manifest)}), but this machine has no "
                            f"{backend} device {device_id}")
    target = manifest["target"]
    if backend == "cuda":
        want = str(target.get("arch", ""))
        have = "sm_" + dev.compute_version.replace(".", "")
        # sm_90a/sm_90f code runs on an sm_90 GPU: compare the compute capability only.
        if want and want.rstrip("af") != have:
            raise ArtifactError(f"{path}: built for {want}, this GPU is {have}; recompile with --arch {have}")
    if backend == "cpu":
        machine = manifest.get("host", {}).get("machine")
        triple = str(target.get("mtriple", target.get("host", {}).get("mtriple", "")))
        arch = triple.split("-")[0]
        here = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
        if arch and arch != here:
            raise ArtifactError(f"{path}: built for {triple}, this machine is {here} (built on {machine})")
    return dev


def _describe(manifest: dict) -> str:
    t = manifest.get("target", {})
    return ", ".join(f"{k}={t[k]}" for k in ("arch", "mcpu", "mtriple") if k in t) or manifest["backend"]


class Runtime:
    """A loaded artifact: ``run(model, **inputs)`` checks inputs and returns numpy arrays."""

    def __init__(self, path: str | Path, device_id: int = 0):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        verify(self.path, self.manifest)
        self.device = _device_for(self.manifest, self.path, device_id)
        from .backends import get

        get(self.manifest["backend"]).prepare_run(self.manifest["target"])
        self.models = {n: ModelInfo.from_json(m) for n, m in self.manifest["models"].items()}
        index = {k: WeightEntry.from_json(v) for k, v in self.manifest["weights"].items()}
        store = WeightStore.load(self.path / WEIGHTS, index)
        try:
            lib = tvm.runtime.load_module(str(_library_by_content(self.path / LIBRARY, self.manifest["files"][LIBRARY])))
        except Exception as e:
            raise ArtifactError(f"{self.path / LIBRARY}: cannot be loaded ({e})") from None
        self.vm = relax.VirtualMachine(lib, self.device)
        # Each distinct weight goes to the device once; models share what they share.
        self._weights = {k: tvm.runtime.tensor(np.ascontiguousarray(store[k]), self.device) for k in store.keys()}

    @property
    def target(self) -> str:
        return self.manifest["backend"]

    def signature(self, model: str) -> ModelInfo:
        if model not in self.models:
            raise InputError(f"no model {model!r} in {self.path}; models: {', '.join(self.models)}")
        return self.models[model]

    def check_inputs(self, model: str, inputs: dict) -> list[np.ndarray]:
        """Inputs in signature order, after checking names, dtypes and shapes."""
        info = self.signature(model)
        names = [t.name for t in info.inputs]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(extra)}"] if extra else [])
            raise InputError(f"model {model!r}: {'; '.join(parts)}; inputs are {', '.join(map(str, info.inputs))}")
        sym: dict[str, int] = {}
        out = []
        for spec in info.inputs:
            a = np.asarray(inputs[spec.name])
            if str(a.dtype) != spec.dtype:
                raise InputError(f"model {model!r} input {spec.name!r}: expected dtype {spec.dtype}, got {a.dtype}")
            _check_shape(model, spec, a.shape, sym)
            out.append(np.ascontiguousarray(a))
        return out

    def device_args(self, model: str, inputs: dict) -> list:
        """Checked inputs copied to the device, then the model's weights (already there)."""
        arrays = self.check_inputs(model, inputs)
        return [tvm.runtime.tensor(a, self.device) for a in arrays] + [self._weights[k] for k in self.models[model].weights]

    def run(self, model: str, **inputs):
        """Run ``model``; returns one array, or a tuple when the model has several outputs."""
        args = self.device_args(model, inputs)  # checks the model name and inputs first
        result = self.vm[model](*args)
        outs = _flatten(result)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def time(self, model: str, number: int = 10, repeat: int = 5, **inputs) -> list[float]:
        """Seconds per run (``repeat`` averages of ``number`` runs each), inputs and weights already
        on the device, after one warm-up run: what a deployment pays per call."""
        args = self.device_args(model, inputs)
        self.vm[model](*args)
        timer = self.vm.time_evaluator(model, self.device, number=number, repeat=repeat)
        return [float(r) for r in timer(*args).results]

    def timer(self, model: str, **inputs) -> Callable[[], float]:
        """A function that runs ``model`` once per call and returns its seconds, as ``time``
        measures (inputs and weights already on the device; TVM's evaluator warms up first)."""
        args = self.device_args(model, inputs)
        evaluator = self.vm.time_evaluator(model, self.device, number=1, repeat=1)
        return lambda: float(evaluator(*args).results[0])

    def run_all(self, **inputs) -> dict[str, np.ndarray | tuple]:
        """Run every model at once through the merged entry (``merge=True``); inputs are named
        ``model.input`` (a shared input by its first model's name). Returns ``{model: outputs}``."""
        if MERGED not in self.models:
            raise InputError(f"{self.path} has no merged entry; compile the models with --merge")
        outs = self.run(MERGED, **inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        result, i = {}, 0
        for name, info in self.models.items():
            if name == MERGED:
                continue
            n = len(info.outputs)
            result[name] = outs[i] if n == 1 else tuple(outs[i:i + n])
            i += n
        return result

    def run_named(self, model: str, **inputs) -> dict[str, np.ndarray]:
        """Like ``run``, returning ``{output name: array}``."""
        outs = self.run(model, **inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {spec.name: o for spec, o in zip(self.models[model].outputs, outs)}


def _library_by_content(lib: Path, digest: str) -> Path:
    """A path named by the library's hash. ``dlopen`` caches by path, so loading a folder that
    was re-saved in the same process would otherwise run the old code."""
    cache = Path(tempfile.gettempdir()) / f"smelt-libs-{os.getuid() if hasattr(os, 'getuid') else 0}"
    cache.mkdir(exist_ok=True)
    dest = cache / f"{digest[:24]}.so"
    if not dest.exists():
        tmp = cache / f".{digest[:24]}.{os.getpid()}.so"
        try:
            os.link(lib, tmp)
        except OSError:
            shutil.copyfile(lib, tmp)
        os.replace(tmp, dest)
    return dest


def _flatten(result) -> list[np.ndarray]:
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    out = []
    for r in result:
        out += _flatten(r)
    return out


def _check_shape(model: str, spec: TensorSpec, shape: tuple, sym: dict) -> None:
    if len(shape) != len(spec.shape):
        raise InputError(f"model {model!r} input {spec.name!r}: expected rank {len(spec.shape)} "
                         f"{list(spec.shape)}, got shape {list(shape)}")
    for i, (want, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(want, int):
            if want != got:
                raise InputError(f"model {model!r} input {spec.name!r}: expected shape {list(spec.shape)}, "
                                 f"got {list(shape)} (dim {i})")
        elif sym.setdefault(want, got) != got:
            raise InputError(f"model {model!r} input {spec.name!r}: dim {i} ({want}) is {got}, "
                             f"but {want} is {sym[want]} in another input")


def load(path: str | Path, device_id: int = 0) -> Runtime:
    """Load a saved artifact for running (verifies it first)."""
    return Runtime(path, device_id)
