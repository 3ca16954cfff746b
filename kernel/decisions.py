"""Host-side decisions of the NKI kernel, as pure functions (docs/design/kernel.md "tiling").

The rules themselves live once, in `tkg.kernel.nki_tkg.rules` (plain arithmetic the kernel also
runs while it is traced); this module is their host face: typed, with argument checks whose
messages name the limit, plus host-only helpers (`resize_block_table`, `round_up`). The host
(service planning, benchmarks, tests) can reason about a call without the Neuron SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from tkg.kernel.nki_tkg import rules
from tkg.kernel.nki_tkg.rules import FA_TILE, MM1_GROUP_TILES, P_MAX, PSUM_FMAX, SBUF_BATCH_BUDGET

MM1_GROUP_KEYS = MM1_GROUP_TILES * P_MAX  # keys per MM1 group: 32 tiles of 128 keys into one PSUM bank

Sharding = Literal["batch", "sequence", "none"]

__all__ = [
    "FA_TILE",
    "MM1_GROUP_KEYS",
    "PSUM_FMAX",
    "P_MAX",
    "SBUF_BATCH_BUDGET",
    "FlashTile",
    "Sharding",
    "batch_tile",
    "flash_tiles",
    "library_sprior_programs",
    "lnc_sharding",
    "mask_block_len",
    "mm1_group_keys",
    "n_programs",
    "resize_block_len",
    "resize_block_table",
    "round_up",
    "sprior_programs",
]  # fmt: skip


def lnc_sharding(bs: int, q_head: int, s_active: int, curr_sprior: int, lnc: int, fuse_rope: bool = False) -> Sharding:
    """How two NeuronCores split one call (`rules.lnc_sharding`); ValueError for an lnc not 1 or 2."""
    if lnc not in (1, 2):
        raise ValueError(f"lnc: {lnc} must be 1 or 2")
    return cast(Sharding, rules.lnc_sharding(bs, q_head, s_active, curr_sprior, lnc, fuse_rope))


def n_programs(sharding: Sharding, lnc: int) -> int:
    """Cores that take part in the call."""
    return lnc if sharding != "none" else 1


def sprior_programs(sharding: Sharding, lnc: int) -> int:
    """Cores the key axis is split across (1 unless sequence-sharded)."""
    return int(rules.sprior_programs(sharding, lnc))


def resize_block_len(num_blocks_per_seq: int, block_len: int, sprior_prgs: int = 1) -> tuple[int, int]:
    """Split blocks so each core's block count is a multiple of 128 (one block per partition).

    Returns `(reduced_block_len, factor)` with the largest reduced length that works:
    block i becomes sub-blocks `i*factor + j`, j < factor, each `block_len // factor` tokens.
    Raises ValueError when the bucket (`num_blocks_per_seq * block_len`) is not a multiple of
    `128 * sprior_prgs`, since then no split can work.
    """
    if num_blocks_per_seq < 1 or block_len < 1:
        raise ValueError(f"num_blocks_per_seq={num_blocks_per_seq}, block_len={block_len}: must be >= 1")
    multiple = P_MAX * sprior_prgs
    bucket = num_blocks_per_seq * block_len
    if bucket % multiple:
        raise ValueError(
            f"curr_sprior: {bucket} (= {num_blocks_per_seq} blocks x {block_len}) must be a multiple of "
            f"{multiple} (128 partitions x {sprior_prgs} cores) for block KV"
        )
    factor = int(rules.block_resize_factor(num_blocks_per_seq, block_len, sprior_prgs))
    return block_len // factor, factor


def resize_block_table(table: np.ndarray, factor: int) -> np.ndarray:
    """Block table after `resize_block_len`: id `old` becomes `old*factor + j` for j < factor.

    table: `[B, n]` uint32 -> `[B, n*factor]` uint32, sub-blocks of one block adjacent.
    The pool is reinterpreted as `[NB*factor, block_len/factor, d]` (a reshape, no copy).
    """
    t = np.asarray(table, dtype=np.uint64)
    new = t[:, :, None] * factor + np.arange(factor, dtype=np.uint64)[None, None, :]
    return new.reshape(t.shape[0], -1).astype(np.uint32)


def library_sprior_programs(bs: int, q_head: int, s_active: int, curr_sprior: int, lnc: int) -> int:
    """Cores the Neuron library splits the key axis across (`rules.library_sprior_programs`: unlike
    `lnc_sharding`, fused RoPE does not prevent its batch sharding)."""
    return int(rules.library_sprior_programs(bs, q_head, s_active, curr_sprior, lnc))


def mask_block_len(
    bs: int, q_head: int, s_active: int, curr_sprior: int, block_len: int, lnc: int = 1, flash: bool = True
) -> int:
    """Block length that orders a pre-generated block-KV mask (the Neuron library's convention,
    `rules.mask_order_len`).

    The mask's row of natural key n is then `F*128*R + (n % R)*128 + (n % (128*R)) // R` with
    F = n // (128*R) (see `reference.unshuffle_block_mask`). R depends on lnc through the key split.
    Raises ValueError when Sp is not a multiple of 128 per core (no fold structure exists).
    """
    n = library_sprior_programs(bs, q_head, s_active, curr_sprior, lnc)
    if curr_sprior % (P_MAX * n):
        raise ValueError(
            f"cfg.curr_sprior: {curr_sprior} must be a multiple of {P_MAX * n} (128 keys x {n} core(s) at lnc={lnc})"
            " with a pre-generated block-KV mask: its keys come in folds of 128 blocks per core"
        )
    return int(rules.mask_order_len(bs, q_head, s_active, curr_sprior, block_len, lnc, flash))


def mm1_group_keys(q_head: int, s_active: int) -> int:
    """Keys per MM1 group: 4096, or fewer so that 32-tile groups of H*S fp32 fit one PSUM bank."""
    hs = q_head * s_active
    if hs > PSUM_FMAX:
        raise ValueError(f"q_head*s_active: {hs} exceeds {PSUM_FMAX}")
    return int(rules.mm1_group_tiles(hs)) * P_MAX


@dataclass(frozen=True)
class FlashTile:
    start: int  # first key of the tile, within the core's share
    size: int  # keys in the tile


def flash_tiles(sprior_per_core: int, enabled: bool = True, tile: int = FA_TILE) -> list[FlashTile]:
    """Flash (online-softmax) tiles over one core's keys; a single tile when not needed."""
    if sprior_per_core < 1:
        raise ValueError(f"sprior_per_core: {sprior_per_core} must be >= 1")
    starts, sizes = rules.fa_tiles(sprior_per_core, enabled, tile)
    return [FlashTile(s, n) for s, n in zip(starts, sizes, strict=True)]


def batch_tile(bs: int, q_head: int, s_active: int, fa_tile_sprior: int) -> int:
    """Largest batch tile within the SBUF budget: 8 * tile * H * S * keys <= 16 MiB (>= 1)."""
    return int(rules.batch_tile(bs, q_head * s_active, fa_tile_sprior))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
