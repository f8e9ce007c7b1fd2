"""FuseHorizontal: structure (Before/Expected), explanations, the ops left in ``__all__`` after
the merge phase, and numbers of ``__all__`` against each model run alone and onnxruntime.

Numerical tolerance: fp32. ``__all__`` against the same model run alone: ``rtol=1e-5``,
``atol=1e-5 * max|reference|`` (a grouped conv or batched matmul sums the same products as
each model's own kernel; on the CPU they agree to the last bit here, the tolerance leaves
room for other schedules). Against onnxruntime: ``rtol=1e-4``, ``atol=1e-4 * max|reference|``
(different kernels, different summation order).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import smelt
from smelt.compiler import import_models
from smelt.examples import zoo
from smelt.examples.zoo import GraphBuilder, _image_input, _logits_output
from smelt.ir import summarize
from smelt.passes import (MERGED, Explainer, FuseHorizontal, MergeCommonStems, MergeOptions, PassManager,
                          PipelineOptions, Step, build_pipeline, canonicalize_passes, resolve_shared_inputs)

F32 = np.float32


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(F32)


def _close(got, ref, tol):
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(float(np.abs(ref).max()), 1e-30))


def _merge_phase(models, names, share_inputs=True, explain=None):
    """The module after canonicalize + MergeCommonStems + FuseHorizontal, and the FuseHorizontal pass."""
    program = import_models(models, names)
    shared = resolve_shared_inputs(program.models, share_inputs)
    fuse = FuseHorizontal(explain)
    steps = [Step("canonicalize", p) for p in canonicalize_passes(PipelineOptions())]
    steps += [Step("merge", MergeCommonStems({m: [t.name for t in i.inputs] for m, i in program.models.items()},
                                             shared)), Step("merge", fuse)]
    return PassManager(steps, verify_each=True).run(program.bind()), fuse


def _ops(mod) -> dict:
    return dict(summarize(mod, [MERGED]).ops)


def _compile(models, names, tmp_path, **kw):
    art = smelt.compile(models, names=names, merge=True, share_inputs=True, **kw)
    return art, smelt.load(art.save(tmp_path / "art"))


def _check_all(rt, names, feeds, outputs, tol=1e-5):
    """``__all__`` returns each model's outputs as the model run alone does."""
    got = rt.run(MERGED, **{f"{names[0]}.{k}": v for k, v in feeds.items()})
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(names) * outputs
    for k, name in enumerate(names):
        alone = rt.run(name, **feeds)
        alone = alone if isinstance(alone, tuple) else (alone,)
        for j, ref in enumerate(alone):
            _close(got[k * outputs + j], ref, tol)
    return got


def _run_all(mod, *inputs):
    exe = tvm.compile(relax.transform.LegalizeOps()(mod), tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(exe, tvm.cpu())[MERGED](*[tvm.runtime.tensor(a) for a in inputs])
    return [o.numpy() for o in out]


# -- structure ---------------------------------------------------------------------------------

def _two_linear(rng, middle=None):
    """Models a and b: ``x @ W + bias`` (different weights), with ``middle`` between when given."""
    wa, wb, ba, bb = _randn(rng, 4, 3), _randn(rng, 4, 3), _randn(rng, 3), _randn(rng, 3)
    mid = middle or (lambda t: t)

    @I.ir_module
    class Before:
        @R.function
        def a(x: R.Tensor((1, 4), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(wa))
                lv1 = mid(lv)
                gv = R.add(lv1, R.const(ba))
                R.output(gv)
            return gv

        @R.function
        def b(x: R.Tensor((1, 4), "float32")):
            with R.dataflow():
                lv = R.matmul(x, R.const(wb))
                lv1 = mid(lv)
                gv = R.add(lv1, R.const(bb))
                R.output(gv)
            return gv

    merged = MergeCommonStems({"a": ["x"], "b": ["x"]}, {"b.x": "a.x"})(Before)
    return merged, (wa, wb, ba, bb)


def test_structure_linear_layers():
    """Two linear layers on one input: one matmul with the weights side by side, one bias add
    in the matmul's layout (so TVM fuses it into the matmul), then a split into the models."""
    rng = np.random.default_rng(0)
    merged, (wa, wb, ba, bb) = _two_linear(rng, middle=R.nn.relu)

    @I.ir_module
    class Expected:
        @R.function
        def __all__(a__x: R.Tensor((1, 4), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.matmul(a__x, R.const(np.concatenate([wa, wb], axis=1)))
                lv1 = R.nn.relu(lv)
                lv2 = R.add(lv1, R.const(np.concatenate([ba, bb]).reshape(1, 6)))
                lv3 = R.reshape(lv2, R.shape([1, 2, 3]))
                lv4 = R.split(lv3, indices_or_sections=2, axis=1)
                lv5 = lv4[0]
                a = R.squeeze(lv5, axis=[1])
                lv6 = lv4[1]
                b = R.squeeze(lv6, axis=[1])
                gv = (a, b)
                R.output(gv)
            return gv

    explain = Explainer("FuseHorizontal")
    after = FuseHorizontal(explain)(merged)
    tvm.ir.assert_structural_equal(after[MERGED].without_attr("smelt.merge"), Expected[MERGED])
    assert explain.lines() == ["FuseHorizontal: rewrote matmul: models a, b: 3 bindings zipped into one each"]
    # the model functions are untouched; the multi-model module prints and parses back
    tvm.ir.assert_structural_equal(after["a"], merged["a"])
    tvm.ir.assert_structural_equal(tvm.script.from_source(after.script(show_meta=True)), after)
    x = _randn(rng, 1, 4)
    got, ref = _run_all(after, x), _run_all(merged, x)
    for g, r in zip(got, ref):
        _close(g, r, 1e-6)


def test_structure_op_without_rule_falls_back():
    """cumsum has no rule: one per model on slices of the merged matmul, stacked again for the add."""
    rng = np.random.default_rng(1)
    merged, (wa, wb, ba, bb) = _two_linear(rng, middle=lambda t: R.cumsum(t, axis=1))

    @I.ir_module
    class Expected:
        @R.function
        def __all__(a__x: R.Tensor((1, 4), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.matmul(a__x, R.const(np.concatenate([wa, wb], axis=1)))
                lv1 = R.reshape(lv, R.shape([1, 2, 3]))
                lv2 = R.split(lv1, indices_or_sections=2, axis=1)
                lv3 = lv2[0]
                lv4 = R.squeeze(lv3, axis=[1])
                lv5 = R.cumsum(lv4, axis=1)
                lv6 = lv2[1]
                lv7 = R.squeeze(lv6, axis=[1])
                lv8 = R.cumsum(lv7, axis=1)
                lv9 = R.stack((lv5, lv8), axis=1)
                lv10 = R.add(lv9, R.const(np.stack([ba, bb])[None]))
                lv11 = R.split(lv10, indices_or_sections=2, axis=1)
                lv12 = lv11[0]
                a = R.squeeze(lv12, axis=[1])
                lv13 = lv11[1]
                b = R.squeeze(lv13, axis=[1])
                gv = (a, b)
                R.output(gv)
            return gv

    explain = Explainer("FuseHorizontal")
    fuse = FuseHorizontal(explain)
    after = fuse(merged)
    tvm.ir.assert_structural_equal(after[MERGED].without_attr("smelt.merge"), Expected[MERGED])
    assert explain.lines() == [
        "FuseHorizontal: rewrote matmul: models a, b: 3 bindings zipped into one each",
        "FuseHorizontal: left cumsum: a, b #1 (a__lv1): no rule for cumsum; one cumsum per model"]
    assert fuse.report == {"groups": [{"models": ["a", "b"], "positions": 3, "fused": 2, "fell_back": 1, "fallbacks": [
        {"position": 1, "op": "cumsum", "reason": "no rule for cumsum"}], "per_model_after": {"a": 0, "b": 0}}],
        "alone": []}
    x = _randn(rng, 1, 4)
    for g, r in zip(_run_all(after, x), _run_all(merged, x)):
        _close(g, r, 1e-6)


def test_structure_conv_layers():
    """The first conv reads the common input: one conv with both models' filters. The second is a
    grouped conv (groups = 2 models) straight on the first one's output channels: the bias add and
    relu stay in the conv layout, so nothing stands between a conv and its epilogue."""
    rng = np.random.default_rng(2)
    w1 = [_randn(rng, 3, 2, 3, 3) for _ in range(2)]
    bias = [_randn(rng, 1, 3, 1, 1) for _ in range(2)]
    w2 = [_randn(rng, 3, 3, 1, 1) for _ in range(2)]

    def model(k):
        @R.function
        def f(x: R.Tensor((1, 2, 4, 4), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(w1[k]), padding=1)
                lv1 = R.add(lv, R.const(bias[k]))
                lv2 = R.nn.relu(lv1)
                gv = R.nn.conv2d(lv2, R.const(w2[k]))
                R.output(gv)
            return gv
        return f

    before = tvm.IRModule({name: model(k).with_attr("global_symbol", name) for k, name in enumerate("ab")})
    merged = MergeCommonStems({"a": ["x"], "b": ["x"]}, {"b.x": "a.x"})(before)

    @I.ir_module
    class Expected:
        @R.function
        def __all__(a__x: R.Tensor((1, 2, 4, 4), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                lv = R.nn.conv2d(a__x, R.const(np.concatenate(w1)), padding=1)
                lv1 = R.add(lv, R.const(np.concatenate(bias, axis=1)))
                lv2 = R.nn.relu(lv1)
                lv3 = R.nn.conv2d(lv2, R.const(np.concatenate(w2)), groups=2)
                lv4 = R.reshape(lv3, R.shape([1, 2, 3, 4, 4]))
                lv5 = R.split(lv4, indices_or_sections=2, axis=1)
                lv6 = lv5[0]
                a = R.squeeze(lv6, axis=[1])
                lv7 = lv5[1]
                b = R.squeeze(lv7, axis=[1])
                gv = (a, b)
                R.output(gv)
            return gv

    after = FuseHorizontal()(merged)
    tvm.ir.assert_structural_equal(after[MERGED].without_attr("smelt.merge"), Expected[MERGED])
    x = _randn(rng, 1, 2, 4, 4)
    for g, r in zip(_run_all(after, x), _run_all(merged, x)):
        _close(g, r, 1e-5)


def test_no_merged_function_unchanged():
    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                gv = R.nn.relu(x)
                R.output(gv)
            return gv

    assert FuseHorizontal()(Mod).same_as(Mod)


def test_models_with_nothing_in_common_unchanged():
    """An MLP and a CNN: nothing to zip; the module comes back as it was and the Explainer says why."""
    explain = Explainer("FuseHorizontal")
    program = import_models([zoo.mlp(), zoo.resnet(18, size=32, classes=10, width=8)], ["mlp", "cnn"])
    steps = [Step("canonicalize", p) for p in canonicalize_passes(PipelineOptions())]
    steps.append(Step("merge", MergeCommonStems({"mlp": ["features"], "cnn": ["input"]})))
    merged = PassManager(steps).run(program.bind())
    fuse = FuseHorizontal(explain)
    assert fuse(merged).same_as(merged)
    assert fuse.report == {"groups": [], "alone": ["mlp", "cnn"]}
    assert explain.lines() == [
        "FuseHorizontal: left matmul: mlp zipped with no other model: first binding vs cnn's: "
        "binding #0 (mlp__lv vs cnn__lv): op matmul vs nn.conv2d",
        "FuseHorizontal: left nn.conv2d: cnn zipped with no other model: first binding vs mlp's: "
        "binding #0 (cnn__lv vs mlp__lv): op nn.conv2d vs matmul"]


# -- end to end --------------------------------------------------------------------------------

def test_eight_cnns_one_conv_per_layer(tmp_path, rng, onnx_reference):
    """8 ResNet-18s (width 8) with different weights on one input: one conv per layer position."""
    models = [zoo.resnet(18, size=32, classes=10, width=8, seed=i) for i in range(8)]
    names = [f"r{i}" for i in range(8)]
    explain = Explainer("FuseHorizontal")
    mod, fuse = _merge_phase(models, names, explain=explain)
    alone = dict(summarize(mod, ["r0"]).ops)
    ops = _ops(mod)
    assert alone["nn.conv2d"] == 20
    for op in ("nn.conv2d", "nn.max_pool2d", "matmul", "mean"):
        assert ops[op] == alone[op], (op, ops)
    assert ops["add"] == alone["add"] and ops["nn.relu"] == alone["nn.relu"]
    assert ops["split"] == 1 and "stack" not in ops
    (group,) = fuse.report["groups"]
    assert group["models"] == names and group["fused"] == group["positions"] and group["fell_back"] == 0
    assert not [line for line in explain.lines() if "left" in line]

    art, rt = _compile(models, names, tmp_path)
    x = _randn(rng, 1, 3, 32, 32)
    got = _check_all(rt, names, {"input": x}, 1)
    for model, out in zip(models, got):
        (ref,) = onnx_reference(model, {"input": x})
        _close(out, ref, 1e-4)


def test_eight_mlps_one_matmul_per_layer(tmp_path, rng, onnx_reference):
    models = [zoo.mlp(seed=i) for i in range(8)]
    names = [f"m{i}" for i in range(8)]
    mod, _ = _merge_phase(models, names)
    assert _ops(mod) == {"matmul": 3, "add": 3, "nn.relu": 2, "reshape": 2, "split": 1, "squeeze": 8}
    art, rt = _compile(models, names, tmp_path)
    x = _randn(rng, 1, 64)
    got = _check_all(rt, names, {"features": x}, 1)
    for model, out in zip(models, got):
        (ref,) = onnx_reference(model, {"features": x})
        _close(out, ref, 1e-4)


def test_eight_mlps_kernel_launches():
    """After the whole pipeline, ``__all__`` of 8 MLPs launches one kernel per layer and one split
    (the 8 squeezes are views), against 3 per model for the models one by one."""
    models = [zoo.mlp(seed=i) for i in range(8)]
    names = [f"m{i}" for i in range(8)]
    program = import_models(models, names)
    backend = smelt.backends.get("cpu")
    target = backend.target(smelt.TargetOptions())
    from smelt.passes import merge_passes

    merge = merge_passes(program.models, MergeOptions(True, True))
    assert type(merge[-1]).__name__ == "FuseHorizontal"
    mod = PassManager(build_pipeline(backend, target, merge=merge)).run(program.bind(), target)
    prims = {gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}

    def launches(name):
        n = []
        relax.analysis.post_order_visit(mod[name].body, lambda e: n.append(1) if isinstance(
            e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar) and e.op in prims else None)
        return len(n)

    assert [launches(m) for m in names] == [3] * 8
    assert launches(MERGED) == 4


def test_four_transformers(tmp_path, rng, onnx_reference):
    """Attention, LayerNorm with per-model gamma/beta, GELU (erf): every binding zipped."""
    models = [zoo.transformer_encoder(layers=1, seq=8, d_model=32, heads=2, ffn=64, seed=i) for i in range(4)]
    names = [f"t{i}" for i in range(4)]
    explain = Explainer("FuseHorizontal")
    mod, fuse = _merge_phase(models, names, explain=explain)
    alone, ops = dict(summarize(mod, ["t0"]).ops), _ops(mod)
    for op in ("matmul", "nn.softmax", "nn.layer_norm", "erf", "permute_dims"):
        assert ops[op] == alone[op], (op, ops)
    (group,) = fuse.report["groups"]
    assert group["fused"] == group["positions"] == sum(alone.values())
    art, rt = _compile(models, names, tmp_path)
    x = _randn(rng, 1, 8, 32)
    got = _check_all(rt, names, {"hidden": x}, 1)
    for model, out in zip(models, got):
        (ref,) = onnx_reference(model, {"hidden": x})
        _close(out, ref, 1e-4)


def _stem_and_head(head_seed: int):
    """Two conv layers with the same weights in every model, then a conv + classifier of its own."""
    g = GraphBuilder("stem_head", seed=0)
    x = g.conv_bn("input", 3, 8, 3)
    x = g.conv_bn(x, 8, 8, 3)
    g.rng = np.random.default_rng(100 + head_seed)
    x = g.conv_bn(x, 8, 16, 3, stride=2)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    g.linear(x, 16, 10)
    g.nodes[-1].output[0] = "logits"
    return g.model([_image_input(1, 16)], [_logits_output(1, 10)])


def test_heads_after_shared_stem(tmp_path, rng, onnx_reference):
    """The stem is computed once (MergeCommonStems), the three heads as one (FuseHorizontal)."""
    models = [_stem_and_head(i) for i in range(3)]
    names = ["h0", "h1", "h2"]
    mod, fuse = _merge_phase(models, names)
    assert _ops(mod)["nn.conv2d"] == 3  # 2 stem convs + 1 zipped head conv
    assert _ops(mod)["matmul"] == 1
    (group,) = fuse.report["groups"]
    assert group["models"] == names and group["fell_back"] == 0
    art, rt = _compile(models, names, tmp_path)
    assert art.report.merge["shared_bindings"] == {"h0": 6, "h1": 6, "h2": 6}
    x = _randn(rng, 1, 3, 16, 16)
    got = _check_all(rt, names, {"input": x}, 1)
    for model, out in zip(models, got):
        (ref,) = onnx_reference(model, {"input": x})
        _close(out, ref, 1e-4)


def test_models_that_part_ways(tmp_path, rng):
    """A third MLP with another class count: all three zipped up to the last layer, then one by one."""
    models = [zoo.mlp(seed=0), zoo.mlp(seed=1), zoo.mlp(dims=(64, 256, 256, 7), seed=2)]
    names = ["a", "b", "c"]
    explain = Explainer("FuseHorizontal")
    mod, fuse = _merge_phase(models, names, explain=explain)
    assert explain.lines() == [
        "FuseHorizontal: left matmul: a, b zipped with c for 6 bindings only; then binding #6 "
        "(a__lv6 vs c__lv6): operand 1 of matmul: a constant float32[256, 10] vs a constant float32[256, 7]",
        "FuseHorizontal: rewrote matmul: models a, b, c: 6 bindings zipped into one each"]
    assert fuse.report["groups"][0]["per_model_after"] == {"a": 2, "b": 2, "c": 2}
    assert _ops(mod)["matmul"] == 2 + 3
    art, rt = _compile(models, names, tmp_path)
    x = _randn(rng, 1, 64)
    got = rt.run(MERGED, **{"a.features": x})
    for name, out in zip(names, got):
        _close(out, rt.run(name, features=x), 1e-5)


def test_own_inputs_stacked(tmp_path, rng):
    """Without shared inputs each model reads its own: the inputs are stacked once and zipped."""
    models = [zoo.mlp(seed=i) for i in range(3)]
    names = ["a", "b", "c"]
    mod, fuse = _merge_phase(models, names, share_inputs=False)
    assert _ops(mod)["matmul"] == 3 and _ops(mod)["stack"] == 1
    art = smelt.compile(models, names=names, merge=True)
    rt = smelt.load(art.save(tmp_path / "art"))
    xs = {n: _randn(rng, 1, 64) for n in names}
    got = rt.run(MERGED, **{f"{n}.features": x for n, x in xs.items()})
    for name, out in zip(names, got):
        _close(out, rt.run(name, features=xs[name]), 1e-5)


def test_dynamic_batch(tmp_path, rng):
    """A symbolic batch stays axis 0 of every merged value."""
    models = [zoo.mlp(batch="n", seed=i) for i in range(3)]
    names = ["a", "b", "c"]
    art, rt = _compile(models, names, tmp_path, dynamic_batch=True)
    for batch in (1, 5):
        _check_all(rt, names, {"features": _randn(rng, batch, 64)}, 1)


def test_two_outputs_per_model(tmp_path, rng):
    """Each model returns (pooled, logits): the token lookup stays per model (no rule for take)."""
    models = [zoo.embedding_classifier(seed=i) for i in range(2)]
    names = ["e0", "e1"]
    explain = Explainer("FuseHorizontal")
    _, fuse = _merge_phase(models, names, explain=explain)
    (group,) = fuse.report["groups"]
    assert {f["op"] for f in group["fallbacks"]} >= {"take"}
    assert 0 < group["fused"] < group["positions"]
    art, rt = _compile(models, names, tmp_path)
    tokens = rng.integers(0, 1000, (1, 16)).astype(np.int64)
    _check_all(rt, names, {"tokens": tokens}, 2)


def test_applied_twice_is_a_no_op():
    models = [zoo.mlp(seed=i) for i in range(2)]
    mod, _ = _merge_phase(models, ["a", "b"])
    assert FuseHorizontal()(mod).same_as(mod)
