"""Host-side glue shared by the NKI backends (`nki-emu` and `nki`).

Turns a validated `KernelCall` into the `@nki.jit` wrapper's arguments, checks the limits only
the NKI kernel has, launches through a caller-supplied launcher (emulator, `nki.simulate`, or the
device), and copies the results back into the call's destinations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tkg.dtypes import BF16, FP8
from tkg.kernel import decisions
from tkg.kernel.backends import reference
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.validate import KernelCall

P_MAX = 128
Launcher = Callable[[int, tuple[Any, ...]], tuple[Any, ...]]


def lnc_option(call: KernelCall) -> int:
    """`lnc` from the call's backend options (1 or 2; default 1)."""
    lnc = call.options.get("lnc", 1)
    if lnc not in (1, 2):
        raise ValueError(f"attention_tkg: lnc: {lnc!r} must be 1 or 2 (NeuronCores per logical core)")
    return int(lnc)


def key_cores(cfg: AttnTKGConfig, lnc: int) -> int:
    """Cores the keys are split across for this call (2 only under sequence sharding)."""
    sharding = decisions.lnc_sharding(cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, lnc, cfg.fuse_rope)
    return decisions.sprior_programs(sharding, lnc)


def check_nki_limits(call: KernelCall, lnc: int) -> None:
    """Constraints of the NKI kernel beyond docs/design/kernel.md's common ones; ValueError naming them."""
    cfg = call.cfg
    n = key_cores(cfg, lnc)
    if cfg.curr_sprior % (P_MAX * n):
        raise ValueError(
            f"attention_tkg: cfg.curr_sprior: {cfg.curr_sprior} / {n} core(s) must be a multiple of {P_MAX} "
            f"for the NKI kernel; round the bucket up to a multiple of {P_MAX * n} "
            f"(paged_via_attention_tkg(..., align={P_MAX * n}))"
        )
    if cfg.is_block_kv and not cfg.use_pos_id:
        blr, _ = decisions.resize_block_len(cfg.blocks_per_seq, cfg.block_len, n)
        r = call.mask_block_len
        if blr % r and r % blr:
            raise ValueError(
                f"attention_tkg: cfg.block_len: {cfg.block_len}: the NKI kernel splits blocks to {blr} tokens, "
                f"which does not nest with the pre-generated mask's order length {r} (lnc={lnc}); use a "
                "power-of-two block_len or use_pos_id=True"
            )
    if call.out.dtype == np.float32 and FP8 in (call.k_prior.dtype, call.v_prior.dtype):
        raise ValueError(
            "attention_tkg: out: float32 output with a float8_e4m3 cache: the PE does not multiply fp8 by "
            "fp32 operands on the NKI backends; use bfloat16 or float16 I/O"
        )
    if call.q.dtype == FP8 and call.out.dtype != BF16:
        raise ValueError(f"attention_tkg: out: dtype {call.out.dtype}: with an fp8 q the NKI kernel writes bfloat16")
    if call.sink is None:
        vis = reference.visibility(call)
        dead = ~vis.any(axis=2)  # [B, H, S]
        if dead.any():
            b, h, i = (int(x[0]) for x in np.nonzero(dead))
            raise ValueError(
                f"attention_tkg: mask: every key is masked for row b={b}, head h={h}, query i={i}; "
                "expected at least one visible key (the active diagonal) or a sink"
            )


def kernel_config(cfg: AttnTKGConfig, config_cls: type, *, return_lse: bool = False, attend_only: bool = False) -> Any:
    """Our AttnTKGConfig as the kernel's `nl.NKIObject` config (`TKGConfig`), field by field, plus
    our kernel's partial-launch flags (`partial_kind`) when set: AttnTKGConfig has no such fields,
    nor has nki-library's config class (`nkilib*` backends, which never set them)."""
    partial = {"return_lse": bool(return_lse), "attend_only": bool(attend_only)} if (return_lse or attend_only) else {}
    return config_cls(
        bs=int(cfg.bs), q_head=int(cfg.q_head), s_active=int(cfg.s_active), curr_sprior=int(cfg.curr_sprior),
        full_sprior=int(cfg.full_sprior), d_head=int(cfg.d_head), block_len=int(cfg.block_len),
        tp_k_prior=bool(cfg.tp_k_prior), strided_mm1=bool(cfg.strided_mm1), use_pos_id=bool(cfg.use_pos_id),
        fuse_rope=bool(cfg.fuse_rope), use_gpsimd_sb2sb=bool(cfg.use_gpsimd_sb2sb), qk_in_sb=bool(cfg.qk_in_sb),
        k_out_in_sb=bool(cfg.k_out_in_sb), out_in_sb=bool(cfg.out_in_sb),
        enable_fa_s_prior_tiling=bool(cfg.enable_fa_s_prior_tiling), **partial,
    )  # fmt: skip


def _f32(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.ascontiguousarray(x, dtype=np.float32)


def kernel_args(call: KernelCall, kcfg: Any) -> tuple[Any, ...]:
    """Positional arguments of `attention_tkg_kernel`, contiguous, small vectors in fp32."""
    table = None
    if call.active_blocks_table is not None:
        table = np.ascontiguousarray(call.active_blocks_table, dtype=np.uint32)
    sink = None if call.sink is None else _f32(call.sink).reshape(-1, 1)
    return (
        np.ascontiguousarray(call.q), np.ascontiguousarray(call.k_active), np.ascontiguousarray(call.v_active),
        np.ascontiguousarray(call.k_prior), np.ascontiguousarray(call.v_prior),
        np.ascontiguousarray(call.mask, dtype=np.uint8),
        _f32(call.inv_freqs), _f32(call.rope_pos_ids), _f32(call.start_pos_ids), sink, table,
        kcfg, call.dbg is not None,
    )  # fmt: skip


def write_results(call: KernelCall, results: tuple[Any, ...]) -> None:
    """Copy the kernel's outputs (out, [k_out], [4 debug tensors]) into the call's destinations."""
    res = [np.asarray(r) for r in results]
    call.out[...] = res[0].reshape(call.out.shape)
    i = 1
    cfg = call.cfg
    if cfg.fuse_rope:
        if call.k_out is not None:
            call.k_out[...] = res[1].reshape(call.k_out.shape)
        i = 2
    elif call.k_out is not None:
        # Without fused RoPE the kernel (like the library's) has no k_out; the API still fills a given
        # k_out with k_active in k_out's layout, as every backend does.
        B, S, d = cfg.bs, cfg.s_active, cfg.d_head
        ka = call.k_active.reshape(d, B, S) if cfg.qk_in_sb else call.k_active[:, 0].transpose(2, 0, 1)  # [d, B, S]
        call.k_out[...] = ka.reshape(d, B * S) if cfg.k_out_in_sb else ka.transpose(1, 0, 2)[:, None]
    if call.dbg is not None:
        for name, arr in zip(("qk", "qk_max", "qk_exp", "exp_sum"), res[i : i + 4], strict=True):
            if name in call.dbg:
                call.dbg[name][...] = arr.reshape(call.dbg[name].shape)


def run(call: KernelCall, launch: Launcher, config_cls: type) -> None:
    """Check, convert, launch `launch(lnc, args)`, and write the results into `call`."""
    lnc = lnc_option(call)
    check_nki_limits(call, lnc)
    args = kernel_args(call, kernel_config(call.cfg, config_cls))
    results = launch(lnc, args)
    if not isinstance(results, tuple):
        results = (results,)
    write_results(call, results)


def paged_folded(args: Any, backend: str, *, lnc: int = 1, align: int | None = None, **options: Any) -> None:
    """The service's paged step as ONE kernel launch: (sequence, kv head) rows folded into the batch.

    The pool is head-major `[Hkv, NB, BL, d]`, so `[Hkv*NB, BL, d]` is the same memory and row
    (b, g) reads its blocks at ids `table[b] + g*NB`. q heads `g*G .. (g+1)*G` of sequence b become
    the G query heads of row `b*Hkv + g`. One launch instead of Hkv, and more rows for LNC2 batch
    sharding. The kernel's sink is per query head of the call, shared by all rows, so per-group
    sinks that differ between kv heads fall back to one launch per kv head.
    """
    from tkg.kernel.api import attention_tkg
    from tkg.kernel.paged import paged_via_attention_tkg

    align = P_MAX * lnc if align is None else align
    q, out = args.q, args.out
    B, Hq, S, d = q.shape
    Hkv, NB, BL = args.num_kv_heads, args.k_cache.shape[1], args.block_len
    G = Hq // Hkv
    sinks = None
    if args.sinks is not None:
        groups = args.sinks.reshape(Hkv, G)
        if not np.all(groups == groups[:1]):
            paged_via_attention_tkg(args, backend, align=align, lnc=lnc, **options)
            return
        sinks = groups[0].reshape(G, 1)
    lens = args.seq_lens.astype(np.int64)
    sp = decisions.round_up(max(int(lens.max()), 1), int(np.lcm(BL, align)))
    # The S newest cache entries of each sequence are its new tokens: the active k/v.
    new_pos = (lens - S)[:, None] + np.arange(S)[None, :]  # [B, S]
    new_blk = np.take_along_axis(args.block_tables.astype(np.int64), new_pos // BL, axis=1)
    k_new = args.k_cache[:, new_blk, new_pos % BL].transpose(1, 0, 2, 3)  # [B, Hkv, S, d]
    v_new = args.v_cache[:, new_blk, new_pos % BL].transpose(1, 0, 2, 3)
    step = fold_inputs(
        q, k_new, v_new, args.block_tables, lens, scale=args.scale * args.k_scale, window=args.window, heads=range(Hkv),
        num_blocks=NB, block_len=BL, context=sp, batch=B, s_active=S,
    )  # fmt: skip
    pool_k = args.k_cache.reshape(Hkv * NB, BL, d)
    pool_v = args.v_cache.reshape(Hkv * NB, BL, d)
    res, _ = attention_tkg(
        step.q, step.k_active, step.v_active, pool_k, pool_v, step.mask, None, step.cfg, None,
        rope_pos_ids=step.positions, sink=sinks, active_blocks_table=step.table, start_pos_ids=step.starts,
        backend=backend, lnc=lnc, **options,
    )  # fmt: skip
    step.unfold(res, out)
    if args.v_scale != 1.0:  # the pools hold V / v_scale
        out[...] = np.asarray(out, np.float32) * np.float32(args.v_scale)


def partial_kind(return_lse: bool, attend_only: bool) -> tuple[bool, bool]:
    """The kernel's (return_lse, attend_only) flags for a step: an attend-only step always computes
    lse (and so fp32 out), whether or not the caller asked for it: one specialisation per shape
    serves both answers (the caller's out is cast, its lse dropped). Three kinds in all: a plain
    decode (False, False), a decode with lse (True, False), attend-only (True, True)."""
    if attend_only:
        return (True, True)
    return (bool(return_lse), False)


def query_windows(
    cached: np.ndarray, first: np.ndarray, s_active: int, window: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The generated mask's inputs for rows of `cached[r]` cached keys whose query i sits at key
    index `first[r] + i` (int `[R]` each): positions float32 `[R, S]` (every query's window end:
    the cached length; the keys at or past it are the active ones, or nothing when attend-only)
    and, with a window W, starts float32 `[R, S]`: `first + i - W + 1` floored at 0 and capped at
    the end. The cap is what makes an attend-only query past its window see nothing (start ==
    end: an empty window; start > end would mean a wrap-around window to the kernel). A decode's
    queries (first = cached, W >= S) never reach the cap."""
    i = np.arange(s_active, dtype=np.int64)[None, :]
    ends = np.repeat(np.asarray(cached, np.int64)[:, None], s_active, axis=1)
    starts = None
    if window is not None:
        starts = np.minimum(np.maximum(np.asarray(first, np.int64)[:, None] + i - window + 1, 0), ends)
        starts = starts.astype(np.float32)
    return ends.astype(np.float32), starts


def paged_partial(args: Any, launch: Launcher, config_cls: type, *, lnc: int = 1, align: int | None = None) -> None:
    """A partial paged step (`tkg.kernel.paged.PagedArgs` with lse and/or q_start) on our NKI kernel
    over host pools: one folded launch (one per kv head when the kv groups' sinks differ, as in
    `paged_folded`) through `launch(lnc, args)`; fills `args.out` and `args.lse`. The kernel is
    launched directly: the seed API (`attention_tkg`) has no lse output and no attend-only mode."""
    if lnc not in (1, 2):
        raise ValueError(f"paged_decode: lnc: {lnc!r} must be 1 or 2 (NeuronCores per logical core)")
    q, out = args.q, args.out
    B, Hq, S, d = q.shape
    Hkv, NB, BL = args.num_kv_heads, args.k_cache.shape[1], args.block_len
    G = Hq // Hkv
    if q.dtype == np.float32 and args.k_cache.dtype == FP8:
        raise ValueError(
            "paged_decode: q: float32 queries with a float8_e4m3 cache: the PE does not multiply fp8 by fp32 "
            "operands on the NKI backends; use bfloat16 or float16 I/O"
        )
    align = P_MAX * lnc if align is None else align
    lens = args.seq_lens.astype(np.int64)
    sp = decisions.round_up(max(int(lens.max()), 1), int(np.lcm(BL, align)))
    k_new = v_new = None
    if args.q_start is None:  # the S newest cache entries of each sequence are its new tokens
        new_pos = (lens - S)[:, None] + np.arange(S)[None, :]  # [B, S]
        new_blk = np.take_along_axis(args.block_tables.astype(np.int64), new_pos // BL, axis=1)
        k_new = args.k_cache[:, new_blk, new_pos % BL].transpose(1, 0, 2, 3)  # [B, Hkv, S, d]
        v_new = args.v_cache[:, new_blk, new_pos % BL].transpose(1, 0, 2, 3)
    groups: list[Any] = [range(Hkv)]
    sinks = None
    if args.sinks is not None:
        sinks = args.sinks.reshape(Hkv, G)
        if not np.all(sinks == sinks[:1]):
            groups = [[h] for h in range(Hkv)]
    pool_k = np.ascontiguousarray(args.k_cache).reshape(Hkv * NB, BL, d)
    pool_v = np.ascontiguousarray(args.v_cache).reshape(Hkv * NB, BL, d)
    for heads in groups:
        st = fold_inputs(
            q, k_new, v_new, args.block_tables, lens, scale=args.scale * args.k_scale, window=args.window,
            heads=heads, num_blocks=NB, block_len=BL, context=sp, batch=B, s_active=S,
            return_lse=args.lse is not None, q_start=args.q_start, num_kv_heads=Hkv,
        )  # fmt: skip
        sink = None if sinks is None else np.ascontiguousarray(sinks[heads[0]].reshape(G, 1), np.float32)
        kcfg = kernel_config(st.cfg, config_cls, return_lse=st.return_lse, attend_only=st.attend_only)
        res = launch(lnc, (
            st.q, st.k_active, st.v_active, pool_k, pool_v, st.mask, None, st.positions, st.starts, sink, st.table,
            kcfg, False,
        ))  # fmt: skip
        res = res if isinstance(res, tuple) else (res,)
        st.unfold(res[0], out)
        if args.lse is not None:
            st.unfold_lse(res[1], args.lse)
    if args.v_scale != 1.0:  # the pools hold V / v_scale
        out[...] = np.asarray(out, np.float32) * np.float32(args.v_scale)


@dataclass
class FoldedStep:
    """The host-side inputs of one folded launch (everything but the pools), padded to its bucket.

    Rows are (sequence b, kv head `heads[j]`) pairs, row `b*H + j`, over `batch` sequences (rows
    past the real B are padding: block 0, length `s_active`, zero q/k/v) and `s_active` query
    columns (columns past the real S are zero queries whose output is dropped; the causal mask
    keeps every real query off them).
    """

    q: np.ndarray  # [d, rows*G*Sb] io dtype, scaled
    k_active: np.ndarray | None  # [d, rows*Sb]; None when attend-only
    v_active: np.ndarray | None  # [rows, 1, Sb, d]; None when attend-only
    mask: np.ndarray | None  # uint8 [Sb, rows, G, Sb]; None when attend-only
    positions: np.ndarray  # float32 [rows, Sb]
    starts: np.ndarray | None  # float32 [rows, Sb] (sliding window)
    table: np.ndarray  # uint32 [rows, context/BL], ids in the folded pool [Hkv*NB, BL, d]
    cfg: AttnTKGConfig
    heads: np.ndarray  # int [H] kv heads in the rows
    real_batch: int
    real_s: int
    return_lse: bool = False  # the kernel's flags (`partial_kind`)
    attend_only: bool = False

    def unfold(self, res: np.ndarray, out: np.ndarray) -> None:
        """Kernel output `[rows, G, d, Sb]` into `out[b, g*G + h, s, :]` for the real rows/columns."""
        B, S, H = self.real_batch, self.real_s, self.heads.size
        G, Sb, d = self.cfg.q_head, self.cfg.s_active, self.cfg.d_head
        r = np.asarray(res).reshape(-1, H, G, d, Sb)[:B, :, :, :, :S].transpose(0, 1, 2, 4, 3)  # [B, H, G, S, d]
        Hkv = out.shape[1] // G
        if Hkv == H:
            out[...] = r.reshape(out.shape)
        else:
            o = out.reshape(B, Hkv, G, S, d)
            o[:, self.heads] = r

    def unfold_lse(self, res: np.ndarray, lse: np.ndarray) -> None:
        """Kernel lse `[rows, G, Sb]` into `lse[b, g*G + h, s]` (`[B, Hq, S]`, contiguous) for the real rows/columns."""
        B, S, H = self.real_batch, self.real_s, self.heads.size
        G, Sb = self.cfg.q_head, self.cfg.s_active
        r = np.asarray(res).reshape(-1, H, G, Sb)[:B, :, :, :S]  # [B, H, G, S]
        Hkv = lse.shape[1] // G
        if Hkv == H:
            lse[...] = r.reshape(lse.shape)
        else:
            lse.reshape(B, Hkv, G, S)[:, self.heads] = r


def fold_inputs(
    q: np.ndarray,
    k_new: np.ndarray | None,
    v_new: np.ndarray | None,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    *,
    scale: float,
    window: int | None,
    heads: Any,
    num_blocks: int,
    block_len: int,
    context: int,
    batch: int,
    s_active: int,
    return_lse: bool = False,
    q_start: np.ndarray | None = None,
    num_kv_heads: int | None = None,
) -> FoldedStep:
    """Inputs of one launch for kv heads `heads` of a decode step, padded to (batch, context, s_active).

    q `[B, Hq, S, d]`, k_new/v_new `[B, Hkv, S, d]` (the S new tokens, already in the cache),
    block_tables int `[B, >= used blocks]`, seq_lens `[B]` (incl. the new tokens); `context` a
    multiple of the block length covering max(seq_lens). The pool is head-major `[Hkv, NB, BL, d]`,
    so `[Hkv*NB, BL, d]` is the same memory and row (b, g) reads its blocks at `table[b] + g*NB`.
    Partial steps (`partial_kind`): `return_lse`; `q_start` int `[B]` makes it attend-only (k_new,
    v_new None: nothing new, seq_lens are the cached keys, query i sits at key index `q_start[b] + i`;
    `num_kv_heads` then gives the pool's kv heads).
    """
    lse, attend = partial_kind(return_lse, q_start is not None)
    B, Hq, S, d = q.shape
    Hkv = k_new.shape[1] if k_new is not None else num_kv_heads
    if Hkv is None:
        raise ValueError("fold_inputs: num_kv_heads: expected the pool's kv heads for an attend-only step (no k_new)")
    G = Hq // Hkv
    hs = np.asarray(list(heads), dtype=np.int64)
    H, Bb, Sb = hs.size, batch, s_active
    BL = block_len
    rows = Bb * H
    lens = np.asarray(seq_lens, dtype=np.int64)
    cached = np.zeros(Bb, dtype=np.int64)  # keys before the first query (padding rows: none)
    first = np.zeros(Bb, dtype=np.int64)  # each row's first query as a key index
    cached[:B] = lens if attend else lens - S
    first[:B] = np.asarray(q_start, np.int64) if attend else lens - S
    nblk = context // BL
    table = np.zeros((Bb, nblk), dtype=np.int64)  # padding entries: block 0 (in range, masked)
    used = np.arange(nblk)[None, :] < (-(-lens // BL))[:, None]  # [B, nblk]
    width = min(nblk, block_tables.shape[1])
    table[:B, :width] = np.where(used[:, :width], block_tables[:, :width], 0)
    folded = (table[:, None, :] + (hs * num_blocks)[None, :, None]).reshape(rows, nblk).astype(np.uint32)
    qs = np.zeros((Bb, Hq, Sb, d), dtype=q.dtype)
    qs[:B, :, :S] = (np.asarray(q, dtype=np.float32) * np.float32(scale)).astype(q.dtype)
    q_sb = qs.reshape(Bb, Hkv, G, Sb, d)[:, hs].transpose(4, 0, 1, 2, 3).reshape(d, rows * G * Sb)
    k_sb = v_act = mask = None
    if not attend:
        kn = np.zeros((Bb, Hkv, Sb, d), dtype=k_new.dtype)  # the cache's dtype (fp8 stays fp8)
        vn = np.zeros((Bb, Hkv, Sb, d), dtype=v_new.dtype)
        kn[:B, :, :S] = k_new
        vn[:B, :, :S] = v_new
        k_sb = np.ascontiguousarray(kn[:, hs].transpose(3, 0, 1, 2).reshape(d, rows * Sb))
        v_act = np.ascontiguousarray(vn[:, hs].reshape(rows, 1, Sb, d))
        mask = causal_mask(Sb, rows, G)
    # Row b*H + j. Every query's window ends at the cached length (a decode's earlier new tokens
    # are the active ones, masked causally; an attend-only query sees cached keys only).
    pos, starts = query_windows(np.repeat(cached, H), np.repeat(first, H), Sb, window)
    cfg = AttnTKGConfig(
        bs=rows, q_head=G, s_active=Sb, curr_sprior=context, full_sprior=context, d_head=d, block_len=BL,
        tp_k_prior=True, strided_mm1=False, use_pos_id=True, qk_in_sb=True,
    )  # fmt: skip
    return FoldedStep(
        np.ascontiguousarray(q_sb), k_sb, v_act, mask, pos, starts, folded, cfg, hs, B, S, lse, attend,
    )  # fmt: skip


def causal_mask(s_active: int, rows: int, group: int) -> np.ndarray:
    """uint8 `[S, rows, G, S]`: active key j visible to query i when j <= i."""
    tri = np.tril(np.ones((s_active, s_active), dtype=np.uint8)).T  # [j, i]
    return np.ascontiguousarray(np.broadcast_to(tri[:, None, None, :], (s_active, rows, group, s_active)))
