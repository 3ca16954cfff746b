"""Our NKI `attention_tkg` kernel for Trainium (NKI 0.3+ API), written from scratch.

Modules (kernel-side: the NKI language subset, imported only once `nki` exists, i.e. the real
Neuron package or the tkg emulator installed in its place):
    wrapper   `@nki.jit` entry `attention_tkg_kernel[lnc](...)`: outputs, SBUF manager, q/k DMA
    kernel    the `attention_tkg` sub-kernel (seed signature) and its per-flash-tile pipeline
    rules     the tiling and sharding rules (plain arithmetic; `tkg.kernel.decisions` uses them too)
    plan      trace-time work split and tiling of one call and core, from `rules`
    sbuf      `SbufManager`: stack allocator with scopes and multi-buffer sections
    psum      PSUM banks per pipeline stage
    kv        K^T / V loads (flat, strided, block KV by indirect DMA), active-token insertion
    mask      loaded or position-generated uint8 masks
    softmax   online softmax with row-broadcast statistics, cross-core merge
    rope      fused rotate-half RoPE
Host-side glue lives outside this package: `tkg.kernel.backends` (`nki_host`, `nki_emu`, `nki`).
"""
