"""`paged_decode`: the service's decode step over a paged, head-major KV pool.

The service keeps, per layer, K and V pools `[Hkv, num_blocks, block_len, d]` and appends the S
new tokens of each sequence BEFORE calling this, so the new keys are ordinary cache entries. The
call attends each of the S queries to its sequence's keys causally (query i of a sequence whose
length is now L sees keys `j <= L - S + i`), optionally within a sliding window and with a per-head
sink. This is `attention_tkg`'s math with the (sequence, kv head) rows folded, ragged lengths and a
per-q-head sink, expressed directly.

Backends with a native implementation (`cpu`) provide `paged_decode`; every other backend is
driven through `attention_tkg` once per kv head by `paged_via_attention_tkg`, which makes the
service's path a test of the seed API too.

Partial calls (context parallelism, docs/context-parallel.md): `lse` asks for each query's
log-sum-exp, and `q_start` makes the call attend-only (no new tokens: query i of sequence b sits
at key index `q_start[b] + i >= seq_lens[b]` and sees every cached key within the window; no sink).
A query that sees no key gets out 0 and lse -inf. They run on a backend's `paged_decode_partial`
(`partial_decoder`); backends without one refuse them (`supports_partial`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tkg.dtypes import FP8, IO_NUMPY
from tkg.kernel import backends
from tkg.kernel.arrays import as_f32
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.decisions import round_up


@dataclass(frozen=True)
class PagedArgs:
    """A validated `paged_decode` call (numpy views, no copies)."""

    q: np.ndarray  # [B, Hq, S, d], io dtype, RoPE applied, NOT scaled
    k_cache: np.ndarray  # [Hkv, NB, BL, d]
    v_cache: np.ndarray  # [Hkv, NB, BL, d]
    block_tables: np.ndarray  # int32 [B, max_blocks]
    seq_lens: np.ndarray  # int32 [B], tokens incl. the S new ones
    scale: float
    window: int | None
    sinks: np.ndarray | None  # float32 [Hq]
    out: np.ndarray  # [B, Hq, S, d], io dtype
    k_scale: float = 1.0  # the pools hold value / scale (fp8 caches); the kernel multiplies back
    v_scale: float = 1.0
    lse: np.ndarray | None = None  # float32 [B, Hq, S] destination: log-sum-exp of each query's logits
    q_start: np.ndarray | None = None  # int64 [B]: attend-only; key index of each sequence's first query

    @property
    def partial(self) -> bool:
        """A context-parallel call (lse asked, or attend-only): `paged_decode_partial` runs it."""
        return self.lse is not None or self.q_start is not None

    def query_index(self) -> np.ndarray:
        """int64 `[B, S]`: the key index each query sits at (`seq_lens - S + i`, or `q_start + i`)."""
        S = self.q.shape[2]
        first = self.seq_lens.astype(np.int64) - S if self.q_start is None else self.q_start
        return first[:, None] + np.arange(S, dtype=np.int64)[None, :]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[0]

    @property
    def block_len(self) -> int:
        return self.k_cache.shape[2]


def check_paged_args(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    scale: float,
    window: int | None = None,
    sinks: np.ndarray | None = None,
    out: np.ndarray | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    check_tables: bool = True,
    lse: np.ndarray | None = None,
    q_start: np.ndarray | None = None,
) -> PagedArgs:
    """Shape/dtype/range checks; ValueError naming the argument and the expected value.

    `check_tables=False` skips the range check of the tables' used entries (per step, O(B x
    max_blocks)): for tables the caller's own bookkeeping built (the service's KV cache).
    `lse` (float32 `[B, Hq, S]`) and `q_start` (int `[B]`, attend-only) make a partial call, whose
    `out` may be float32 whatever q's dtype (partial results merge without an extra rounding)."""
    if q.ndim != 4 or q.dtype not in IO_NUMPY:
        raise ValueError(f"paged_decode: q: expected [B, Hq, S, d] float32/float16/bfloat16, got {q.dtype} {q.shape}")
    B, Hq, S, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape[3] != d or k_cache.dtype not in (q.dtype, FP8):
        raise ValueError(
            f"paged_decode: k_cache: expected [Hkv, NB, BL, {d}] {q.dtype} or float8_e4m3, "
            f"got {k_cache.dtype} {k_cache.shape}"
        )
    if not (np.isfinite(k_scale) and k_scale > 0):
        raise ValueError(f"paged_decode: k_scale: {k_scale!r} must be a finite number > 0")
    if not (np.isfinite(v_scale) and v_scale > 0):
        raise ValueError(f"paged_decode: v_scale: {v_scale!r} must be a finite number > 0")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"paged_decode: v_cache: expected {k_cache.shape} {k_cache.dtype}, got {v_cache.dtype} {v_cache.shape}"
        )
    Hkv, NB, BL, _ = k_cache.shape
    if Hq % Hkv:
        raise ValueError(f"paged_decode: q: {Hq} q heads is not a multiple of {Hkv} kv heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != B:
        raise ValueError(f"paged_decode: block_tables: expected [{B}, max_blocks], got {block_tables.shape}")
    if seq_lens.shape != (B,):
        raise ValueError(f"paged_decode: seq_lens: expected [{B}], got {seq_lens.shape}")
    least = f"S={S}" if q_start is None else "0"  # attend-only: no new tokens, an empty segment is fine
    if B and (seq_lens.min() < (S if q_start is None else 0) or seq_lens.max() > block_tables.shape[1] * BL):
        raise ValueError(
            f"paged_decode: seq_lens: each must lie in [{least}, {block_tables.shape[1] * BL}], got {seq_lens.tolist()}"
        )
    if q_start is not None:
        q_start = np.asarray(q_start, dtype=np.int64)
        if q_start.shape != (B,) or (B and (q_start < seq_lens).any()):
            raise ValueError(
                f"paged_decode: q_start: expected [{B}] key indices at or past seq_lens {seq_lens.tolist()}, "
                f"got {q_start.tolist()}"
            )
        if sinks is not None:
            raise ValueError("paged_decode: sinks: an attend-only call (q_start) adds no sink; expected None")
    # Only the entries a sequence uses must be valid ids; one vectorised check (this is per step).
    if check_tables:
        nblocks = -(-np.asarray(seq_lens, dtype=np.int64) // BL)
        used = np.arange(block_tables.shape[1])[None, :] < nblocks[:, None]
        bad = used & ((block_tables < 0) | (block_tables >= NB))
        if bad.any():
            b = int(np.argmax(bad.any(axis=1)))
            ids = block_tables[b, : nblocks[b]].tolist()
            raise ValueError(f"paged_decode: block_tables[{b}]: ids must lie in [0, {NB}), got {ids}")
    if window is not None and window < (S if q_start is None else 1):
        raise ValueError(f"paged_decode: window: {window} must be >= {f'S={S}' if q_start is None else 1}")
    if sinks is not None:
        sinks = as_f32(sinks).reshape(-1)
        if sinks.shape != (Hq,):
            raise ValueError(f"paged_decode: sinks: expected [{Hq}], got {sinks.shape}")
    partial = lse is not None or q_start is not None
    if out is None:
        out = np.empty(q.shape, np.float32) if partial else np.empty_like(q)
    elif out.shape != q.shape or not (out.dtype == q.dtype or (partial and out.dtype == np.float32)):
        raise ValueError(f"paged_decode: out: expected {q.shape} {q.dtype}, got {out.dtype} {out.shape}")
    if lse is not None and (lse.shape != (B, Hq, S) or lse.dtype != np.float32):
        raise ValueError(f"paged_decode: lse: expected [{B}, {Hq}, {S}] float32, got {lse.dtype} {lse.shape}")
    return PagedArgs(
        q, k_cache, v_cache, np.asarray(block_tables, dtype=np.int32), np.asarray(seq_lens, dtype=np.int32),
        float(scale), window, sinks, out, float(k_scale), float(v_scale), lse, q_start,
    )  # fmt: skip


def paged_decode(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    *,
    scale: float,
    window: int | None = None,
    sinks: np.ndarray | None = None,
    out: np.ndarray | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    backend: str = "auto",
    **backend_options: object,
) -> np.ndarray:
    """One decode step of one layer for a batch of sequences over a paged KV pool.

    Args:
        q: `[B, Hq, S, d]` queries (RoPE already applied, not scaled), float32/float16/bfloat16.
        k_cache, v_cache: `[Hkv, num_blocks, block_len, d]`, the same dtype (q's, or float8_e4m3),
            already holding the S new tokens of every sequence at positions `seq_lens[b]-S .. seq_lens[b]-1`.
        block_tables: int `[B, max_blocks]`; entry i is the physical block of logical block i.
        seq_lens: int `[B]`, tokens per sequence including the S new ones.
        scale: softmax scale applied to q (usually `1/sqrt(d)`).
        window: sliding window W: query at position t sees keys j with `t - j < W`; None = all.
        sinks: float32 `[Hq]` per-q-head sink logits (gpt-oss), or None.
        out: optional destination `[B, Hq, S, d]`.
        k_scale, v_scale: the pools hold value / scale (vLLM's fp8 convention): keys and values
            are multiplied back by these (logits by k_scale, the output by v_scale). Default 1.
        backend: a `tkg.kernel.backends` name or "auto".

    Returns:
        `[B, Hq, S, d]` attention output in q's dtype (`out` when given).
    """
    args = check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, scale, window, sinks, out, k_scale, v_scale)
    mod = backends.load(backend, backend_options)
    run_paged(mod, mod.NAME, args, **backend_options)
    return args.out


def run_paged(mod: backends.KernelBackend, backend: str, args: PagedArgs, **backend_options: object) -> None:
    """Run checked `args` on backend module `mod` (its `NAME` is `backend`): its own
    `paged_decode`, else through `attention_tkg`. For callers that resolved the backend once
    (a KV store: resolving costs a few us per call, every layer of every step)."""
    if args.partial:
        partial = partial_decoder(mod)
        if partial is None:
            raise ValueError(f"paged_decode: backend {backend} does not support lse or attend-only calls yet")
        partial(args, **backend_options)  # the store's options too (the cpu backend's thread cap)
        return
    impl = getattr(mod, "paged_decode", None)
    if impl is not None:
        impl(args, **backend_options)
    else:
        paged_via_attention_tkg(args, backend, **backend_options)


def partial_decoder(mod: backends.KernelBackend) -> Callable[..., None] | None:
    """The backend's `paged_decode_partial` (lse, attend-only), or None: it refuses such calls.

    `reference`, `cpu_torch` and `cpu` have one; the `cpu` backend's runs on its native C kernel
    and falls back to `cpu_torch` only for calls the native kernel does not cover
    (`cpu.paged_native_ok`: a strided pool, d > 256, TKG_CPU_NATIVE=0, the extension not built)."""
    return getattr(mod, "paged_decode_partial", None)


def paged_via_attention_tkg(args: PagedArgs, backend: str, *, align: int = 1, **options: object) -> None:
    """Run a paged step through `attention_tkg`, one call per kv head (block KV, use_pos_id).

    Per kv head g: q heads `[g*G, (g+1)*G)` in the SBUF layout, pre-scaled; the S newest cache
    entries of each sequence as k_active/v_active; the prior mask generated from the cached
    lengths; the bucket `curr_sprior` = max length rounded up to the block length (and `align`).
    """
    from tkg.kernel.api import attention_tkg

    q, out = args.q, args.out
    B, Hq, S, d = q.shape
    Hkv, BL = args.num_kv_heads, args.block_len
    G = Hq // Hkv
    lens = args.seq_lens.astype(np.int64)
    cached = lens - S
    Sp = round_up(max(int(lens.max()), 1), np.lcm(BL, align))
    nblk = Sp // BL

    # Table padded with block 0 past each sequence's blocks: in range, and masked (k >= cached).
    table = np.zeros((B, nblk), dtype=np.uint32)
    for b in range(B):
        used = -(-int(lens[b]) // BL)
        table[b, :used] = args.block_tables[b, :used]
    # Positions and physical slots of the S newest tokens of every sequence.
    new_pos = cached[:, None] + np.arange(S)[None, :]  # [B, S]
    new_blk = np.take_along_axis(table.astype(np.int64), new_pos // BL, axis=1)
    new_off = new_pos % BL
    # Every query's window ends at the cached length (its earlier new tokens are the active ones,
    # masked causally); with W >= S a start never passes it, so no window wraps.
    rope_pos = np.repeat(cached[:, None], S, axis=1).astype(np.float32)
    start = None
    if args.window is not None:
        start = np.maximum(new_pos - args.window + 1, 0).astype(np.float32)
    active_mask = np.broadcast_to(
        np.tril(np.ones((S, S), dtype=np.uint8)).T[:, None, None, :], (S, B, G, S)
    ).copy()  # mask[j, b, h, i] = j <= i
    cfg = AttnTKGConfig(
        bs=B, q_head=G, s_active=S, curr_sprior=Sp, full_sprior=Sp, d_head=d, block_len=BL,
        tp_k_prior=True, strided_mm1=False, use_pos_id=True, qk_in_sb=True,
    )  # fmt: skip
    qs = (as_f32(q) * np.float32(args.scale * args.k_scale)).astype(q.dtype)
    for g in range(Hkv):
        qg = qs[:, g * G : (g + 1) * G].transpose(3, 0, 1, 2).reshape(d, B * G * S)
        kg, vg = args.k_cache[g], args.v_cache[g]
        k_act = kg[new_blk, new_off].transpose(2, 0, 1).reshape(d, B * S)
        v_act = vg[new_blk, new_off][:, None]  # [B, 1, S, d]
        sink = None if args.sinks is None else args.sinks[g * G : (g + 1) * G].reshape(G, 1)
        res, _ = attention_tkg(
            np.ascontiguousarray(qg), np.ascontiguousarray(k_act), np.ascontiguousarray(v_act),
            kg, vg, active_mask, None, cfg, None,
            rope_pos_ids=rope_pos, sink=sink, active_blocks_table=table,
            start_pos_ids=start, backend=backend, **options,
        )  # fmt: skip
        res = res.transpose(0, 1, 3, 2)  # [B, G, d, S] -> [B, G, S, d]
        out[:, g * G : (g + 1) * G] = res if args.v_scale == 1.0 else as_f32(res) * np.float32(args.v_scale)
