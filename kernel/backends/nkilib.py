"""Backend `nkilib`: the Neuron library's own `attention_tkg` (the `nkilib` bundled with neuronx-cc).

The performance peer of our kernel on Trainium (`tkg bench kernel --backend nkilib` next to
`--backend nki`), called the way the library's own tests call it: a thin `@nki.jit` wrapper that
makes the library's SBUF manager, allocates the outputs and DMAs q/k into SBUF. Arguments are
passed by keyword because the library's signature grew over releases (`start_pos_ids`, ...).

Importing this module needs the real `nki` and `nkilib`; the backend registry reports the import
error as the reason the backend is unavailable (always, on machines without the Neuron SDK).
"""

from __future__ import annotations

from typing import Any

import nki
import nki.isa as nisa
import nki.language as nl
from nkilib.core.attention.attention_tkg import attention_tkg as nkilib_attention_tkg
from nkilib.core.attention.attention_tkg_utils import AttnTKGConfig as NkilibConfig
from nkilib.core.utils.allocator import SbufManager as NkilibSbufManager
from nkilib.core.utils.logging import Logger

from tkg.kernel.backends import nki_host
from tkg.kernel.validate import KernelCall

NAME = "nkilib"


def available() -> str | None:
    if getattr(nki, "__tkg_emulator__", False):
        return "`nki` is the tkg emulator here; nkilib needs the Neuron SDK"
    return None


@nki.jit
def nkilib_kernel(q, k_active, v_active, k_prior, v_prior, mask, inv_freqs, rope_pos_ids, start_pos_ids, sink,
                  active_blocks_table, cfg, dbg):  # fmt: skip
    B = cfg.bs
    H = cfg.q_head
    S = cfg.s_active
    d = cfg.d_head
    io = q.dtype
    if io == nl.float8_e4m3:
        io = nl.bfloat16  # fp8 KV is storage only: the outputs are bf16, as in the library's tests
    sbm = NkilibSbufManager(0, nl.tile_size.total_available_sbuf_size, Logger("SBM"))
    sbm.open_scope()
    if cfg.out_in_sb:
        out = sbm.alloc_stack((d, B * H * S), dtype=io, buffer=nl.sbuf)
    else:
        out = nl.ndarray((B, H, d, S), dtype=io, buffer=nl.shared_hbm, name="out")
    k_out = None
    if cfg.fuse_rope:
        if cfg.k_out_in_sb:
            k_out = sbm.alloc_stack((d, B * S), dtype=io, buffer=nl.sbuf)
        else:
            k_out = nl.ndarray((B, 1, d, S), dtype=io, buffer=nl.shared_hbm, name="k_out")
    q_in = q
    ka_in = k_active
    if cfg.qk_in_sb:
        q_in = sbm.alloc_stack(q.shape, dtype=q.dtype, buffer=nl.sbuf)
        ka_in = sbm.alloc_stack(k_active.shape, dtype=k_active.dtype, buffer=nl.sbuf)
        nisa.dma_copy(q_in, q)
        nisa.dma_copy(ka_in, k_active)
    out, k_out = nkilib_attention_tkg(
        q=q_in, k_active=ka_in, v_active=v_active, k_prior=k_prior, v_prior=v_prior, mask=mask, out=out, cfg=cfg,
        sbm=sbm, inv_freqs=inv_freqs, rope_pos_ids=rope_pos_ids, start_pos_ids=start_pos_ids, sink=sink,
        active_blocks_table=active_blocks_table, k_out=k_out,
    )  # fmt: skip
    results = (out,)
    if cfg.out_in_sb:
        out_hbm = nl.ndarray((d, B * H * S), dtype=io, buffer=nl.shared_hbm, name="out_hbm")
        nisa.dma_copy(out_hbm, out)
        results = (out_hbm,)
    if cfg.fuse_rope:
        if cfg.k_out_in_sb:
            k_hbm = nl.ndarray((d, B * S), dtype=io, buffer=nl.shared_hbm, name="k_out_hbm")
            nisa.dma_copy(k_hbm, k_out)
            k_out = k_hbm
        results = results + (k_out,)  # noqa: RUF005 -- NKI-language tuple
    sbm.close_scope()
    return results


def _launch(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    from tkg.kernel.backends.nki import on_device

    kernel = nkilib_kernel[lnc]
    if on_device():
        return kernel(*args)
    return nki.simulate(kernel)(*args)


def run(call: KernelCall) -> None:
    """Run the library's kernel; DBG_TENSORS are not supported on this path (its layout differs)."""
    if call.dbg is not None:
        raise ValueError("attention_tkg: DBG_TENSORS: not supported by backend 'nkilib' (use 'nki')")
    nki_host.run(call, _launch, NkilibConfig)
