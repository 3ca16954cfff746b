"""`AttnTKGConfig`: the static shape and flags of one `attention_tkg` call.

Field names, order and defaults follow the Neuron kernel library's `AttnTKGConfig`
(docs/design/kernel.md, research/nki.md section 1.2), so code written against that library ports
unchanged. `enable_fa_s_prior_tiling` is the library's later addition, kept with its default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttnTKGConfig:
    """Shapes and flags of one `attention_tkg` call.

    Attributes:
        bs: B, batch rows (sequences, or folded (sequence, kv head) rows).
        q_head: H, query heads sharing the ONE kv head of the call.
        s_active: S, new tokens per sequence (1..8).
        curr_sprior: Sp, keys attended in this call (the bucket); the last S slots are the
            active tokens.
        full_sprior: Spf, allocated cache length (>= Sp).
        d_head: d, head dimension (<= 128).
        block_len: 0 for a flat cache, else tokens per block of the paged cache.
        tp_k_prior: K prior arrives `[B+, 1, Spf, d]` (True) or pre-transposed `[B+, 1, d, Spf]`.
        strided_mm1: NKI tiling choice (K read strided so V streams); no effect on the result.
        use_pos_id: generate the prior mask from `rope_pos_ids[:, 0]` (cached lengths).
        fuse_rope: rotate q and k_active in the kernel, then scale q by 1/sqrt(d).
        use_gpsimd_sb2sb: NKI cross-core exchange path; no effect on the result.
        qk_in_sb: q and k_active arrive in the SBUF layouts `[d, B*H*S]` and `[d, B*S]`.
        k_out_in_sb: k_out is `[d, B*S]` instead of `[B, 1, d, S]`.
        out_in_sb: out is `[d, B*H*S]` instead of `[B, H, d, S]`.
        enable_fa_s_prior_tiling: allow flash (online-softmax) tiling past 8192 keys per core.
    """

    bs: int
    q_head: int
    s_active: int
    curr_sprior: int
    full_sprior: int
    d_head: int
    block_len: int = 0
    tp_k_prior: bool = False
    strided_mm1: bool = True
    use_pos_id: bool = False
    fuse_rope: bool = False
    use_gpsimd_sb2sb: bool = True
    qk_in_sb: bool = False
    k_out_in_sb: bool = False
    out_in_sb: bool = False
    enable_fa_s_prior_tiling: bool = True

    @property
    def is_block_kv(self) -> bool:
        return self.block_len > 0

    # Shapes of the arguments, one place for validation, backends and tests.
    @property
    def q_shape(self) -> tuple[int, ...]:
        B, H, S, d = self.bs, self.q_head, self.s_active, self.d_head
        return (d, B * H * S) if self.qk_in_sb else (B, H, S, d)

    @property
    def k_active_shape(self) -> tuple[int, ...]:
        B, S, d = self.bs, self.s_active, self.d_head
        return (d, B * S) if self.qk_in_sb else (B, 1, S, d)

    @property
    def v_active_shape(self) -> tuple[int, ...]:
        return (self.bs, 1, self.s_active, self.d_head)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        keys = self.s_active if self.use_pos_id else self.curr_sprior
        return (keys, self.bs, self.q_head, self.s_active)

    @property
    def out_shape(self) -> tuple[int, ...]:
        B, H, S, d = self.bs, self.q_head, self.s_active, self.d_head
        return (d, B * H * S) if self.out_in_sb else (B, H, d, S)

    @property
    def k_out_shape(self) -> tuple[int, ...]:
        B, S, d = self.bs, self.s_active, self.d_head
        return (d, B * S) if self.k_out_in_sb else (B, 1, d, S)

    @property
    def blocks_per_seq(self) -> int:
        return self.curr_sprior // self.block_len if self.block_len else 0
