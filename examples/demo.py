"""``make demo``: compile the bundled example models together for this CPU, run them, report.

Writes the example models (built in code, fixed seeds) to ``demo_out/models``, runs
``smelt compile`` on all of them into ``demo_out/artifact``, then runs every model
from the artifact and checks it against onnxruntime (or PyTorch eager).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from . import zoo

OUT = Path("demo_out")


def _write_models(models_dir: Path) -> list[Path]:
    models_dir.mkdir(parents=True, exist_ok=True)
    specs = {
        "resnet18": zoo.resnet(18, batch="N", size=64, classes=100),
        "mobilenet": zoo.mobilenet(batch=1, size=96, classes=100, width=0.5),
        "encoder": zoo.transformer_encoder(layers=2, seq=32, d_model=128, heads=4, ffn=512),
    }
    paths = []
    for name, model in specs.items():
        p = models_dir / f"{name}.onnx"
        onnx.save(model, p)
        paths.append(p)
    return paths


def _torch_model(models_dir: Path) -> Path | None:
    try:
        import torch
    except ImportError:
        return None
    from .torch_zoo import small_cnn  # noqa: PLC0415

    module, args = small_cnn()
    ep = torch.export.export(module, args)
    p = models_dir / "small_cnn.pt2"
    torch.export.save(ep, str(p))
    return p


def _reference(path: Path, feeds: dict) -> list[np.ndarray] | None:
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    import torch

    from ..frontend.from_torch import load_pt2

    ep = load_pt2(path)
    out = ep.module()(*[torch.from_numpy(v) for v in feeds.values()])
    return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


def main() -> int:
    from click.testing import CliRunner

    from .. import cli, load

    shutil.rmtree(OUT, ignore_errors=True)
    paths = _write_models(OUT / "models")
    pt2 = None
    try:
        pt2 = _torch_model(OUT / "models")
    except Exception as e:  # the demo still shows the ONNX path without torch
        print(f"(skipping the PyTorch example: {e})")
    if pt2:
        paths.append(pt2)
    print(f"example models written to {OUT / 'models'}: {', '.join(p.name for p in paths)}\n")
    args = ["compile", *map(str, paths), "--target", "cpu", "-o", str(OUT / "artifact")]
    print("$ smelt " + " ".join(args))
    result = CliRunner().invoke(cli.main, args)
    print(result.output)
    if result.exit_code != 0:
        return result.exit_code

    rt = load(OUT / "artifact")
    rng = np.random.default_rng(0)
    print("running every model from the artifact, checked against "
          "onnxruntime (ONNX) and PyTorch eager (.pt2):")
    rows = [("model", "input", "max |err|", "rel err", "smelt ms", "reference")]
    ok = True
    for path in paths:
        name = path.stem
        info = rt.models[name]
        feeds = {}
        for spec in info.inputs:
            shape = [d if isinstance(d, int) else 2 for d in spec.shape]
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        rt.run(name, **feeds)  # warm-up
        t0 = time.perf_counter()
        outs = rt.run(name, **feeds)
        ms = (time.perf_counter() - t0) * 1e3
        outs = outs if isinstance(outs, tuple) else (outs,)
        ref = _reference(path, feeds)
        if ref is None:
            rows.append((name, str(info.inputs[0]), "-", "-", f"{ms:.1f}", "not installed"))
            continue
        err = max(float(np.abs(o - r).max()) for o, r in zip(outs, ref))
        rel = err / max(float(np.abs(ref[0]).max()), 1e-12)
        ok &= rel < 1e-4
        rows.append((name, str(info.inputs[0]), f"{err:.2e}", f"{rel:.1e}", f"{ms:.1f}",
                     "onnxruntime" if path.suffix == ".onnx" else "torch eager"))
    print("\n".join(cli._table(rows, indent=2)))
    print(f"\n$ smelt inspect {OUT / 'artifact'}")
    print(CliRunner().invoke(cli.main, ["inspect", str(OUT / "artifact")]).output)
    print("all outputs match their references (relative error < 1e-4)" if ok else "MISMATCH against a reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
