"""FuseOperandViews: attention's q/k/v split and head transposes are read inside the matmuls.

Numbers: the rewritten module against the original on the CPU (float32; the same products
summed in the same order, tolerance 1e-6 of the output's scale), and a PyTorch attention
block compiled for CUDA against torch eager float32 (marker ``cuda``; fp16 compute, tolerance
1e-2 of the output's scale, as the other fp16 GPU tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import smelt
from smelt.passes import Explainer
from smelt.passes.fuse_operand_views import FuseOperandViews

B, S, H, D = 2, 16, 2, 32


def attention(dtype="float32"):
    """Self-attention as ``torch.export`` writes it: one q/k/v projection split by reshape, permute and
    slices; k transposed; the context transposed back before the output projection."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((B * S, H * D), dtype))
    wqkv = relax.Var("wqkv", relax.TensorType((H * D, 3 * H * D), dtype))
    wo = relax.Var("wo", relax.TensorType((H * D, H * D), dtype))
    with bb.function("main", [x, wqkv, wo]):
        with bb.dataflow():
            qkv = bb.emit(relax.op.matmul(x, wqkv))
            qkv = bb.emit(relax.op.permute_dims(relax.op.reshape(qkv, (B, S, 3, H, D)), [2, 0, 3, 1, 4]))
            q, k, v = (bb.emit(relax.op.reshape(relax.op.squeeze(relax.op.strided_slice(qkv, [0], [i], [i + 1]), [0]),
                                                (B * H, S, D))) for i in range(3))
            kt = bb.emit(relax.op.permute_dims(k, [0, 2, 1]))
            p = bb.emit(relax.op.nn.softmax(relax.op.matmul(q, kt)))
            ctx = bb.emit(relax.op.matmul(p, v))
            ctx = bb.emit(relax.op.reshape(relax.op.permute_dims(relax.op.reshape(ctx, (B, H, S, D)), [0, 2, 1, 3]),
                                           (B * S, H * D)))
            out = bb.emit_output(bb.emit(relax.op.matmul(ctx, wo)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> set[str]:
    ops = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.add(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return ops


def test_views_vanish_into_the_matmuls():
    explain = Explainer("FuseOperandViews")
    after = FuseOperandViews(explain)(attention())
    assert not {"relax.permute_dims", "relax.strided_slice", "relax.squeeze"} & _ops(after)
    assert explain.lines() == [
        "FuseOperandViews: rewrote matmul: a: reshape -> permute_dims -> strided_slice -> squeeze -> reshape; "
        "b: reshape -> permute_dims -> strided_slice -> squeeze -> reshape -> (NT)",
        "FuseOperandViews: rewrote matmul: a: -; b: reshape -> permute_dims -> strided_slice -> squeeze -> reshape",
        "FuseOperandViews: rewrote matmul: a: reshape -> permute_dims -> reshape; b: -"]
    kernels = [f for _, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 3 and all(int(f.attrs["op_pattern"]) == 4 for f in kernels)


def test_plain_matmuls_and_reshape_only_views_are_left_alone():
    """A reshape alone is free (a view at run time): nothing to gain, so nothing changes."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(relax.op.reshape(x, (32, 16)), w)))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(FuseOperandViews()(mod), mod)
    assert "relax.matmul" in _ops(FuseOperandViews()(attention()))  # the q/k/v projection reads x itself


def test_same_numbers_as_the_views(rng, run):
    before, after = attention(), FuseOperandViews()(attention())
    args = [rng.standard_normal(s).astype("float32") for s in ((B * S, H * D), (H * D, 3 * H * D), (H * D, H * D))]
    ref, got = (run(m, *args) for m in (before, after))
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


class Attention(torch.nn.Module):
    def __init__(self, d=128, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, s, d))


def _compile_attention(x):
    return smelt.compile([(Attention().eval(), (x,))], target="cuda", arch="sm_90", names=["att"],
                         precision="float16", options=smelt.CompileOptions(tune_log_dir=None))


def test_attention_kernels_are_matmuls_on_tensor_cores(requires_cuda_compiler):
    """The projections run on cuBLASLt; q @ k^T and p @ v read q, k and v through their views."""
    art = _compile_attention(torch.randn(2, 64, 128))
    names = art.report.schedules
    assert not [n for n in names if "strided_slice" in n], names
    assert sum(rule == "TensorCoreMatmul" for rule in names.values()) == 2, names


def test_attention_without_libraries_is_four_tensor_core_kernels(requires_cuda_compiler):
    art = smelt.compile([(Attention().eval(), (torch.randn(2, 64, 128),))], target="cuda", arch="sm_90",
                        names=["att"], precision="float16",
                        options=smelt.CompileOptions(smelt.TargetOptions("cuda", "sm_90", libs=()), tune_log_dir=None))
    names = art.report.schedules
    assert not [n for n in names if "transpose" in n or "strided_slice" in n], names
    assert sum(rule == "TensorCoreMatmul" for rule in names.values()) == 4, names


@pytest.mark.cuda
def test_attention_matches_torch_on_gpu(tmp_path):
    x = torch.randn(2, 64, 128)
    rt = smelt.load(_compile_attention(x).save(tmp_path / "att"))
    y = rt.run("att", **{rt.models["att"].inputs[0].name: x.numpy()})
    with torch.no_grad():
        ref = Attention().eval()(x).numpy().astype("float64")
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()
