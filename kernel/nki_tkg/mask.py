"""The uint8 attention predicate of one batch row for one flash tile.

`mt` `[128, n_kt*H*S]` uint8: partition p, columns `t*HS .. t*HS+HS` hold `mask[key(t, p), b, h, s]`
for the key slot (t, p) of the plan's layout (nonzero = attend). MM1 evacuates PSUM through it
with a predicated copy onto a `-inf`-filled score tile.

- Pre-generated masks (`use_pos_id=False`) are DMA'd from HBM with an access pattern that
  visits the caller's key order in the kernel's slot order: natural order for flat caches; for
  block caches nki-library's fold-shuffled order (folds of `128*R` keys with R = `pl.mask_bl`,
  its lnc-dependent reduced block length, see `reference.unshuffle_block_mask`), re-mapped when
  the kernel's own block split differs from R.
- Generated masks (`use_pos_id=True`): key k is visible iff `k < rope_pos_ids[b, 0]`, or with a
  sliding window for query i iff `start[b, i] <= k < end` with `end = rope_pos_ids[b, i]`
  (`start > end` means the window wraps around a circular cache: `k >= start or k < end`);
  the caller's `[S, B, H, S]` active mask then replaces the active slots.
"""

import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.plan import P_MAX, TilePlan


def load_mask(pl: TilePlan, mask, b: int, ks: int, nk: int, mt):
    """DMA the pre-generated mask of batch row b, natural keys `[ks, ks+nk)`, into `mt`."""
    hs = pl.HS
    bhs = pl.BHS
    n_kt = nk // P_MAX
    if pl.layout == "contig":
        src = mask.ap([[bhs, P_MAX], [P_MAX * bhs, n_kt], [1, hs]], offset=ks * bhs + b * hs)
        nisa.dma_copy(mt, src, dge_mode=nisa.dge_mode.none)
    elif pl.layout == "strided":
        src = mask.ap([[n_kt * bhs, P_MAX], [bhs, n_kt], [1, hs]], offset=ks * bhs + b * hs)
        nisa.dma_copy(mt, src, dge_mode=nisa.dge_mode.none)
    else:
        # Caller's row of natural token n: fold F = n // (R*128), within it partition P = n % (R*128) // R
        # and offset O = n % R, row = F*R*128 + O*128 + P (R = pl.mask_bl). The kernel's fold f holds
        # 128 sub-blocks of blr keys, partition p reading keys n_f + p*blr + o.
        rl = pl.mask_bl
        w = pl.blr * hs
        for f in range(nk // pl.fold_keys):
            n_f = ks + f * pl.fold_keys
            if rl % pl.blr == 0:
                # R = u*blr: kernel partition p = g*u + j reads P = P0 + g and O = j*blr + o.
                u = rl // pl.blr
                per = P_MAX // u
                row0 = (n_f // (rl * P_MAX)) * rl * P_MAX + ((n_f % (rl * P_MAX)) // pl.fold_keys) * per
                src = mask.ap(
                    [[bhs, per], [pl.blr * P_MAX * bhs, u], [P_MAX * bhs, pl.blr], [1, hs]],
                    offset=row0 * bhs + b * hs,
                )
                nisa.dma_copy(mt[:, f * w : (f + 1) * w], src, dge_mode=nisa.dge_mode.none)
            else:
                # blr = u*R: the kernel fold spans u caller folds; partition p = c*(128/u) + p2 of caller
                # fold c reads P = p2*u + a, O = v for its keys o = a*R + v.
                u = pl.blr // rl
                per = P_MAX // u
                for c in range(u):
                    row0 = (n_f // (rl * P_MAX) + c) * rl * P_MAX
                    src = mask.ap(
                        [[u * bhs, per], [bhs, u], [P_MAX * bhs, rl], [1, hs]], offset=row0 * bhs + b * hs
                    )
                    nisa.dma_copy(mt[c * per : (c + 1) * per, f * w : (f + 1) * w], src, dge_mode=nisa.dge_mode.none)


def key_positions(pl: TilePlan, ks: int, nk: int, kidx, keyf):
    """`keyf` `[128, n_kt]` fp32 = natural key index of every slot (via int32 `kidx`)."""
    n_kt = nk // P_MAX
    if pl.layout == "contig":
        nisa.iota(kidx, pattern=[[P_MAX, n_kt]], offset=ks, channel_multiplier=1)
    elif pl.layout == "strided":
        nisa.iota(kidx, pattern=[[1, n_kt]], offset=ks, channel_multiplier=n_kt)
    else:
        nf = nk // pl.fold_keys
        nisa.iota(kidx, pattern=[[pl.fold_keys, nf], [1, pl.blr]], offset=ks, channel_multiplier=pl.blr)
    nisa.tensor_copy(keyf, kidx)


def gen_mask(pl: TilePlan, b: int, n_kt: int, keyf, cached_bc, start_bc, end_bc, wrap_bc, mt, sbm):
    """Generate the prior part of batch row b's mask into `mt` from positions.

    cached_bc `[128, B]` fp32: `rope_pos_ids[b, 0]` on every partition; start_bc / end_bc / wrap_bc
    `[128, B*S]` fp32 (or None): window starts, ends (`rope_pos_ids[b, i]`) and `start > end` flags.
    """
    hs = pl.HS
    S = pl.S
    sbm.open_scope()
    if start_bc == None:
        valid = sbm.alloc((P_MAX, n_kt), nl.uint8, "valid")
        nisa.tensor_scalar(valid, keyf, op0=nl.less, operand0=cached_bc[:, b : b + 1])
        nisa.tensor_copy(mt, valid.ap([[n_kt, P_MAX], [1, n_kt], [0, hs]], offset=0))
    else:
        below = sbm.alloc((P_MAX, n_kt), nl.float32, "below")
        after = sbm.alloc((P_MAX, n_kt), nl.float32, "after")
        both = sbm.alloc((P_MAX, n_kt), nl.float32, "both")
        valid = sbm.alloc((P_MAX, n_kt), nl.uint8, "valid")
        for s in range(S):
            c = b * S + s
            nisa.tensor_scalar(below, keyf, op0=nl.less, operand0=end_bc[:, c : c + 1])
            # valid = (after AND below) OR (wraps AND (after OR below)), on 0/1 floats.
            nisa.tensor_scalar(after, keyf, op0=nl.greater_equal, operand0=start_bc[:, c : c + 1])
            nisa.tensor_tensor(both, after, below, op=nl.maximum)
            nisa.tensor_scalar(both, both, op0=nl.multiply, operand0=wrap_bc[:, c : c + 1])
            nisa.tensor_tensor(after, after, below, op=nl.multiply)
            nisa.tensor_tensor(valid, after, both, op=nl.maximum)
            nisa.tensor_copy(
                mt.ap([[n_kt * hs, P_MAX], [hs, n_kt], [S, pl.H]], offset=s),
                valid.ap([[n_kt, P_MAX], [1, n_kt], [0, pl.H]], offset=0),
            )
    sbm.close_scope()


def put_active_mask(pl: TilePlan, mask, b: int, mt, runs: tuple):
    """Copy the caller's active mask rows `mask[j, b]` (`[S, B, H, S]`) onto the active slots."""
    hs = pl.HS
    for r in range(len(runs)):
        run = runs[r]
        j0 = run[0]
        n = run[1]
        t0 = run[2]
        p0 = run[3]
        src = mask.ap([[pl.BHS, n], [1, hs]], offset=j0 * pl.BHS + b * hs)
        dst = mt[p0 : p0 + 1, t0 * hs : (t0 + n) * hs] if run[5] == 0 else mt[p0 : p0 + n, t0 * hs : (t0 + 1) * hs]
        nisa.dma_copy(dst, src, dge_mode=nisa.dge_mode.none)
