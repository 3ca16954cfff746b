"""The KV cache manager: block pool, sequences, two-phase appends, fork/COW, expiry.

Contents are checked by gathering each sequence's tokens back out of the paged storage through
its block ids and comparing with what was appended; a hypothesis state machine drives random
operation sequences against a plain per-sequence list model.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support.fakes import FakeClock

from tkg.dtypes import BF16
from tkg.kernel.backends import host_ops
from tkg.server.appends import Writer
from tkg.server.block_pool import BlockPool
from tkg.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from tkg.server.kv_cache import KVCache

L, HKV, D, BL = 2, 2, 3, 4


def make(num_blocks: int = 16, max_context: int = 32, **kw: object) -> KVCache:
    return KVCache(
        num_layers=L, num_kv_heads=HKV, head_dim=D, block_len=BL, num_blocks=num_blocks, max_context=max_context, **kw
    )


def tokens(start: int, n: int, heads: int = HKV, d: int = D) -> np.ndarray:
    """`[n, heads, d]` float32 values unique per (token, head, lane); exact in float16 below token 64,
    in bfloat16 below token 8."""
    t = np.arange(start, start + n, dtype=np.float32)[:, None, None]
    return t * 8 + np.arange(heads, dtype=np.float32)[None, :, None] * 2 + np.arange(d)[None, None, :] / 4


def fill(cache: KVCache, seq_id: str, n: int, start: int = 0) -> None:
    """Append tokens `start..start+n-1` (k = tokens, v = -tokens) to every layer of `seq_id`."""
    for layer in range(cache.num_layers):
        pos = cache.get(seq_id).lengths[layer]
        cache.append(seq_id, layer, pos, tokens(start, n), -tokens(start, n))


def gather(cache: KVCache, seq_id: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The sequence's cached (k, v) at `layer` as `[n, Hkv, d]` float32, read through its blocks."""
    (state,) = [s for s in cache.snapshot() if s.seq_id == seq_id]
    n = state.lengths[layer]
    pos = np.arange(n)
    blk = np.asarray(state.block_ids, dtype=np.int64)[pos // cache.block_len]
    off = pos % cache.block_len
    kb, vb = cache.store.read_blocks(layer, blk)  # [Hkv, n, BL, d]: block of each token
    k = kb[:, np.arange(n), off].astype(np.float32).transpose(1, 0, 2)
    v = vb[:, np.arange(n), off].astype(np.float32).transpose(1, 0, 2)
    return k, v


def free_ids(pool: BlockPool) -> list[int]:
    """The pool's free stack, bottom first (the next allocation pops the last)."""
    return pool._stack[: pool._top].tolist()


def fingerprint(cache: KVCache) -> tuple:
    """Everything observable about the cache's bookkeeping (not its storage bytes)."""
    return (
        cache.free_blocks,
        sorted(free_ids(cache.pool)),
        tuple(cache.snapshot()),
        cache.pool.refcounts(np.arange(cache.num_blocks)).tolist(),
        cache.tokens_appended,
    )


def check_invariants(cache: KVCache) -> None:
    held: dict[int, int] = {}
    for s in cache.snapshot():
        assert s.num_blocks == -(-max(s.lengths) // cache.block_len), s
        assert len(set(s.block_ids)) == len(s.block_ids), s
        for b in s.block_ids:
            held[b] = held.get(b, 0) + 1
    refs = cache.pool.refcounts(np.arange(cache.num_blocks))
    expect = np.zeros(cache.num_blocks, dtype=np.int64)
    for b, n in held.items():
        expect[b] = n
    np.testing.assert_array_equal(refs, expect)
    free = free_ids(cache.pool)
    assert len(set(free)) == len(free)
    assert not set(free) & set(held)
    assert cache.free_blocks + cache.used_blocks == cache.num_blocks
    assert cache.used_blocks == len(held)
    assert sorted(free + list(held)) == list(range(cache.num_blocks))


# ---- BlockPool --------------------------------------------------------------------------------


def test_pool_allocates_in_order_and_reuses_freed_blocks_first() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert a.tolist() == [0, 1, 2]
    assert (pool.free_count, pool.used_count) == (3, 3)
    assert pool.decref(a[1:]) == 2
    assert pool.allocate(2).tolist() == [1, 2]
    with pytest.raises(ResourceExhausted, match="4 more blocks needed, more than the shared pool has free now"):
        pool.allocate(4)
    assert pool.free_count == 3


def test_pool_refcounts_and_double_free() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.incref(a[:1])
    assert [pool.refcount(0), pool.refcount(1)] == [2, 1]
    assert pool.decref(a) == 1  # block 0 still held once
    assert pool.decref(a[:1]) == 1
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(a[:1])
    with pytest.raises(RuntimeError, match="free block"):
        pool.incref(a[:1])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


# ---- storage and sequences ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_storage_is_head_major_per_layer_in_the_kv_dtype(dtype: str) -> None:
    cache = make(num_blocks=5, max_context=10, dtype=dtype)
    store = cache.store
    assert len(store.k) == len(store.v) == L
    for a in (*store.k, *store.v):
        assert a.shape == (HKV, 5, BL, D)
        assert a.dtype == (BF16 if dtype == "bfloat16" else np.dtype(dtype))
        assert not a.any()
    assert cache.max_blocks_per_seq == 3
    assert KVCache.bytes_per_block(L, HKV, D, BL, dtype) == 2 * L * HKV * BL * D * cache.dtype.itemsize


def test_bad_geometry_and_dtype_are_rejected() -> None:
    with pytest.raises(ValueError, match="block_len: expected >= 1, got 0"):
        KVCache(num_layers=1, num_kv_heads=1, head_dim=1, block_len=0, num_blocks=1, max_context=1)
    with pytest.raises(ValueError, match="kv_dtype: expected one of"):
        make(dtype="int8")


def test_create_get_release_and_ids() -> None:
    cache = make(max_sequences=3)
    a = cache.create("a")
    assert a.seq_id == "a" and a.lengths == (0, 0) and a.num_blocks == 0 and a.block_ids == ()
    gen = cache.create()
    gen2 = cache.create("")
    assert gen.seq_id and gen2.seq_id and len({"a", gen.seq_id, gen2.seq_id}) == 3
    with pytest.raises(AlreadyExists, match="sequence_id: 'a' is already in use"):
        cache.create("a")
    cache.release(gen2.seq_id)
    with pytest.raises(InvalidArgument, match="sequence_id: expected a string of at most 321 characters"):
        cache.create("x" * 322)  # the service caps callers' ids at 256 bytes; the cache leaves room for a prefix
    cache.create("b")
    with pytest.raises(ResourceExhausted, match="sequences: 3 live; expected at most 3"):
        cache.create("c")
    assert cache.get("a") == a and "a" in cache and len(cache) == 3
    assert cache.release("a") == 0
    for call in (lambda: cache.get("a"), lambda: cache.release("a"), lambda: cache.truncate("a", 0)):
        with pytest.raises(NotFound, match="sequence_id: no sequence 'a'"):
            call()
    with pytest.raises(NotFound, match="source_id: no sequence 'a'"):
        cache.fork("a")


def test_append_roundtrip_blocks_shared_by_layers() -> None:
    cache = make(dtype="bfloat16")
    cache.create("a")
    k, v = tokens(0, 6), -tokens(0, 6)
    s = cache.append("a", 0, 0, k, v)
    assert s.lengths == (6, 0) and s.block_ids == (0, 1) and cache.free_blocks == 14
    s = cache.append("a", 1, 0, k[:3], v[:3])
    s = cache.append("a", 1, 3, k[3:], v[3:])
    assert s.lengths == (6, 6) and s.block_ids == (0, 1)  # layer 1 reuses the ids layer 0 took
    for layer in range(L):
        gk, gv = gather(cache, "a", layer)
        np.testing.assert_array_equal(gk, k)
        np.testing.assert_array_equal(gv, v)
    assert cache.tokens_appended == 6  # tokens, not token-layers
    check_invariants(cache)


def test_prepare_append_errors_name_the_field_and_change_nothing() -> None:
    cache = make(num_blocks=4, max_context=12)
    for sid in ("a", "b"):
        cache.create(sid)
        cache.append(sid, 0, 0, tokens(0, 3), tokens(0, 3))
    before = fingerprint(cache)
    cases = [
        (InvalidArgument, "layer: expected 0 <= layer < 2, got 2", (2, ["a"], [3], 1)),
        (InvalidArgument, "num_tokens: expected >= 1, got 0", (0, ["a"], [3], 0)),
        (InvalidArgument, "sequence_ids: expected at least one", (0, [], [], 1)),
        (InvalidArgument, "positions: expected 2", (0, ["a", "b"], [3], 1)),
        (InvalidArgument, r"sequence_ids\[2\]: 'a' already at sequence_ids\[0\]", (0, ["a", "b", "a"], [3, 3, 3], 1)),
        (NotFound, r"sequence_ids\[1\]: no sequence 'zz'", (0, ["a", "zz"], [3, 0], 1)),
        (FailedPrecondition, r"positions\[1\]: 4 is not sequence 'b'.s length at layer 0; expected 3",
         (0, ["a", "b"], [3, 4], 1)),
        (FailedPrecondition, r"positions\[0\]: 3 .* at layer 1; expected 0", (1, ["a"], [3], 1)),
        (OutOfRange, r"positions\[0\]: 3 \+ 10 tokens exceeds max_context for sequence 'a'; expected at most 12",
         (0, ["a", "b"], [3, 3], 10)),
        (ResourceExhausted, r"4 more blocks needed \(4 new, 0 copy-on-write\), more than", (0, ["a", "b"], [3, 3], 6)),
    ]  # fmt: skip
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            cache.prepare_append(*args)
        assert fingerprint(cache) == before, msg
    check_invariants(cache)


def test_out_of_range_names_the_position_and_max_context() -> None:
    cache = make(max_context=8)
    cache.create("a")
    cache.create("b")
    cache.append("b", 0, 0, tokens(0, 2), tokens(0, 2))
    with pytest.raises(OutOfRange, match=r"positions\[1\]: 2 \+ 7 tokens exceeds max_context for sequence 'b'"):
        cache.prepare_append(0, ["a", "b"], [0, 2], 7)
    plan = cache.prepare_append(0, ["a", "b"], [0, 2], 6)  # exactly max_context
    assert plan.seq_lens.tolist() == [6, 8]
    cache.abort(plan)


def test_batch_commit_writes_every_sequence_and_exposes_kernel_tables() -> None:
    cache = make()
    for sid, n in (("a", 3), ("b", 0), ("c", 8)):
        cache.create(sid)
        if n:
            cache.append(sid, 0, 0, tokens(100, n), tokens(200, n))
    plan = cache.prepare_append(0, ["a", "b", "c"], [3, 0, 8], 2)
    assert plan.seq_lens.dtype == np.int32 and plan.seq_lens.tolist() == [5, 2, 10]
    assert plan.reserved_blocks == 3  # a crosses into block 1, b needs its first, c its third
    with pytest.raises(RuntimeError, match="after commit"):
        _ = plan.block_tables
    k = np.stack([tokens(10 * b, 2).transpose(1, 0, 2) for b in range(3)])  # [B, Hkv, S, d]
    cache.commit(plan, k, -k)
    assert plan.state == "committed"
    tables = plan.block_tables
    assert tables.dtype == np.int32 and tables.shape == (3, 3)
    for b, sid in enumerate(plan.seq_ids):
        s = cache.get(sid)
        assert tables[b, : s.num_blocks].tolist() == list(s.block_ids)
        gk, gv = gather(cache, sid, 0)
        np.testing.assert_array_equal(gk[-2:], k[b].transpose(1, 0, 2))
        np.testing.assert_array_equal(gv[-2:], -k[b].transpose(1, 0, 2))
    np.testing.assert_array_equal(gather(cache, "a", 0)[0][:3], tokens(100, 3))
    assert cache.tokens_appended == 3 + 8 + 6
    with pytest.raises(RuntimeError, match="already committed"):
        cache.commit(plan, k, k)
    check_invariants(cache)


def test_commit_shape_error_aborts_and_abort_returns_reservation() -> None:
    cache = make()
    cache.create("a")
    before = fingerprint(cache)
    plan = cache.prepare_append(0, ["a"], [0], 5)
    assert cache.free_blocks == 14
    with pytest.raises(InvalidArgument, match=r"v: expected shape \[B, num_kv_heads, S, head_dim\] = \[1, 2, 5, 3\]"):
        cache.commit(plan, np.zeros((1, HKV, 5, D)), np.zeros((1, HKV, 4, D)))
    assert plan.state == "aborted" and fingerprint(cache) == before
    plan = cache.prepare_append(0, ["a"], [0], 5)
    cache.abort(plan)
    assert fingerprint(cache) == before
    with pytest.raises(RuntimeError, match="already aborted"):
        cache.abort(plan)
    with pytest.raises(InvalidArgument, match=r"k: expected shape \[T >= 1, 2, 3\], got \[4, 3, 3\]"):
        cache.append("a", 0, 0, np.zeros((4, 3, D)), np.zeros((4, 3, D)))


def test_rollback_undoes_a_committed_append_at_its_layer_only() -> None:
    cache = make()
    for sid in "abc":
        cache.create(sid)
    fill(cache, "a", 3)  # both layers at 3: the rollback's new block is needed by no layer
    cache.append("b", 0, 0, tokens(0, 4), -tokens(0, 4))  # layer 1 still empty
    cache.append("b", 1, 0, tokens(0, 6), -tokens(0, 6))  # layer 1 ahead: its blocks must stay
    before = fingerprint(cache)
    plan = cache.prepare_append(0, ["a", "b", "c"], [3, 4, 0], 2)
    cache.commit(plan, np.ones((3, HKV, 2, D)), np.ones((3, HKV, 2, D)))
    assert cache.get("a").lengths == (5, 3) and cache.get("a").num_blocks == 2
    assert cache.rollback(plan) == 3
    assert plan.state == "rolled_back"
    assert fingerprint(cache)[:2] == before[:2] and fingerprint(cache)[3:] == before[3:]
    assert [cache.get(s).lengths for s in "abc"] == [(3, 3), (4, 6), (0, 0)]
    np.testing.assert_array_equal(gather(cache, "a", 0)[0], tokens(0, 3))
    check_invariants(cache)
    with pytest.raises(RuntimeError, match="expected a committed plan, got one rolled_back"):
        cache.rollback(plan)


def test_rollback_skips_sequences_that_moved_on_or_were_released() -> None:
    cache = make()
    for sid in "ab":
        cache.create(sid)
    plan = cache.prepare_append(0, ["a", "b"], [0, 0], 1)
    cache.commit(plan, np.ones((2, HKV, 1, D)), np.ones((2, HKV, 1, D)))
    cache.append("a", 0, 1, tokens(1, 1), -tokens(1, 1))  # built on the step's token
    cache.release("b")
    assert cache.rollback(plan) == 0
    assert cache.get("a").lengths == (2, 0)
    check_invariants(cache)


def test_append_in_flight_blocks_a_second_prepare_truncate_and_fork() -> None:
    cache = make()
    cache.create("a")
    plan = cache.prepare_append(0, ["a"], [0], 1)
    with pytest.raises(FailedPrecondition, match="'a' already has an append in flight at layer 0"):
        cache.prepare_append(0, ["a"], [0], 1)  # a retry must not append twice
    with pytest.raises(FailedPrecondition, match="in flight at layer 0; expected none to truncate"):
        cache.truncate("a", 0)
    with pytest.raises(FailedPrecondition, match="expected none to fork"):
        cache.fork("a", "b")
    assert cache.expire_idle(cache._clock() + 1e9, 1.0) == []  # in flight: kept
    other = cache.prepare_append(1, ["a"], [0], 1)  # other layers proceed independently
    cache.commit(plan, np.ones((1, HKV, 1, D)), np.ones((1, HKV, 1, D)))
    cache.commit(other, np.ones((1, HKV, 1, D)), np.ones((1, HKV, 1, D)))
    assert cache.get("a").lengths == (1, 1) and cache.get("a").num_blocks == 1
    check_invariants(cache)


def test_release_while_in_flight_skips_the_sequence_and_frees_everything() -> None:
    cache = make()
    cache.create("a")
    cache.create("b")
    plan = cache.prepare_append(0, ["a", "b"], [0, 0], 6)
    assert cache.release("a") == 0  # its reservation is the plan's, returned at commit
    k = np.stack([tokens(0, 6).transpose(1, 0, 2)] * 2)
    cache.commit(plan, k, k)
    np.testing.assert_array_equal(gather(cache, "b", 0)[0], tokens(0, 6))
    check_invariants(cache)
    cache.release("b")
    assert cache.free_blocks == cache.num_blocks


def test_release_while_in_flight_then_slot_reused_leaves_the_newcomer_alone() -> None:
    cache = make()
    cache.create("a")
    cache.create("b")
    plan = cache.prepare_append(0, ["a", "b"], [0, 0], 2)
    cache.release("a")
    c = cache.create("c")  # takes a's freed slot
    c_plan = cache.prepare_append(0, ["c"], [0], 1)  # c's own append in flight at the same layer
    k = np.stack([tokens(0, 2).transpose(1, 0, 2), tokens(10, 2).transpose(1, 0, 2)])
    cache.commit(plan, k, k)
    assert cache.get("c").lengths == c.lengths and cache.get("c").block_ids == ()
    assert plan.block_tables[0].tolist() == [0] and plan.block_tables[1].tolist() == list(cache.get("b").block_ids)
    with pytest.raises(FailedPrecondition, match="'c' already has an append in flight"):
        cache.prepare_append(0, ["c"], [0], 1)  # the commit did not clear c's flag
    np.testing.assert_array_equal(gather(cache, "b", 0)[0], tokens(10, 2))
    cache.abort(c_plan)  # reservations are held by their plan, not by a table
    check_invariants(cache)


def test_many_sequences_grow_the_slot_arrays() -> None:
    cache = make(num_blocks=400, max_context=8)
    ids = [cache.create(f"q{i}").seq_id for i in range(150)]  # past the initial 64 slots, twice
    cache.append("q3", 0, 0, tokens(0, 1), tokens(0, 1))
    plan = cache.prepare_append(0, ids, [1 if i == 3 else 0 for i in range(150)], 2)
    k = np.stack([tokens(i, 2).transpose(1, 0, 2) for i in range(150)])
    cache.commit(plan, k, -k)
    cache.fork("q149", "kid")
    for i in (0, 64, 127, 128, 149):
        np.testing.assert_array_equal(gather(cache, f"q{i}", 0)[0], tokens(i, 2))
    np.testing.assert_array_equal(gather(cache, "q3", 0)[0], np.concatenate([tokens(0, 1), tokens(3, 2)]))
    np.testing.assert_array_equal(gather(cache, "kid", 0)[1], -tokens(149, 2))
    assert cache.seqs.capacity >= 151 and len(cache) == 151
    check_invariants(cache)


# ---- truncate, fork, copy-on-write ----------------------------------------------------------


def test_truncate_frees_whole_blocks_and_reappend_restores() -> None:
    cache = make()
    cache.create("a")
    for layer in range(L):
        cache.append("a", layer, 0, tokens(0, 10), -tokens(0, 10))
    with pytest.raises(OutOfRange, match=r"length: 11 is past sequence 'a'.s length 10 at layer 0; expected <= 10"):
        cache.truncate("a", 11)
    cache.append("a", 0, 10, tokens(10, 1), tokens(10, 1))
    with pytest.raises(OutOfRange, match="length 10 at layer 1; expected <= 10"):
        cache.truncate("a", 11)  # past layer 1's length even though layer 0 has 11
    with pytest.raises(InvalidArgument, match="length: expected >= 0, got -1"):
        cache.truncate("a", -1)
    assert cache.truncate("a", 5) == 1  # 11 tokens -> 5: blocks 0,1 of 3 stay
    s = cache.get("a")
    assert s.lengths == (5, 5) and s.num_blocks == 2
    for layer in range(L):
        cache.append("a", layer, 5, tokens(5, 5), -tokens(5, 5))
        gk, gv = gather(cache, "a", layer)
        np.testing.assert_array_equal(gk, tokens(0, 10))
        np.testing.assert_array_equal(gv, -tokens(0, 10))
    assert cache.truncate("a", 0) == 3 and cache.free_blocks == cache.num_blocks
    check_invariants(cache)


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    cache = make(dtype="float16")
    cache.create("src")
    for layer in range(L):
        cache.append("src", layer, 0, tokens(0, 10), -tokens(0, 10))
    src = cache.get("src")
    child = cache.fork("src", "kid")
    assert child.lengths == src.lengths and child.block_ids[:2] == src.block_ids[:2]
    assert child.block_ids[2] not in src.block_ids
    assert [cache.pool.refcount(b) for b in child.block_ids] == [2, 2, 1]
    for layer in range(L):
        np.testing.assert_array_equal(gather(cache, "kid", layer)[0], tokens(0, 10))
        np.testing.assert_array_equal(gather(cache, "kid", layer)[1], -tokens(0, 10))
    # Diverge: neither sees the other's new tokens.
    cache.append("kid", 0, 10, tokens(20, 3), tokens(20, 3))
    cache.append("src", 0, 10, tokens(30, 3), tokens(30, 3))
    np.testing.assert_array_equal(gather(cache, "src", 0)[0], np.concatenate([tokens(0, 10), tokens(30, 3)]))
    np.testing.assert_array_equal(gather(cache, "kid", 0)[0], np.concatenate([tokens(0, 10), tokens(20, 3)]))
    gen = cache.fork("kid")
    assert gen.seq_id not in ("src", "kid")
    with pytest.raises(AlreadyExists, match="sequence_id: 'kid' is already in use"):
        cache.fork("src", "kid")
    assert cache.release("src") == 2  # its own blocks 2 and 3; shared 0 and 1 stay with kid and gen
    assert cache.release("kid") == 2
    check_invariants(cache)
    assert cache.release(gen.seq_id) == 4 and cache.free_blocks == cache.num_blocks


def test_fork_with_layers_at_different_lengths_shares_only_blocks_full_everywhere() -> None:
    cache = make()
    cache.create("a")
    cache.append("a", 0, 0, tokens(0, 8), tokens(0, 8))
    cache.append("a", 1, 0, tokens(0, 6), tokens(0, 6))
    kid = cache.fork("a", "b")
    a = cache.get("a")
    assert kid.block_ids[0] == a.block_ids[0] and kid.block_ids[1] != a.block_ids[1]
    cache.append("a", 1, 6, tokens(30, 2), tokens(30, 2))
    cache.append("b", 1, 6, tokens(40, 2), tokens(40, 2))
    np.testing.assert_array_equal(gather(cache, "a", 1)[0][6:], tokens(30, 2))
    np.testing.assert_array_equal(gather(cache, "b", 1)[0][6:], tokens(40, 2))
    np.testing.assert_array_equal(gather(cache, "b", 0)[0], tokens(0, 8))
    check_invariants(cache)


def test_fork_without_room_for_the_partial_copy_changes_nothing() -> None:
    cache = make(num_blocks=3)
    cache.create("a")
    fill(cache, "a", 10)
    before = fingerprint(cache)
    with pytest.raises(ResourceExhausted, match="1 more blocks needed, more than the shared pool has free now"):
        cache.fork("a", "b")
    assert fingerprint(cache) == before and "b" not in cache


def test_write_into_shared_block_after_truncate_copies_all_layers() -> None:
    cache = make()
    cache.create("a")
    for layer in range(L):
        cache.append("a", layer, 0, tokens(0, 8), -tokens(0, 8))
    cache.fork("a", "b")  # both blocks full: all shared
    assert cache.free_blocks == 14
    cache.truncate("b", 6)  # b's last token slot lands inside shared block 1
    plan = cache.prepare_append(0, ["b"], [6], 1)
    assert plan.reserved_blocks == 1  # the copy-on-write target
    cache.commit(plan, np.full((1, HKV, 1, D), 99.0), np.full((1, HKV, 1, D), 98.0))
    a, b = cache.get("a"), cache.get("b")
    assert a.block_ids[0] == b.block_ids[0] and a.block_ids[1] != b.block_ids[1]
    assert cache.pool.refcount(a.block_ids[1]) == 1
    for layer in range(L):  # source untouched; the copy carries every layer's earlier tokens
        np.testing.assert_array_equal(gather(cache, "a", layer)[0], tokens(0, 8))
    np.testing.assert_array_equal(gather(cache, "b", 1)[0], tokens(0, 6))
    np.testing.assert_array_equal(gather(cache, "b", 0)[0][:6], tokens(0, 6))
    assert (gather(cache, "b", 0)[0][6] == 99.0).all()
    check_invariants(cache)


def test_two_writers_of_one_shared_block_in_a_batch_copy_once() -> None:
    cache = make()
    cache.create("a")
    fill(cache, "a", 4)
    cache.fork("a", "b")
    cache.truncate("a", 2)
    cache.truncate("b", 2)
    plan = cache.prepare_append(0, ["a", "b"], [2, 2], 1)
    assert plan.reserved_blocks == 2  # upper bound
    k = np.stack([np.full((HKV, 1, D), 1.0), np.full((HKV, 1, D), 2.0)])
    cache.commit(plan, k, k)
    assert cache.used_blocks == 2  # one copy; the last writer kept the original
    assert (gather(cache, "a", 0)[0][2] == 1.0).all() and (gather(cache, "b", 0)[0][2] == 2.0).all()
    np.testing.assert_array_equal(gather(cache, "b", 0)[0][:2], tokens(0, 2))
    check_invariants(cache)


def test_exhaustion_counts_copy_on_write_and_changes_nothing() -> None:
    cache = make(num_blocks=2)
    cache.create("a")
    fill(cache, "a", 4)
    cache.fork("a", "b")
    cache.truncate("b", 3)
    cache.create("c")
    fill(cache, "c", 1)  # the last free block
    before = fingerprint(cache)
    with pytest.raises(ResourceExhausted, match=r"1 more blocks needed \(0 new, 1 copy-on-write\), more than"):
        cache.prepare_append(0, ["c", "b"], [1, 3], 1)
    assert fingerprint(cache) == before
    cache.release("c")
    cache.append("b", 0, 3, tokens(9, 1), tokens(9, 1))
    for layer in range(L):
        np.testing.assert_array_equal(gather(cache, "a", layer)[0], tokens(0, 4))
    check_invariants(cache)


# ---- expiry and counts ----------------------------------------------------------------------


def test_expire_idle_uses_last_use_and_counts_evictions() -> None:
    clock = FakeClock()
    cache = make(clock=clock)
    for sid in ("a", "b", "c"):
        cache.create(sid)
        clock.t += 10
    cache.append("c", 0, 0, tokens(0, 5), tokens(0, 5))
    clock.t += 10  # a: 40 s idle, b: 30 s, c: 10 s
    cache.get("a")  # a read is no use: a stays 40 s idle
    cache.abort(cache.prepare_append(0, ["b"], [0], 1))  # a step prepared for b is use, even one aborted
    assert cache.expire_idle(None, 35) == ["a"]
    clock.t += 15  # b: 15, c: 25
    assert cache.expire_idle(None, 20) == ["c"]
    assert cache.stats().evicted == {"idle_ttl": 2} and cache.free_blocks == cache.num_blocks
    assert cache.expire_idle(clock.t + 16, 15, busy=lambda sid: sid == "b") == []  # work queued for b
    assert cache.expire_idle(clock.t + 16, 15) == ["b"]
    assert cache.evicted["idle_ttl"] == 3 and len(cache) == 0
    with pytest.raises(NotFound, match="unknown, released or expired"):
        cache.get("a")


def test_stats_for_metrics() -> None:
    cache = make(num_blocks=8)
    cache.create("a")
    cache.append("a", 0, 0, tokens(0, 9), tokens(0, 9))
    st_ = cache.stats()
    assert (st_.blocks_total, st_.blocks_used, st_.active_sequences, st_.tokens_appended) == (8, 3, 1, 9)
    assert st_.usage_ratio == pytest.approx(3 / 8)
    assert st_.evicted == {}


def test_paged_decode_over_the_cache_matches_dense_attention() -> None:
    rng = np.random.default_rng(1)
    cache = make(num_blocks=12, max_context=20)
    hist, hq, S = {"a": 7, "b": 0, "c": 12}, 4, 2
    ks, vs = {}, {}
    for sid, n in hist.items():
        cache.create(sid)
        ks[sid] = rng.standard_normal((n + S, HKV, D)).astype(np.float32)
        vs[sid] = rng.standard_normal((n + S, HKV, D)).astype(np.float32)
        if n:
            cache.append(sid, 0, 0, ks[sid][:n], vs[sid][:n])
    cache.fork("c", "d")  # d shares c's full blocks
    ks["d"], vs["d"] = ks["c"].copy(), vs["c"].copy()
    ks["d"][12:] += 1.0
    sids = ["a", "b", "c", "d"]
    plan = cache.prepare_append(0, sids, [7, 0, 12, 12], S)
    cache.commit(
        plan,
        np.stack([ks[s][-S:].transpose(1, 0, 2) for s in sids]),
        np.stack([vs[s][-S:].transpose(1, 0, 2) for s in sids]),
    )
    q = rng.standard_normal((4, hq, S, D)).astype(np.float32)
    out = cache.store.decode(0, q, None, None, plan.block_tables, plan.seq_lens, scale=0.5)
    for b, sid in enumerate(sids):
        n = plan.seq_lens[b]
        for h in range(hq):
            g = h // (hq // HKV)
            for i in range(S):
                sc = 0.5 * ks[sid][: n - S + i + 1, g] @ q[b, h, i]
                p = np.exp(sc - sc.max())
                np.testing.assert_allclose(
                    out[b, h, i], p @ vs[sid][: n - S + i + 1, g] / p.sum(), rtol=1e-4, atol=1e-5
                )


# ---- stateful: random operation sequences against a list model ------------------------------

IDS = ["s0", "s1", "s2", "s3", "s4"]


class KVCacheMachine(RuleBasedStateMachine):
    """Model: per sequence, per layer, the list of appended (k, v) token rows; a clock per use."""

    @initialize(block_len=st.integers(1, 3), num_blocks=st.integers(3, 16))
    def setup(self, block_len: int, num_blocks: int) -> None:
        self.clock = FakeClock()
        self.cache = KVCache(
            num_layers=L, num_kv_heads=HKV, head_dim=2, block_len=block_len, num_blocks=num_blocks,
            max_context=12, clock=self.clock,
        )  # fmt: skip
        self.storage = [*self.cache.store.k, *self.cache.store.v]  # preallocated once: never replaced
        self.model: dict[str, list[list[np.ndarray]]] = {}  # id -> per layer list of [Hkv, 2] k rows
        self.used: dict[str, float] = {}
        self.counter = 0

    def fresh(self, n: int) -> np.ndarray:
        """`[n, Hkv, 2]` never seen before; v is derived as -k - 0.5."""
        self.counter += n
        return tokens(self.counter - n, n, HKV, 2)

    def touch(self, *sids: str) -> None:
        for s in sids:
            self.used[s] = self.clock.t

    def step(self) -> None:
        self.clock.t += 1

    @rule(sid=st.sampled_from([*IDS, None]))
    def create(self, sid: str | None) -> None:
        self.step()
        if sid in self.model:
            with pytest.raises(AlreadyExists):
                self.cache.create(sid)
            return
        s = self.cache.create(sid)
        assert s.lengths == (0,) * L and s.block_ids == ()
        self.model[s.seq_id] = [[] for _ in range(L)]
        self.touch(s.seq_id)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), layer=st.integers(0, L - 1), n=st.integers(1, 4), finish=st.sampled_from(["commit", "abort"]))
    def append(self, data: st.DataObject, layer: int, n: int, finish: str) -> None:
        self.step()
        self.append_batch(self.draw_batch(data), layer, n, finish)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(1, 2))
    def decode_step(self, data: st.DataObject, n: int) -> None:
        """Every layer in turn, as the service sees a decode step (keeps layers level)."""
        self.step()
        sids = self.draw_batch(data)
        for layer in range(L):
            self.append_batch(sids, layer, n, "commit")

    def draw_batch(self, data: st.DataObject) -> list[str]:
        return data.draw(st.lists(st.sampled_from(list(self.model)), min_size=1, max_size=3, unique=True))

    def append_batch(self, sids: list[str], layer: int, n: int, finish: str) -> None:
        pos = [len(self.model[s][layer]) for s in sids]
        before = fingerprint(self.cache)
        if max(pos) + n > self.cache.max_context:
            with pytest.raises(OutOfRange):
                self.cache.prepare_append(layer, sids, pos, n)
            assert fingerprint(self.cache) == before
            return
        try:
            plan = self.cache.prepare_append(layer, sids, pos, n)
        except ResourceExhausted:
            assert fingerprint(self.cache) == before
            # What the batch needs: blocks past each table's end plus shared blocks it writes into.
            need, bl = 0, self.cache.block_len
            states = {x.seq_id: x for x in self.cache.snapshot()}
            for s, p in zip(sids, pos, strict=True):
                ids = states[s].block_ids
                need += max(0, -(-(p + n) // bl) - len(ids))
                written = np.asarray(ids[p // bl : -(-(p + n) // bl)], dtype=np.int64)
                need += int((self.cache.pool.refcounts(written) > 1).sum())
            assert need > self.cache.free_blocks
            return
        self.touch(*sids)
        assert plan.seq_lens.tolist() == [p + n for p in pos]
        if finish == "abort":
            self.cache.abort(plan)
            assert fingerprint(self.cache)[:2] == before[:2]
            return
        k = np.stack([self.fresh(n).transpose(1, 0, 2) for _ in sids])
        self.cache.commit(plan, k, -k - 0.5)
        for b, s in enumerate(sids):
            self.model[s][layer].extend(k[b].transpose(1, 0, 2))
            # The kernel's row covers the blocks of the tokens it attends at this layer.
            used = -(-(pos[b] + n) // self.cache.block_len)
            state = next(x for x in self.cache.snapshot() if x.seq_id == s)
            assert plan.block_tables[b, :used].tolist() == list(state.block_ids[:used])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), position_error=st.integers(1, 3))
    def append_at_wrong_position_fails(self, data: st.DataObject, position_error: int) -> None:
        sid = data.draw(st.sampled_from(list(self.model)))
        before = fingerprint(self.cache)
        with pytest.raises(FailedPrecondition, match=r"positions\[0\]"):
            self.cache.prepare_append(0, [sid], [len(self.model[sid][0]) + position_error], 1)
        assert fingerprint(self.cache) == before

    @precondition(lambda self: self.model)
    @rule(data=st.data(), back=st.integers(-1, 5))
    def truncate(self, data: st.DataObject, back: int) -> None:
        self.step()
        sid = data.draw(st.sampled_from(list(self.model)))
        shortest = min(len(x) for x in self.model[sid])
        length = shortest - back
        if length < 0:
            return
        if length > shortest:
            with pytest.raises(OutOfRange, match="length"):
                self.cache.truncate(sid, length)
            return
        free = self.cache.free_blocks
        freed = self.cache.truncate(sid, length)
        assert self.cache.free_blocks == free + freed
        for layer in self.model[sid]:
            del layer[length:]
        self.touch(sid)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=st.sampled_from([*IDS, None]), rewind=st.integers(0, 3))
    def fork(self, data: st.DataObject, new: str | None, rewind: int) -> None:
        """Fork, then (beam search, rejected drafts) maybe roll the child back into a shared block."""
        self.step()
        src = data.draw(st.sampled_from(list(self.model)))
        if new in self.model:
            with pytest.raises(AlreadyExists):
                self.cache.fork(src, new)
            return
        before = fingerprint(self.cache)
        try:
            s = self.cache.fork(src, new)
        except ResourceExhausted:
            assert fingerprint(self.cache) == before
            return
        self.model[s.seq_id] = [list(x) for x in self.model[src]]
        self.touch(s.seq_id)  # forking reads the source: no use of it
        length = min(len(x) for x in self.model[src]) - rewind
        if rewind and length >= 0:
            self.cache.truncate(s.seq_id, length)
            for layer in self.model[s.seq_id]:
                del layer[length:]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.step()
        sid = data.draw(st.sampled_from(list(self.model)))
        free = self.cache.free_blocks
        freed = self.cache.release(sid)
        assert self.cache.free_blocks == free + freed
        del self.model[sid], self.used[sid]

    @precondition(lambda self: self.model)
    @rule(ttl=st.integers(3, 40))
    def expire(self, ttl: int) -> None:
        self.step()
        expect = sorted(s for s, t in self.used.items() if self.clock.t - t > ttl)
        assert sorted(self.cache.expire_idle(None, ttl)) == expect
        for s in expect:
            del self.model[s], self.used[s]

    @invariant()
    def bookkeeping_consistent(self) -> None:
        check_invariants(self.cache)
        assert all(x is y for x, y in zip([*self.cache.store.k, *self.cache.store.v], self.storage, strict=True))
        assert sorted(self.cache.sequence_ids()) == sorted(self.model)

    @invariant()
    def contents_match_model(self) -> None:
        for sid, layers in self.model.items():
            assert next(x for x in self.cache.snapshot() if x.seq_id == sid).lengths == tuple(map(len, layers))
            for layer, rows in enumerate(layers):
                gk, gv = gather(self.cache, sid, layer)
                expect = np.asarray(rows, dtype=np.float32).reshape(len(rows), HKV, 2)
                np.testing.assert_array_equal(gk, expect)
                np.testing.assert_array_equal(gv, -expect - 0.5)

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for sid in list(self.model):
            self.cache.release(sid)
        assert self.cache.free_blocks == self.cache.num_blocks
        assert not self.cache.pool.refcounts(np.arange(self.cache.num_blocks)).any()


TestKVCacheStateful = KVCacheMachine.TestCase
TestKVCacheStateful.settings = settings(max_examples=150, stateful_step_count=40)


# ---- holds: the blocks a kernel reads -------------------------------------------------------


def test_a_held_plan_keeps_its_blocks_until_finish() -> None:
    """commit(hold=True): release and truncate of a sequence the kernel reads cannot free its
    blocks (a new sequence gets other ones); finish hands them back; a write into a held block
    copies it first."""
    cache = make(num_blocks=6, max_context=32)
    cache.create("a")
    cache.append("a", 0, 0, tokens(0, 9), tokens(0, 9))  # 3 blocks of 4 at layer 0
    plan = cache.prepare_append(0, ["a"], [9], 1)
    k = tokens(100, 1).transpose(1, 0, 2)[None]
    cache.commit(plan, k, k, hold=True)
    held = set(plan.block_tables[0, :3].tolist())
    assert plan.state == "held" and cache.in_flight("a")
    with pytest.raises(FailedPrecondition, match="expected none to truncate"):
        cache.truncate("a", 0)
    assert cache.expire_idle(cache._clock() + 1e9, 1.0) == []
    cache.append("a", 1, 0, tokens(0, 2), tokens(0, 2))  # another layer, into held block 0: copied first
    assert cache.get("a").block_ids[0] not in held
    assert cache.release("a") == 1  # only the copy: the 3 blocks the launch reads stay held
    cache.create("b")
    cache.append("b", 0, 0, tokens(50, 8), tokens(50, 8))
    assert not set(cache.get("b").block_ids) & held
    cache.finish(plan)
    assert plan.state == "committed" and cache.free_blocks == cache.num_blocks - 2
    check_invariants(cache)


def test_rollback_of_a_held_plan_restores_lengths_and_references() -> None:
    cache = make(num_blocks=6)
    cache.create("a")
    cache.append("a", 0, 0, tokens(0, 4), tokens(0, 4))
    free = cache.free_blocks
    plan = cache.prepare_append(0, ["a"], [4], 2)
    k = tokens(100, 2).transpose(1, 0, 2)[None]
    cache.commit(plan, k, k, hold=True)
    assert cache.rollback(plan) == 1
    assert cache.get("a").lengths == (4, 0) and not cache.in_flight("a") and cache.free_blocks == free
    check_invariants(cache)


# ---- the scalar fast path: the same effects as the general path ------------------------------


def test_a_small_unshared_step_takes_the_fast_path_and_a_shared_one_does_not(monkeypatch) -> None:
    """The twin machine below is only a test of the fast path if the fast path runs: it does for
    a small batch with nothing shared, and not once a fork shares blocks."""
    cache = make()
    taken: list[bool] = []
    prepare = cache._prepare_small
    monkeypatch.setattr(cache, "_prepare_small", lambda *a: taken.append((p := prepare(*a)) is not None) or p)
    cache.create("a")
    fill(cache, "a", 5)
    assert taken == [True, True]  # one append per layer
    cache.fork("a", "b")
    fill(cache, "b", 1, start=5)
    assert taken[2:] == [False, False]
    cache.small_batch = 0
    cache.release("b")
    fill(cache, "a", 1, start=5)
    assert taken[4:] == [False, False]


@pytest.mark.parametrize("small_batch", [8, 0])
def test_a_reservation_another_layer_made_unneeded_goes_back_to_the_pool(small_batch: int) -> None:
    """Prepared at layer 0 with a new block reserved; layer 1 grows the table first; the commit
    then needs no new block and returns the reservation (either path)."""
    cache = make(num_blocks=4)
    cache.small_batch = small_batch
    cache.create("a")
    fill(cache, "a", 4)  # one full block per layer
    plan = cache.prepare_append(0, ["a"], [4], 1)
    assert plan.reserved_blocks == 1 and cache.free_blocks == 2
    cache.append("a", 1, 4, tokens(4, 1), tokens(4, 1))  # takes a block of its own
    k = tokens(4, 1).transpose(1, 0, 2)[None]
    cache.commit(plan, k, k)
    assert cache.free_blocks == 2 and cache.get("a").num_blocks == 2
    np.testing.assert_array_equal(gather(cache, "a", 0)[0], tokens(0, 5))
    check_invariants(cache)


@pytest.mark.parametrize("small_batch", [8, 0])
def test_finishing_a_hold_on_a_released_sequence_leaves_the_slots_newcomer_in_flight(small_batch: int) -> None:
    cache = make()
    cache.small_batch = small_batch
    cache.create("a")
    fill(cache, "a", 3)
    plan = cache.prepare_append(0, ["a"], [3], 1)
    k = tokens(3, 1).transpose(1, 0, 2)[None]
    cache.commit(plan, k, k, hold=True)
    cache.release("a")
    cache.create("c")  # takes a's slot
    c_plan = cache.prepare_append(0, ["c"], [0], 1)
    cache.finish(plan)
    assert cache.in_flight("c")  # the finish did not clear the newcomer's flag
    cache.abort(c_plan)
    check_invariants(cache)


def _outcome(fn, *args, **kwargs) -> object:
    """What a cache call did: its result, or its exception's type and message."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # compared between the two caches, whatever it is
        return ("error", type(exc).__name__, str(exc))


def _cache_state(cache: KVCache) -> tuple:
    """Every bit of bookkeeping, in storage order (the free stack's order included)."""
    s = cache.seqs
    rows = [
        (sid, s.tables[slot].tolist(), int(s.num_blocks[slot]), s.lengths[slot].tolist(), s.pending[slot].tolist(),
         float(s.last_used[slot]))
        for sid, slot in s.items()
    ]  # fmt: skip
    return (free_ids(cache.pool), cache.pool.refcounts(np.arange(cache.num_blocks)).tolist(),
            cache.pool.shared_count, cache.tokens_appended, rows)  # fmt: skip


def _plan_state(plan) -> tuple:
    tables = plan.block_tables.tolist() if plan.state in ("held", "committed") else None
    return (plan.state, plan.seq_lens.tolist(), plan._reserved.tolist(), sorted(plan._held.tolist()), tables)


def _store_writer(cache: KVCache, k: np.ndarray, v: np.ndarray) -> Writer:
    """A `commit` writer that stores `k`, `v` `[B, Hkv, S, d]` at the slots it is given, as the
    store's own write would (the live rows only)."""

    def write(layer: int, blocks: np.ndarray, offsets: np.ndarray, live: np.ndarray | None) -> None:
        kk, vv = (k, v) if live is None else (k[live], v[live])
        cache.store.write(layer, blocks, offsets, kk.transpose(1, 0, 2, 3), vv.transpose(1, 0, 2, 3))

    return write


@pytest.mark.parametrize("small_batch", [8, 0])
@pytest.mark.parametrize("hold", [False, True])
def test_a_commit_whose_writer_fails_is_undone_whole(small_batch: int, hold: bool) -> None:
    """`commit`'s writer runs last, on a plan already committed (or held): when it raises, `undo`
    rolls the append back and the cache is as before the prepare (either path; the clock stands still)."""
    cache = make(clock=FakeClock())
    cache.small_batch = small_batch
    for sid in ("a", "b"):
        cache.create(sid)
        fill(cache, sid, 4)  # a full block: the append takes a new one
    before = (_cache_state(cache), cache.free_blocks)
    plan = cache.prepare_append(0, ["a", "b"], [4, 4], 1)
    k = np.stack([tokens(4, 1).transpose(1, 0, 2)] * 2)

    def failing(layer: int, blocks: np.ndarray, offsets: np.ndarray, live: np.ndarray | None) -> None:
        assert plan.state == ("held" if hold else "committed") and live is None
        assert blocks.tolist() == [[int(plan.block_tables[0, 1])], [int(plan.block_tables[1, 1])]]
        assert offsets.tolist() == [[0], [0]]
        raise RuntimeError("the write failed")

    with pytest.raises(RuntimeError, match="the write failed"):
        cache.commit(plan, k, k, hold=hold, writer=failing)
    cache.undo(plan)
    assert plan.state == "rolled_back"
    assert (_cache_state(cache), cache.free_blocks) == before
    other = cache.prepare_append(0, ["a"], [4], 1)
    with pytest.raises(ValueError, match="exclude"):
        cache.commit(other, k[:1], k[:1], hold=True, defer=True, writer=failing)
    cache.abort(other)
    check_invariants(cache)


class FastVsGeneralMachine(RuleBasedStateMachine):
    """Three caches fed the same random operations: the first may take the native fast path
    (`native_appends`, where the module is built), the second the scalar one (`small_batch` 8),
    the third never a fast path (0). Every result, error, plan, table, length,
    reference count, free-stack order and stored byte must agree. Plans stay open (prepared, or
    held as while a kernel reads them) while other operations run: appends at the same or the
    other layer, forks, truncates, releases and slot reuse, so both paths meet pending
    sequences, shared and held blocks, tables grown by another layer and sequences released
    mid-plan."""

    @initialize(block_len=st.integers(1, 4), num_blocks=st.integers(4, 24))
    def setup(self, block_len: int, num_blocks: int) -> None:
        self.clock = FakeClock()
        self.caches = [
            KVCache(num_layers=L, num_kv_heads=HKV, head_dim=2, block_len=block_len, num_blocks=num_blocks,
                    max_context=14, clock=self.clock)
            for _ in range(3)
        ]  # fmt: skip
        self.caches[0].native_appends = host_ops.host_ops_available()
        self.caches[1].native_appends = False
        self.caches[2].small_batch = 0
        self.open: list[tuple] = []  # the two caches' plans of each prepared or held append
        self.counter = 0
        for sid in IDS[:2]:  # most rules need a sequence
            self.both("create", sid)

    def both(self, op: str, *args: object) -> object:
        """`op` on every cache: the same outcome (for a prepare, the same plan)."""
        a, *rest = (_outcome(getattr(c, op), *args) for c in self.caches)
        for b in rest:
            if a[0] == "ok" and op == "prepare_append":
                assert b[0] == "ok" and _plan_state(a[1]) == _plan_state(b[1])
            else:
                assert a == b
        return tuple(x[1] for x in (a, *rest)) if a[0] == "ok" else None

    def both_plans(self, op: str, plans: tuple, *args: object, **kwargs: object) -> None:
        a, *rest = (_outcome(getattr(c, op), p, *args, **kwargs) for c, p in zip(self.caches, plans, strict=True))
        for b, plan in zip(rest, plans[1:], strict=True):
            assert a == b and _plan_state(plans[0]) == _plan_state(plan)

    def ids(self) -> list[str]:
        return self.caches[0].sequence_ids()

    @rule(sid=st.sampled_from(IDS))
    def create(self, sid: str) -> None:
        self.clock.t += 1
        self.both("create", sid)

    @precondition(lambda self: self.ids())
    @rule(data=st.data(), layer=st.integers(0, L - 1), n=st.integers(1, 3), off=st.sampled_from([0, 0, 0, 1, -1]),
          then=st.sampled_from(["commit", "hold", "keep open"]), writer=st.booleans())  # fmt: skip
    def prepare(self, data: st.DataObject, layer: int, n: int, off: int, then: str, writer: bool) -> None:
        self.clock.t += 1
        sids = data.draw(st.lists(st.sampled_from(self.ids()), min_size=1, max_size=4))  # duplicates too
        pos = [self.caches[0].get(s).lengths[layer] for s in sids]
        pos[0] += off  # sometimes a wrong position
        plans = self.both("prepare_append", layer, sids, np.asarray(pos), n)
        if plans is not None:
            self.open.append(plans)
            if then != "keep open":
                self.commit(len(self.open) - 1, then == "hold", writer)

    def commit(self, i: int, hold: bool, writer: bool = False) -> None:
        """Both caches commit; with `writer` the first one writes through `commit`'s writer (the
        step's fused RoPE + store path) while the second writes itself: the same slots and bytes."""
        plans = self.open[i]
        B, n = plans[0].batch_size, plans[0].num_tokens
        self.counter += B * n
        k = tokens(self.counter, B * n, HKV, 2).reshape(B, n, HKV, 2).transpose(0, 2, 1, 3)
        if writer:  # the fast paths write through the writer, the general path itself
            got = [
                _outcome(c.commit, p, k, -k, hold=hold, **({} if c is self.caches[-1] else
                                                            {"writer": _store_writer(c, k, -k)}))
                for c, p in zip(self.caches, plans, strict=True)
            ]  # fmt: skip
            for b, plan in zip(got[1:], plans[1:], strict=True):
                assert got[0] == b and _plan_state(plans[0]) == _plan_state(plan)
        else:
            self.both_plans("commit", plans, k, -k, hold=hold)
        if not hold:
            del self.open[i]

    @precondition(lambda self: self.open)
    @rule(data=st.data(), how=st.sampled_from(["commit", "hold", "finish", "rollback", "abort"]), writer=st.booleans())
    def end_or_advance(self, data: st.DataObject, how: str, writer: bool) -> None:
        i = data.draw(st.integers(0, len(self.open) - 1))
        plans, state = self.open[i], self.open[i][0].state
        if state == "prepared" and how in ("commit", "hold"):
            self.commit(i, how == "hold", writer)
        elif state == "prepared":
            self.both_plans("abort", plans)
            del self.open[i]
        elif how in ("finish", "rollback"):  # held
            self.both_plans(how, plans)
            del self.open[i]

    @precondition(lambda self: self.ids())
    @rule(data=st.data(), new=st.sampled_from(IDS))
    def fork(self, data: st.DataObject, new: str) -> None:
        self.clock.t += 1
        self.both("fork", data.draw(st.sampled_from(self.ids())), new)

    @precondition(lambda self: self.ids())
    @rule(data=st.data(), back=st.integers(0, 3))
    def truncate(self, data: st.DataObject, back: int) -> None:
        sid = data.draw(st.sampled_from(self.ids()))
        self.both("truncate", sid, max(0, min(self.caches[0].get(sid).lengths) - back))

    @precondition(lambda self: self.ids())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.both("release", data.draw(st.sampled_from(self.ids())))

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "caches"):
            return
        a, *rest = self.caches
        for b in rest:
            assert _cache_state(a) == _cache_state(b)
            for x, y in zip([*a.store.k, *a.store.v], [*b.store.k, *b.store.v], strict=True):
                np.testing.assert_array_equal(x, y)

    def teardown(self) -> None:
        if not hasattr(self, "caches"):
            return
        for plans in self.open:
            self.both_plans("finish" if plans[0].state == "held" else "abort", plans)
        for c in self.caches:
            check_invariants(c)


TestFastVsGeneral = FastVsGeneralMachine.TestCase
TestFastVsGeneral.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
