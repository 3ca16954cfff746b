"""The inputs of `tkg bench kernel`: one decode step over a paged, head-major KV pool, and its peers' views.

A `Case` holds the service's layout (pools `[Hkv, NB, BL, d]`, a shuffled block table, ragged or equal
lengths that include the S new tokens) and derives from it, once and outside any timing, what each peer
consumes: the folded-row `attention_tkg` call (one row per (sequence, kv head), block KV, generated
mask) and a contiguous `[B, Hkv, L, d]` cache for torch's scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tkg.dtypes import BF16, FP8, to_fp8
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.decisions import round_up
from tkg.kernel.paged import PagedArgs, check_paged_args


@dataclass(frozen=True)
class Shape:
    """One benchmark shape. `ragged`: lengths spread over [context/2, context], else all `context`."""

    batch: int
    kv_heads: int
    q_per_kv: int
    d: int
    context: int
    s: int
    block_len: int
    ragged: bool
    dtype: np.dtype  # of the KV pools

    @property
    def io_dtype(self) -> np.dtype:
        """q and out: the KV dtype, bf16 for an fp8 cache (fp8 is storage only)."""
        return BF16 if np.dtype(self.dtype) == FP8 else np.dtype(self.dtype)

    @property
    def label(self) -> str:
        lens = "ragged" if self.ragged else "equal"
        kv = " fp8" if np.dtype(self.dtype) == FP8 else ""
        return f"S={self.s} BL={self.block_len} {lens}{kv}"


class Case:
    """Random inputs for `shape` (seeded), in the service's paged layout."""

    def __init__(self, shape: Shape, seed: int = 0) -> None:
        self.shape = shape
        rng = np.random.default_rng(seed)
        B, Hkv, G, d, BL, S = shape.batch, shape.kv_heads, shape.q_per_kv, shape.d, shape.block_len, shape.s
        if shape.ragged:
            lens = np.linspace(shape.context // 2, shape.context, B).astype(np.int64)
            lens = rng.permutation(np.maximum(lens, S))
        else:
            lens = np.full(B, shape.context, dtype=np.int64)
        self.seq_lens = lens.astype(np.int32)
        self.max_blocks = -(-int(lens.max()) // BL)
        nb_used = sum(-(-int(n) // BL) for n in lens)
        num_blocks = nb_used + 8  # a few blocks no sequence owns, as in a live pool
        # Shuffled physical blocks: each sequence's blocks are scattered over the pool.
        perm = rng.permutation(num_blocks).astype(np.int32)
        self.block_tables = np.zeros((B, self.max_blocks), dtype=np.int32)
        at = 0
        for b, n in enumerate(lens):
            used = -(-int(n) // BL)
            self.block_tables[b, :used] = perm[at : at + used]
            at += used

        def rand(*dims: int, dtype: np.dtype = shape.dtype) -> np.ndarray:
            x = rng.standard_normal(dims, dtype=np.float32)
            return to_fp8(x) if np.dtype(dtype) == FP8 else x.astype(dtype)

        self.k_cache = rand(Hkv, num_blocks, BL, d)
        self.v_cache = rand(Hkv, num_blocks, BL, d)
        self.q = rand(B, Hkv * G, S, d, dtype=shape.io_dtype)
        self.scale = float(d) ** -0.5

    @property
    def kv_bytes(self) -> int:
        """Compulsory bytes: every cached K and V element of every sequence, read once."""
        s = self.shape
        return int(self.seq_lens.sum()) * s.kv_heads * s.d * 2 * np.dtype(s.dtype).itemsize

    def paged_args(self) -> PagedArgs:
        return check_paged_args(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.scale,
            out=np.empty_like(self.q),
        )  # fmt: skip

    @cached_property
    def folded(self) -> dict:
        """`attention_tkg` arguments with rows = (sequence, kv head) folded: bs = B*Hkv, q_head = G."""
        s = self.shape
        B, Hkv, G, d, BL, S = s.batch, s.kv_heads, s.q_per_kv, s.d, s.block_len, s.s
        R = B * Hkv
        NB = self.k_cache.shape[1]
        lens = self.seq_lens.astype(np.int64)
        Sp = round_up(int(lens.max()), BL)
        nblk = Sp // BL
        # Row (b, g) reads kv head g's blocks: the pool viewed as [Hkv*NB, BL, d], ids offset by g*NB.
        table = np.zeros((B, Hkv, nblk), dtype=np.int64)
        table[:, :, : self.max_blocks] = self.block_tables[:, None, :nblk]
        for b in range(B):
            table[b, :, -(-int(lens[b]) // BL) :] = 0  # past the sequence: any valid block, masked
        table += (np.arange(Hkv) * NB)[None, :, None]
        table = table.reshape(R, nblk).astype(np.uint32)
        cached = np.repeat(lens - S, Hkv)  # [R]
        pos = cached[:, None] + np.arange(S)[None, :]  # [R, S]
        kpool = self.k_cache.reshape(Hkv * NB, BL, d)
        vpool = self.v_cache.reshape(Hkv * NB, BL, d)
        flat_blk = table.astype(np.int64)[np.arange(R)[:, None], pos // BL]
        k_act = kpool[flat_blk, pos % BL]  # [R, S, d]
        v_act = vpool[flat_blk, pos % BL]
        qs = (self.q.astype(np.float32) * np.float32(self.scale)).astype(s.io_dtype)  # [B, Hkv*G, S, d]
        q_sb = qs.reshape(R, G, S, d).transpose(3, 0, 1, 2).reshape(d, R * G * S)
        mask = np.broadcast_to(np.tril(np.ones((S, S), np.uint8)).T[:, None, None, :], (S, R, G, S)).copy()
        cfg = AttnTKGConfig(
            bs=R, q_head=G, s_active=S, curr_sprior=Sp, full_sprior=Sp, d_head=d, block_len=BL,
            tp_k_prior=True, strided_mm1=False, use_pos_id=True, qk_in_sb=True,
        )  # fmt: skip
        return dict(
            q=np.ascontiguousarray(q_sb), k_active=np.ascontiguousarray(k_act.transpose(2, 0, 1).reshape(d, R * S)),
            v_active=np.ascontiguousarray(v_act[:, None]), k_prior=kpool, v_prior=vpool, mask=mask,
            out=np.empty(cfg.out_shape, dtype=s.io_dtype), cfg=cfg, rope_pos_ids=pos.astype(np.float32),
            active_blocks_table=table,
        )  # fmt: skip

    def unfold_out(self, out: np.ndarray) -> np.ndarray:
        """A folded `attention_tkg` output `[B*Hkv, G, d, S]` as `[B, Hq, S, d]`."""
        s = self.shape
        return out.reshape(s.batch, s.kv_heads * s.q_per_kv, s.d, s.s).transpose(0, 1, 3, 2)

    @cached_property
    def contiguous(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """K, V `[B, Hkv, Lmax, d]` gathered from the pool, and the visibility `[B, 1, S, Lmax]` (None if all)."""
        s = self.shape
        B, S = s.batch, s.s
        Lmax = int(self.seq_lens.max())
        ids = self.block_tables[:, : self.max_blocks]  # [B, nblk]
        k = self.k_cache[:, ids].reshape(s.kv_heads, B, -1, s.d)[:, :, :Lmax].transpose(1, 0, 2, 3)
        v = self.v_cache[:, ids].reshape(s.kv_heads, B, -1, s.d)[:, :, :Lmax].transpose(1, 0, 2, 3)
        t = self.seq_lens[:, None].astype(np.int64) - S + np.arange(S)[None, :]  # [B, S] query positions
        vis = np.arange(Lmax)[None, None, :] <= t[:, :, None]  # [B, S, Lmax]
        mask = None if vis.all() else np.ascontiguousarray(vis[:, None])
        return np.ascontiguousarray(k), np.ascontiguousarray(v), mask
