"""Trace-time tiling plan of one `attention_tkg` call on one NeuronCore.

Everything here is arithmetic on static shapes, evaluated while the kernel is traced. The rules
are the same as the host-side `tkg.kernel.decisions` (sharding, block-length resize, flash tiles,
batch tile, MM1 group); they are re-stated here in the NKI language subset because kernel code
cannot call host modules that use dataclasses or typing. `tests/test_nki_kernel.py` checks both
agree over a sweep of shapes.

Key layouts inside one flash (FA) tile of `nk` keys (`n_kt = nk / 128` key tiles; key tile t,
partition p; `lk` = key offset within the FA tile):
- "contig"  (flat, strided_mm1=False): lk = t*128 + p
- "strided" (flat, strided_mm1=True):  lk = p*n_kt + t   (each partition reads its keys, and so
  its V rows, as one contiguous run)
- "block"   (paged): fold f of 128 (sub-)blocks, one per partition, offset o in the block:
  lk = f*BLr*128 + p*BLr + o, key tile t = f*BLr + o
"""

from dataclasses import dataclass

import nki.language as nl

P_MAX = 128
PSUM_FMAX = 512  # fp32 per partition in one PSUM bank
MM1_GROUP_TILES = 32  # 4096 keys per MM1 group
FA_TILE = 8192  # flash tiling threshold and tile size, keys per core
SBUF_BATCH_BUDGET = 16 * 1024 * 1024  # bytes, the batch-tiling heuristic's budget


@dataclass
class TKGConfig(nl.NKIObject):
    """The kernel-side copy of `tkg.kernel.config.AttnTKGConfig` (same fields and meaning)."""

    bs: int = 1
    q_head: int = 1
    s_active: int = 1
    curr_sprior: int = 128
    full_sprior: int = 128
    d_head: int = 128
    block_len: int = 0
    tp_k_prior: bool = False
    strided_mm1: bool = True
    use_pos_id: bool = False
    fuse_rope: bool = False
    use_gpsimd_sb2sb: bool = True
    qk_in_sb: bool = False
    k_out_in_sb: bool = False
    out_in_sb: bool = False
    enable_fa_s_prior_tiling: bool = True


def lnc_sharding(bs: int, q_head: int, s_active: int, curr_sprior: int, n_prgs: int, fuse_rope: bool) -> str:
    """'batch', 'sequence' or 'none' (same rule as `decisions.lnc_sharding`)."""
    if n_prgs == 1:
        return "none"
    if bs % 2 == 0 and (not fuse_rope) and (bs * q_head * s_active > P_MAX or curr_sprior < 2 * P_MAX):
        return "batch"
    if curr_sprior >= 2 * P_MAX:
        return "sequence"
    return "none"


def block_resize_factor(n_blocks: int, block_len: int, sprior_prgs: int) -> int:
    """Smallest split of each block so every core gets a multiple of 128 sub-blocks.

    Same rule as `decisions.resize_block_len`; the factor is always a power of two dividing 128.
    """
    multiple = P_MAX * sprior_prgs
    assert (n_blocks * block_len) % multiple == 0, (
        f"attention_tkg: curr_sprior {n_blocks * block_len} must be a multiple of {multiple} for block KV"
    )
    for factor in range(1, block_len + 1):
        if block_len % factor == 0 and (n_blocks * factor) % multiple == 0:
            return factor
    return block_len


def mask_order_len(cfg: TKGConfig, n_prgs: int) -> int:
    """Order length R of a pre-generated block-KV mask: nki-library's reduced block length (same
    rule as `decisions.mask_block_len`): the largest divisor of block_len such that each core's
    keys (the library's key split) and its 8192-key flash tiles are whole folds of 128 R-blocks."""
    B = cfg.bs
    sp = cfg.curr_sprior
    cores = 1
    batch_split = B % 2 == 0 and (B * cfg.q_head * cfg.s_active > P_MAX or sp < 2 * P_MAX)
    if n_prgs == 2 and not batch_split and sp >= 2 * P_MAX:
        cores = 2
    assert sp % (P_MAX * cores) == 0, (
        f"attention_tkg: curr_sprior {sp} must be a multiple of {P_MAX * cores} with a pre-generated block mask"
    )
    per_core = sp // cores
    div = per_core // P_MAX
    if cfg.enable_fa_s_prior_tiling and per_core > FA_TILE:
        div = gcd(div, FA_TILE // P_MAX)
        last = per_core % FA_TILE
        if last > 0:
            div = gcd(div, last // P_MAX)
    return gcd(cfg.block_len, div)


def gcd(a: int, b: int) -> int:
    while b > 0:
        t = a % b
        a = b
        b = t
    return a


def fa_tile_keys(hs: int, fold_keys: int) -> int:
    """Keys per flash tile: 8192, fewer when H*S is so large one batch row's scores would not fit
    the SBUF budget (`8 * H*S * keys <= 16 MiB`), rounded to whole block folds for block KV."""
    cap = (SBUF_BATCH_BUDGET // (8 * hs)) // P_MAX * P_MAX
    tile = min(FA_TILE, max(P_MAX, cap))
    if fold_keys > 0:
        tile = max(fold_keys, (tile // fold_keys) * fold_keys)
    return tile


def batch_tile(bs: int, hs: int, fa_keys: int) -> int:
    """Batch rows per pass within the SBUF budget: `8 * rows * H*S * keys <= 16 MiB` (>= 1)."""
    per_row = 8 * hs * fa_keys
    return max(1, min(bs, SBUF_BATCH_BUDGET // per_row))


def mm1_group_tiles(hs: int) -> int:
    """128-key tiles per MM1 group: 32 (4096 keys), fewer so the group's H*S columns fit one bank."""
    return min(MM1_GROUP_TILES, PSUM_FMAX // hs)


def ilog2(x: int) -> int:
    n = 0
    while (1 << n) < x:
        n = n + 1
    return n


@dataclass
class TilePlan(nl.NKIObject):
    """Static work split and tiling of one call on one core (see module docstring)."""

    B: int = 1
    H: int = 1
    S: int = 1
    d: int = 128
    Sp: int = 128
    HS: int = 1
    BHS: int = 1
    n_prgs: int = 1
    prg_id: int = 0
    sharding: str = "none"
    works: bool = True  # False: this core idles (unsharded LNC2, core 1)
    bs_core: int = 1  # batch rows of this core
    b0: int = 0  # first global batch row of this core
    n_sp: int = 1  # cores the keys are split across
    sp_id: int = 0  # this core's index along the key split
    sp_core: int = 128  # keys of this core
    k0: int = 0  # first natural key of this core
    holds_active: bool = True  # the active tokens are among this core's keys
    layout: str = "contig"
    block_len: int = 0
    factor: int = 1  # block split factor (block KV)
    log2_factor: int = 0
    blr: int = 0  # reduced block length (block KV)
    mask_bl: int = 0  # order length of a pre-generated block-KV mask (nki-library's reduced length)
    fold_keys: int = 0  # keys per fold of 128 sub-blocks (block KV)
    n_blocks: int = 0  # blocks per sequence in the table
    sub0: int = 0  # first sub-block (after the split) of this core
    fa_starts: tuple = ()
    fa_sizes: tuple = ()
    n_fa: int = 1
    bt: int = 1  # batch rows per batch tile
    mm1_group: int = 1


def make_plan(cfg: TKGConfig, n_prgs: int, prg_id: int) -> TilePlan:
    """The plan of `cfg` for program `prg_id` of `n_prgs`."""
    assert n_prgs == 1 or n_prgs == 2, f"attention_tkg: launch grid {n_prgs} must be 1 or 2"
    pl = TilePlan()
    pl.B = cfg.bs
    pl.H = cfg.q_head
    pl.S = cfg.s_active
    pl.d = cfg.d_head
    pl.Sp = cfg.curr_sprior
    pl.HS = cfg.q_head * cfg.s_active
    pl.BHS = cfg.bs * pl.HS
    pl.n_prgs = n_prgs
    pl.prg_id = prg_id
    pl.sharding = lnc_sharding(cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, n_prgs, cfg.fuse_rope)
    pl.works = True
    pl.bs_core = cfg.bs
    pl.b0 = 0
    pl.n_sp = 1
    pl.sp_id = 0
    if pl.sharding == "batch":
        pl.bs_core = cfg.bs // n_prgs
        pl.b0 = prg_id * pl.bs_core
    elif pl.sharding == "sequence":
        pl.n_sp = n_prgs
        pl.sp_id = prg_id
    elif prg_id > 0:
        pl.works = False
    assert pl.Sp % (P_MAX * pl.n_sp) == 0, (
        f"attention_tkg: curr_sprior {pl.Sp} / {pl.n_sp} core(s) must be a multiple of {P_MAX}"
    )
    pl.sp_core = pl.Sp // pl.n_sp
    pl.k0 = pl.sp_id * pl.sp_core
    pl.holds_active = pl.sp_id == pl.n_sp - 1

    pl.block_len = cfg.block_len
    pl.fold_keys = 0
    if cfg.block_len > 0:
        pl.layout = "block"
        pl.n_blocks = cfg.curr_sprior // cfg.block_len
        pl.factor = block_resize_factor(pl.n_blocks, cfg.block_len, pl.n_sp)
        pl.log2_factor = ilog2(pl.factor)
        assert (1 << pl.log2_factor) == pl.factor, f"attention_tkg: block split {pl.factor} must be a power of 2"
        pl.blr = cfg.block_len // pl.factor
        pl.fold_keys = pl.blr * P_MAX
        pl.sub0 = pl.sp_id * (pl.n_blocks * pl.factor // pl.n_sp)
        if not cfg.use_pos_id:
            pl.mask_bl = mask_order_len(cfg, n_prgs)
            assert pl.mask_bl % pl.blr == 0 or pl.blr % pl.mask_bl == 0, (
                f"attention_tkg: block split {pl.blr} and mask order length {pl.mask_bl} must nest"
            )
    elif cfg.strided_mm1:
        pl.layout = "strided"
    else:
        pl.layout = "contig"

    tile = fa_tile_keys(pl.HS, pl.fold_keys)
    starts = ()
    sizes = ()
    if cfg.enable_fa_s_prior_tiling and pl.sp_core > tile:
        s = 0
        while s < pl.sp_core:
            starts = starts + (s,)
            sizes = sizes + (min(tile, pl.sp_core - s),)
            s = s + tile
    else:
        starts = (0,)
        sizes = (pl.sp_core,)
    pl.fa_starts = starts
    pl.fa_sizes = sizes
    pl.n_fa = len(starts)
    pl.bt = batch_tile(pl.bs_core, pl.HS, sizes[0])
    pl.mm1_group = mm1_group_tiles(pl.HS)
    return pl


def key_slot(pl: TilePlan, nk: int, lk: int) -> tuple:
    """(key tile t, partition p) of key offset `lk` within an FA tile of `nk` keys."""
    if pl.layout == "contig":
        return (lk // P_MAX, lk % P_MAX)
    if pl.layout == "strided":
        n_kt = nk // P_MAX
        return (lk % n_kt, lk // n_kt)
    f = lk // pl.fold_keys
    r = lk % pl.fold_keys
    return (f * pl.blr + r % pl.blr, r // pl.blr)


def active_runs(pl: TilePlan, fa_start: int, nk: int) -> tuple:
    """Where the S active tokens sit in an FA tile, as runs `(j0, count, t0, p0, dt, dp)`.

    Active token j (natural key Sp-S+j) sits at key tile t0 + i*dt, partition p0 + i*dp for
    j = j0 + i. Runs step along one axis only, so each run is one strided copy or DMA.
    Empty when this FA tile of this core holds no active token.
    """
    runs = ()
    if not pl.holds_active:
        return runs
    first = pl.Sp - pl.S - pl.k0 - fa_start  # local offset of active token 0
    if first + pl.S <= 0 or first >= nk:
        return runs
    cur = None
    for j in range(pl.S):
        lk = first + j
        if lk < 0 or lk >= nk:
            continue
        slot = key_slot(pl, nk, lk)
        t = slot[0]
        p = slot[1]
        if cur != None:
            n = cur[1]
            last_t = cur[2] + (n - 1) * cur[4]
            last_p = cur[3] + (n - 1) * cur[5]
            if n == 1 and ((t == last_t + 1 and p == last_p) or (t == last_t and p == last_p + 1)):
                cur = (cur[0], 2, cur[2], cur[3], t - last_t, p - last_p)
                continue
            if n > 1 and t == last_t + cur[4] and p == last_p + cur[5]:
                cur = (cur[0], n + 1, cur[2], cur[3], cur[4], cur[5])
                continue
            runs = runs + (cur,)
        cur = (j, 1, t, p, 1, 0)
    if cur != None:
        runs = runs + (cur,)
    return runs
