"""Weight store and the constant helpers around it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from tvm import relax

from smelt.ir import WeightStore, weight_key
from smelt.ir.weights import exact_const, stays_inline


def test_relax_const_narrows_and_exact_const_does_not():
    """The symptom exact_const works around: relax.const(array) turns int64 into int32."""
    big = np.array([2**40, -1], dtype="int64")
    assert str(relax.const(big).ty.dtype) == "int32"  # TVM's default; when this fails, TVM changed it
    assert str(relax.const(np.ones(2)).ty.dtype) == "float32"
    c = exact_const(big)
    assert str(c.ty.dtype) == "int64"
    np.testing.assert_array_equal(c.value.numpy(), big)
    assert str(exact_const(np.ones(2)).ty.dtype) == "float64"


@pytest.mark.parametrize("value", [np.float32(3.0), np.array(3.0, dtype="float32"),
                                   np.arange(6, dtype="float16").reshape(2, 3).T,
                                   np.ones(4, dtype=ml_dtypes.bfloat16)])
def test_exact_const_keeps_shape_and_dtype(value):
    c = exact_const(value)
    assert tuple(int(d) for d in c.ty.shape) == np.shape(value)
    assert str(c.ty.dtype) == str(np.asarray(value).dtype)
    np.testing.assert_array_equal(c.value.numpy(), np.asarray(value))


def test_stays_inline_threshold():
    assert stays_inline(()) and stays_inline((15,)) and stays_inline((3, 5))
    assert not stays_inline((16,)) and not stays_inline((4, 4))


def test_store_dedups_by_content_and_round_trips(tmp_path, rng):
    a = rng.standard_normal((4, 8)).astype("float32")
    store = WeightStore()
    k1, k2 = store.add(a), store.add(a.copy())
    k3 = store.add(a.astype("float16"))
    k4 = store.add(a.reshape(8, 4))
    assert k1 == k2 == weight_key(a) and len({k1, k3, k4}) == 3
    assert len(store) == 3 and store.added_bytes == 3 * a.nbytes + a.nbytes // 2
    index = store.save(tmp_path / "w.bin")
    assert all(e.offset % 64 == 0 for e in index.values())
    loaded = WeightStore.load(tmp_path / "w.bin", index)
    for k in (k1, k3, k4):
        np.testing.assert_array_equal(loaded[k], store[k])
        assert loaded[k].dtype == store[k].dtype and loaded[k].shape == store[k].shape


def test_empty_and_scalar_stores_round_trip(tmp_path):
    """A model without weights writes an empty weights.bin, which np.memmap cannot map."""
    empty = WeightStore()
    index = empty.save(tmp_path / "empty.bin")
    assert index == {} and (tmp_path / "empty.bin").stat().st_size == 0
    assert len(WeightStore.load(tmp_path / "empty.bin", index)) == 0

    store = WeightStore()
    k = store.add(np.array(2.5, dtype="float32"))
    loaded = WeightStore.load(tmp_path / "scalar.bin", store.save(tmp_path / "scalar.bin"))
    assert loaded[k].shape == () and float(loaded[k]) == 2.5


def test_parts_of_a_stacked_tensor_cost_no_bytes(tmp_path):
    """Weights of N models stacked into one (horizontal fusion) are stored once: each model's
    tensor is recorded at its place inside the stacked one, and reads back equal."""
    import numpy as np

    from smelt.ir.weights import WeightEntry, WeightStore

    rng = np.random.default_rng(0)
    pieces = [rng.standard_normal((16, 8, 3, 3)).astype("float32") for _ in range(4)]
    store = WeightStore()
    keys = [store.add(p) for p in pieces]
    stacked = store.add(np.concatenate(pieces, axis=0))
    other = store.add(rng.standard_normal((64, 8)).astype("float32"))
    index = store.save(tmp_path / "w.bin")
    assert (tmp_path / "w.bin").stat().st_size < sum(p.nbytes for p in pieces) + 64 * 8 * 4 + 256
    assert [index[k].offset for k in keys] == [index[stacked].offset + i * pieces[0].nbytes for i in range(4)]
    loaded = WeightStore.load(tmp_path / "w.bin", {k: WeightEntry.from_json(e.to_json()) for k, e in index.items()})
    for k, p in zip(keys, pieces):
        np.testing.assert_array_equal(loaded[k], p)
    assert loaded[other].shape == (64, 8)
