"""ConvertConvLayout: convolutions in the backend's layout, pads carried along, numbers unchanged.

Numerics: on the CPU against the module before the pass, exact (integer convs).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from smelt.passes.convert_conv_layout import ConvertConvLayout


def _int8_conv_with_pad() -> tvm.IRModule:
    """What INT8 quantization makes of a 3x3 conv after another conv: the first conv's result quantized,
    an explicit zero-point pad (value 7), then the conv, all NCHW."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 5), "float32"))
    w1 = relax.const(rng.standard_normal((8, 4, 1, 1)).astype("float32"))
    w = relax.const(rng.integers(-127, 128, (16, 8, 3, 3)).astype("int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w1))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(y), 0, 255), "uint8"))
            y = bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, 1, 1, 2, 0], pad_value=7.0))
            y = bb.emit(relax.op.nn.conv2d(y, w, out_dtype="int32"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod: tvm.IRModule) -> list[str]:
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return ops


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_pad_moves_to_the_new_layout_without_transposes():
    before = _int8_conv_with_pad()
    after = ConvertConvLayout("NHWC", "OHWI")(before)
    ops = _ops(after)
    # the input to NHWC and the output back (the weights' transposes are constants): none around the pad
    assert ops.count("relax.permute_dims") == 4, ops
    (pad,) = [b.value for b in after["main"].body.blocks[0].bindings
              if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.pad"]
    assert [int(v) for v in pad.attrs.pad_width] == [0, 0, 1, 1, 2, 0, 0, 0]  # N, H, W, C
    assert float(pad.attrs.pad_value) == 7.0
    x = (np.random.default_rng(1).standard_normal((1, 4, 6, 5)) * 20).astype("float32")
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def test_depthwise_convs_take_their_own_kernel_layout():
    """The CUDA choice: depthwise convs HWIO (a thread's channels have contiguous weights), others OHWI."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((8, 1, 3, 3)).astype("float32")),
                                           padding=1, groups=8))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(rng.standard_normal((4, 2, 3, 3)).astype("float32")),
                                           padding=1, groups=4))  # grouped, not depthwise
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(y, relax.const(
                rng.standard_normal((6, 4, 1, 1)).astype("float32")))))
        bb.emit_func_output(out)
    before = bb.get()
    after = ConvertConvLayout("NHWC", "OHWI", depthwise_kernel_layout="HWIO")(before)
    convs = [b.value.attrs for b in after["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert [(str(a.data_layout), str(a.kernel_layout), int(a.groups)) for a in convs] == \
        [("NHWC", "HWIO", 8), ("NHWC", "OHWI", 4), ("NHWC", "OHWI", 1)]
    xv = np.random.default_rng(1).standard_normal((2, 8, 7, 7)).astype("float32")
    np.testing.assert_allclose(_run(after, xv), _run(before, xv), rtol=1e-5, atol=1e-5)
