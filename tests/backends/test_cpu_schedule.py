"""Default CPU schedules: the kernels are tiled, vectorized and parallel, and compute the same numbers."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import tvm
from tvm import te, topi
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

import smelt
from smelt.backends import cpu_schedule
from smelt.backends.base import TargetOptions
from smelt.backends.cpu import CPUBackend
from smelt.examples import zoo
from smelt.examples.reference import ort_outputs
from smelt.passes.convert_conv_layout import ConvertConvLayout

# The schedules' shapes follow the target's vector registers: these tests fix them to AVX2's
# (Haswell's code runs on every x86-64 CPU with AVX2, AVX-512 ones included), elsewhere the host's.
TARGET = CPUBackend().target(TargetOptions(arch="haswell" if platform.machine() in ("x86_64", "AMD64") else None))
TWO_CORES = tvm.target.Target({**TARGET.export(), "num-cores": 2})  # tail tiles need 4 chunks per core


def _run(func: tvm.tirx.PrimFunc, shapes: list[tuple], rng, config: dict | None = None) -> list[np.ndarray]:
    """Build ``func`` (under PassContext ``config``) and run it on seeded inputs; returns inputs and the output."""
    with tvm.transform.PassContext(opt_level=3, config=config or {}):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    arrays = [rng.standard_normal(s).astype("float32") for s in shapes[:-1]] + [np.zeros(shapes[-1], "float32")]
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib(*args)
    return [a.numpy() for a in args]


def _scheduled(func, rule, target=TARGET):
    sch = rule.apply(func, target, False)
    assert sch is not None, f"{type(rule).__name__} declined"
    return sch.mod["main"]


CASES = {
    # name: (TE builder, shapes of the arguments, output last)
    "conv_nhwc_3x3": (lambda x, w, b: topi.nn.relu(topi.nn.conv2d_nhwc(x, w, 1, 1, 1, out_dtype="float32") + b),
                      [(1, 14, 14, 32), (3, 3, 32, 64), (1, 1, 1, 64), (1, 14, 14, 64)]),
    "conv_nhwc_stride2": (lambda x, w, b: topi.nn.conv2d_nhwc(x, w, 2, 1, 1, out_dtype="float32") + b,
                          [(1, 15, 15, 16), (3, 3, 16, 48), (1, 1, 1, 48), (1, 8, 8, 48)]),
    "conv_nchw": (lambda x, w, b: topi.nn.conv2d_nchw(x, w, 1, 1, 1, out_dtype="float32") + b,
                  [(1, 8, 12, 12), (16, 8, 3, 3), (1, 16, 1, 1), (1, 16, 12, 12)]),
    "matmul_odd_n": (lambda a, b, c: topi.nn.matmul(a, b) + c, [(6, 40), (40, 10), (10,), (6, 10)]),
    "batch_matmul": (lambda a, b, c: topi.nn.batch_matmul(a, b, transpose_b=False) * c,
                     [(3, 16, 24), (3, 24, 32), (1,), (3, 16, 32)]),
    # 49 rows over height and width (a tail tile), and over one axis of a batched matmul
    "conv_nhwc_1x1_7x7": (lambda x, w, b: topi.nn.relu(topi.nn.conv2d_nhwc(x, w, 1, 0, 1, out_dtype="float32") + b),
                          [(1, 7, 7, 64), (1, 1, 64, 256), (1, 1, 1, 256), (1, 7, 7, 256)]),
    "conv_nhwc_1x1_7x7_alone": (lambda x, w, _b: topi.nn.conv2d_nhwc(x, w, 1, 0, 1, out_dtype="float32"),
                                [(1, 7, 7, 64), (1, 1, 64, 256), (1,), (1, 7, 7, 256)]),  # a write-back, no epilogue
    "batch_matmul_49": (lambda a, b, c: topi.nn.batch_matmul(a, b, transpose_b=False) + c,
                        [(16, 49, 32), (16, 32, 128), (1,), (16, 49, 128)]),
    "depthwise_nhwc_72": (lambda x, w, b: topi.nn.depthwise_conv2d_nhwc(x, w, 2, 1, 1, out_dtype="float32") + b,
                          [(1, 15, 15, 72), (3, 3, 72, 1), (1, 1, 1, 72), (1, 8, 8, 72)]),
    "max_pool_nhwc": (lambda x, _w, _b: topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max",
                                                        layout="NHWC"),
                      [(1, 9, 9, 32), (1,), (1,), (1, 5, 5, 32)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tile_reduction_matches_the_loop_nest(case, rng):
    """Tolerance 1e-5 relative to the largest output: only the summation order changes."""
    build, shapes = CASES[case]
    placeholders = [te.placeholder(s, name=f"p{i}") for i, s in enumerate(shapes[:-1])]
    out = build(*placeholders)
    func = te.create_prim_func([*placeholders, out])
    scheduled = _scheduled(func, cpu_schedule.TileReduction())
    text = scheduled.script()
    assert "T.parallel" in text and "T.vectorized" in text
    want = _run(func, shapes, np.random.default_rng(0))[-1]
    got = _run(scheduled, shapes, np.random.default_rng(0))[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _tiled(case):
    build, shapes = CASES[case]
    placeholders = [te.placeholder(s, name=f"p{i}") for i, s in enumerate(shapes[:-1])]
    return _scheduled(te.create_prim_func([*placeholders, build(*placeholders)]), cpu_schedule.TileReduction()).script()


def test_small_reductions_read_through_the_padding_and_odd_widths_take_half_registers():
    """A depthwise conv (9 products per output) loses its padded copy; a dense 3x3 conv keeps it.
    72 channels are vectorized 8 at a time (odd widths such as 12 made LLVM split every vector)."""
    depthwise, dense = _tiled("depthwise_nhwc_72"), _tiled("conv_nhwc_3x3")
    assert 'T.sblock("PaddedInput")' not in depthwise and "T.if_then_else" in depthwise
    assert 'T.sblock("pad_temp")' in dense
    assert "T.vectorized(8)" in depthwise, depthwise  # AVX-512 (16 lanes) and AVX2 (8) alike


def test_accumulator_tiles_live_on_the_stack(rng):
    """A 1x1 conv's accumulator tile is a stack array LLVM keeps in registers: no workspace is
    allocated (TVM allocates "local" tiles, and tiles of 1024 bytes or more, with a call per tile).
    Tolerance 1e-5 relative to the largest output."""
    x, w, b = te.placeholder((1, 28, 28, 16), name="x"), te.placeholder((1, 1, 16, 64), name="w"), \
        te.placeholder((1, 1, 1, 64), name="b")
    func = te.create_prim_func([x, w, b, topi.nn.relu(topi.nn.conv2d_nhwc(x, w, 1, 0, 1, out_dtype="float32") + b)])
    scheduled = _scheduled(func, cpu_schedule.TileReduction())
    assert 'scope="local"' not in scheduled.script()
    # without the weight repacking, which the model's compile moves out of the kernel
    kernel = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(tvm.IRModule({"main": scheduled}))
    lib = tvm.compile(kernel, target=TARGET)
    ll = "".join(m.inspect_source("ll") for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm")
    assert "load ptr, ptr @__TVMBackendAllocWorkspace" not in ll
    shapes = [(1, 28, 28, 16), (1, 1, 16, 64), (1, 1, 1, 64), (1, 28, 28, 64)]
    want = _run(func, shapes, np.random.default_rng(2))[-1]
    got = _run(scheduled, shapes, np.random.default_rng(2))[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_matrix_vector_products_spread_accumulators_along_the_width(rng):
    """One row: the tile takes five 8-lane accumulators along N (200 = 25 x 8, on AVX-512 and
    AVX2 alike) instead of one chain of K FMAs. Tolerance 1e-5 relative to the largest output."""
    a, b, c = te.placeholder((1, 64), name="a"), te.placeholder((64, 200), name="b"), te.placeholder((200,), name="c")
    func = te.create_prim_func([a, b, c, topi.nn.matmul(a, b) + c])
    scheduled = _scheduled(func, cpu_schedule.TileReduction())
    text = scheduled.script()
    assert "T.unroll(5)" in text and "T.vectorized(8)" in text, text
    shapes = [(1, 64), (64, 200), (200,), (1, 200)]
    want = _run(func, shapes, np.random.default_rng(3))[-1]
    got = _run(scheduled, shapes, np.random.default_rng(3))[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_injective_kernels_are_parallel_and_vectorized(rng):
    x = te.placeholder((64, 256), name="x")
    y = topi.transpose(topi.nn.relu(x) * 2.0)
    func = te.create_prim_func([x, y])
    assert cpu_schedule.TileReduction().apply(func, TARGET, False) is None
    scheduled = _scheduled(func, cpu_schedule.ParallelInjective())
    assert "T.parallel" in scheduled.script() and "T.vectorized" in scheduled.script()
    got = _run(scheduled, [(64, 256), (256, 64)], np.random.default_rng(1))
    np.testing.assert_array_equal(got[1], (np.maximum(got[0], 0) * 2).T)


@pytest.mark.parametrize("shape,perm,want", [
    ((1, 14, 14, 64), (0, 3, 1, 2), "T.vectorized(8)"),  # NHWC -> NCHW: along the channels, not 7-lane gathers
    ((1, 3, 64, 40), (0, 2, 3, 1), "T.vectorized(8)"),  # the 3-channel image to NHWC: along its width
    ((1, 64, 10, 10), (0, 2, 3, 1), "T.vectorized(8)"),  # 64 channels out, 10 in: the output's (not 5 lanes)
])
def test_transposes_vectorize_along_the_longer_contiguous_axis(shape, perm, want):
    """A transpose vectorizes along its input's contiguous axis where that is the longer one
    (contiguous loads, scattered stores), else along its output's. Same numbers exactly."""
    x = te.placeholder(shape, name="x")
    func = te.create_prim_func([x, topi.transpose(x, perm)])
    scheduled = _scheduled(func, cpu_schedule.ParallelInjective())
    text = scheduled.script()
    assert want in text and text.count("T.vectorized(") == 1 and "T.parallel" in text, text
    out = tuple(shape[p] for p in perm)
    got = _run(scheduled, [shape, out], np.random.default_rng(4))
    np.testing.assert_array_equal(got[1], got[0].transpose(perm))


def test_moved_last_axis_names_the_axis_an_input_is_contiguous_along():
    x = te.placeholder((2, 5, 6, 7), name="x")
    for perm, want in [((0, 3, 1, 2), 1), ((0, 2, 3, 1), 2), ((0, 2, 1, 3), None)]:
        sch = tvm.s_tir.Schedule(te.create_prim_func([x, topi.transpose(x, perm)]))
        block = sch.get_sblock("T_transpose")
        assert cpu_schedule._moved_last_axis(sch, block, 4) == want, perm
    # A broadcast along the last axis reads no input along it: its stores stay contiguous.
    v = te.placeholder((64,), name="v")
    sch = tvm.s_tir.Schedule(te.create_prim_func([v, te.compute((64, 16), lambda i, j: v[i] * 2.0, name="b")]))
    assert cpu_schedule._moved_last_axis(sch, sch.get_sblock("b"), 2) is None


def test_injective_kernels_with_a_scalar_operand_are_scheduled():
    """A kernel that also reads a 0-d tensor (an ONNX Where over ``x + c``, as MiniLM's position
    ids) is scheduled like any other: the scalar has no axis to follow."""
    x = te.placeholder((8, 32), name="x")
    c = te.placeholder((), name="c")
    y = te.compute((8, 32), lambda i, j: tvm.tirx.Select(x[i, j] < 0, x[i, j] + c[()], x[i, j]), name="y")
    func = te.create_prim_func([x, c, y])
    sch = tvm.s_tir.Schedule(func)
    assert cpu_schedule._moved_last_axis(sch, sch.get_sblock("y"), 2) is None
    scheduled = _scheduled(func, cpu_schedule.ParallelInjective())
    assert "T.vectorized" in scheduled.script()
    got = _run(scheduled, [(8, 32), (), (8, 32)], np.random.default_rng(2))
    np.testing.assert_array_equal(got[2], np.where(got[0] < 0, got[0] + got[1], got[0]))


def test_float8_kernels_stay_scalar():
    """TVM 0.27's LLVM code generator cannot vectorize float8 casts: kernels touching float8
    (FP8 quantization's) are scheduled without vectors, and compute E4M3 as ml_dtypes rounds it,
    exactly in E4M3's normal range; its subnormals (below 2^-6) TVM rounds off by up to 2^-7."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = te.placeholder((64, 256), name="x")
    q = te.compute((64, 256), lambda i, j: (x[i, j] * 4.0).astype("float8_e4m3fn"), name="q")
    func = te.create_prim_func([x, q])
    scheduled = _scheduled(func, cpu_schedule.ParallelInjective())
    assert "T.parallel" in scheduled.script() and "T.vectorized" not in scheduled.script()
    lib = tvm.compile(scheduled, target=TARGET)
    xs = np.random.default_rng(0).uniform(-8, 8, (64, 256)).astype(np.float32)
    out = tvm.runtime.empty((64, 256), "float8_e4m3fn")
    lib(tvm.runtime.tensor(xs), out)
    want = (xs * 4).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = out.numpy().astype(np.float32)
    normal = np.abs(want) >= 2.0 ** -6
    np.testing.assert_array_equal(got[normal], want[normal])
    assert np.abs(got - want).max() <= 2.0 ** -7


def test_rules_decline_gpu_targets():
    x = te.placeholder((16, 16), name="x")
    func = te.create_prim_func([x, topi.nn.relu(x)])
    gpu = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    assert cpu_schedule.ParallelInjective().apply(func, gpu, False) is None
    assert cpu_schedule.TileReduction().apply(func, gpu, False) is None


def test_weights_are_repacked_at_compile_time_and_names_kept(tmp_path, rng):
    """An MLP's weights reach its kernels as [N / width, K, width] panels; no repacking runs at run time."""
    model = zoo.mlp(batch=4)
    art = smelt.compile(model, "cpu")
    assert art.report.schedules == {"fused_matmul_add_relu": "TileReduction", "fused_matmul1_add_relu": "TileReduction",
                                    "fused_matmul2_add1": "TileReduction"}
    shapes = [art.weights[k].shape for k in art.weights.keys()]
    # 64x256, 256x256 and 256x10 weights: panels two vectors wide where that divides N; 10 columns
    # take one 10-wide panel of 16-lane (AVX-512) tiles, or two 5-wide ones of 8-lane (AVX2) tiles.
    w = 2 * cpu_schedule.vector_lanes(CPUBackend().target(TargetOptions()), 32)  # the compile's: this CPU's
    last = (1, 256, 10) if w == 32 else (2, 256, 5)
    assert sorted(s for s in shapes if len(s) > 1) == sorted([last, (256 // w, 64, w), (256 // w, 256, w)]), shapes
    feeds = {"features": rng.standard_normal((4, 64)).astype("float32")}
    (want,) = ort_outputs(model, feeds)
    rt = smelt.load(art.save(tmp_path / "art"))
    got = rt.run(next(iter(rt.models)), **feeds)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("net", ["resnet18", "mobilenet"])
def test_convert_conv_layout_keeps_numbers(net, tmp_path, rng):
    """NHWC/HWIO: every conv2d converted, hardswish (clip) fused into its conv instead of sitting
    between transposes, outputs equal onnxruntime's to 1e-5 relative to the largest."""
    model = zoo.resnet(depth=18, size=56, classes=10) if net == "resnet18" else zoo.mobilenet(size=56, classes=10)
    prog = smelt.frontend.import_models([model], None, None, False)
    mod = ConvertConvLayout("NHWC", "HWIO")(prog.bind())
    convs = [line for line in mod.script().splitlines() if "R.nn.conv2d(" in line]
    assert convs and all('data_layout="NHWC"' in c and 'kernel_layout="HWIO"' in c for c in convs)
    feeds = {"input": rng.standard_normal((1, 3, 56, 56)).astype("float32")}
    (want,) = ort_outputs(model, feeds)
    art = smelt.compile(model, "cpu")
    # transposes only at the borders: the input into NHWC, the pooled features back
    assert len([k for k in art.report.schedules if "transpose" in k]) <= 2, art.report.schedules
    got = smelt.load(art.save(tmp_path / "art")).run(next(iter(art.models)), **feeds)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_convert_conv_layout_leaves_modules_without_conv_alone():
    prog = smelt.frontend.import_models([zoo.mlp()], None, None, False)
    mod = prog.bind()
    assert ConvertConvLayout()(mod).same_as(mod)


def test_dynamic_batch_keeps_the_tiles(tmp_path, rng):
    """A symbolic batch stays in the parallel grid: convolutions are still tiled, numbers hold at batch 3."""
    model = zoo.resnet(depth=18, size=32, batch="N", classes=10)
    art = smelt.compile(model, "cpu", dynamic_batch=True)
    convs = {k: v for k, v in art.report.schedules.items() if "conv2d" in k}
    assert convs and set(convs.values()) == {"TileReduction"}, convs
    feeds = {"input": rng.standard_normal((3, 3, 32, 32)).astype("float32")}
    (want,) = ort_outputs(model, feeds)
    got = smelt.load(art.save(tmp_path / "art")).run(next(iter(art.models)), **feeds)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_winograd_transforms_unroll_the_tile_and_match_a_direct_conv():
    """3x3 conv as Winograd F(2x2, 3x3): input transform, batched matmul with the transformed
    weights, output transform with bias and ReLU. Each transform unrolls its tile position
    (16 and 2x2), so every copy is a straight sum; scheduled as any injective kernel each value
    chose among 16 expressions at run time. Odd sizes (7x7) take a partial last tile.
    Tolerance 1e-5 relative to the largest output (rounding of the 0, +-1, +-1/2 coefficients)."""
    from smelt.passes import rewrite_conv_winograd as wino

    n, h, c, k = 1, 7, 16, 32
    rule = cpu_schedule.WinogradTransform()
    x = te.placeholder((n, h, h, c), name="x")
    v = wino.winograd_input(x)
    fin = _scheduled(te.create_prim_func([x, v]), rule)
    lanes = cpu_schedule.vector_lanes(TARGET, 32)
    assert "T.unroll(16)" in fin.script() and f"T.vectorized({lanes})" in fin.script(), fin.script()
    b = te.placeholder((1, 1, 1, k), name="b")
    m = te.placeholder((16, int(v.shape[1]), k), name="m")
    y = topi.nn.relu(wino.winograd_output(m, n, h, h) + b)
    fout = _scheduled(te.create_prim_func([m, b, y]), rule)
    assert fout.script().count("T.unroll(2)") == 2 and "T.Select" in fout.script()

    rng = np.random.default_rng(5)
    xs, ws, bs = (rng.standard_normal(s).astype("float32") for s in [(n, h, h, c), (3, 3, c, k), (1, 1, 1, k)])
    dev = tvm.cpu()
    lin = tvm.compile(tvm.IRModule({"main": fin}), target=TARGET)
    vt = tvm.runtime.tensor(np.zeros([int(d) for d in v.shape], "float32"), dev)
    lin(tvm.runtime.tensor(xs, dev), vt)
    u = np.einsum("ai,ijck,bj->abck", wino.WINOGRAD_G, ws.astype("float64"), wino.WINOGRAD_G)
    mm = np.matmul(vt.numpy(), u.reshape(16, c, k).astype("float32"))
    lout = tvm.compile(tvm.IRModule({"main": fout}), target=TARGET)
    got = tvm.runtime.tensor(np.zeros((n, h, h, k), "float32"), dev)
    lout(tvm.runtime.tensor(mm, dev), tvm.runtime.tensor(bs, dev), got)
    xp = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.maximum(sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + h, j:j + h], ws[i, j])
                          for i in range(3) for j in range(3)) + bs, 0)
    assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_resnet_3x3_convs_run_as_winograd(tmp_path, rng):
    """Every 3x3 stride-1 conv of a ResNet becomes the three Winograd kernels, the strided and
    1x1 ones stay direct; the bias, residual and ReLU fuse into the output transform, which
    keeps the WinogradTransform schedule (no add/ReLU kernel is left); numbers equal
    onnxruntime's to 1e-5 relative to the largest."""
    model = zoo.resnet(depth=18, size=64, classes=10)
    art = smelt.compile(model, "cpu")
    kinds = art.report.schedules
    assert sum(k.startswith("winograd_input") for k in kinds) == 4  # one kernel per distinct shape
    outputs = {k: v for k, v in kinds.items() if "winograd_output" in k}
    assert sum(k.startswith("fused_winograd_output") for k in outputs) == 8, kinds  # 2 per stage
    assert set(outputs.values()) == {"WinogradTransform"}, kinds
    assert not [k for k, v in kinds.items() if k.startswith("fused_add") and v == "ParallelInjective"], kinds
    assert any("conv2d" in k for k in kinds)  # the stem and the strided convs
    feeds = {"input": rng.standard_normal((1, 3, 64, 64)).astype("float32")}
    (want,) = ort_outputs(model, feeds)
    got = smelt.load(art.save(tmp_path / "art")).run(next(iter(art.models)), **feeds)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("cpu,lanes,accumulators", [("haswell", 8, 10), ("znver3", 8, 10), ("skylake-avx512", 16, 16),
                                                     ("znver4", 16, 16), ("x86-64", 4, 10)])
def test_tiles_follow_the_cpus_vector_registers(cpu, lanes, accumulators):
    """AVX2 CPUs get 8-lane float32 tiles and AVX-512 ones 16 (TVM's own vector-width query says
    512 bits for every x86 CPU); the tile's accumulators fit the CPU's register file."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    assert cpu_schedule.vector_lanes(target, 32) == lanes
    a, b = te.placeholder((128, 256), name="a"), te.placeholder((256, 512), name="b")
    func = te.create_prim_func([a, b, topi.nn.matmul(a, b)])
    text = cpu_schedule.TileReduction().apply(func, target, False).mod["main"].script()
    assert f"T.vectorized({lanes})" in text and f"T.vectorized({2 * lanes})" not in text, text
    rows = int(text.split("T.unroll(")[1].split(")")[0])  # the register tile's row loop comes first
    assert rows * 2 <= accumulators, text


@pytest.mark.parametrize("rows_ext,lanes,accumulators,want", [
    (14, 8, 10, (7, 8)), (49, 8, 10, (7, 8)), (7, 8, 10, (7, 8)),  # AVX2: no divisor up to 5 rows of two vectors
    (128, 8, 10, (4, 16)), (56, 8, 10, (4, 16)), (30, 8, 10, (5, 16)),
    (14, 16, 16, (7, 32)), (128, 16, 16, (4, 32)),  # AVX-512: 7 rows of two vectors fit the stack tile
    (1, 8, 10, (1, 16)),  # one row: TileReduction spreads the accumulators along the width
])
def test_register_tiles_keep_the_fma_units_busy(rows_ext, lanes, accumulators, want):
    assert cpu_schedule.register_tile(512, rows_ext, lanes, accumulators, 4) == want


@pytest.mark.parametrize("rows_ext,reduction,want", [
    (14, 80, (2, 32)), (14, 128, (2, 32)),  # a 32-wide panel of 80 or 128 floats stays in L1
    (14, 1024, (7, 8)),  # ... of 1024 floats does not: one vector of 7 rows
    (28, 80, (4, 16)),  # 4x16 loads as little as 2x32
    (7, 80, (7, 8)),  # two rows do not divide 7
])
def test_four_vector_tiles_where_the_weight_panel_fits_in_l1(rows_ext, reduction, want):
    assert cpu_schedule.register_tile(480 if rows_ext != 14 else 512, rows_ext, 8, 10, 4, reduction * 4) == want


@pytest.mark.parametrize("k,want", [(80, "2x32"), (1024, "5x16")])
def test_tile_reduction_sizes_the_weight_panel_from_the_reduction(k, want):
    """TileReduction passes the reduction's extent and the weight's element size to the tile choice
    (14 rows with a panel too large for 2x32: 5x16 with a tail)."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2})
    a, b = te.placeholder((14, k), name="a"), te.placeholder((k, 512), name="b")
    text = cpu_schedule.TileReduction().apply(te.create_prim_func([a, b, topi.nn.matmul(a, b)]), target,
                                              False).mod["main"].script()
    rows, width = want.split("x")
    unrolls = [int(u.split(")")[0].split("(")[-1]) for u in text.split("T.unroll(")[1:3]]
    assert unrolls[0] == int(rows) and "T.vectorized(8)" in text, text
    assert (unrolls[1] == int(width) // 8) if int(width) > 8 else True, text


@pytest.mark.parametrize("rows_ext,want", [
    (49, (5, 16)),  # 7x8 (7 chains) or 5x16 over 50 rows: the tail wins
    (14, (5, 16)),
    (196, (4, 16)),  # 5x16 over 200 rows scores 5 % above 4x16: not worth a tail
    (56, (4, 16)), (30, (5, 16)),  # divisors as before
])
def test_tail_tiles_where_no_divisor_keeps_the_fma_units_busy(rows_ext, want):
    assert cpu_schedule.register_tile(512, rows_ext, 8, 10, 4, tails=True) == want


@pytest.mark.parametrize("case", ["conv_nhwc_1x1_7x7", "conv_nhwc_1x1_7x7_alone", "batch_matmul_49"])
def test_tail_tiles_fuse_rows_and_partition_the_last_tile(case):
    """A 7x7 conv's rows span height and width (one iterator of 49, in the block and in the
    accumulator buffer, so the epilogue computed per tile covers that tile alone); the tail's
    row loop stays out of the parallel grid, and LoopPartition splits off the last tile.
    Numbers within 1e-5 of the unscheduled loop nest, built with and without the partition."""
    build, shapes = CASES[case]
    placeholders = [te.placeholder(s, name=f"p{i}") for i, s in enumerate(shapes[:-1])]
    func = te.create_prim_func([*placeholders, build(*placeholders)])
    scheduled = _scheduled(func, cpu_schedule.TileReduction(), TWO_CORES)
    text = scheduled.script()
    assert "T.axis.spatial(49," in text and "T.where(" in text, text
    parallel = text.split("T.parallel(")[1].split(")")[0]
    assert int(parallel) == 256 // 16 if case.startswith("conv") else 16 * 128 // 16, text  # the rows loop serially
    want = _run(func, shapes, np.random.default_rng(0))[-1]
    for config in ({}, cpu_schedule.TAIL_PASS_CONFIG):
        got = _run(scheduled, shapes, np.random.default_rng(0), config)[-1]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_rows_do_not_fuse_across_axes_the_weights_depend_on():
    """A batched matmul's batch axis picks the weights: its rows stay within one batch."""
    stmt = tvm.s_tir.Schedule(te.create_prim_func([a := te.placeholder((16, 49, 32)), b := te.placeholder((16, 32, 128)),
                                                   topi.nn.batch_matmul(a, b, transpose_b=False)]))
    block = stmt.get(stmt.get_sblock("T_batch_matmul_NN"))
    assert cpu_schedule._fusable_rows(block, 3, [16, 49, 128], 1) == 1


def test_rows_of_an_nchw_conv_stay_within_one_output_channel():
    x, w = te.placeholder((1, 8, 12, 12)), te.placeholder((16, 8, 3, 3))
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, w, topi.nn.conv2d_nchw(x, w, 1, 1, 1, out_dtype="float32")]))
    block = sch.get(sch.get_sblock("conv2d_nchw"))
    assert cpu_schedule._fusable_rows(block, 4, [1, 16, 12, 12], 2) == 2


def test_tail_tiles_need_parallel_work_for_every_core():
    """The tail's rows loop serially: with 64 cores a 7x7 conv of 256 channels (16 chunks) keeps
    its dividing 7x8 tiles."""
    build, shapes = CASES["conv_nhwc_1x1_7x7"]
    placeholders = [te.placeholder(s, name=f"p{i}") for i, s in enumerate(shapes[:-1])]
    func = te.create_prim_func([*placeholders, build(*placeholders)])
    many = tvm.target.Target({**TARGET.export(), "num-cores": 64})
    assert "T.where(" not in _scheduled(func, cpu_schedule.TileReduction(), many).script()
    assert "T.where(" in _scheduled(func, cpu_schedule.TileReduction(), TWO_CORES).script()


@pytest.mark.parametrize("width_ext,want", [(24, (4, 24)), (72, (4, 24)), (120, (4, 24)),
                                            (240, (4, 16)),  # two vectors divide: as before
                                            (40, (2, 40)),  # five vectors, 10 accumulators
                                            (56, (8, 8))])  # seven would leave one row: one vector
def test_three_or_five_vector_tiles_where_two_do_not_divide_the_width(width_ext, want):
    assert cpu_schedule.register_tile(width_ext, 3136, 8, 10, 4) == want


def _random_case(seed: int):
    """A conv (1x1, 3x3, 3x3 stride 2, NHWC, bias and ReLU) or a (batched) matmul with a bias, of
    odd sizes: rows that 7, 13 or 14 leave, channels of 3, 5 or 1 vectors."""
    r = np.random.default_rng(seed)
    h, c, k = (int(r.choice(v)) for v in ([5, 7, 13, 14, 28], [8, 24, 40, 64, 72], [16, 24, 40, 48, 72, 160]))
    kind = ["conv1", "conv3", "conv3s2", "bmm", "mm"][seed % 5]
    if kind.startswith("conv"):
        size, stride = (1, 1) if kind == "conv1" else (3, 2 if kind == "conv3s2" else 1)
        out = (h + 2 * (size // 2) - size) // stride + 1
        return ((lambda x, w, b: topi.nn.relu(topi.nn.conv2d_nhwc(x, w, stride, size // 2, 1, out_dtype="float32") + b)),
                [(1, h, h, c), (size, size, c, k), (1, 1, 1, k), (1, out, out, k)])
    if kind == "bmm":
        return (lambda a, b, d: topi.nn.batch_matmul(a, b, transpose_b=False) + d,
                [(16, h * h, c), (16, c, k), (1,), (16, h * h, k)])
    return lambda a, b, d: topi.nn.matmul(a, b) + d, [(3 * h, c), (c, k), (k,), (3 * h, k)]


@pytest.mark.parametrize("seed", range(15))
def test_tile_reduction_on_random_shapes_matches_the_loop_nest(seed):
    """Fused rows, tails and 3- or 5-vector widths on shapes drawn at random (fixed seeds), built
    with and without LoopPartition: within 1e-5 of the unscheduled loop nest."""
    build, shapes = _random_case(seed)
    placeholders = [te.placeholder(s, name=f"p{i}") for i, s in enumerate(shapes[:-1])]
    func = te.create_prim_func([*placeholders, build(*placeholders)])
    scheduled = _scheduled(func, cpu_schedule.TileReduction(), TWO_CORES)
    want = _run(func, shapes, np.random.default_rng(0))[-1]
    for config in ({}, cpu_schedule.TAIL_PASS_CONFIG):
        got = _run(scheduled, shapes, np.random.default_rng(0), config)[-1]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (shapes, config)
