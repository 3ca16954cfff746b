"""The `reference` backend: docs/design/kernel.md written out literally in numpy, fp32 throughout.

Slow and obvious on purpose: it is the oracle every other backend is tested against. Each step
below is one numbered step of docs/design/kernel.md "The math".
"""

from __future__ import annotations

import numpy as np

from tkg.kernel.arrays import as_f32
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.paged import PagedArgs
from tkg.kernel.validate import KernelCall

NAME = "reference"


def rope_rotate_half(x: np.ndarray, pos: np.ndarray, inv_freqs: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE.

    x: `[B, ..., S, d]` float32; pos: `[B, S]` positions; inv_freqs: `[d/2]` or `[d/2, 1]`.
    freqs = inv_freqs * pos, emb = concat(freqs, freqs), x*cos(emb) + rotate_half(x)*sin(emb).
    """
    d = x.shape[-1]
    freqs = as_f32(pos)[..., None] * as_f32(inv_freqs).reshape(-1)  # [B, S, d/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [B, S, d]
    shape = (x.shape[0],) + (1,) * (x.ndim - 3) + emb.shape[1:]
    cos, sin = np.cos(emb).reshape(shape), np.sin(emb).reshape(shape)
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return (x * cos + rotated * sin).astype(np.float32)


def unshuffle_block_mask(mask: np.ndarray, block_len: int) -> np.ndarray:
    """Pre-generated block-KV mask `[Sp, ...]` from its fold order to natural key order.

    `block_len` is the mask's order length R (`KernelCall.mask_block_len`: nki-library's reduced
    block length for the call's lnc, `decisions.mask_block_len`). Keys come in folds of 128
    blocks of R tokens, one block per SBUF partition, so mask row
    m = fold*R*128 + offset*128 + partition holds the natural token fold*R*128 + partition*R + offset.
    """
    Sp = mask.shape[0]
    folds = Sp // (block_len * 128)
    m = mask.reshape((folds, block_len, 128, *mask.shape[1:]))
    return np.swapaxes(m, 1, 2).reshape(mask.shape)


def queries(call: KernelCall, fused_rope: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """q as `[B, H, S, d]` and k_active as `[B, S, d]`, float32, from either layout.

    With `fused_rope` and `cfg.fuse_rope`, step 2 is applied too: both rotated, q scaled by
    1/sqrt(d) (host backends share this; B*H*S <= 128 rows, so numpy is cheap).
    """
    cfg = call.cfg
    B, H, S, d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
    if cfg.qk_in_sb:
        q = as_f32(call.q).reshape(d, B, H, S).transpose(1, 2, 3, 0)
        ka = as_f32(call.k_active).reshape(d, B, S).transpose(1, 2, 0)
    else:
        q = as_f32(call.q)
        ka = as_f32(call.k_active)[:, 0]
    if fused_rope and cfg.fuse_rope:
        q = rope_rotate_half(q, call.rope_pos_ids, call.inv_freqs) / np.float32(np.sqrt(d))
        ka = rope_rotate_half(ka, call.rope_pos_ids, call.inv_freqs)
    return q, ka


def _prior(call: KernelCall) -> tuple[np.ndarray, np.ndarray]:
    """The first Sp cached keys and values of each row, `[B, Sp, d]` float32 (fresh copies)."""
    cfg = call.cfg
    B, Sp, d = cfg.bs, cfg.curr_sprior, cfg.d_head
    if cfg.is_block_kv:
        table = call.active_blocks_table.astype(np.int64)
        K = as_f32(call.k_prior)[table].reshape(B, Sp, d)
        V = as_f32(call.v_prior)[table].reshape(B, Sp, d)
    else:
        kp = as_f32(call.k_prior)[:B, 0]
        K = kp[:, :Sp, :] if cfg.tp_k_prior else kp[:, :, :Sp].transpose(0, 2, 1)
        V = as_f32(call.v_prior)[:B, 0, :Sp, :]
    return np.array(K, dtype=np.float32), np.array(V, dtype=np.float32)


def prior_visibility(call: KernelCall) -> np.ndarray:
    """Boolean `[B, Sp-S, S]`: may query i of row b see cached key k (generated mask, step 4).

    Without a window every query sees the keys before the cached length `rope_pos_ids[b, 0]`.
    With `start_pos_ids`, query i sees `[start[b, i], end[b, i])` with `end = rope_pos_ids[b, i]`,
    or, when start > end (a circular cache whose window wraps), `k >= start or k < end`
    (nki-library's convention: its reference wins where design docs differ).
    """
    cfg = call.cfg
    S, Sp = cfg.s_active, cfg.curr_sprior
    keys = np.arange(Sp - S, dtype=np.float32)[None, :, None]  # [1, Sp-S, 1]
    pos = as_f32(call.rope_pos_ids)
    if call.start_pos_ids is None:
        return np.broadcast_to(keys < pos[:, None, :1], (cfg.bs, Sp - S, S))
    start = as_f32(call.start_pos_ids)[:, None, :]  # [B, 1, S]
    end = pos[:, None, :]
    after, before = keys >= start, keys < end
    return np.where(start <= end, after & before, after | before)


def visibility(call: KernelCall) -> np.ndarray:
    """Boolean `[B, H, Sp, S]`: may query i of row b, head h see key k (step 4)."""
    cfg = call.cfg
    B, H, S, Sp = cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior
    if not cfg.use_pos_id:
        m = call.mask
        if cfg.is_block_kv:
            m = unshuffle_block_mask(m, call.mask_block_len)
        return m.transpose(1, 2, 0, 3) != 0
    vis = np.zeros((B, H, Sp, S), dtype=bool)
    vis[:, :, : Sp - S, :] = prior_visibility(call)[:, None]
    vis[:, :, Sp - S :, :] = call.mask.transpose(1, 2, 0, 3) != 0
    return vis


def _weighted_values(p: np.ndarray, V: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """`sum_k p[b,h,k,i] * V[b,k,:]` as `[B, H, d, S]`, over visible keys only.

    A masked key's weight is exactly 0, but 0 * NaN and 0 * inf are NaN: garbage in a slot no
    query sees (stale or never-written cache slots) must not reach the output. Non-finite values
    are kept out of the product, and the (rare) ones a query does see are added back for it.
    """
    finite = np.isfinite(V)
    if finite.all():
        return np.einsum("bhki,bkd->bhdi", p, V)
    pv = np.einsum("bhki,bkd->bhdi", p, np.where(finite, V, np.float32(0)))
    b_i, k_i, e_i = np.nonzero(~finite)
    seen = vis[b_i, :, k_i, :]  # [n, H, S]
    with np.errstate(invalid="ignore"):  # 0 * inf where masked: discarded by the where
        contrib = np.where(seen, p[b_i, :, k_i, :] * V[b_i, k_i, e_i][:, None, None], np.float32(0))
    np.add.at(pv.transpose(0, 2, 1, 3), (b_i, e_i), contrib)  # pv viewed as [B, d, H, S]
    return pv


def store_outputs(call: KernelCall, out: np.ndarray, ka: np.ndarray) -> None:
    """Write out `[B, H, S, d]` and the (rotated) k_active `[B, S, d]`, both fp32, into the call's
    destinations in their layouts, rounding to the I/O dtype: out HBM `[B, H, d, S]` or SBUF
    `[d, B*H*S]`; k_out (when asked for) HBM `[B, 1, d, S]` or SBUF `[d, B*S]`."""
    cfg = call.cfg
    B, H, S, d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
    if cfg.out_in_sb:
        call.out[...] = out.transpose(3, 0, 1, 2).reshape(d, B * H * S)
    else:
        call.out[...] = out.transpose(0, 1, 3, 2)
    if call.k_out is not None:
        if cfg.k_out_in_sb:
            call.k_out[...] = ka.transpose(2, 0, 1).reshape(d, B * S)
        else:
            call.k_out[...] = ka.transpose(0, 2, 1)[:, None]


def run(call: KernelCall) -> None:
    """Compute `call.out` (and `call.k_out`, `call.dbg`) in place."""
    cfg: AttnTKGConfig = call.cfg
    H, S, d, Sp = cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior

    # Step 2: optional fused RoPE, then the 1/sqrt(d) scale (k_out is rotated, not scaled).
    q, ka = queries(call)
    if cfg.fuse_rope:
        q = rope_rotate_half(q, call.rope_pos_ids, call.inv_freqs) / np.float32(np.sqrt(d))
        ka = rope_rotate_half(ka, call.rope_pos_ids, call.inv_freqs)
    va = as_f32(call.v_active)[:, 0]

    # Step 3: the active tokens replace the last S slots of the Sp window.
    K, V = _prior(call)
    K[:, Sp - S :, :] = ka
    V[:, Sp - S :, :] = va

    # Steps 4 and 6: scores[b, h, k, i] = K[b, k, :] . q[b, h, i, :], masked to -inf.
    scores = np.einsum("bkd,bhid->bhki", K, q).astype(np.float32)
    vis = visibility(call)
    scores = np.where(vis, scores, np.float32(-np.inf))

    # Step 5: the sink is one extra logit per head, in the max and the denominator only.
    row_max = scores.max(axis=2, keepdims=True)  # [B, H, 1, S]
    if call.sink is not None:
        sink = as_f32(call.sink).reshape(1, H, 1, 1)
        row_max = np.maximum(row_max, sink)
    # A sink of -inf is no sink: its row still has nothing to normalise over.
    if np.isneginf(row_max).any():
        b, h, _, i = (int(x[0]) for x in np.nonzero(np.isneginf(row_max)))
        raise ValueError(
            f"attention_tkg: mask: every key is masked for row b={b}, head h={h}, query i={i}; "
            "expected at least one visible key (the active diagonal) or a finite sink"
        )
    p = np.exp(scores - row_max)
    denom = p.sum(axis=2, keepdims=True)
    if call.sink is not None:
        denom = denom + np.exp(sink - row_max)
    out = _weighted_values(p, V, vis) / denom  # [B, H, d, S]

    store_outputs(call, out.transpose(0, 1, 3, 2), ka)
    if call.dbg is not None:
        full = {"qk": scores, "qk_max": row_max, "qk_exp": p, "exp_sum": denom}
        for name, dst in call.dbg.items():
            dst[...] = full[name]


def paged_decode_partial(args: PagedArgs, **_options: object) -> None:
    """A partial paged step (`tkg.kernel.paged`: lse and/or attend-only), sequence by sequence, fp32.

    Query i of sequence b sits at key index `t = args.query_index()[b, i]` and sees cached keys
    `j < seq_lens[b]` with `j <= t` (and `t - j < window`). Logits are `scale * k_scale * q . K`;
    the row's max and denominator include the sink (never given in attend-only calls). Fills
    `args.out` `[B, Hq, S, d]` and `args.lse` `[B, Hq, S]` (natural log of the denominator, i.e.
    max + log(sum)); a query that sees nothing gets out 0 and lse -inf.
    """
    q = as_f32(args.q)
    B, Hq = q.shape[:2]
    Hkv, BL = args.num_kv_heads, args.block_len
    G = Hq // Hkv
    t = args.query_index()  # [B, S]
    sinks = None if args.sinks is None else as_f32(args.sinks).reshape(Hq, 1)
    for b in range(B):
        L = int(args.seq_lens[b])
        j = np.arange(L)
        blocks, offs = args.block_tables[b, j // BL].astype(np.int64), j % BL
        K = as_f32(args.k_cache[:, blocks, offs]) * np.float32(args.k_scale)  # [Hkv, L, d]
        V = as_f32(args.v_cache[:, blocks, offs]) * np.float32(args.v_scale)
        K, V = np.repeat(K, G, axis=0), np.repeat(V, G, axis=0)  # [Hq, L, d]: q head h reads kv head h // G
        logits = np.einsum("hid,hjd->hij", q[b], K) * np.float32(args.scale)  # [Hq, S, L]
        dist = t[b][:, None] - j[None, :]  # [S, L]
        vis = dist >= 0
        if args.window is not None:
            vis &= dist < args.window
        logits = np.where(vis[None], logits, np.float32(-np.inf))
        row_max = logits.max(axis=2, initial=-np.inf)  # [Hq, S]
        if sinks is not None:
            row_max = np.maximum(row_max, sinks)
        seen = np.isfinite(row_max)
        m = np.where(seen, row_max, np.float32(0))
        p = np.exp(logits - m[:, :, None])  # 0 where masked
        denom = p.sum(axis=2)
        if sinks is not None:
            denom = denom + np.exp(sinks - m)
        V = np.where(vis.any(axis=0)[None, :, None], V, np.float32(0))  # a slot no query sees may hold garbage
        pv = np.einsum("hij,hjd->hid", p, V)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(seen[:, :, None], pv / denom[:, :, None], np.float32(0))
            lse = np.where(seen, m + np.log(denom), np.float32(-np.inf))
        args.out[b] = out
        if args.lse is not None:
            args.lse[b] = lse
