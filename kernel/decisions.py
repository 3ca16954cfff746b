"""Host-side decisions of the NKI kernel, as pure functions (design/kernel.md "tiling").

The NKI kernel makes these choices at trace time from static shapes. Keeping them here as plain
arithmetic lets the host (service planning, benchmarks, tests) reason about a call without the
Neuron SDK, and lets each rule be unit-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

P_MAX = 128  # SBUF/PSUM partitions
PSUM_FMAX = 512  # fp32 elements per partition in one PSUM bank
MM1_GROUP_KEYS = 4096  # keys per MM1 group: 32 tiles of 128 keys into one PSUM bank
FA_TILE = 8192  # flash tiling threshold and tile size, keys per core
SBUF_BATCH_BUDGET = 16 * 1024 * 1024  # bytes: the batch-tiling heuristic's budget

Sharding = Literal["batch", "sequence", "none"]


def lnc_sharding(
    bs: int, q_head: int, s_active: int, curr_sprior: int, lnc: int, fuse_rope: bool = False
) -> Sharding:
    """How two NeuronCores split one call.

    Batch sharding when B is even and (B*H*S > 128 or Sp < 256), and RoPE is not fused;
    else sequence sharding (each core half the keys) when Sp >= 256; else one core.
    """
    if lnc not in (1, 2):
        raise ValueError(f"lnc: {lnc} must be 1 or 2")
    if lnc == 1:
        return "none"
    if bs % 2 == 0 and not fuse_rope and (bs * q_head * s_active > P_MAX or curr_sprior < 2 * P_MAX):
        return "batch"
    if curr_sprior >= 2 * P_MAX:
        return "sequence"
    return "none"


def n_programs(sharding: Sharding, lnc: int) -> int:
    """Cores that take part in the call."""
    return lnc if sharding != "none" else 1


def sprior_programs(sharding: Sharding, lnc: int) -> int:
    """Cores the key axis is split across (1 unless sequence-sharded)."""
    return lnc if sharding == "sequence" else 1


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
    for factor in range(1, block_len + 1):
        if block_len % factor == 0 and (num_blocks_per_seq * factor) % multiple == 0:
            return block_len // factor, factor
    raise AssertionError("unreachable: factor=block_len always works when bucket % multiple == 0")


def resize_block_table(table: np.ndarray, factor: int) -> np.ndarray:
    """Block table after `resize_block_len`: id `old` becomes `old*factor + j` for j < factor.

    table: `[B, n]` uint32 -> `[B, n*factor]` uint32, sub-blocks of one block adjacent.
    The pool is reinterpreted as `[NB*factor, block_len/factor, d]` (a reshape, no copy).
    """
    t = np.asarray(table, dtype=np.uint64)
    new = t[:, :, None] * factor + np.arange(factor, dtype=np.uint64)[None, None, :]
    return new.reshape(t.shape[0], -1).astype(np.uint32)


def library_sprior_programs(bs: int, q_head: int, s_active: int, curr_sprior: int, lnc: int) -> int:
    """Cores the Neuron library splits the key axis across (its rule, which differs from
    `lnc_sharding` in one point: fused RoPE does not prevent its batch sharding).

    Two cores take half the keys each unless the batch is split instead (B even and
    (B*H*S > 128 or Sp < 256)), and only when Sp >= 256.
    """
    if lnc == 1:
        return 1
    batch_split = bs % 2 == 0 and (bs * q_head * s_active > P_MAX or curr_sprior < 2 * P_MAX)
    return lnc if not batch_split and curr_sprior >= 2 * P_MAX else 1


def mask_block_len(
    bs: int, q_head: int, s_active: int, curr_sprior: int, block_len: int, lnc: int = 1, flash: bool = True
) -> int:
    """Block length that orders a pre-generated block-KV mask (the Neuron library's convention).

    The library reduces block_len to the largest divisor R such that each core's keys are whole
    folds of 128 blocks of R tokens and, under flash tiling (> 8192 keys per core), so are the
    8192-key tiles and the last partial tile. The mask's row of natural key n is then
    `F*128*R + (n % R)*128 + (n % (128*R)) // R` with F = n // (128*R) (see
    `reference.unshuffle_block_mask`). R depends on lnc through the key split.

    Raises ValueError when Sp is not a multiple of 128 per core (no fold structure exists).
    """
    n = library_sprior_programs(bs, q_head, s_active, curr_sprior, lnc)
    if curr_sprior % (P_MAX * n):
        raise ValueError(
            f"cfg.curr_sprior: {curr_sprior} must be a multiple of {P_MAX * n} (128 keys x {n} core(s) at lnc={lnc})"
            " with a pre-generated block-KV mask: its keys come in folds of 128 blocks per core"
        )
    divisor = curr_sprior // (P_MAX * n)
    per_core = curr_sprior // n
    if flash and per_core > FA_TILE:
        divisor = math.gcd(divisor, FA_TILE // P_MAX)
        last = per_core % FA_TILE
        if last:
            divisor = math.gcd(divisor, last // P_MAX)
    return math.gcd(block_len, divisor)


def mm1_group_keys(q_head: int, s_active: int) -> int:
    """Keys per MM1 group: 4096, or fewer so that 32-tile groups of H*S fp32 fit one PSUM bank."""
    hs = q_head * s_active
    if hs > PSUM_FMAX:
        raise ValueError(f"q_head*s_active: {hs} exceeds {PSUM_FMAX}")
    return min(MM1_GROUP_KEYS, (PSUM_FMAX // hs) * P_MAX)


@dataclass(frozen=True)
class FlashTile:
    start: int  # first key of the tile, within the core's share
    size: int  # keys in the tile


def flash_tiles(sprior_per_core: int, enabled: bool = True, tile: int = FA_TILE) -> list[FlashTile]:
    """Flash (online-softmax) tiles over one core's keys; a single tile when not needed."""
    if sprior_per_core < 1:
        raise ValueError(f"sprior_per_core: {sprior_per_core} must be >= 1")
    if not enabled or sprior_per_core <= tile:
        return [FlashTile(0, sprior_per_core)]
    return [FlashTile(s, min(tile, sprior_per_core - s)) for s in range(0, sprior_per_core, tile)]


def batch_tile(bs: int, q_head: int, s_active: int, fa_tile_sprior: int) -> int:
    """Largest batch tile within the SBUF budget: 8 * tile * H * S * keys <= 16 MiB (>= 1)."""
    per_row = 8 * q_head * s_active * fa_tile_sprior
    return max(1, min(bs, SBUF_BATCH_BUDGET // per_row))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
