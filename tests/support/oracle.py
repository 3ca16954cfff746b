"""The one test oracle: a deliberately naive `attention_tkg`, `paged_decode`, decode over contiguous
K/V, and rotate-half RoPE; the oracle of every backend, of the server's end-to-end outputs (through
`support.mirror`) and of the soak.

Written from docs/design/kernel.md alone, NOT from `tkg.kernel` or `tkg.server`: one Python loop per batch
row, query head and query, in float64, reading every element straight from the documented layouts
(`attention_tkg`: every key element by element; the decodes: the visible keys' rows, gathered one by
one). Slow and obvious on purpose; keep shapes small.

Conventions decided here where docs/design/kernel.md is silent (the reference must agree):
- The RoPE angle `inv_freqs[j] * pos` is the product of two fp32 tensors, so it is rounded to
  fp32 (as any backend computing it in fp32 does); sin/cos are then exact (float64).
- A pre-generated block-KV mask is in fold order with an order length r (nki-library's
  convention, which depends on the core count lnc): folds of `128 * r` keys, mask row
  `fold*r*128 + offset*128 + partition` holds natural token `fold*r*128 + partition*r + offset`.
  r is the largest divisor of block_len for which every core's keys, and every 8192-key flash
  tile of them (with the last partial one), are whole folds; two cores split the keys when
  lnc = 2, Sp >= 256 and the batch is not split instead (B even and (B*H*S > 128 or Sp < 256)).
- Sliding window (nki-library's convention): prior key k is visible to query i iff
  `start[b, i] <= k < rope_pos_ids[b, i]`, or, when `start[b, i] > rope_pos_ids[b, i]` (a
  circular cache whose window wraps), iff `k >= start[b, i] or k < rope_pos_ids[b, i]`. Without
  a window the end is the cached length `rope_pos_ids[b, 0]` for every query.
- Keys a query cannot see are never read, so garbage (NaN, inf) there cannot reach the output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FOLD_PARTITIONS = 128  # blocks per fold of a pre-generated block-KV mask (one per SBUF partition)


def _f(a: Any) -> np.ndarray:
    """Any array (numpy of any float dtype) as float64, so scalars below are Python floats."""
    return np.asarray(a).astype(np.float64)


def mask_order_len(cfg: Any, lnc: int = 1) -> int:
    """The order length r of a pre-generated block-KV mask, by trying every divisor of block_len."""
    B, H, S, Sp, bl = cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, cfg.block_len
    batch_split = B % 2 == 0 and (B * H * S > 128 or Sp < 256)
    cores = 2 if lnc == 2 and Sp >= 256 and not batch_split else 1
    per_core = Sp // cores
    flash = getattr(cfg, "enable_fa_s_prior_tiling", True) and per_core > 8192
    tiles = [min(8192, per_core - s) for s in range(0, per_core, 8192)] if flash else [per_core]
    for r in range(bl, 0, -1):
        if bl % r == 0 and Sp % cores == 0 and all(t % (FOLD_PARTITIONS * r) == 0 for t in tiles):
            return r
    raise ValueError(f"naive: no fold order for Sp={Sp} on {cores} core(s)")


def mask_row_of_token(token: int, block_len: int) -> int:
    """Row of a pre-generated block-KV mask that holds natural key `token` (fold order)."""
    fold_keys = block_len * FOLD_PARTITIONS
    fold, within = divmod(token, fold_keys)
    partition, offset = divmod(within, block_len)
    return fold * fold_keys + offset * FOLD_PARTITIONS + partition


def rope(x: Any, pos: Any, inv_freqs: np.ndarray, fp32_angle: bool = False) -> np.ndarray:
    """Rotate-half RoPE in float64 of `x` `[..., T, d]` at positions `pos` `[T]`: the pair
    (x_j, x_{j+d/2}) turns by the angle `pos * inv_freqs[j]`. `fp32_angle`: that product is rounded
    to fp32 first (the kernel's convention above); else it is exact (float64)."""
    x = _f(x)
    half = x.shape[-1] // 2
    inv = np.asarray(inv_freqs).reshape(-1)[:half]
    pos = np.asarray(pos).reshape(-1)
    if fp32_angle:
        angle = (pos.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]).astype(np.float64)
    else:
        angle = pos.astype(np.float64)[:, None] * inv.astype(np.float64)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)


def _rope_one(x: list[float], pos: float, inv_freqs: np.ndarray) -> list[float]:
    """`rope` of one vector at one position, the kernel's way (fp32 angle), as Python floats."""
    return [float(v) for v in rope(np.asarray(x)[None, :], [pos], inv_freqs, fp32_angle=True)[0]]


class NaiveCall:
    """Element accessors over one `attention_tkg` call's arguments, in the kernel's layouts."""

    def __init__(self, cfg: Any, args: dict[str, Any], lnc: int = 1) -> None:
        self.cfg = cfg
        self.lnc = lnc
        self.B, self.H, self.S, self.d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
        self.Sp = cfg.curr_sprior
        self.q = _f(args["q"])
        self.k_active = _f(args["k_active"])
        self.v_active = _f(args["v_active"])
        # The prior cache may hold NaN/inf garbage; it is read element by element, only when visible.
        self.k_prior = np.asarray(args["k_prior"])
        self.v_prior = np.asarray(args["v_prior"])
        self.mask = np.asarray(args["mask"])
        self.pos = None if args.get("rope_pos_ids") is None else _f(args["rope_pos_ids"])
        self.start = None if args.get("start_pos_ids") is None else _f(args["start_pos_ids"])
        self.table = None if args.get("active_blocks_table") is None else np.asarray(args["active_blocks_table"])
        self.inv_freqs = None if args.get("inv_freqs") is None else np.asarray(args["inv_freqs"], np.float32)
        sink = args.get("sink")
        self.sink = None if sink is None else _f(sink).reshape(-1)

    # --- inputs -------------------------------------------------------------------------------
    def query(self, b: int, h: int, i: int) -> list[float]:
        if self.cfg.qk_in_sb:  # [d, B*H*S], column b*H*S + h*S + i
            col = b * self.H * self.S + h * self.S + i
            return [float(self.q[e, col]) for e in range(self.d)]
        return [float(self.q[b, h, i, e]) for e in range(self.d)]

    def active_key(self, b: int, j: int) -> list[float]:
        if self.cfg.qk_in_sb:  # [d, B*S], column b*S + j
            return [float(self.k_active[e, b * self.S + j]) for e in range(self.d)]
        return [float(self.k_active[b, 0, j, e]) for e in range(self.d)]

    def rotated_active_key(self, b: int, j: int) -> list[float]:
        k = self.active_key(b, j)
        return _rope_one(k, float(self.pos[b, j]), self.inv_freqs) if self.cfg.fuse_rope else k

    def scaled_query(self, b: int, h: int, i: int) -> list[float]:
        q = self.query(b, h, i)
        if not self.cfg.fuse_rope:
            return q  # arrives pre-scaled
        q = _rope_one(q, float(self.pos[b, i]), self.inv_freqs)
        return [x / math.sqrt(self.d) for x in q]

    def prior_slot(self, which: str, b: int, k: int) -> list[float]:
        """Cached key (`which="k"`) or value of row b at position k < Sp - S."""
        cache = self.k_prior if which == "k" else self.v_prior
        if self.cfg.block_len:
            blk = int(self.table[b, k // self.cfg.block_len])
            return [float(x) for x in cache[blk, k % self.cfg.block_len, :].astype(np.float64)]
        if which == "k" and not self.cfg.tp_k_prior:  # [B+, 1, d, Spf]
            return [float(x) for x in cache[b, 0, :, k].astype(np.float64)]
        return [float(x) for x in cache[b, 0, k, :].astype(np.float64)]

    def key(self, b: int, k: int) -> list[float]:
        first_active = self.Sp - self.S
        if k >= first_active:
            return self.rotated_active_key(b, k - first_active)
        return self.prior_slot("k", b, k)

    def value(self, b: int, k: int) -> list[float]:
        first_active = self.Sp - self.S
        if k >= first_active:
            return [float(self.v_active[b, 0, k - first_active, e]) for e in range(self.d)]
        return self.prior_slot("v", b, k)

    def visible(self, b: int, h: int, i: int, k: int) -> bool:
        """May query i of row b, head h see key k (docs/design/kernel.md step 4)."""
        cfg = self.cfg
        first_active = self.Sp - self.S
        if cfg.use_pos_id:
            if k >= first_active:
                return self.mask[k - first_active, b, h, i] != 0
            if self.start is None:
                return k < self.pos[b, 0]
            start, end = self.start[b, i], self.pos[b, i]
            if start > end:  # circular cache, the window wraps around
                return k >= start or k < end
            return start <= k < end
        row = mask_row_of_token(k, mask_order_len(cfg, self.lnc)) if cfg.block_len else k
        return self.mask[row, b, h, i] != 0


def naive_attention(cfg: Any, args: dict[str, Any], lnc: int = 1) -> dict[str, Any]:
    """Everything `attention_tkg` computes for `args` (numpy, kernel layouts), in float64.

    Returns `out` in cfg.out_shape, `k_out` in cfg.k_out_shape (always, even if the call does
    not ask for it) and `dbg`: `qk` `[B, H, Sp, S]` (-inf where masked), `qk_max` and `exp_sum`
    `[B, H, 1, S]` (incl. the sink), `qk_exp` `[B, H, Sp, S]`. Raises ValueError for a query
    that sees no key and has no finite sink.
    """
    c = NaiveCall(cfg, args, lnc)
    B, H, S, d, Sp = c.B, c.H, c.S, c.d, c.Sp
    out = np.zeros(cfg.out_shape)
    qk = np.full((B, H, Sp, S), -np.inf)
    qk_exp = np.zeros((B, H, Sp, S))
    qk_max = np.zeros((B, H, 1, S))
    exp_sum = np.zeros((B, H, 1, S))
    for b in range(B):
        keys = [c.key(b, k) for k in range(Sp)] if Sp else []
        for h in range(H):
            for i in range(S):
                q = c.scaled_query(b, h, i)
                logits: dict[int, float] = {}
                for k in range(Sp):
                    if c.visible(b, h, i, k):
                        logits[k] = sum(q[e] * keys[k][e] for e in range(d))
                sink = None if c.sink is None else float(c.sink[h])
                candidates = list(logits.values()) + ([sink] if sink is not None else [])
                m = max(candidates) if candidates else -math.inf
                if m == -math.inf:
                    raise ValueError(f"naive: every key is masked for b={b}, h={h}, i={i}")
                weights = {k: math.exp(s - m) for k, s in logits.items()}
                denom = sum(weights.values()) + (math.exp(sink - m) if sink is not None else 0.0)
                acc = [0.0] * d
                for k, w in weights.items():
                    v = c.value(b, k)
                    for e in range(d):
                        acc[e] += w * v[e]
                    qk[b, h, k, i] = logits[k]
                    qk_exp[b, h, k, i] = w
                qk_max[b, h, 0, i] = m
                exp_sum[b, h, 0, i] = denom
                for e in range(d):
                    val = acc[e] / denom
                    if cfg.out_in_sb:  # [d, B*H*S], column b*H*S + h*S + i
                        out[e, b * H * S + h * S + i] = val
                    else:  # [B, H, d, S]: d before S
                        out[b, h, e, i] = val
    k_out = np.zeros(cfg.k_out_shape)
    for b in range(B):
        for j in range(S):
            k = c.rotated_active_key(b, j)
            for e in range(d):
                if cfg.k_out_in_sb:
                    k_out[e, b * S + j] = k[e]
                else:
                    k_out[b, 0, e, j] = k[e]
    dbg = {"qk": qk, "qk_max": qk_max, "qk_exp": qk_exp, "exp_sum": exp_sum}
    return {"out": out, "k_out": k_out, "dbg": dbg}


def naive_decode(
    q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float, window: int | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Decode over one sequence's contiguous K/V: `[Hq, S, d]` float64.

    q `[Hq, S, d]`, K/V `[T, Hkv, d]` (the cache with the S new tokens last). Query i sits at
    position `t = T - S + i` and sees positions `j <= t` (and `t - j < window`); q head h reads kv
    head `h // (Hq / Hkv)`; a sink (one logit per q head) joins the softmax's denominator only.
    """
    Hq, S, d = q.shape
    T, Hkv, _ = K.shape
    G = Hq // Hkv
    qf, Kf, Vf = _f(q), _f(K), _f(V)
    out = np.zeros((Hq, S, d))
    for h in range(Hq):
        g = h // G
        for i in range(S):
            t = T - S + i
            seen = [j for j in range(t + 1) if window is None or t - j < window]
            logits = [float(np.dot(qf[h, i], Kf[j, g])) * scale for j in seen]
            sink = None if sinks is None else float(np.asarray(sinks).reshape(-1)[h])
            candidates = logits + ([sink] if sink is not None else [])
            m = max(candidates) if candidates else -math.inf
            if m == -math.inf:
                raise ValueError(f"naive: query {i} of head {h} sees no key and has no finite sink")
            weights = [math.exp(x - m) for x in logits]
            denom = sum(weights) + (math.exp(sink - m) if sink is not None else 0.0)
            for w, j in zip(weights, seen, strict=True):
                out[h, i] += w * Vf[j, g]
            out[h, i] /= denom
    return out


def naive_paged_decode(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    scale: float,
    window: int | None = None,
    sinks: np.ndarray | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> np.ndarray:
    """`paged_decode` sequence by sequence: `[B, Hq, S, d]` float64.

    The pools hold value / scale: every cached key is `k_scale * stored`, every value `v_scale * stored`.
    Position j of sequence b lives at `cache[g, block_tables[b, j // BL], j % BL]` for kv head g;
    each sequence's first `seq_lens[b]` positions are gathered row by row and decoded by
    `naive_decode`. Rows before the first window are never read (left zero), so garbage there
    cannot reach the output.
    """
    B, Hq, S, d = q.shape
    Hkv, _, BL, _ = k_cache.shape
    out = np.zeros((B, Hq, S, d))
    for b in range(B):
        L = int(seq_lens[b])
        first = 0 if window is None else max(0, L - S - window + 1)  # earlier rows no query sees
        rows = [(int(block_tables[b, j // BL]), j % BL) for j in range(first, L)]
        K = np.zeros((L, Hkv, d))
        V = np.zeros((L, Hkv, d))
        for j, (blk, off) in zip(range(first, L), rows, strict=True):
            K[j] = k_scale * _f(k_cache[:, blk, off])
            V[j] = v_scale * _f(v_cache[:, blk, off])
        out[b] = naive_decode(q[b], K, V, scale, window, sinks)
    return out


def naive_partial_decode(
    q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float, first_query: int | None = None,
    window: int | None = None, sinks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A context-parallel segment's decode (docs/context-parallel.md): out `[Hq, S, d]` and lse
    `[Hq, S]`, float64.

    q `[Hq, S, d]`, K/V `[T, Hkv, d]` (T may be 0). Query i sits at key index `t = first_query + i`
    (None: `T - S + i`, the S new tokens being the last keys) and sees keys `j < T`, `j <= t` (and
    `t - j < window`). lse is the natural log of the softmax denominator over the scaled logits
    it saw, incl. the sink's term: `log(sum_j exp(logit_j) + exp(sink))`. A query that saw no key
    and has no sink gets out 0 and lse -inf.
    """
    Hq, S, d = q.shape
    T = K.shape[0]
    Hkv = K.shape[1] if T else 1
    G = Hq // Hkv
    first = T - S if first_query is None else first_query
    qf, Kf, Vf = _f(q), _f(K), _f(V)
    out = np.zeros((Hq, S, d))
    lse = np.full((Hq, S), -math.inf)
    for h in range(Hq):
        g = h // G
        for i in range(S):
            t = first + i
            seen = [j for j in range(min(t + 1, T)) if window is None or t - j < window]
            logits = [float(np.dot(qf[h, i], Kf[j, g])) * scale for j in seen]
            sink = None if sinks is None else float(np.asarray(sinks).reshape(-1)[h])
            candidates = logits + ([sink] if sink is not None else [])
            if not candidates or max(candidates) == -math.inf:
                continue
            m = max(candidates)
            weights = [math.exp(x - m) for x in logits]
            denom = sum(weights) + (math.exp(sink - m) if sink is not None else 0.0)
            for w, j in zip(weights, seen, strict=True):
                out[h, i] += w * Vf[j, g]
            out[h, i] /= denom
            lse[h, i] = m + math.log(denom)
    return out, lse
