"""smelt: compile several deep-learning models together, on Apache TVM.

Public API::

    art = smelt.compile(["a.onnx", (torch_module, (example,))], target="cpu")
    art = smelt.compile("m.onnx", target="cpu", quantize=smelt.Int8(calib="calib.npz", method="entropy"))
    art = smelt.compile("llm.onnx", target="cuda", quantize=smelt.WeightOnly(bits=4, group_size=128))
    print(smelt.quantize_report("m.onnx", smelt.Int8(calib="calib.npz"), eval_data="eval.npz").outputs)
    art.save("out/")
    rt = smelt.load("out/")
    y = rt.run("a", x=x)
"""

import sys as _sys

if __name__ != "smelt":
    # Imported by file path, not as the package (pytest sets up the repository root as a
    # package when it collects tests/): stand for smelt itself so that no module of smelt
    # is loaded twice (twice-loaded error classes would no longer match).
    import importlib as _importlib

    _sys.modules[__name__] = _importlib.import_module("smelt")
else:
    from .accuracy import QuantizeReport, quantize_report
    from .artifact import Artifact, Runtime, load
    from .benchmark import BenchResult, bench
    from .backends import TargetOptions
    from .compiler import CompileOptions, CompileReport, MergeAnalysis, analyze_merge, compile, import_models
    from .errors import (ArtifactError, BackendError, FrontendError, InputError, PassError, SmeltError,
                         UnsupportedOpsError)
    from .ir import Program
    from .passes import Fp8, Int8, PipelineOptions, WeightOnly

    __all__ = ["MergeAnalysis", "analyze_merge", "Artifact", "ArtifactError", "BackendError", "CompileOptions", "CompileReport", "FrontendError",
               "Fp8", "InputError", "Int8", "PassError", "PipelineOptions", "Program", "Runtime", "SmeltError", "TargetOptions",
               "UnsupportedOpsError", "WeightOnly", "compile", "import_models", "load", "QuantizeReport",
               "quantize_report", "BenchResult", "bench"]
