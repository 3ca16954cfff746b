"""Trace-time tiling plan of one `attention_tkg` call on one NeuronCore.

Everything here is arithmetic on static shapes, evaluated while the kernel is traced. The rules
(sharding, block-length resize, flash tiles, batch tile, MM1 group) live once in `rules.py`, which
the host-side `tkg.kernel.decisions` uses too; this module applies them to one call and core.

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

from tkg.kernel.nki_tkg.rules import (
    P_MAX,
    batch_tile,
    block_resize_factor,
    fa_tile_keys,
    fa_tiles,
    library_sprior_programs,
    lnc_sharding,
    mm1_group_tiles,
)
from tkg.kernel.nki_tkg.rules import mask_order_len as mask_order_len_of


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
    # Context parallelism (docs/context-parallel.md), our kernel only (not in AttnTKGConfig):
    return_lse: bool = False  # also write lse [B, H, S] fp32; out is then fp32 (P keeps q's dtype)
    attend_only: bool = False  # no active tokens: k_active/v_active/mask unused, generated mask only


def mask_order_len(cfg: TKGConfig, n_prgs: int) -> int:
    """Order length R of a pre-generated block-KV mask for this call (`rules.mask_order_len`)."""
    cores = library_sprior_programs(cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, n_prgs)
    assert cfg.curr_sprior % (P_MAX * cores) == 0, (
        f"attention_tkg: curr_sprior {cfg.curr_sprior} must be a multiple of {P_MAX * cores} with a pre-generated "
        "block mask"
    )
    return mask_order_len_of(
        cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, cfg.block_len, n_prgs, cfg.enable_fa_s_prior_tiling
    )


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
    holds_active: bool = True  # the active tokens are among this core's keys (never when attend-only)
    partial: bool = False  # return_lse or attend_only: a query may see no key (lse -inf, out 0)
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
    pl.holds_active = core_holds_active(pl.sp_id, pl.n_sp, cfg.attend_only)
    pl.partial = cfg.return_lse or cfg.attend_only
    if cfg.attend_only:
        assert cfg.use_pos_id and not cfg.fuse_rope, (
            "attention_tkg: attend_only: needs use_pos_id=True (the mask is generated from positions) and "
            "fuse_rope=False (no active tokens to rotate)"
        )

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
    tiles = fa_tiles(pl.sp_core, cfg.enable_fa_s_prior_tiling, tile)
    starts = tiles[0]
    sizes = tiles[1]
    pl.fa_starts = starts
    pl.fa_sizes = sizes
    pl.n_fa = len(starts)
    pl.bt = batch_tile(pl.bs_core, pl.HS, sizes[0])
    pl.mm1_group = mm1_group_tiles(pl.HS)
    return pl


def core_holds_active(sp_id: int, n_sp: int, attend_only: bool) -> bool:
    """Whether this core's keys include the S active tokens (the natural keys `[Sp-S, Sp)`): the
    last core along the key split, and nobody in an attend-only call, which has no active tokens
    (every query then attends only to cached keys, through the generated mask)."""
    return sp_id == n_sp - 1 and not attend_only


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
