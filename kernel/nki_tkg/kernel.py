"""`attention_tkg`: decode attention for one kv head, as an NKI sub-kernel (NKI 0.3+ API).

Called from an `@nki.jit` kernel (see `wrapper.py`) that owns the `SbufManager`, the outputs,
and (with `qk_in_sb`) has DMA'd q and k_active into SBUF. Semantics: docs/design/kernel.md; the
numpy oracle is `tkg.kernel.backends.reference`.

Work of one core (see `plan.py` for the split between the two cores of an LNC2 launch):

    for each batch tile (rows sized to the SBUF budget):
        state m, l, o  (softmax.py; sink folded in)
        for each flash tile of this core's keys (one tile up to 8192 keys):
            per batch row: mask tile (loaded or generated), K^T (DMA, indirect per 128-block
                fold for paged caches, PE transposes when K arrives key-major), active k in
                SBUF, MM1 K^T q in groups of up to 32 key tiles per PSUM bank, evacuated
                through the mask onto -inf (predicated copy)
            max / exp / sum of the whole batch tile (softmax.py)
            per batch row: V (DMA, indirect for paged), active v, MM2 V^T P accumulated in
                PSUM over key tiles, o = o*corr + PV
        sequence-sharded: merge the two cores' (m, l, o) with sendrecv
        with return_lse: lse = m + ln(l) per query (-inf where nothing was seen) to HBM
        normalise by 1/l and store (HBM `[B, H, d, S]` or SBUF `[d, B*H*S]`)
    batch-sharded with the output in SBUF: swap halves so both cores hold all of it

Partial calls (context parallelism, docs/context-parallel.md): `return_lse` adds the lse output
and makes out fp32; `attend_only` inserts no active tokens (the queries attend to cached keys
only, as the generated mask says). Both allow a query that sees nothing: out 0, lse -inf.

DBG_TENSORS (optional, fp32 HBM, natural order like the host backends, `validate.debug_shapes`):
qk `[B, H, Sp, S]` (masked scores, -inf where masked), qk_max and exp_sum `[B, H, 1, S]` (final
row max and denominator incl. the sink), qk_exp `[B, H, Sp, S]` = exp(qk - m) with m the running
max when that key's flash tile was processed on its core: equal to exp(qk - qk_max) when each core
has one flash tile and the keys are not split across cores.
"""

import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.kv import (
    block_ids,
    keys_by_dma_transpose,
    load_keys,
    load_values,
    put_active_keys,
    put_active_values,
    row_ids,
    sub_block_offsets,
)
from tkg.kernel.nki_tkg.mask import gen_mask, key_positions, load_mask, put_active_mask
from tkg.kernel.nki_tkg.plan import P_MAX, TilePlan, active_runs, make_plan
from tkg.kernel.nki_tkg.psum import KT_BANKS, MM1_BANKS, MM2_BANKS, PSUM_BANK_BYTES, STAT_BANKS, PsumRing
from tkg.kernel.nki_tkg.rope import fused_rope
from tkg.kernel.nki_tkg.sbuf import dtype_bytes
from tkg.kernel.nki_tkg.softmax import (
    SoftmaxState,
    exchange_engine,
    init_state,
    merge_cores,
    reciprocal_of_sum,
    softmax_tile,
    store_lse,
)


class Consts(nl.NKIObject):
    """Constant tiles: `ones` `[128, 128]` and the identity `ident` `[128, 128]`, fp32."""

    def __init__(self, sbm):
        self.ones = sbm.alloc((P_MAX, P_MAX), nl.float32, "ones")
        nisa.memset(self.ones, value=1.0)
        self.ident = sbm.alloc((P_MAX, P_MAX), nl.float32, "ident")
        sbm.open_scope()
        diff = sbm.alloc((P_MAX, P_MAX), nl.int32, "p_minus_f")
        nisa.iota(diff, pattern=[[-1, P_MAX]], offset=0, channel_multiplier=1)
        nisa.tensor_scalar(self.ident, diff, op0=nl.equal, operand0=0.0)
        sbm.close_scope()


class Rings(nl.NKIObject):
    def __init__(self):
        self.mm1 = PsumRing(MM1_BANKS, "mm1")
        self.kt = PsumRing(KT_BANKS, "kt")
        self.mm2 = PsumRing(MM2_BANKS, "mm2")
        self.stat = PsumRing(STAT_BANKS, "stat")


class Positions(nl.NKIObject):
    """Broadcast position tiles for mask generation: cached `[128, B]`, and with a sliding window
    start / end / wrap `[128, B*S]` (each query's window `[start, end)`, end = its position)."""

    def __init__(self, pl: TilePlan, rope_pos_ids, start_pos_ids, consts: Consts, ring: PsumRing, sbm):
        B = pl.B
        S = pl.S
        self.cached = sbm.alloc((P_MAX, B), nl.float32, "cached")
        broadcast_row(self.cached, rope_pos_ids.ap([[0, 1], [S, B]], offset=0), consts, ring, sbm)
        self.start = None
        self.end = None
        self.wrap = None
        if start_pos_ids != None:
            self.start = sbm.alloc((P_MAX, B * S), nl.float32, "start")
            broadcast_row(self.start, start_pos_ids.ap([[0, 1], [1, B * S]], offset=0), consts, ring, sbm)
            self.end = sbm.alloc((P_MAX, B * S), nl.float32, "end")
            broadcast_row(self.end, rope_pos_ids.ap([[0, 1], [1, B * S]], offset=0), consts, ring, sbm)
            self.wrap = sbm.alloc((P_MAX, B * S), nl.float32, "wrap")
            nisa.tensor_tensor(self.wrap, self.start, self.end, op=nl.greater)


def broadcast_row(dst, src, consts: Consts, ring: PsumRing, sbm):
    """dst `[128, n]` fp32 = the HBM row `src` `[1, n]` on every partition.

    One DMA into one partition, then ones^T @ row on the PE: a DMA broadcasting down the
    partitions moves each 4-byte element as its own run (overhead-bound, ~256 B of DMA time
    each). Exact: each output is one product with 1.0 (positions are integers below 2^24).
    """
    n = dst.shape[1]
    sbm.open_scope()
    row = sbm.alloc((1, n), nl.float32, "pos_row")
    nisa.dma_copy(row, src, dge_mode=nisa.dge_mode.none)
    per = PSUM_BANK_BYTES // 4
    for c0 in range(0, n, per):
        w = min(per, n - c0)
        ps = ring.next((P_MAX, w), nl.float32, "bcast")
        nisa.nc_matmul(ps, stationary=consts.ones[0:1, :], moving=row[0:1, c0 : c0 + w], accumulate=False)
        nisa.tensor_copy(dst[:, c0 : c0 + w], ps)
    sbm.close_scope()


def store_debug_keys(pl: TilePlan, dst, src, bi: int, b: int, ks: int, n_kt: int):
    """One batch row's score-layout tile (`src` columns of row bi) -> HBM `[B, H, Sp, S]` natural order."""
    H = pl.H
    S = pl.S
    hs = pl.HS
    sp = pl.Sp
    c0 = bi * n_kt * hs
    base = b * H * sp * S
    if pl.layout == "block":
        w = pl.blr * hs
        for f in range(n_kt // pl.blr):
            off = base + (ks + f * pl.fold_keys) * S
            view = dst.ap([[pl.blr * S, P_MAX], [S, pl.blr], [sp * S, H], [1, S]], offset=off)
            nisa.dma_copy(view, src[:, c0 + f * w : c0 + (f + 1) * w], dge_mode=nisa.dge_mode.none)
        return
    if pl.layout == "strided":
        view = dst.ap([[n_kt * S, P_MAX], [S, n_kt], [sp * S, H], [1, S]], offset=base + ks * S)
    else:
        view = dst.ap([[S, P_MAX], [P_MAX * S, n_kt], [sp * S, H], [1, S]], offset=base + ks * S)
    nisa.dma_copy(view, src[:, c0 : c0 + n_kt * hs], dge_mode=nisa.dge_mode.none)


def mm1_row_bytes(pl: TilePlan, nk: int, k_bytes: int, needs_raw: bool) -> int:
    """SBUF bytes per partition one batch row's MM1 tiles take (mask, K^T, raw K)."""
    n_kt = nk // P_MAX
    total = n_kt * pl.HS + nk * k_bytes + 256
    if needs_raw:
        total = total + n_kt * pl.d * k_bytes
    return total


def flash_tile(pl: TilePlan, cfg, st: SoftmaxState, q_sb, ka_sb, v_active, k_prior, v_prior, mask,
               active_blocks_table, pos: Positions, dbg, gb0: int, fi: int, has_l_init: bool,
               consts: Consts, rings: Rings, sbm, io):  # fmt: skip
    """MM1, softmax update and MM2 of one flash tile for the batch tile starting at row gb0.

    `io` is the output dtype (P is rounded to it for MM2). K and V tiles keep the cache's dtype
    when the active tokens share it (fp8 operands go to the PE as they are, accumulating in fp32
    PSUM); a cache whose dtype differs from its active tokens' is converted by the loading DMA.
    """
    fa_start = pl.fa_starts[fi]
    nk = pl.fa_sizes[fi]
    n_kt = nk // P_MAX
    ks = pl.k0 + fa_start
    hs = pl.HS
    d = pl.d
    bt = st.bt
    kdt = io
    if ka_sb == None or k_prior.dtype == ka_sb.dtype:  # attend-only: no active keys, the cache's dtype
        kdt = k_prior.dtype
    vdt = io
    if v_active == None or v_prior.dtype == v_active.dtype:
        vdt = v_prior.dtype
    first = fi == 0
    runs = active_runs(pl, fa_start, nk)
    is_block = pl.layout == "block"
    needs_raw = (is_block or cfg.tp_k_prior) and not keys_by_dma_transpose(pl, cfg, kdt, k_prior.dtype)
    nf = 0
    fold0 = 0
    if is_block:
        nf = nk // pl.fold_keys
        fold0 = fa_start // pl.fold_keys

    sbm.open_scope()
    width = bt * n_kt * hs
    scores = sbm.alloc((P_MAX, width), nl.float32, "scores")
    p_io = scores
    if io != nl.float32:
        p_io = sbm.alloc((P_MAX, width), io, "p")
    nisa.memset(scores, value=float("-inf"))
    ids = None
    if is_block:
        # The block ids of the whole batch tile, loaded once: MM1's K and MM2's V gathers share them.
        ids = sbm.alloc((P_MAX, bt * nf), nl.uint32, "blk_ids")
        jt = None
        if pl.factor > 1:
            jt = sbm.alloc((P_MAX, bt * nf), nl.uint32, "sub_j")
            sub_block_offsets(pl, jt)
        block_ids(pl, active_blocks_table, gb0, bt, fold0, ids, jt)
    keyf = None
    if cfg.use_pos_id:
        keyf = sbm.alloc((P_MAX, n_kt), nl.float32, "key_pos")
        sbm.open_scope()
        kidx = sbm.alloc((P_MAX, n_kt), nl.int32, "key_idx")
        key_positions(pl, ks, nk, kidx, keyf)
        sbm.close_scope()

    # ---- MM1: scores[:, row bi, key tile t, hs] = K^T q, masked ------------------------------
    row_bytes = mm1_row_bytes(pl, nk, dtype_bytes(kdt), needs_raw)
    degree = 1
    if sbm.get_free_space() >= 2 * row_bytes + 4096:
        degree = 2  # double-buffer the per-row tiles so row i+1 loads while row i multiplies
    sbm.open_scope(interleave_degree=degree)
    for bi in range(bt):
        b = gb0 + bi
        mt = sbm.alloc((P_MAX, n_kt * hs), nl.uint8, "mask")
        if cfg.use_pos_id:
            gen_mask(pl, b, n_kt, keyf, pos.cached, pos.start, pos.end, pos.wrap, mt, sbm)
            put_active_mask(pl, mask, b, mt, runs)
        else:
            load_mask(pl, mask, b, ks, nk, mt)
        kT = sbm.alloc((d, nk), kdt, "kT")
        kraw = None
        if needs_raw:
            kraw = sbm.alloc((P_MAX, n_kt * d), kdt, "k_rows")
        idx = None
        if is_block:
            idx = row_ids(ids, bi, nf)
        load_keys(pl, cfg, k_prior, b, ks, nk, kT, kraw, idx, rings.kt)
        put_active_keys(pl, kT, ka_sb, b, runs)
        q_b = q_sb[:, b * hs : (b + 1) * hs]
        for g0 in range(0, n_kt, pl.mm1_group):
            g = min(pl.mm1_group, n_kt - g0)
            ps = rings.mm1.next((P_MAX, g * hs), nl.float32, "qk")
            for i in range(g):
                t = g0 + i
                nisa.nc_matmul(
                    ps[:, i * hs : (i + 1) * hs], stationary=kT[:, t * P_MAX : (t + 1) * P_MAX], moving=q_b,
                    accumulate=False,
                )  # fmt: skip
            c0 = (bi * n_kt + g0) * hs
            nisa.tensor_copy_predicated(scores[:, c0 : c0 + g * hs], ps, mt[:, g0 * hs : (g0 + g) * hs])
        if dbg != None:
            store_debug_keys(pl, dbg[0], scores, bi, b, ks, n_kt)
        sbm.increment_section()
    sbm.close_scope()

    # ---- softmax statistics of the whole batch tile -----------------------------------------
    softmax_tile(pl, st, scores, p_io, n_kt, first, has_l_init, consts, rings.stat)
    if dbg != None:
        for bi in range(bt):
            store_debug_keys(pl, dbg[2], p_io, bi, gb0 + bi, ks, n_kt)

    # ---- MM2: o[:, row bi] (+)= V^T P ------------------------------------------------------
    v_bytes = n_kt * d * dtype_bytes(vdt) + 256
    degree = 1
    if sbm.get_free_space() >= 2 * v_bytes + 4096:
        degree = 2
    sbm.open_scope(interleave_degree=degree)
    for bi in range(bt):
        b = gb0 + bi
        vt = sbm.alloc((P_MAX, n_kt * d), vdt, "v")
        idx = None
        if is_block:
            idx = row_ids(ids, bi, nf)
        load_values(pl, cfg, v_prior, b, ks, nk, vt, idx)
        put_active_values(pl, vt, v_active, b, runs)
        ps = rings.mm2.next((d, hs), nl.float32, "pv")
        for t in range(n_kt):
            c = (bi * n_kt + t) * hs
            nisa.nc_matmul(ps, stationary=vt[:, t * d : (t + 1) * d], moving=p_io[:, c : c + hs], accumulate=t > 0)
        o_cols = st.o_run[:, bi * hs : (bi + 1) * hs]
        if first:
            nisa.tensor_copy(o_cols, ps)
        else:
            nisa.tensor_tensor(o_cols, o_cols, st.corr[0:d, bi * hs : (bi + 1) * hs], op=nl.multiply)
            nisa.tensor_tensor(o_cols, o_cols, ps, op=nl.add)
        sbm.increment_section()
    sbm.close_scope()
    sbm.close_scope()


def store_output(pl: TilePlan, cfg, st: SoftmaxState, out, gb0: int, normalised: bool, ring: PsumRing, sbm):
    """Write the batch tile's `o / l` to `out` (SBUF `[d, B*H*S]` or HBM `[B, H, d, S]`)."""
    d = pl.d
    hs = pl.HS
    n = st.n
    sbm.open_scope()
    recip = st.part[0:d, :]
    if not normalised:
        reciprocal_of_sum(recip, st.l_run[0:d, :], pl.partial)
    if cfg.out_in_sb:
        dst = out[:, gb0 * hs : gb0 * hs + n]
        if normalised:
            nisa.tensor_copy(dst, st.o_run)
        else:
            nisa.tensor_tensor(dst, st.o_run, recip, op=nl.multiply)
    else:
        res = sbm.alloc((d, n), out.dtype, "out_tile")
        if normalised:
            nisa.tensor_copy(res, st.o_run)
        else:
            nisa.tensor_tensor(res, st.o_run, recip, op=nl.multiply)
        store_rows(pl, res, out, gb0, st.bt, ring, sbm)
    sbm.close_scope()


def store_rows(pl: TilePlan, res, out, gb0: int, bt: int, ring: PsumRing, sbm):
    """res `[d, bt*H*S]` (columns (row, head, s)) -> HBM out `[B, H, d, S]` rows gb0...

    Each (row, head) owns d*S contiguous elements of `out`, but `res` holds them one per
    partition: a direct DMA would move every element (2-4 bytes) as its own overhead-bound run.
    PE transposes put up to 128 (row, head) pairs on partitions first, so each pair leaves as one
    contiguous run of d*S elements (the s-th transpose fills every S-th column).
    """
    d = pl.d
    H = pl.H
    S = pl.S
    nbh = bt * H
    for c0 in range(0, nbh, P_MAX):
        m = min(P_MAX, nbh - c0)
        sbm.open_scope()
        stage = sbm.alloc((P_MAX, d * S), out.dtype, "out_rows")
        for s in range(S):
            ps = ring.next((P_MAX, d), out.dtype, "out_t")
            nisa.nc_transpose(ps[0:m, :], res[:, c0 * S + s : (c0 + m) * S : S])
            nisa.tensor_copy(stage[0:m, s : d * S : S], ps[0:m, :])
        view = out.ap([[d * S, m], [1, d * S]], offset=(gb0 * H + c0) * d * S)
        nisa.dma_copy(view, stage[0:m, :], dge_mode=nisa.dge_mode.none)
        sbm.close_scope()


def attention_tkg(q, k_active, v_active, k_prior, v_prior, mask, out, cfg, sbm, inv_freqs=None,
                  rope_pos_ids=None, sink=None, active_blocks_table=None, k_out=None, DBG_TENSORS=None,
                  start_pos_ids=None, lse=None):  # fmt: skip
    """Decode attention for one kv head; returns `(out, k_out)` (and fills `lse` when given).

    Args (layouts of docs/design/kernel.md; B, H, S, d, Sp from `cfg`):
        q: SBUF `[d, B*H*S]` (`cfg.qk_in_sb`) or HBM `[B, H, S, d]` (only with `cfg.fuse_rope`).
        k_active: SBUF `[d, B*S]` or HBM `[B, 1, S, d]`.
        v_active: HBM `[B, 1, S, d]`.
        k_prior, v_prior: HBM flat `[B+, 1, Spf, d]` (k: `[B+, 1, d, Spf]` without `tp_k_prior`) or
            block `[num_blocks, block_len, d]`.
        mask: HBM uint8 `[Sp, B, H, S]`, or `[S, B, H, S]` with `cfg.use_pos_id`.
        out: SBUF `[d, B*H*S]` (`cfg.out_in_sb`) or HBM `[B, H, d, S]`, allocated by the caller.
        cfg: `TKGConfig`.
        sbm: the caller's `SbufManager`; everything allocated here is freed before returning.
        inv_freqs: HBM `[d/2, 1]` fp32 (fuse_rope). rope_pos_ids: HBM `[B, S]` fp32.
        sink: HBM `[H, 1]` fp32 or None. active_blocks_table: HBM uint32 `[B, Sp/block_len]`.
        k_out: SBUF `[d, B*S]` (`cfg.k_out_in_sb`) or HBM `[B, 1, d, S]`, with fuse_rope.
        DBG_TENSORS: None or a tuple of 4 fp32 HBM tensors (qk, qk_max, qk_exp, exp_sum).
        start_pos_ids: HBM `[B, S]` fp32 sliding-window starts, or None.
        lse: HBM `[B, H, S]` fp32 with `cfg.return_lse` (else None): each query's log-sum-exp
            (`softmax.store_lse`); `out` is then fp32 while P stays in q's dtype for MM2.

    Attend-only (`cfg.attend_only`, context parallelism): no active tokens. k_active, v_active and
    mask are None; every query sees only cached keys, through the generated mask: row b's
    `rope_pos_ids[b, :]` all hold its cached length L (no key at or past L is seen) and
    `start_pos_ids[b, i]` its window start, clamped to at most L (an empty window, never a wrap).
    A query that sees nothing gets out 0 and lse -inf.
    """
    pl = make_plan(cfg, nl.num_programs(0), nl.program_id(0))
    if not pl.works:
        return out, k_out
    sbm.open_scope()
    consts = Consts(sbm)
    rings = Rings()
    if cfg.fuse_rope:
        q_sb, ka_sb = fused_rope(pl, cfg, q, k_active, inv_freqs, rope_pos_ids, k_out, pl.sp_id == 0, sbm, rings.stat)
    else:
        q_sb = q
        ka_sb = k_active
    io = out.dtype  # P's dtype for MM2
    if cfg.return_lse:
        io = q_sb.dtype  # out is fp32 for an exact merge of partial results; MM2 keeps q's dtype
    # ---- attend-only (context parallelism): no active tokens ------------------------------------
    # `make_plan` gives no core the active slots (`core_holds_active`), so no flash tile inserts
    # k_active / v_active / the active mask: the cache's keys stay in every slot and the mask
    # generated from the positions (`Positions`) alone decides what each query sees.
    if cfg.attend_only:
        ka_sb = None
    pos = None
    if cfg.use_pos_id:
        pos = Positions(pl, rope_pos_ids, start_pos_ids, consts, rings.stat, sbm)
    has_sink = sink != None
    has_l_init = has_sink and pl.sp_id == 0

    for bt0 in range(0, pl.bs_core, pl.bt):
        bt = min(pl.bt, pl.bs_core - bt0)
        gb0 = pl.b0 + bt0
        sbm.open_scope()
        st = SoftmaxState(pl, bt, sbm)
        init_state(pl, st, sink, has_l_init)
        for fi in range(pl.n_fa):
            flash_tile(
                pl, cfg, st, q_sb, ka_sb, v_active, k_prior, v_prior, mask, active_blocks_table, pos,
                DBG_TENSORS, gb0, fi, has_l_init, consts, rings, sbm, io,
            )  # fmt: skip
        merged = pl.n_sp > 1
        if merged:
            merge_cores(pl, cfg, st, pl.sp_id == 0 or cfg.out_in_sb, sbm)
        if DBG_TENSORS != None and pl.sp_id == 0:
            n = st.n
            off = gb0 * pl.HS
            nisa.dma_copy(DBG_TENSORS[1].ap([[n, 1], [1, n]], offset=off), st.m_run[0:1, :])
            nisa.dma_copy(DBG_TENSORS[3].ap([[n, 1], [1, n]], offset=off), st.l_run[0:1, :])
        # ---- lse (context parallelism): m + ln(l) of the final (merged) statistics ----------------
        if lse != None and pl.sp_id == 0:
            store_lse(pl, st, lse, gb0, sbm)
        if cfg.out_in_sb or pl.sp_id == 0:
            store_output(pl, cfg, st, out, gb0, merged, rings.kt, sbm)
        sbm.close_scope()

    if pl.sharding == "batch" and cfg.out_in_sb:
        # Each core computed its half of the batch; swap halves so both hold the whole output.
        hs = pl.HS
        w = pl.bs_core * hs
        other = 1 - pl.prg_id
        nisa.sendrecv(
            src=out[:, pl.b0 * hs : pl.b0 * hs + w], dst=out[:, other * w : (other + 1) * w],
            send_to_rank=other, recv_from_rank=other, pipe_id=3,
            dma_engine=exchange_engine(cfg, w * dtype_bytes(out.dtype)),
        )  # fmt: skip
    sbm.close_scope()
    return out, k_out
