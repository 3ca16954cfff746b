"""The tiling and sharding rules of `attention_tkg`, in one place (docs/design/kernel.md "tiling").

Plain integer arithmetic in the NKI language subset (no `nki` import, no dataclasses, no typing),
so the same functions run while the kernel is traced (`plan.make_plan`) and on the host
(`tkg.kernel.decisions`, which adds checks with messages, and the service's planning).
"""

P_MAX = 128  # SBUF/PSUM partitions
PSUM_FMAX = 512  # fp32 elements per partition in one PSUM bank
MM1_GROUP_TILES = 32  # 128-key tiles per MM1 group: 4096 keys into one PSUM bank
FA_TILE = 8192  # flash tiling threshold and tile size, keys per core
SBUF_BATCH_BUDGET = 16 * 1024 * 1024  # bytes: the batch-tiling heuristic's budget


def lnc_sharding(bs, q_head, s_active, curr_sprior, n_prgs, fuse_rope):
    """How `n_prgs` NeuronCores split one call: 'batch', 'sequence' or 'none'.

    Batch sharding when B is even and (B*H*S > 128 or Sp < 256), and RoPE is not fused; else
    sequence sharding (each core half the keys) when Sp >= 256; else one core.
    """
    if n_prgs == 1:
        return "none"
    if bs % 2 == 0 and (not fuse_rope) and (bs * q_head * s_active > P_MAX or curr_sprior < 2 * P_MAX):
        return "batch"
    if curr_sprior >= 2 * P_MAX:
        return "sequence"
    return "none"


def sprior_programs(sharding, n_prgs):
    """Cores the key axis is split across (1 unless sequence-sharded)."""
    if sharding == "sequence":
        return n_prgs
    return 1


def block_resize_factor(n_blocks, block_len, sprior_prgs):
    """Smallest split of each block so every core gets a multiple of 128 sub-blocks (one per
    partition): block i becomes sub-blocks `i*factor + j`, each `block_len // factor` tokens."""
    multiple = P_MAX * sprior_prgs
    assert (n_blocks * block_len) % multiple == 0, (
        f"attention_tkg: curr_sprior {n_blocks * block_len} must be a multiple of {multiple} for block KV"
    )
    for factor in range(1, block_len + 1):
        if block_len % factor == 0 and (n_blocks * factor) % multiple == 0:
            return factor
    return block_len


def library_sprior_programs(bs, q_head, s_active, curr_sprior, n_prgs):
    """Cores the Neuron library splits the key axis across: its rule differs from `lnc_sharding`
    in one point, fused RoPE does not prevent its batch sharding. Two cores take half the keys each
    unless the batch is split instead (B even and (B*H*S > 128 or Sp < 256)), and only when Sp >= 256."""
    if n_prgs == 1:
        return 1
    batch_split = bs % 2 == 0 and (bs * q_head * s_active > P_MAX or curr_sprior < 2 * P_MAX)
    if (not batch_split) and curr_sprior >= 2 * P_MAX:
        return n_prgs
    return 1


def gcd(a, b):
    while b > 0:
        t = a % b
        a = b
        b = t
    return a


def mask_order_len(bs, q_head, s_active, curr_sprior, block_len, n_prgs, flash):
    """Order length R of a pre-generated block-KV mask (the Neuron library's convention): the
    largest divisor of block_len such that each core's keys (the library's key split) and, under
    flash tiling (> 8192 keys per core), its 8192-key tiles and last partial tile are whole folds
    of 128 blocks of R tokens. Needs curr_sprior a multiple of 128 per core."""
    cores = library_sprior_programs(bs, q_head, s_active, curr_sprior, n_prgs)
    per_core = curr_sprior // cores
    div = per_core // P_MAX
    if flash and per_core > FA_TILE:
        div = gcd(div, FA_TILE // P_MAX)
        last = per_core % FA_TILE
        if last > 0:
            div = gcd(div, last // P_MAX)
    return gcd(block_len, div)


def fa_tile_keys(hs, fold_keys):
    """Keys per flash tile: 8192, fewer when H*S is so large one batch row's scores would not fit
    the SBUF budget (`8 * H*S * keys <= 16 MiB`), rounded to whole block folds for block KV."""
    cap = (SBUF_BATCH_BUDGET // (8 * hs)) // P_MAX * P_MAX
    tile = min(FA_TILE, max(P_MAX, cap))
    if fold_keys > 0:
        tile = max(fold_keys, (tile // fold_keys) * fold_keys)
    return tile


def fa_tiles(sp_core, enabled, tile):
    """Flash tiles over one core's `sp_core` keys: (starts, sizes); one tile when not needed."""
    if not enabled or sp_core <= tile:
        return ((0,), (sp_core,))
    starts = ()
    sizes = ()
    s = 0
    while s < sp_core:
        starts = starts + (s,)
        sizes = sizes + (min(tile, sp_core - s),)
        s = s + tile
    return (starts, sizes)


def batch_tile(bs, hs, fa_keys):
    """Batch rows per pass within the SBUF budget: `8 * rows * H*S * keys <= 16 MiB` (>= 1)."""
    per_row = 8 * hs * fa_keys
    return max(1, min(bs, SBUF_BATCH_BUDGET // per_row))


def mm1_group_tiles(hs):
    """128-key tiles per MM1 group: 32 (4096 keys), fewer so the group's H*S columns fit one bank."""
    return min(MM1_GROUP_TILES, PSUM_FMAX // hs)
