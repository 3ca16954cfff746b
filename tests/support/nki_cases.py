"""Random `attention_tkg` calls over the kernel's feature matrix, shared by the NKI kernel tests.

`build_case` makes the arguments of one call in the layouts of docs/design/kernel.md: ragged cached
lengths, an active causal triangle, optional sink / sliding window / fused RoPE, flat or block KV
(block pools with a shuffled table and spare blocks), `B+ > B` padding rows and
`curr_sprior < full_sprior` for flat caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tkg.dtypes import BY_SHORT
from tkg.kernel.config import AttnTKGConfig

DTYPES = {short: BY_SHORT[short].numpy for short in ("fp32", "bf16", "fp16")}
# (rtol, atol) against the fp32 reference computed from the same rounded inputs.
TOLERANCE = {"fp32": (1e-4, 2e-5), "bf16": (3e-2, 3e-2), "fp16": (1e-2, 1e-2)}


@dataclass
class Case:
    """One kernel test case: a config plus how to fill its inputs."""

    name: str
    cfg: AttnTKGConfig
    dtype: str = "fp32"
    lnc: int = 1
    sink: bool = False
    window: int | None = None  # sliding window (use_pos_id); a wrap-around row is included
    dbg: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def shuffle_block_mask(natural: np.ndarray, block_len: int) -> np.ndarray:
    """Natural key order `[Sp, ...]` -> the kernel's fold order (inverse of `reference.unshuffle_block_mask`)."""
    sp = natural.shape[0]
    folds = sp // (block_len * 128)
    m = natural.reshape((folds, 128, block_len, *natural.shape[1:]))
    return np.ascontiguousarray(np.swapaxes(m, 1, 2).reshape(natural.shape))


def build_case(case: Case) -> dict[str, Any]:
    """Keyword arguments for `tkg.kernel.attention_tkg` (without `backend`)."""
    cfg = case.cfg
    rng = np.random.default_rng(case.seed)
    dt = DTYPES[case.dtype]
    B, H, S, d, Sp, Spf = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior, cfg.full_sprior

    def rnd(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dt)

    # Cached lengths: ragged, one row at the full bucket, one short.
    cached = rng.integers(0, Sp - S + 1, size=B)
    cached[0] = Sp - S
    if B > 1:
        cached[-1] = min(int(cached[-1]), 3)
    pos = (cached[:, None] + np.arange(S)[None, :]).astype(np.float32)  # [B, S]

    qscale = 1.0 if cfg.fuse_rope else d**-0.5  # without fused RoPE q arrives pre-scaled
    q_nat = rnd(B, H, S, d, scale=qscale)
    k_nat = rnd(B, S, d)
    args: dict[str, Any] = {}
    if cfg.qk_in_sb:
        args["q"] = np.ascontiguousarray(q_nat.transpose(3, 0, 1, 2).reshape(d, B * H * S))
        args["k_active"] = np.ascontiguousarray(k_nat.transpose(2, 0, 1).reshape(d, B * S))
    else:
        args["q"] = q_nat
        args["k_active"] = np.ascontiguousarray(k_nat[:, None])
    args["v_active"] = rnd(B, 1, S, d)

    if cfg.is_block_kv:
        nblk = Sp // cfg.block_len
        pool_blocks = B * nblk + 5
        args["k_prior"] = rnd(pool_blocks, cfg.block_len, d)
        args["v_prior"] = rnd(pool_blocks, cfg.block_len, d)
        args["active_blocks_table"] = rng.permutation(pool_blocks)[: B * nblk].reshape(B, nblk).astype(np.uint32)
    else:
        bplus = B + 1
        kp = rnd(bplus, 1, Spf, d)
        args["k_prior"] = kp if cfg.tp_k_prior else np.ascontiguousarray(kp.transpose(0, 1, 3, 2))
        args["v_prior"] = rnd(bplus, 1, Spf, d)

    tri = (np.arange(S)[:, None] <= np.arange(S)[None, :]).astype(np.uint8)  # [j, i]: key j visible to query i
    if cfg.use_pos_id:
        args["mask"] = np.ascontiguousarray(np.broadcast_to(tri[:, None, None, :], (S, B, H, S)))
        args["rope_pos_ids"] = pos
        if case.window is not None:
            start = np.maximum(pos - case.window + 1, 0)
            if B > 1:
                # A circular cache whose window wraps: start past the cached length.
                start[1] = min(int(cached[1]) + 7, Sp - S - 1)
            args["start_pos_ids"] = start.astype(np.float32)
    else:
        keys = np.arange(Sp)
        prior = keys[:, None] < cached[None, :]  # [Sp, B]
        m = np.broadcast_to(prior[:, :, None, None], (Sp, B, H, S)).astype(np.uint8).copy()
        m[Sp - S :] = tri[:, None, None, :]
        args["mask"] = shuffle_block_mask(m, cfg.block_len) if cfg.is_block_kv else m
        if cfg.fuse_rope:
            args["rope_pos_ids"] = pos
    if cfg.fuse_rope:
        args["inv_freqs"] = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32).reshape(d // 2, 1)
    if case.sink:
        args["sink"] = (rng.standard_normal((H, 1)) * 2).astype(np.float32)
    if case.dbg:
        args["DBG_TENSORS"] = {
            "qk": np.zeros((B, H, Sp, S), np.float32),
            "qk_max": np.zeros((B, H, 1, S), np.float32),
            "qk_exp": np.zeros((B, H, Sp, S), np.float32),
            "exp_sum": np.zeros((B, H, 1, S), np.float32),
        }
    args["out"] = None
    args["cfg"] = cfg
    args.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.extra.items()})
    return args


def cfg(**kw: Any) -> AttnTKGConfig:
    """AttnTKGConfig with small defaults: B=2, H=2, S=2, d=64, Sp=256, Spf=384, qk in SBUF."""
    base: dict[str, Any] = dict(bs=2, q_head=2, s_active=2, curr_sprior=256, full_sprior=384, d_head=64, qk_in_sb=True)
    base.update(kw)
    if base.get("block_len", 0):
        base.setdefault("tp_k_prior", True)
        base.setdefault("strided_mm1", False)
        base["full_sprior"] = base["curr_sprior"]
    return AttnTKGConfig(**base)
