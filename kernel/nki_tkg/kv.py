"""Loading one batch row's keys and values for one flash tile into SBUF.

Tiles (see `plan` for the key layouts):
- `kT` `[d, n_kt*128]` (io dtype): column `t*128 + p` holds key slot (t, p); the MM1 stationary.
- `vt` `[128, n_kt*d]` (io dtype): partition p, columns `t*d .. t*d+d` hold the value of slot (t, p);
  the MM2 stationary operand of key tile t is `vt[:, t*d:(t+1)*d]`.
- `kraw` `[128, n_kt*d]` (io dtype): keys with key slots on partitions, before the PE transpose
  (`tp_k_prior=True` flat caches and block caches).

The active tokens replace the cache slots `[Sp-S, Sp)` in SBUF after the cache is loaded; the
HBM cache is never written.
"""

import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.plan import P_MAX, TilePlan
from tkg.kernel.nki_tkg.psum import PSUM_BANK_BYTES, PsumRing
from tkg.kernel.nki_tkg.sbuf import dtype_bytes


def block_ids(pl: TilePlan, table, b0: int, bt: int, fold0: int, idx, jt):
    """Physical (sub-)block ids of folds `fold0 ..` of batch rows `b0 .. b0+bt` into `idx`
    `[128, bt*nf]` uint32, one DMA for the whole batch tile (K and V then share it): row bi's
    fold f is column `bi*nf + f` (see `row_ids`).

    Partition p of fold f reads sub-block `s = sub0 + (fold0+f)*128 + p` of the row, which is
    block `table[b, s // factor]` split `factor` ways: id `table[...] * factor + p % factor`
    (`jt` `[128, bt*nf]` holds `p % factor`). Unsplit blocks (factor 1) arrive by a DMA
    transpose of the rows' table entries, each row one contiguous run (a plain copy would move
    every 4-byte id as its own overhead-bound run); split ones by a copy whose stride-0 pattern
    repeats each entry `factor` times down the partitions.
    """
    nf = idx.shape[1] // bt
    per = P_MAX // pl.factor
    first = (pl.sub0 + fold0 * P_MAX) // pl.factor
    off = b0 * pl.n_blocks + first
    if pl.factor == 1:
        # src (row, fold, partition) -> dst (partition, fold, row): column f*bt + bi, reordered below.
        src = table.ap([[pl.n_blocks, bt], [P_MAX, nf], [1, P_MAX]], offset=off)
        dst = idx.ap([[bt * nf, P_MAX], [1, nf], [nf, bt]], offset=0)
        nisa.dma_transpose(dst, src, axes=(2, 1, 0))
        return
    src = table.ap([[1, per], [0, pl.factor], [pl.n_blocks, bt], [per, nf]], offset=off)
    nisa.dma_copy(idx, src, dge_mode=nisa.dge_mode.none)
    nisa.tensor_scalar(idx, idx, op0=nl.left_shift, operand0=pl.log2_factor)
    nisa.tensor_tensor(idx, idx, jt, op=nl.bitwise_or)


def row_ids(idx, bi: int, nf: int):
    """Row bi's `[128, nf]` block ids in a batch tile's `block_ids` tile."""
    return idx[:, bi * nf : (bi + 1) * nf]


def sub_block_offsets(pl: TilePlan, jt):
    """`jt` `[128, nf]` uint32 = partition index mod the block split factor."""
    nf = jt.shape[1]
    nisa.iota(jt, pattern=[[0, nf]], offset=0, channel_multiplier=1)
    nisa.tensor_scalar(jt, jt, op0=nl.bitwise_and, operand0=pl.factor - 1)


def gather_blocks(pl: TilePlan, pool, idx, dst):
    """Indirect DMA: fold f of `dst` `[128, nf*blr*d]` <- one (sub-)block per partition, ids `idx[:, f]`."""
    d = pool.shape[2]
    n_sub = pool.shape[0] * pl.factor
    pool_r = pool.reshape((n_sub, pl.blr, d))
    w = pl.blr * d
    for f in range(idx.shape[1]):
        nisa.dma_copy(
            dst[:, f * w : (f + 1) * w],
            pool_r.ap([[w, P_MAX], [1, w]], offset=0, vector_offset=idx[:, f : f + 1], indirect_dim=0),
            oob_mode=nisa.oob_mode.error,
            dge_mode=nisa.dge_mode.swdge,
        )


def transpose_keys(kraw, kT, d: int, n_kt: int, ring: PsumRing):
    """kT[:, t*128:(t+1)*128] = kraw[:, t*d:(t+1)*d]^T on the PE, several tiles per PSUM bank."""
    per_bank = PSUM_BANK_BYTES // (P_MAX * dtype_bytes(kraw.dtype))
    for t0 in range(0, n_kt, per_bank):
        g = min(per_bank, n_kt - t0)
        ps = ring.next((d, g * P_MAX), kraw.dtype, "kT")
        for i in range(g):
            t = t0 + i
            nisa.nc_transpose(ps[:, i * P_MAX : (i + 1) * P_MAX], kraw[:, t * d : (t + 1) * d])
        nisa.tensor_copy(kT[:, t0 * P_MAX : (t0 + g) * P_MAX], ps)


def keys_by_dma_transpose(pl: TilePlan, cfg, kdt, cache_dt) -> bool:
    """K rows reach `kT` transposed by the DMA (no PE transposes, no PSUM evacuation): key rows of
    d=128 in a 2-byte dtype, contiguous (flat `tp_k_prior`) or gathered by block (reduced block
    length >= 8: below that the transfer overhead outweighs it). nki-library's rule for the same
    choice (attention_tkg `use_dma_transpose`). `kdt`: kT's dtype; `cache_dt`: the K cache's (a
    DMA transpose does not convert)."""
    if pl.d != P_MAX or dtype_bytes(kdt) != 2 or kdt != cache_dt:
        return False
    if pl.layout == "block":
        return pl.blr >= 8
    return pl.layout == "contig" and cfg.tp_k_prior


def dma_transpose_keys(pl: TilePlan, cfg, k_prior, b: int, ks: int, nk: int, kT, idx):
    """kT `[d, nk]` <- K rows of row b by DMA transpose, in the key-slot order of `transpose_keys`
    (4-D views `(rows, 1, n, d)` -> `(d, 1, n, rows)`, the form the DMA transposes)."""
    d = pl.d
    if pl.layout == "block":
        w = pl.blr * d
        n_sub = k_prior.shape[0] * pl.factor
        pool4 = k_prior.reshape((n_sub, 1, pl.blr, d))
        for f in range(idx.shape[1]):
            # Fold f: column f*blr*128 + j*128 + p of kT = key j of the sub-block on partition p.
            dst = kT.ap([[nk, d], [1, 1], [P_MAX, pl.blr], [1, P_MAX]], offset=f * pl.blr * P_MAX)
            pattern = [[w, P_MAX], [1, 1], [d, pl.blr], [1, d]]
            src = pool4.ap(pattern, offset=0, vector_offset=idx[:, f : f + 1], indirect_dim=0)
            nisa.dma_transpose(dst, src, axes=(3, 1, 2, 0), dge_mode=nisa.dge_mode.swdge)
        return
    base = (b * cfg.full_sprior + ks) * d
    nisa.dma_transpose(
        kT.ap([[nk, d], [1, 1], [1, 1], [1, nk]], offset=0),
        k_prior.ap([[d, nk], [1, 1], [1, 1], [1, d]], offset=base),
        axes=(3, 1, 2, 0),
    )


def load_keys(pl: TilePlan, cfg, k_prior, b: int, ks: int, nk: int, kT, kraw, idx, ring: PsumRing):
    """K^T of batch row b, natural keys `[ks, ks+nk)`, into `kT` (via `kraw` when transposing on the PE)."""
    d = pl.d
    n_kt = nk // P_MAX
    if kraw == None and keys_by_dma_transpose(pl, cfg, kT.dtype, k_prior.dtype):
        dma_transpose_keys(pl, cfg, k_prior, b, ks, nk, kT, idx)
        return
    if pl.layout == "block":
        gather_blocks(pl, k_prior, idx, kraw)
        transpose_keys(kraw, kT, d, n_kt, ring)
    elif cfg.tp_k_prior:
        # [B+, 1, Spf, d]: key rows on partitions, then PE transposes.
        base = (b * cfg.full_sprior + ks) * d
        if pl.layout == "strided":
            src = k_prior.ap([[n_kt * d, P_MAX], [1, n_kt * d]], offset=base)
        else:
            src = k_prior.ap([[d, P_MAX], [P_MAX * d, n_kt], [1, d]], offset=base)
        nisa.dma_copy(kraw, src, dge_mode=nisa.dge_mode.none)
        transpose_keys(kraw, kT, d, n_kt, ring)
    else:
        # [B+, 1, d, Spf]: already transposed; strided_mm1 reads every n_kt-th key per column block.
        spf = cfg.full_sprior
        base = b * d * spf + ks
        if pl.layout == "strided":
            src = k_prior.ap([[spf, d], [1, n_kt], [n_kt, P_MAX]], offset=base)
        else:
            src = k_prior.ap([[spf, d], [1, nk]], offset=base)
        nisa.dma_copy(kT, src, dge_mode=nisa.dge_mode.none)


def load_values(pl: TilePlan, cfg, v_prior, b: int, ks: int, nk: int, vt, idx):
    """V of batch row b, natural keys `[ks, ks+nk)`, into `vt`."""
    d = pl.d
    n_kt = nk // P_MAX
    if pl.layout == "block":
        gather_blocks(pl, v_prior, idx, vt)
        return
    base = (b * cfg.full_sprior + ks) * d
    if pl.layout == "strided":
        src = v_prior.ap([[n_kt * d, P_MAX], [1, n_kt * d]], offset=base)
    else:
        src = v_prior.ap([[d, P_MAX], [P_MAX * d, n_kt], [1, d]], offset=base)
    nisa.dma_copy(vt, src, dge_mode=nisa.dge_mode.none)


def put_active_keys(pl: TilePlan, kT, ka_sb, b: int, runs: tuple):
    """Overwrite the K^T columns of the active slots with k_active (`ka_sb` `[d, B*S]`)."""
    col = b * pl.S
    for r in range(len(runs)):
        run = runs[r]
        j0 = run[0]
        n = run[1]
        c0 = run[2] * P_MAX + run[3]
        step = run[4] * P_MAX + run[5]
        src = ka_sb[:, col + j0 : col + j0 + n]
        if n == 1:
            nisa.tensor_copy(kT[:, c0 : c0 + 1], src)
        else:
            nisa.tensor_copy(kT[:, c0 : c0 + (n - 1) * step + 1 : step], src)


def put_active_values(pl: TilePlan, vt, v_active, b: int, runs: tuple):
    """Overwrite the V rows of the active slots with v_active `[B, 1, S, d]` (DMA: crosses partitions)."""
    d = pl.d
    for r in range(len(runs)):
        run = runs[r]
        j0 = run[0]
        n = run[1]
        t0 = run[2]
        p0 = run[3]
        # Along key tiles on one partition, or along partitions in one key tile.
        dst = vt[p0 : p0 + 1, t0 * d : (t0 + n) * d] if run[5] == 0 else vt[p0 : p0 + n, t0 * d : (t0 + 1) * d]
        nisa.dma_copy(dst, v_active[b, 0, j0 : j0 + n, :], dge_mode=nisa.dge_mode.none)
