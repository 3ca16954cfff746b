"""`attention_tkg`: the seed's call signature, dispatched to a backend.

    out, k_out = attention_tkg(q, k_active, v_active, k_prior, v_prior, mask, out, cfg, sbm, ...)

Arguments are numpy arrays (float32, float16, ml_dtypes.bfloat16; q and K/V also
ml_dtypes.float8_e4m3, the output then bf16 unless `out` says) or CPU torch tensors, in the
layouts of docs/design/kernel.md; results come back as the same kind as `q`, and are also written
into `out` / `k_out` when those are given.
"""

from __future__ import annotations

from typing import Any

from tkg.kernel import backends
from tkg.kernel.arrays import from_numpy, is_torch
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.validate import validate_call


def attention_tkg(
    q: Any,
    k_active: Any,
    v_active: Any,
    k_prior: Any,
    v_prior: Any,
    mask: Any,
    out: Any,
    cfg: AttnTKGConfig,
    sbm: Any = None,
    inv_freqs: Any = None,
    rope_pos_ids: Any = None,
    sink: Any = None,
    active_blocks_table: Any = None,
    k_out: Any = None,
    DBG_TENSORS: Any = None,
    *,
    start_pos_ids: Any = None,
    backend: str = "auto",
    **backend_options: Any,
) -> tuple[Any, Any]:
    """Decode attention for one kv head (or folded (batch, kv head) rows); see docs/design/kernel.md.

    Args:
        q: `[B, H, S, d]`, or `[d, B*H*S]` with `cfg.qk_in_sb`.
        k_active: `[B, 1, S, d]`, or `[d, B*S]` with `cfg.qk_in_sb`.
        v_active: `[B, 1, S, d]`.
        k_prior: flat `[B+, 1, Spf, d]` (`tp_k_prior`) or `[B+, 1, d, Spf]`; block `[NB, block_len, d]`.
        v_prior: flat `[B+, 1, Spf, d]`; block `[NB, block_len, d]`.
        mask: uint8 `[Sp, B, H, S]` (or `[S, B, H, S]` with `cfg.use_pos_id`), nonzero = attend.
        out: destination `[B, H, d, S]` (or `[d, B*H*S]` with `cfg.out_in_sb`), or None.
        cfg: the call's `AttnTKGConfig`.
        sbm: the NKI SBUF manager; host backends ignore it.
        inv_freqs: `[d/2, 1]` float32, with `cfg.fuse_rope`.
        rope_pos_ids: `[B, S]` token positions (RoPE angle; `[:, 0]` is the cached length).
        sink: `[H, 1]` per-head sink logit (scaled-logit units).
        active_blocks_table: uint32 `[B, Sp/block_len]` physical block ids (block KV).
        k_out: destination for the rotated k_active, `[B, 1, d, S]` or `[d, B*S]`.
        DBG_TENSORS: 4 float32 destinations (or a dict): scores, row max, exp, row sum,
            in natural order (see `tkg.kernel.validate.debug_shapes`).
        start_pos_ids: `[B, S]` sliding-window starts (needs `cfg.use_pos_id`).
        backend: "auto", "reference", "cpu", "nki-emu", "nki".
        **backend_options: passed to the backend. `lnc` (1 or 2, default 1) is the logical core
            count of the NKI backends; every backend takes it, since it orders a pre-generated
            block-KV mask (nki-library's convention, `tkg.kernel.decisions.mask_block_len`).

    Returns:
        `(out, k_out)`; k_out is None unless `cfg.fuse_rope` or a `k_out` was given.

    Raises:
        ValueError: an argument breaks a constraint (the message names it and the limit).
        BackendUnavailable: the requested backend cannot run on this host.
    """
    call = validate_call(
        q, k_active, v_active, k_prior, v_prior, mask, out, cfg,
        inv_freqs=inv_freqs, rope_pos_ids=rope_pos_ids, sink=sink,
        active_blocks_table=active_blocks_table, k_out=k_out, DBG_TENSORS=DBG_TENSORS,
        start_pos_ids=start_pos_ids, lnc=backend_options.get("lnc", 1),
    )  # fmt: skip
    call.options = dict(backend_options)
    call.options["sbm"] = sbm
    backends.load(backend, backend_options).run(call)

    if is_torch(q):
        res_out = out if out is not None else from_numpy(call.out)
        res_k = k_out if k_out is not None else (from_numpy(call.k_out) if call.k_out is not None else None)
        return res_out, res_k
    return (out if out is not None else call.out), (k_out if k_out is not None else call.k_out)
