"""Online softmax over flash tiles, with statistics kept in *row-broadcast* form.

Scores come out of MM1 with keys on partitions: `scores` `[128, bt*n_kt*HS]` fp32, column
`(bi*n_kt + t)*HS + hs` for batch row bi of the batch tile, key tile t, query column hs. A row of
the softmax (one (bi, hs)) is spread over all partitions and key tiles, so every per-row
statistic is kept as a `[128, N]` tile (N = bt*HS) whose partitions all hold the same row
vector. That is exactly the operand shape needed to subtract the max from the scores (a stride-0
view over key tiles) and to scale MM2's `[d, HS]` results, with no per-partition bias.

Per flash tile, with running max m, running sum l and unnormalised output o:
    pmax = max over key tiles (free axis), folded with m  ->  cross-partition max (PE transpose,
    free-axis max, diag(col) x ones matmul to broadcast) = m_new
    corr = exp(m - m_new);  p = exp(scores - m_new) (scalar engine, io dtype)
    rowsum = ones^T x (sum over key tiles of p)   (one matmul broadcasts the partition sum)
    l = l*corr + rowsum;  o = o*corr + P V (done by the caller per batch row);  m = m_new
The sink joins as the initial value of m (so it is in every max) and as l = 1 on one core only
(so `exp(sink - max)` is in the denominator exactly once). Without a sink m starts at -3e38, a
finite stand-in for -inf so `exp(m - m_new)` never computes `inf - inf`.

Partial calls (context parallelism: `return_lse`, `attend_only`) may hold a query that saw no key
and no sink: its p are all 0, so l = 0 and o = 0 (m stays -3e38). Its output must be 0 and its lse
-inf, so 1/l is taken of max(l, 2^-64) (`reciprocal_of_sum`) and `store_lse` writes -inf where l = 0.
Elsewhere l >= 1 (the maximal logit or the sink contributes exp(0)), so the floor changes nothing.
"""

import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.plan import P_MAX, TilePlan
from tkg.kernel.nki_tkg.psum import PsumRing
from tkg.kernel.nki_tkg.rules import PSUM_FMAX

NEG_BIG = -3.0e38
L_FLOOR = 2.0**-64  # the least sum 1/l and ln(l) are taken of: the lower end of nl.log's valid range


class SoftmaxState(nl.NKIObject):
    """SBUF tiles of one batch tile's running statistics and output (N = bt*HS columns)."""

    def __init__(self, pl: TilePlan, bt: int, sbm):
        n = bt * pl.HS
        self.n = n
        self.bt = bt
        # m and l side by side so one sendrecv exchanges both between cores.
        self.ml = sbm.alloc((P_MAX, 2 * n), nl.float32, "ml")
        self.m_run = self.ml[:, 0:n]
        self.l_run = self.ml[:, n : 2 * n]
        self.m_new = sbm.alloc((P_MAX, n), nl.float32, "m_new")
        self.corr = sbm.alloc((P_MAX, n), nl.float32, "corr")
        self.part = sbm.alloc((P_MAX, n), nl.float32, "part")
        self.o_run = sbm.alloc((pl.d, n), nl.float32, "o_run")
        self.col = sbm.alloc((P_MAX, 1), nl.float32, "col")
        self.diag = sbm.alloc((P_MAX, P_MAX), nl.float32, "diag")


def init_state(pl: TilePlan, st: SoftmaxState, sink, has_l_init: bool):
    """m = sink (broadcast to every query column) or -3e38; l = 1 where the sink is counted, else 0."""
    if sink != None:
        src = sink.ap([[0, P_MAX], [0, st.bt], [1, pl.H], [0, pl.S]], offset=0)
        nisa.dma_copy(st.m_run, src, dge_mode=nisa.dge_mode.none)
    else:
        nisa.memset(st.m_run, value=NEG_BIG)
    if has_l_init:
        nisa.memset(st.l_run, value=1.0)
    else:
        nisa.memset(st.l_run, value=0.0)


def tile_view(t, bt: int, n_kt: int, hs: int):
    """`[128, bt*n_kt*hs]` score-layout tile viewed as (128, bt, hs, n_kt): key tiles last."""
    return t.ap([[bt * n_kt * hs, P_MAX], [n_kt * hs, bt], [1, hs], [hs, n_kt]], offset=0)


def row_bcast(t, bt: int, n_kt: int, hs: int):
    """`[128, bt*hs]` statistic viewed as (128, bt, n_kt, hs), repeated over key tiles (stride 0)."""
    return t.ap([[bt * hs, P_MAX], [hs, bt], [0, n_kt], [1, hs]], offset=0)


def cross_partition_max(st: SoftmaxState, consts, ring: PsumRing):
    """m_new[p, c] = max over partitions of part[:, c], for every p."""
    n = st.n
    for c0 in range(0, n, P_MAX):
        cw = min(P_MAX, n - c0)
        ps_t = ring.next((cw, P_MAX), nl.float32, "maxT")
        nisa.nc_transpose(ps_t, st.part[:, c0 : c0 + cw])
        nisa.tensor_reduce(st.col[0:cw, :], op=nl.maximum, data=ps_t, axis=1)
        # diag(col) then ones^T x diag: every output partition gets the row of maxima.
        nisa.tensor_scalar(st.diag[0:cw, 0:cw], consts.ident[0:cw, 0:cw], op0=nl.multiply, operand0=st.col[0:cw, :])
        ps_b = ring.next((P_MAX, cw), nl.float32, "maxB")
        nisa.nc_matmul(ps_b, stationary=consts.ones[0:cw, :], moving=st.diag[0:cw, 0:cw], accumulate=False)
        nisa.tensor_copy(st.m_new[:, c0 : c0 + cw], ps_b)


def softmax_tile(pl: TilePlan, st: SoftmaxState, scores, p_io, n_kt: int, first: bool, has_l_init: bool,
                 consts, ring: PsumRing):  # fmt: skip
    """One flash tile: new max, correction, p = exp(scores - max) into `p_io`, l update, m = new max."""
    bt = st.bt
    hs = pl.HS
    n = st.n
    nisa.tensor_reduce(st.part, op=nl.maximum, data=tile_view(scores, bt, n_kt, hs), axis=3)
    nisa.tensor_tensor(st.part, st.part, st.m_run, op=nl.maximum)
    cross_partition_max(st, consts, ring)

    need_corr = (not first) or has_l_init
    if need_corr:
        nisa.tensor_tensor(st.corr, st.m_run, st.m_new, op=nl.subtract)
        nisa.activation(st.corr, op=nl.exp, data=st.corr)

    nisa.tensor_tensor(scores, scores, row_bcast(st.m_new, bt, n_kt, hs), op=nl.subtract)
    nisa.activation(p_io, op=nl.exp, data=scores)

    nisa.tensor_reduce(st.part, op=nl.add, data=tile_view(p_io, bt, n_kt, hs), axis=3)
    for n0 in range(0, n, PSUM_FMAX):
        nw = min(PSUM_FMAX, n - n0)
        ps = ring.next((P_MAX, nw), nl.float32, "sum")
        nisa.nc_matmul(ps, stationary=consts.ones, moving=st.part[:, n0 : n0 + nw], accumulate=False)
        l_cols = st.l_run[:, n0 : n0 + nw]
        if not need_corr:
            nisa.tensor_copy(l_cols, ps)
        elif first:
            nisa.tensor_tensor(l_cols, st.corr[:, n0 : n0 + nw], ps, op=nl.add)  # l was 1: 1*corr + sum
        else:
            nisa.tensor_tensor(l_cols, l_cols, st.corr[:, n0 : n0 + nw], op=nl.multiply)
            nisa.tensor_tensor(l_cols, l_cols, ps, op=nl.add)
    nisa.tensor_copy(st.m_run, st.m_new)


def reciprocal_of_sum(dst, l_sum, guard: bool):
    """dst = 1 / l_sum; with `guard` (partial calls) 1 / max(l_sum, 2^-64), so a query that saw
    nothing (l = 0, o = 0) gets o/l = 0 rather than 0 * inf."""
    if guard:
        nisa.tensor_scalar(dst, l_sum, op0=nl.maximum, operand0=L_FLOOR)
        nisa.reciprocal(dst, dst)
    else:
        nisa.reciprocal(dst, l_sum)


def store_lse(pl: TilePlan, st: SoftmaxState, lse, gb0: int, sbm):
    """The log-sum-exp of the batch tile's queries -> HBM `lse` `[B, H, S]` fp32, rows gb0 ..

    lse = m + ln(l): the natural log of each query's softmax denominator over its scaled logits,
    with the running max m (the sink's logit included in it) and the sum l (the sink's term
    included on the core that counted it, `init_state`); after `merge_cores` m and l are both
    cores' M and L. -inf where the query saw no key and no sink (l = 0). Reads partition 0 of the
    row-broadcast statistics (every partition holds the same row); columns are (row, head, s),
    the natural order of `[B, H, S]`.
    """
    n = st.n
    sbm.open_scope()
    seen = sbm.alloc((1, n), nl.uint8, "lse_seen")
    val = sbm.alloc((1, n), nl.float32, "lse_val")
    res = sbm.alloc((1, n), nl.float32, "lse")
    l_row = st.l_run[0:1, :]
    nisa.tensor_scalar(seen, l_row, op0=nl.greater, operand0=0.0)
    nisa.tensor_scalar(val, l_row, op0=nl.maximum, operand0=L_FLOOR)  # within ln's valid range
    nisa.activation(val, op=nl.log, data=val)
    nisa.tensor_tensor(val, val, st.m_run[0:1, :], op=nl.add)
    nisa.memset(res, value=float("-inf"))
    nisa.tensor_copy_predicated(res, val, seen)
    nisa.dma_copy(lse.ap([[n, 1], [1, n]], offset=gb0 * pl.HS), res, dge_mode=nisa.dge_mode.none)
    sbm.close_scope()


def exchange_engine(cfg, bytes_per_partition: int):
    """sendrecv transport: the GpSimd SBUF-to-SBUF DMA when asked for and within its 1 KiB/partition
    limit (`use_gpsimd_sb2sb`), else the shared DMA rings."""
    if cfg.use_gpsimd_sb2sb and bytes_per_partition <= 512:
        return nisa.dma_engine.gpsimd_dma
    return nisa.dma_engine.dma


def merge_cores(pl: TilePlan, cfg, st: SoftmaxState, keep_sum: bool, sbm):
    """Sequence sharding: combine both cores' (m, l, o) so each holds the normalised halves summed.

    Both cores compute the same global max M and sum L (the same operations on the same values
    in commutative order), scale their own o by exp(m - M) / L, swap the scaled halves and add.
    Core 0 (and core 1 too when the output stays in SBUF) ends with the final normalised output
    in `st.o_run[:, :]`; `st.m_run` / `st.l_run` then hold M and L.
    """
    d = pl.d
    n = st.n
    other = 1 - pl.sp_id
    sbm.open_scope()
    oth = sbm.alloc((P_MAX, 2 * n), nl.float32, "ml_other")
    nisa.sendrecv(
        src=st.ml[0:d, :], dst=oth[0:d, :], send_to_rank=other, recv_from_rank=other, pipe_id=1,
        dma_engine=exchange_engine(cfg, 2 * n * 4),
    )  # fmt: skip
    m_oth = oth[0:d, 0:n]
    l_oth = oth[0:d, n : 2 * n]
    m_own = st.m_run[0:d, :]
    l_own = st.l_run[0:d, :]
    big = st.m_new[0:d, :]
    c_own = st.corr[0:d, :]
    nisa.tensor_tensor(big, m_own, m_oth, op=nl.maximum)
    nisa.tensor_tensor(c_own, m_own, big, op=nl.subtract)
    nisa.activation(c_own, op=nl.exp, data=c_own)
    nisa.tensor_tensor(m_oth, m_oth, big, op=nl.subtract)
    nisa.activation(m_oth, op=nl.exp, data=m_oth)  # m_oth now holds the partner's correction
    nisa.tensor_tensor(l_own, l_own, c_own, op=nl.multiply)
    nisa.tensor_tensor(l_oth, l_oth, m_oth, op=nl.multiply)
    nisa.tensor_tensor(l_own, l_own, l_oth, op=nl.add)
    nisa.tensor_copy(m_own, big)
    # o_own * c_own / L, swapped with the partner's, summed.
    recip = st.part[0:d, :]
    reciprocal_of_sum(recip, l_own, pl.partial)
    nisa.tensor_tensor(st.o_run, st.o_run, c_own, op=nl.multiply)
    nisa.tensor_tensor(st.o_run, st.o_run, recip, op=nl.multiply)
    o_oth = sbm.alloc((d, n), nl.float32, "o_other")
    nisa.sendrecv(
        src=st.o_run, dst=o_oth, send_to_rank=other, recv_from_rank=other, pipe_id=2,
        dma_engine=exchange_engine(cfg, n * 4),
    )  # fmt: skip
    if keep_sum:
        nisa.tensor_tensor(st.o_run, st.o_run, o_oth, op=nl.add)
    sbm.close_scope()
