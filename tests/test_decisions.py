"""Unit tests of kernel/decisions.py: the NKI kernel's host-side choices, rule by rule.

Each rule of docs/design/kernel.md ("What the NKI implementation must reproduce") is checked at its
boundaries by hand and, where it has one, against its defining property over many inputs
(hypothesis), written here independently of the implementation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tkg.kernel import decisions as D

# --- LNC sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bs", "q_head", "s_active", "sprior", "fuse_rope", "expected"),
    [
        (2, 1, 1, 255, False, "batch"),  # B even, Sp < 256
        (2, 1, 1, 256, False, "sequence"),  # B even but B*H*S = 2 <= 128 and Sp >= 256
        (2, 64, 1, 4096, False, "sequence"),  # B*H*S = 128: not more than 128
        (2, 65, 1, 4096, False, "batch"),  # B*H*S = 130 > 128
        (4, 8, 4, 8192, False, "sequence"),  # B*H*S = 128 exactly: keys split instead
        (3, 64, 1, 4096, False, "sequence"),  # B odd: never batch
        (3, 1, 1, 255, False, "none"),  # B odd and too few keys to split
        (1, 1, 1, 128, False, "none"),
        (2, 1, 1, 128, True, "none"),  # fused RoPE forbids batch sharding; 128 keys cannot split
        (2, 65, 1, 4096, True, "sequence"),  # ... so it falls back to sequence sharding
    ],
)
def test_lnc2_sharding_table(bs: int, q_head: int, s_active: int, sprior: int, fuse_rope: bool, expected: str) -> None:
    assert D.lnc_sharding(bs, q_head, s_active, sprior, 2, fuse_rope) == expected


@given(
    bs=st.integers(1, 16), q_head=st.integers(1, 64), s_active=st.integers(1, 8),
    sprior=st.integers(1, 20000), fuse_rope=st.booleans(),
)  # fmt: skip
def test_lnc2_sharding_properties(bs: int, q_head: int, s_active: int, sprior: int, fuse_rope: bool) -> None:
    """What each answer promises, checked from outside: a batch split gives each core whole rows and
    never splits a fused-RoPE call; a key split needs two cores' worth of 128-key tiles; a
    splittable call is never left on one core; one core never shards."""
    got = D.lnc_sharding(bs, q_head, s_active, sprior, 2, fuse_rope)
    if got == "batch":
        assert bs % 2 == 0 and not fuse_rope
    if got == "sequence":
        assert sprior >= 256
    if got == "none":
        assert sprior < 256 and (bs % 2 or fuse_rope)
    if sprior < 256 and bs % 2 == 0 and not fuse_rope:
        assert got == "batch"  # keys too few to split: rows are
    if fuse_rope or bs % 2:
        assert got != "batch"
    assert D.lnc_sharding(bs, q_head, s_active, sprior, 1, fuse_rope) == "none"
    assert D.n_programs(got, 2) == (1 if got == "none" else 2)
    assert D.sprior_programs(got, 2) == (2 if got == "sequence" else 1)


def test_programs_with_one_core() -> None:
    assert D.n_programs("none", 1) == 1
    assert D.sprior_programs("none", 1) == 1
    assert D.n_programs("batch", 2) == 2 and D.sprior_programs("batch", 2) == 1


@pytest.mark.parametrize("lnc", [0, 3, -1])
def test_lnc_must_be_1_or_2(lnc: int) -> None:
    with pytest.raises(ValueError, match=f"lnc: {lnc} must be 1 or 2"):
        D.lnc_sharding(2, 1, 1, 256, lnc)


# --- block-length resize --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nblk", "block_len", "cores", "expected"),
    [
        (128, 16, 1, (16, 1)),  # already one fold
        (16, 16, 1, (2, 8)),  # 256 keys: 128 sub-blocks of 2
        (128, 16, 2, (8, 2)),  # two cores: 256 sub-blocks
        (192, 2, 1, (1, 2)),  # 384 keys: only block_len 1 gives a multiple of 128 blocks
        (1, 128, 1, (1, 128)),
        (96, 32, 1, (8, 4)),  # 3072 keys = 384 sub-blocks of 8
    ],
)
def test_resize_block_len_examples(nblk: int, block_len: int, cores: int, expected: tuple[int, int]) -> None:
    assert D.resize_block_len(nblk, block_len, cores) == expected


@given(
    nblk=st.integers(1, 600),
    block_len=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32, 64]),
    cores=st.sampled_from([1, 2]),
)
def test_resize_block_len_is_the_largest_split_that_fills_folds(nblk: int, block_len: int, cores: int) -> None:
    bucket = nblk * block_len
    multiple = 128 * cores
    if bucket % multiple:
        with pytest.raises(ValueError, match=f"curr_sprior: {bucket} .* must be a multiple of {multiple}"):
            D.resize_block_len(nblk, block_len, cores)
        return
    reduced, factor = D.resize_block_len(nblk, block_len, cores)
    assert reduced * factor == block_len
    assert (nblk * factor) % multiple == 0  # whole folds of 128 blocks on every core
    # Largest: no longer sub-block (a divisor of block_len) fills the folds.
    for longer in range(reduced + 1, block_len + 1):
        if block_len % longer == 0:
            assert (bucket // longer) % multiple != 0
    assert reduced == math.gcd(block_len, bucket // multiple)  # the same thing in closed form


@pytest.mark.parametrize(("nblk", "block_len"), [(0, 16), (4, 0)])
def test_resize_block_len_rejects_empty(nblk: int, block_len: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        D.resize_block_len(nblk, block_len)


def test_resize_block_table_by_hand() -> None:
    table = np.array([[3, 0], [1, 2]], dtype=np.uint32)
    np.testing.assert_array_equal(
        D.resize_block_table(table, 3), [[9, 10, 11, 0, 1, 2], [3, 4, 5, 6, 7, 8]]
    )
    assert D.resize_block_table(table, 3).dtype == np.uint32
    np.testing.assert_array_equal(D.resize_block_table(table, 1), table)


@given(
    B=st.integers(1, 3), nblk=st.integers(1, 6), block_len=st.sampled_from([2, 4, 8]),
    factor_log=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_resized_table_reads_the_same_keys(B: int, nblk: int, block_len: int, factor_log: int, seed: int) -> None:
    """Splitting blocks and reshaping the pool (no copy) must gather the very same key sequence."""
    factor = min(2**factor_log, block_len)
    rng = np.random.default_rng(seed)
    NB = B * nblk + 2
    pool = rng.standard_normal((NB, block_len, 3)).astype(np.float32)
    table = rng.permutation(NB)[: B * nblk].reshape(B, nblk).astype(np.uint32)
    before = pool[table.astype(np.int64)].reshape(B, nblk * block_len, 3)
    split = pool.reshape(NB * factor, block_len // factor, 3)
    new_table = D.resize_block_table(table, factor).astype(np.int64)
    after = split[new_table].reshape(B, nblk * block_len, 3)
    np.testing.assert_array_equal(after, before)


# --- MM1 groups, flash tiles, batch tiles ---------------------------------------------------------


@pytest.mark.parametrize(
    ("q_head", "s_active", "keys"),
    [(1, 1, 4096), (2, 8, 4096), (4, 4, 4096), (17, 1, 3840), (8, 8, 1024), (64, 8, 128), (3, 7, 3072)],
)
def test_mm1_group_keys_examples(q_head: int, s_active: int, keys: int) -> None:
    assert D.mm1_group_keys(q_head, s_active) == keys


@given(hs=st.integers(1, 512))
def test_mm1_group_fills_at_most_one_psum_bank(hs: int) -> None:
    keys = D.mm1_group_keys(hs, 1)
    tiles = keys // 128
    assert keys % 128 == 0 and 1 <= tiles <= 32
    assert tiles * hs <= 512  # fp32 scores of the group fit one 2 KiB bank per partition
    assert tiles == 32 or (tiles + 1) * hs > 512  # and the group is as large as allowed


def test_mm1_group_rejects_too_many_queries() -> None:
    with pytest.raises(ValueError, match="q_head\\*s_active: 513 exceeds 512"):
        D.mm1_group_keys(513, 1)


def test_flash_tiles_single_when_not_needed() -> None:
    assert D.flash_tiles(8192) == [D.FlashTile(0, 8192)]
    assert D.flash_tiles(100_000, enabled=False) == [D.FlashTile(0, 100_000)]
    assert D.flash_tiles(8193) == [D.FlashTile(0, 8192), D.FlashTile(8192, 1)]


@given(keys=st.integers(1, 70_000), tile=st.sampled_from([128, 2048, 8192]))
def test_flash_tiles_cover_the_keys_in_order(keys: int, tile: int) -> None:
    tiles = D.flash_tiles(keys, tile=tile)
    assert tiles[0].start == 0
    for a, b in itertools.pairwise(tiles):
        assert b.start == a.start + a.size
    assert tiles[-1].start + tiles[-1].size == keys
    if keys > tile:
        assert all(t.size == tile for t in tiles[:-1]) and 1 <= tiles[-1].size <= tile
    else:
        assert len(tiles) == 1


def test_flash_tiles_rejects_no_keys() -> None:
    with pytest.raises(ValueError, match="sprior_per_core: 0 must be >= 1"):
        D.flash_tiles(0)


@given(bs=st.integers(1, 256), q_head=st.integers(1, 64), s_active=st.integers(1, 8), keys=st.integers(1, 8192))
def test_batch_tile_is_the_largest_within_budget(bs: int, q_head: int, s_active: int, keys: int) -> None:
    tile = D.batch_tile(bs, q_head, s_active, keys)
    per_row = 8 * q_head * s_active * keys
    assert 1 <= tile <= bs
    assert tile == 1 or tile * per_row <= 16 * 1024 * 1024
    assert tile == bs or (tile + 1) * per_row > 16 * 1024 * 1024


def test_batch_tile_examples() -> None:
    assert D.batch_tile(64, 8, 8, 8192) == 4  # 8*8*8*8192 = 4 MiB per row
    assert D.batch_tile(2, 1, 1, 128) == 2
    assert D.batch_tile(8, 64, 8, 8192) == 1  # one row is over budget: still 1


@pytest.mark.parametrize(("x", "m", "expected"), [(0, 16, 0), (1, 16, 16), (16, 16, 16), (17, 16, 32), (5, 1, 5)])
def test_round_up(x: int, m: int, expected: int) -> None:
    assert D.round_up(x, m) == expected
