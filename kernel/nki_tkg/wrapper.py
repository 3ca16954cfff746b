"""`attention_tkg_kernel`: the `@nki.jit` entry point around the `attention_tkg` sub-kernel.

It owns what a caller inside a larger NKI kernel would own: the `SbufManager` over the usable
SBUF (leaving 16 KiB to the compiler), the outputs, and for `qk_in_sb` the DMA of q and k_active
into SBUF. Launch with `attention_tkg_kernel[lnc](...)` (lnc 1 or 2).

Arguments (all tensors in HBM; layouts of docs/design/kernel.md, with `cfg.qk_in_sb` q is `[d, B*H*S]`
and k_active `[d, B*S]`): q, k_active, v_active, k_prior, v_prior, mask, inv_freqs, rope_pos_ids,
start_pos_ids, sink, active_blocks_table (None where unused), cfg (`TKGConfig`), dbg (bool).

Returns a tuple of shared-HBM tensors: out (`[d, B*H*S]` with `cfg.out_in_sb`, else
`[B, H, d, S]`; fp32 with `cfg.return_lse`, else q's dtype, bf16 for fp8 q), then k_out when
`cfg.fuse_rope` (`[d, B*S]` with `cfg.k_out_in_sb`, else `[B, 1, d, S]`), then with
`cfg.return_lse` lse `[B, H, S]` fp32, then with `dbg` the four fp32 debug tensors qk
`[B, H, Sp, S]`, qk_max `[B, H, 1, S]`, qk_exp `[B, H, Sp, S]`, exp_sum `[B, H, 1, S]`.
With `cfg.attend_only` k_active, v_active and mask are None (no active tokens).
"""

import nki
import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.kernel import attention_tkg
from tkg.kernel.nki_tkg.sbuf import SbufManager

SBUF_COMPILER_RESERVE = 16 * 1024  # bytes per partition left to the compiler


@nki.jit
def attention_tkg_kernel(q, k_active, v_active, k_prior, v_prior, mask, inv_freqs, rope_pos_ids, start_pos_ids,
                         sink, active_blocks_table, cfg, dbg):  # fmt: skip
    B = cfg.bs
    H = cfg.q_head
    S = cfg.s_active
    d = cfg.d_head
    io = q.dtype
    if io == nl.float8_e4m3:
        io = nl.bfloat16  # fp8 is a storage dtype: the output (and P) are bf16
    first_core = nl.program_id(0) == 0
    sbm = SbufManager(0, nl.tile_size.total_available_sbuf_size - SBUF_COMPILER_RESERVE, "sbm")
    sbm.open_scope()

    out_dt = io
    if cfg.return_lse:
        out_dt = nl.float32  # partial results merge without another rounding
    if cfg.out_in_sb:
        out = sbm.alloc((d, B * H * S), out_dt, "out")
    else:
        out = nl.ndarray((B, H, d, S), dtype=out_dt, buffer=nl.shared_hbm, name="out")
    lse = None
    if cfg.return_lse:
        lse = nl.ndarray((B, H, S), dtype=nl.float32, buffer=nl.shared_hbm, name="lse")
    k_out = None
    if cfg.fuse_rope:
        if cfg.k_out_in_sb:
            k_out = sbm.alloc((d, B * S), io, "k_out")
        else:
            k_out = nl.ndarray((B, 1, d, S), dtype=io, buffer=nl.shared_hbm, name="k_out")
    q_in = q
    ka_in = k_active
    if cfg.qk_in_sb:
        q_in = sbm.alloc((d, B * H * S), io, "q")
        nisa.dma_copy(q_in, q, dge_mode=nisa.dge_mode.none)
        if k_active != None:  # None: attend-only
            ka_in = sbm.alloc((d, B * S), io, "k_active")
            nisa.dma_copy(ka_in, k_active, dge_mode=nisa.dge_mode.none)
    dbg_t = None
    if dbg:
        sp = cfg.curr_sprior
        dbg_t = (
            nl.ndarray((B, H, sp, S), dtype=nl.float32, buffer=nl.shared_hbm, name="dbg_qk"),
            nl.ndarray((B, H, 1, S), dtype=nl.float32, buffer=nl.shared_hbm, name="dbg_qk_max"),
            nl.ndarray((B, H, sp, S), dtype=nl.float32, buffer=nl.shared_hbm, name="dbg_qk_exp"),
            nl.ndarray((B, H, 1, S), dtype=nl.float32, buffer=nl.shared_hbm, name="dbg_exp_sum"),
        )

    out, k_out = attention_tkg(
        q_in, ka_in, v_active, k_prior, v_prior, mask, out, cfg, sbm, inv_freqs, rope_pos_ids, sink,
        active_blocks_table, k_out, dbg_t, start_pos_ids, lse,
    )  # fmt: skip

    results = (out,)
    if cfg.out_in_sb:
        out_hbm = nl.ndarray((d, B * H * S), dtype=out_dt, buffer=nl.shared_hbm, name="out_hbm")
        if first_core:
            nisa.dma_copy(out_hbm, out, dge_mode=nisa.dge_mode.none)
        results = (out_hbm,)
    if cfg.fuse_rope:
        if cfg.k_out_in_sb:
            k_hbm = nl.ndarray((d, B * S), dtype=io, buffer=nl.shared_hbm, name="k_out_hbm")
            if first_core:
                nisa.dma_copy(k_hbm, k_out, dge_mode=nisa.dge_mode.none)
            results = results + (k_hbm,)
        else:
            results = results + (k_out,)
    if cfg.return_lse:
        results = results + (lse,)
    if dbg:
        results = results + dbg_t
    sbm.close_scope()
    return results
