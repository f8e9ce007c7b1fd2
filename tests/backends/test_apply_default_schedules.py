"""ApplyDefaultSchedules: a rule that raises costs one kernel its rule, not the compile; reasons are kept."""

from __future__ import annotations

import logging

import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.script import ir as I
from tvm.script import relax as R

from smelt.backends.apply_default_schedules import ApplyDefaultSchedules
from smelt.errors import BackendError

TARGET = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152,
                            "max_threads_per_block": 1024, "thread_warp_size": 32})


@I.ir_module
class Matmul:
    @R.function
    def main(x: R.Tensor((32, 64), "float32"), w: R.Tensor((64, 128), "float32")) -> R.Tensor((32, 128), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


class Exploding:
    """A dlight-style rule that asserts, as dlight's Matmul did on MobileNetV3 at batch 32."""

    def apply(self, func, target, tunable):
        raise AssertionError("unexpected reduction layout\nblock: matmul")


class NeverApplies:
    def apply(self, func, target, tunable):
        return None


def prim_funcs() -> tvm.IRModule:
    """The legalized matmul as a module of PrimFuncs alone."""
    legal = relax.transform.LegalizeOps()(Matmul)
    return tvm.IRModule({gv: f for gv, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})


def run(pass_, mod):
    with TARGET:
        return pass_(mod)


def test_rule_that_raises_falls_through_to_the_next(caplog):
    apply = ApplyDefaultSchedules([Exploding(), NeverApplies(), dl.gpu.Matmul(), dl.gpu.Fallback()])
    with caplog.at_level(logging.WARNING, logger="smelt.backends.apply_default_schedules"):
        mod = run(apply, prim_funcs())
    assert apply.report == {"matmul": "Matmul"}
    assert apply.fallbacks == {"matmul": "Exploding: AssertionError: block: matmul"}
    assert "schedule rule Exploding failed on matmul (AssertionError: block: matmul)" in caplog.text
    func = mod["matmul"]
    assert func.attrs["tirx.is_scheduled"]
    assert "threadIdx" in func.script()
    # Scheduled for real: the CUDA code generator refuses unbound loops.
    lib = tvm.compile(tvm.IRModule({"matmul": func.with_attr("global_symbol", "matmul")}), target=TARGET)
    assert "__global__" in lib.mod.imports[0].inspect_source("cuda")


def test_default_rules_schedule_the_matmul():
    apply = ApplyDefaultSchedules()
    run(apply, prim_funcs())
    assert apply.report == {"matmul": "Matmul"} and apply.fallbacks == {}


def test_the_input_module_is_not_changed():
    # MetaSchedule keeps the module it tunes; tuning measured the default schedule of a task
    # with this pass, and writing in place made it tune the scheduled kernel instead.
    mod = prim_funcs()
    before = mod["matmul"]
    out = run(ApplyDefaultSchedules(), mod)
    assert mod["matmul"].same_as(before) and "tirx.is_scheduled" not in (mod["matmul"].attrs or {})
    assert out["matmul"].attrs["tirx.is_scheduled"]


def test_tuned_functions_are_left_alone():
    mod = prim_funcs()
    mod["matmul"] = mod["matmul"].with_attr("tirx.is_scheduled", True)
    apply = ApplyDefaultSchedules([Exploding()])
    out = run(apply, mod)
    assert apply.report == {"matmul": "tuned"} and apply.fallbacks == {}
    tvm.ir.assert_structural_equal(out["matmul"], mod["matmul"])


def test_no_rule_left_is_an_error_naming_kernel_and_reasons():
    apply = ApplyDefaultSchedules([Exploding(), NeverApplies()])
    # A BackendError raised inside a pass reaches us as RuntimeError (the FFI boundary keeps only
    # the message) unless smelt.errors registers its types with tvm_ffi.register_error.
    expected = (r"no default GPU schedule applies to kernel matmul; tried Exploding, NeverApplies "
                r"\(failures: Exploding: AssertionError: block: matmul\)")
    with pytest.raises((BackendError, RuntimeError), match=expected):
        run(apply, prim_funcs())


def test_reduction_rule_never_schedules_grouped_convolutions():
    """dlight's Reduction rule miscompiles a grouped 1x1 conv (relative error 0.59 on an H200);
    the next rule must take it, and the report must say why."""
    import numpy as np

    x = relax.Var("x", relax.TensorType((1, 1024, 14, 14), "float32"))  # 128 products: not SmallReduction's
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        w = relax.const(np.zeros((512, 128, 1, 1), "float32"))
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(x, w, groups=8)))
    mod = relax.transform.LegalizeOps()(bb.get())
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    sched = ApplyDefaultSchedules()
    with target:
        sched(mod)
    (name,) = sched.report
    assert sched.report[name] != "Reduction"
    assert "Reduction: skipped, it miscompiles group_conv2d_nchw" in sched.fallbacks[name]


@pytest.mark.usefixtures("requires_cuda_compiler")
def test_int8_matmuls_build_for_cuda_without_the_matmul_rule(tmp_path):
    """dlight's Matmul schedule of an int8 x int8 -> int32 matmul fails CUDA codegen; an
    INT8 model must still build, its matmuls scheduled by the next rule."""
    import numpy as np

    import smelt
    from smelt.examples import zoo

    m = zoo.mlp(batch=4)
    calib = [{"features": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}]
    art = smelt.compile([m], "cuda", arch="sm_90", names=["m"], quantize=smelt.Int8(calib=calib),
                        options=smelt.CompileOptions(tune_log_dir=None))
    skipped = {k: v for k, v in art.report.schedule_fallbacks.items() if "Matmul: skipped" in v}
    assert len(skipped) == 3 and all("its int8 code does not build for matmul" in v for v in skipped.values())
    assert all(art.report.schedules[k] != "Matmul" for k in skipped)
