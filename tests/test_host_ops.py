"""The native per-step host ops (`tkg.kernel.backends.host_ops.native_rope_qk`, `native_rope_store`,
`native_scatter`) against their numpy definitions, bit for bit, and the numpy fallbacks when the extension is absent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tkg.dtypes import BF16
from tkg.kernel.backends import host_ops
from tkg.kernel.kv_store import HostKVStore, KVGeometry
from tkg.server.rope import RopeTable, angles, inv_freqs, rotate

needs_native = pytest.mark.skipif(not host_ops.host_ops_available(), reason="native extension not built")

DTYPES = {"fp32": np.dtype(np.float32), "bf16": BF16, "fp16": np.dtype(np.float16)}
# float32 bit patterns the rotation must carry exactly as numpy does: zeros of both signs, the
# smallest subnormal, the smallest normal, values that round to bf16/fp16 ties, the largest
# finite values of each I/O dtype (products near them overflow to inf), infinities and NaNs.
EDGE_BITS = np.array([
    0x00000000, 0x80000000, 0x00000001, 0x00800000, 0x3F808000, 0x3F818000, 0x3F800001, 0x477FE000,
    0x477FF000, 0x7F7F0000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC12345,
    0x7F800001, 0x38800000, 0x33800000, 0x3F000000,
], dtype=np.uint32)  # fmt: skip


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _bits_equal_but_nan_payloads(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-identical, except that a NaN may carry another sign or payload: which operand's NaN an
    IEEE add or multiply returns depends on operand order, and compilers (numpy's loops included)
    commute those freely. Served values are never NaN (the wire's finiteness check)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g32, w32 = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(g32), np.isnan(w32))
    keep = ~np.isnan(w32)
    uint = {2: np.uint16, 4: np.uint32}[got.itemsize]
    np.testing.assert_array_equal(got.view(uint)[keep], want.view(uint)[keep])


@st.composite
def rope_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    d = draw(st.sampled_from([2, 4, 6, 16, 64, 128, 256]))
    B, hq, hkv, T = (draw(st.integers(1, n)) for n in (4, 5, 3, 3))
    qd, kd = draw(st.sampled_from(sorted(DTYPES))), draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    edge_share = draw(st.sampled_from([0.0, 0.1, 1.0]))
    rng = np.random.default_rng(seed)

    def values(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
        edges = EDGE_BITS[rng.integers(0, EDGE_BITS.size, shape)].view(np.float32)
        return np.where(rng.random(shape) < edge_share, edges, x).astype(dtype)

    q, k = values((B, hq, T, d), DTYPES[qd]), values((B, hkv, T, d), DTYPES[kd])
    top = draw(st.sampled_from([T + 1, 5000, 131_072]))
    pos = rng.integers(0, top - T + 1, (B, 1)) + np.arange(T)[None, :]
    return q, k, pos, top


@needs_native
@settings(max_examples=120)
@given(rope_cases(), st.sampled_from([10000.0, 500000.0]))
def test_native_rope_qk_is_bit_identical_to_numpy(case: tuple, theta: float) -> None:
    q, k, pos, top = case
    table = RopeTable(inv_freqs(q.shape[-1], theta), max_context=max(top, 64), initial=64)
    assert table.native
    with np.errstate(all="ignore"):  # edge values overflow and carry NaNs, as they would in numpy
        got_q, got_k = table.rotate_qk(q, k, pos)
        want_q, want_k = table.rotate_qk_numpy(q, k, pos)
    _bits_equal_but_nan_payloads(got_q, want_q)
    _bits_equal_but_nan_payloads(got_k, want_k)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_rotate_qk_paths_equal_rotate(native: bool) -> None:
    """Both paths of `rotate_qk` give `rotate`'s values (the definition, with `angles`)."""
    inv = inv_freqs(32, 10000.0)
    rng = np.random.default_rng(1)
    table = RopeTable(inv, max_context=10_000, initial=64)
    table.native = native
    for dtype in DTYPES.values():
        q = rng.standard_normal((3, 4, 2, 32)).astype(dtype)
        k = rng.standard_normal((3, 2, 2, 32)).astype(dtype)
        pos = rng.integers(0, 8000, (3, 1)) + np.arange(2)[None, :]
        got_q, got_k = table.rotate_qk(q, k, pos)
        cos, sin = angles(pos, inv)
        _bytes_equal(got_q, rotate(q, cos, sin))
        _bytes_equal(got_k, rotate(k, cos, sin))


@needs_native
def test_native_rope_rejects_positions_outside_the_table() -> None:
    table = RopeTable(inv_freqs(8, 10000.0), max_context=100, initial=64)
    q, k = np.zeros((1, 1, 1, 8), np.float32), np.zeros((1, 1, 1, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        host_ops.native_rope_qk(q, k, np.array([[64]]), table.cos2, table.sin2)  # table not grown to 65 rows
    with pytest.raises(ValueError, match="positions"):
        host_ops.native_rope_qk(q, k, np.array([[-1]]), table.cos2, table.sin2)


@needs_native
def test_native_rope_declines_what_it_does_not_cover() -> None:
    table = RopeTable(inv_freqs(8, 10000.0), max_context=100)
    table.rotate_qk(np.zeros((1, 1, 1, 8), np.float32), np.zeros((1, 1, 1, 8), np.float32), np.array([[5]]))
    f64 = np.zeros((1, 1, 1, 8), np.float64)
    assert host_ops.native_rope_qk(f64, f64, np.array([[5]]), table.cos2, table.sin2) is None


def test_without_the_extension_rope_and_writes_run_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another platform (no native module): the table takes the numpy path, the store writes."""
    monkeypatch.setattr(host_ops, "_native", None)
    table = RopeTable(inv_freqs(16, 10000.0), max_context=1000)
    assert not table.native
    q = np.ones((2, 2, 1, 16), BF16)
    assert host_ops.native_rope_qk(q, q, np.array([[1], [2]]), table.cos2, table.sin2) is None
    got_q, _ = table.rotate_qk(q, q, np.array([[1], [2]]))
    _bytes_equal(got_q, table.rotate_qk_numpy(q, q, np.array([[1], [2]]))[0])
    pool = np.zeros((2, 4, 4, 16), BF16)
    assert not host_ops.native_scatter(pool, np.array([1]), np.array([2]), np.ones((2, 1, 16), BF16))


@st.composite
def scatter_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    H, NB, BL, d = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 4, 16])), draw(
        st.sampled_from([1, 8, 128]))
    dtype = draw(st.sampled_from([np.dtype(np.float32), BF16, np.dtype(np.float16), np.dtype(np.uint8)]))
    n = draw(st.integers(0, NB * BL))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slots = rng.permutation(NB * BL)[:n]  # distinct slots
    two_d = draw(st.booleans()) and n % 2 == 0 and n > 0
    shape = (2, n // 2) if two_d else (n,)
    blocks, offsets = (slots // BL).reshape(shape), (slots % BL).reshape(shape)
    pool = rng.standard_normal((H, NB, BL, d)).astype(dtype)
    if draw(st.booleans()):  # rows as the cache passes them: a transposed view of [*I, H, d]
        rows = rng.standard_normal((*shape, H, d)).astype(dtype)
        rows = np.moveaxis(rows, -2, 0)
    else:
        rows = rng.standard_normal((H, *shape, d)).astype(dtype)
    return pool, blocks, offsets, rows


@needs_native
@settings(max_examples=80)
@given(scatter_cases())
def test_native_scatter_equals_numpy_fancy_assignment(case: tuple) -> None:
    pool, blocks, offsets, rows = case
    want = pool.copy()
    want[:, blocks, offsets] = rows
    assert host_ops.native_scatter(pool, blocks, offsets, rows)
    _bytes_equal(pool, want)


@needs_native
def test_native_scatter_out_of_range_writes_nothing() -> None:
    pool = np.zeros((2, 3, 4, 8), np.float32)
    rows = np.ones((2, 2, 8), np.float32)
    for blocks, offsets in (([0, 3], [0, 0]), ([0, 1], [0, 4]), ([-1, 0], [0, 1])):
        with pytest.raises(ValueError, match="blocks/offsets"):
            host_ops.native_scatter(pool, np.array(blocks), np.array(offsets), rows)
        assert not pool.any()


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_host_store_write_both_paths(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`HostKVStore.write` (the commit's scatter) with and without the native module, values cast
    to the store dtype, rows given as the cache's transposed `[Hkv, B, S, d]` view."""
    from tkg.kernel import kv_store

    if not native:
        monkeypatch.setattr(host_ops, "_native", None)
    monkeypatch.setattr(kv_store, "NATIVE_SCATTER_BYTES", 0)  # the native pass whatever the size
    g = KVGeometry(num_layers=2, num_kv_heads=2, num_blocks=5, block_len=4, head_dim=8, dtype=BF16)
    store = HostKVStore(g)
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 2, 2, 8)).astype(np.float32)  # [B, Hkv, S, d], float32: cast on write
    v = rng.standard_normal((3, 2, 2, 8)).astype(BF16)
    blocks, offsets = np.array([[1, 1], [4, 4], [0, 2]]), np.array([[2, 3], [0, 1], [3, 0]])
    store.write(1, blocks, offsets, k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3))
    for b in range(3):
        for s in range(2):
            _bytes_equal(store.k[1][:, blocks[b, s], offsets[b, s]], k[b, :, s].astype(BF16))
            _bytes_equal(store.v[1][:, blocks[b, s], offsets[b, s]], v[b, :, s])
    assert not store.k[0].any() and not store.v[0].any()


@st.composite
def rope_store_cases(draw: st.DrawFn) -> tuple:
    """A step's q, k, v, positions and distinct (block, offset) slots in pools of k's dtype."""
    q, k, pos, top = draw(rope_cases())
    B, hkv, T, d = k.shape
    NB, BL = draw(st.integers(1, 5)), draw(st.sampled_from([1, 4, 16]))
    NB = max(NB, -(-B * T // BL))  # room for B * T distinct slots
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slots = rng.permutation(NB * BL)[: B * T].reshape(B, T)
    v = rng.standard_normal(k.shape).astype(k.dtype)
    pool = rng.standard_normal((2, hkv, NB, BL, d)).astype(k.dtype)  # K and V pools, old values everywhere
    return q, k, v, pos, top, pool, slots // BL, slots % BL


@needs_native
@settings(max_examples=120)
@given(rope_store_cases())
def test_native_rope_store_equals_rope_then_scatter(case: tuple) -> None:
    """The fused pass = `rotate_qk_numpy` of q and k, then numpy's fancy assignment of the rotated k
    and of v into their slots (bit for bit, NaN payloads aside as for `native_rope_qk`); other
    slots untouched."""
    q, k, v, pos, top, pool, blocks, offsets = case
    table = RopeTable(inv_freqs(q.shape[-1], 10000.0), max_context=max(top, 64), initial=64)
    table.rotate_qk(q[:, :0], k[:, :0], pos)  # grows the table to cover pos
    with np.errstate(all="ignore"):
        want_q, want_k = table.rotate_qk_numpy(q, k, pos)
        want_kp, want_vp = pool[0].copy(), pool[1].copy()
        want_kp[:, blocks, offsets] = want_k.transpose(1, 0, 2, 3)
        want_vp[:, blocks, offsets] = v.transpose(1, 0, 2, 3)
        kp, vp = pool[0].copy(), pool[1].copy()
        got_q = host_ops.native_rope_store(q, k, v, pos, table.cos2, table.sin2, kp, vp, blocks, offsets)
    assert got_q is not None
    _bits_equal_but_nan_payloads(got_q, want_q)
    _bits_equal_but_nan_payloads(kp, want_kp)
    _bytes_equal(vp, want_vp)


@needs_native
def test_native_rope_store_refusals_write_nothing() -> None:
    """A position outside the table or a slot outside the pools: ValueError, no pool byte changed;
    dtypes it does not cover: None, nothing written."""
    table = RopeTable(inv_freqs(8, 10000.0), max_context=100, initial=64)
    table.rotate_qk(np.zeros((1, 1, 1, 8), BF16), np.zeros((1, 1, 1, 8), BF16), np.array([[5]]))
    q, k = np.ones((2, 2, 1, 8), BF16), np.ones((2, 1, 1, 8), BF16)
    kp, vp = np.zeros((1, 3, 4, 8), BF16), np.zeros((1, 3, 4, 8), BF16)
    ok_blocks, ok_offsets = np.array([[0], [1]]), np.array([[0], [3]])
    cases = [
        ("positions", np.array([[5], [64]]), ok_blocks, ok_offsets),  # the table has 64 rows
        ("positions", np.array([[-1], [5]]), ok_blocks, ok_offsets),
        ("blocks/offsets", np.array([[5], [6]]), np.array([[0], [3]]), ok_offsets),
        ("blocks/offsets", np.array([[5], [6]]), ok_blocks, np.array([[0], [4]])),
        ("blocks/offsets", np.array([[5], [6]]), np.array([[-1], [0]]), ok_offsets),
    ]  # fmt: skip
    for what, pos, blocks, offsets in cases:
        with pytest.raises(ValueError, match=what):
            host_ops.native_rope_store(q, k, k, pos, table.cos2, table.sin2, kp, vp, blocks, offsets)
        assert not kp.any() and not vp.any()
    pos = np.array([[5], [6]])
    f32_pool = np.zeros((1, 3, 4, 8), np.float32)  # k bf16, pools float32: the caller casts instead
    f32 = (f32_pool, f32_pool, ok_blocks, ok_offsets)
    assert host_ops.native_rope_store(q, k, k, pos, table.cos2, table.sin2, *f32) is None
    assert host_ops.native_rope_store(q, k, k.astype(np.float16), pos, table.cos2, table.sin2, kp, vp, ok_blocks,
                                 ok_offsets) is None  # fmt: skip
    assert not f32_pool.any() and not kp.any() and not vp.any()


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_rotate_into_both_paths_equal_rotate_then_write(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RopeTable.rotate_into` (the step's commit write): the fused pass, or without the extension
    `rotate_qk` and `HostKVStore.write`, store what `rotate` then `write` store and return `rotate`'s
    q; a float32 store (k cast on the way in) takes the unfused path with the same result."""
    if not native:
        monkeypatch.setattr(host_ops, "_native", None)
    inv = inv_freqs(16, 10000.0)
    rng = np.random.default_rng(3)
    for dtype in (BF16, np.dtype(np.float32)):
        g = KVGeometry(num_layers=2, num_kv_heads=2, num_blocks=6, block_len=4, head_dim=16, dtype=dtype)
        got, want = HostKVStore(g), HostKVStore(g)
        table = RopeTable(inv, max_context=5000, initial=64)
        assert table.native == native
        q = rng.standard_normal((3, 4, 2, 16)).astype(BF16)
        k, v = (rng.standard_normal((3, 2, 2, 16)).astype(BF16) for _ in range(2))
        pos = rng.integers(0, 4000, (3, 1)) + np.arange(2)[None, :]
        blocks, offsets = np.array([[1, 1], [5, 5], [0, 2]]), np.array([[2, 3], [0, 1], [3, 0]])
        q_rot = table.rotate_into(got, 1, blocks, offsets, q, k, v, pos)
        cos, sin = angles(pos, inv)
        want.write(1, blocks, offsets, rotate(k, cos, sin).transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3))
        _bytes_equal(q_rot, rotate(q, cos, sin))
        for a, b in zip([*got.k, *got.v], [*want.k, *want.v], strict=True):
            _bytes_equal(a, b)


@needs_native
def test_native_append_passes_refuse_rows_of_other_types_and_change_nothing() -> None:
    """The append passes read the sequence table's rows as buffers: a row of another dtype or too
    short is a ValueError naming it, before anything changes. (Their results against the general
    numpy path: tests/test_kv_cache.py's FastVsGeneralMachine, which runs all three paths in lockstep.)"""
    cap, L = 4, 2
    base, num_blocks, gen = np.zeros(cap, np.int64), np.zeros(cap, np.int64), np.array([0, 3, 7, 1], np.int64)
    lengths, pending, last_used = np.zeros((cap, L), np.int64), np.zeros((cap, L), bool), np.zeros(cap)
    slots, pos = np.array([0, 2], np.int64), np.array([0, 0], np.int64)
    prepare = host_ops.native_append_prepare
    with pytest.raises(ValueError, match="lengths"):
        prepare(slots, pos, base, lengths.astype(np.int32), pending, num_blocks, last_used, gen, 0, 1, 8, 4, 10, 1.0)
    with pytest.raises(ValueError, match="last_used"):
        prepare(slots, pos, base, lengths, pending, num_blocks, last_used[:1], gen, 0, 1, 8, 4, 10, 1.0)
    assert not pending.any() and not last_used.any()
    assert host_ops.native_append_prepare(slots, pos, base, lengths, pending, num_blocks, last_used, gen, 0, 1, 8, 4, 1,
                                     1.0) is None  # two new blocks, one free  # fmt: skip
    assert not pending.any() and not last_used.any()
    rows = (base, lengths, pending, num_blocks, last_used, gen)
    fresh, rel, ends, gens = host_ops.native_append_prepare(slots, pos, *rows, 0, 1, 8, 4, 2, 1.0)
    assert fresh == 2 and rel.tolist() == [0, 0] and pending[:, 0].tolist() == [True, False, True, False]
    assert ends.dtype == np.int32 and ends.tolist() == [1, 1] and gens.tolist() == [0, 7]
    tables = np.zeros((cap, 2), np.int32)
    with pytest.raises(ValueError, match="reserved"):
        host_ops.native_append_commit(slots, gens, ends, tables, num_blocks, lengths, pending, gen,
                                 np.array([5, 6], np.int64), 0, 1, 4, False)  # fmt: skip
    gen[2] += 1  # slot 2 released since prepare: the general path's business
    assert host_ops.native_append_commit(slots, gens, ends, tables, num_blocks, lengths, pending, gen,
                                    np.array([5, 6], np.int32), 0, 1, 4, False) is None  # fmt: skip
    assert not tables.any() and not num_blocks.any() and not lengths.any() and pending[:, 0].sum() == 2


def test_every_wire_dtype_has_a_native_bounded_check() -> None:
    """The (mask, limit) form exists for q/k/v's dtypes and fp8, so no dtype silently stays slow."""
    from tkg import codec, dtypes

    assert set(codec._BOUNDED_NATIVE) == {d.numpy for d in dtypes.ALL}


@st.composite
def wire_bytes(draw: st.DrawFn) -> tuple[bytes, np.dtype]:
    from tkg import dtypes

    dtype = draw(st.sampled_from([d.numpy for d in dtypes.ALL]))
    n = draw(st.sampled_from([0, 1, 3, 1024, 1025, 4095, 4096, 4097, 9000, 70_000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Mostly harmless top bytes (small values), then a few bytes of any value at random places: the
    # check must find one bad value anywhere (first or last chunk, a trailing partial value).
    # Overwrites are any byte or one next to the bound (top byte & mask at limit - 1 or limit).
    from tkg import codec

    _, (mask, limit) = codec._BOUNDED_NATIVE[dtype]
    edge = [b for b in range(256) if (b & mask) in (limit - 1, limit)]
    data = bytearray(rng.integers(0, 0x30, n, dtype=np.uint8).tobytes())
    for _ in range(draw(st.integers(0, 3))):
        if n:
            at = int(rng.integers(0, n)) if draw(st.booleans()) else n - 1 - int(rng.integers(0, min(n, 8)))
            data[at] = draw(st.sampled_from(edge)) if draw(st.booleans()) else int(rng.integers(0, 256))
    return bytes(data), dtype


@needs_native
@settings(max_examples=200)
@given(wire_bytes())
def test_native_bounded_bytes_equals_the_bytes_check(case: tuple[bytes, np.dtype]) -> None:
    from tkg import codec

    data, dtype = case
    assert codec._native_top_bytes_below() is not None
    assert codec.bounded_bytes(data, dtype) == codec.bounded_bytes_python(data, dtype)


def test_bounded_bytes_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    from tkg import codec

    monkeypatch.setattr(host_ops, "_native", None)
    codec._native_top_bytes_below.cache_clear()
    try:
        assert codec._native_top_bytes_below() is None
        good = np.ones(4096, BF16).tobytes()
        assert codec.bounded_bytes(good, BF16)
        assert not codec.bounded_bytes(good[:-2] + np.array([np.inf], BF16).tobytes(), BF16)
    finally:
        codec._native_top_bytes_below.cache_clear()


@st.composite
def pool_ops(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Operations on a 64-block pool: (op, how many, seed); the ids they name are drawn at run time
    from the blocks in the state the op needs (held ones, or any for a refused double free)."""
    op = st.sampled_from(["allocate", "incref", "decref", "decref_free", "incref_free"])
    return draw(st.lists(st.tuples(op, st.integers(0, 40), st.integers(0, 2**16)), max_size=40))


@needs_native
@settings(max_examples=100)
@given(pool_ops(), st.sampled_from([np.int32, np.int64]))
def test_block_pool_native_counts_equal_numpy(ops: list[tuple[str, int, int]], id_dtype: type) -> None:
    """`BlockPool.incref`/`decref` with the native pass (over 16 ids) and with numpy (the module
    absent) stay in lockstep: counts, shared count, freed counts, the free stack's order, and the
    refusals (a free block incref'd, a double free) that change nothing."""
    from tkg.server import block_pool

    native, plain = block_pool.BlockPool(64), block_pool.BlockPool(64)

    def both(method: str, *args: object) -> list[object]:
        out = []
        for pool, use_native in ((native, True), (plain, False)):
            real = block_pool.native_refcount_add
            block_pool.native_refcount_add = real if use_native else (lambda *_: None)
            try:
                out.append(getattr(pool, method)(*args))
            except (RuntimeError, IndexError) as exc:  # compare the refusals too
                out.append(type(exc).__name__)
            finally:
                block_pool.native_refcount_add = real
        return out

    for op, n, seed in ops:
        rng = np.random.default_rng(seed)
        held = np.flatnonzero(plain.refcounts(np.arange(64)) > 0)
        free = np.flatnonzero(plain.refcounts(np.arange(64)) == 0)
        if op == "allocate":
            got = both("allocate", min(n, plain.free_count))
            np.testing.assert_array_equal(got[0], got[1])
            continue
        pick = held if op in ("incref", "decref") else np.concatenate([held, free[:1]])
        if not pick.size:
            continue
        ids = rng.permutation(pick)[: max(1, min(n, pick.size))].astype(id_dtype)
        if op.endswith("_free") and free.size:
            ids[-1] = free[0]  # one free block among them: refused, nothing changes
        got = both(op.removesuffix("_free"), ids)
        assert got[0] == got[1]
        np.testing.assert_array_equal(native.refcounts(np.arange(64)), plain.refcounts(np.arange(64)))
        assert native.shared_count == plain.shared_count and native.free_count == plain.free_count
    np.testing.assert_array_equal(native.allocate(native.free_count), plain.allocate(plain.free_count))


@pytest.mark.parametrize("lengths", [[8, 8, 8], [8, 5, 8], [3, 8, 6]])
def test_held_blocks_of_a_batch_are_every_block_its_tables_use(lengths: list[int]) -> None:
    """A held commit of a batch (above the scalar small-batch path) holds exactly the blocks of each
    row up to its length, in row order: the rectangle shortcut (equal block counts) and the ragged
    walk agree, and finish gives every reference back."""
    from tkg.server.kv_cache import KVCache

    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, block_len=2, num_blocks=32, max_context=16)
    cache.small_batch = 0  # the vectorised commit, whatever the batch size
    ids = [f"s{i}" for i in range(len(lengths))]
    for sid, n in zip(ids, lengths, strict=True):
        cache.create(sid)
        cache.append(sid, 0, 0, np.ones((n - 1, 1, 2), np.float32), np.ones((n - 1, 1, 2), np.float32))
    plan = cache.prepare_append(0, ids, np.array(lengths) - 1, 1)
    kv = np.zeros((len(ids), 1, 1, 2), np.float32)
    cache.commit(plan, kv, kv, hold=True)
    tables = plan.block_tables
    want = np.concatenate([tables[b, : -(-n // 2)] for b, n in enumerate(lengths)])
    np.testing.assert_array_equal(plan._held, want)
    assert (cache.pool.refcounts(want) == 2).all()
    cache.finish(plan)
    assert (cache.pool.refcounts(want) == 1).all()
