"""A stand-in for the NKI kernel in torch ops, for `NeuronDevice(kernel=...)` off Trainium.

It takes the store's folded launch arguments (`tkg.kernel.backends.nki_host.fold_inputs`, the
`attention_tkg_kernel` signature with `qk_in_sb` and position ids) as torch tensors on any device
(torch CPU for the dtype test, torch-xla's CPU runtime for `make test-xla`) and returns the output
`[rows, G, d, Sb]` in q's dtype, computed in float32. Written from the layouts in that docstring
(not from the kernel): prior key p of row r is visible to query s iff `start[r, s] <= p <
pos[r, s]`, active key j to query i iff `mask[j, r, g, i]`; a sink adds one logit per query head.
Only torch ops with fixed shapes, so on a lazy-tensor device it is one graph per launch shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tkg.dtypes import FP8


def _fp8_table(torch: Any, device: Any) -> Any:
    """float32 value of each fp8 e4m3 bit pattern (the pools carry fp8 as uint8 bits)."""
    return torch.from_numpy(np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)).to(device)


def _f32(torch: Any, t: Any) -> Any:
    if t.dtype == torch.uint8:
        return _fp8_table(torch, t.device)[t.long()]
    return t.float()


def attention(lnc: int, args: tuple[Any, ...]) -> tuple[Any]:
    """`attention_tkg_kernel[lnc](*args)`'s output for the store's launches (lnc is ignored)."""
    import torch

    q, k_active, v_active, k_prior, v_prior, mask, _inv, pos, starts, sink, table, _cfg, _dbg = args
    Sb, rows, G = mask.shape[0], mask.shape[1], mask.shape[2]
    d = q.shape[0]
    BL = k_prior.shape[1]
    nblk = table.shape[1]
    ctx = nblk * BL
    qf = q.float().reshape(d, rows, G, Sb).permute(1, 2, 3, 0)  # [rows, G, Sb, d]
    ka = _f32(torch, k_active).reshape(d, rows, Sb).permute(1, 2, 0)  # [rows, Sb, d] (fp8 caches: fp8)
    va = _f32(torch, v_active).reshape(rows, Sb, d)
    ids = table.long().reshape(-1)
    kp = _f32(torch, k_prior.index_select(0, ids)).reshape(rows, ctx, d)
    vp = _f32(torch, v_prior.index_select(0, ids)).reshape(rows, ctx, d)
    key = torch.arange(ctx, device=q.device, dtype=torch.float32)  # [ctx] prior positions
    seen = key[None, None, :] < pos[:, :, None]  # [rows, Sb, ctx]
    if starts is not None:
        seen = seen & (key[None, None, :] >= starts[:, :, None])
    neg = torch.tensor(-1e30, device=q.device, dtype=torch.float32)
    lp = torch.where(seen[:, None], torch.einsum("rgsd,rkd->rgsk", qf, kp), neg)  # [rows, G, Sb, ctx]
    active = mask.permute(1, 2, 3, 0) != 0  # [rows, G, Sb(query), Sb(key)]
    la = torch.where(active, torch.einsum("rgsd,rjd->rgsj", qf, ka), neg)
    logits = torch.cat([lp, la], dim=-1)
    if sink is not None:
        sk = sink.float().reshape(1, G, 1, 1).expand(rows, G, Sb, 1)
        logits = torch.cat([logits, sk], dim=-1)
    w = torch.softmax(logits, dim=-1)
    out = torch.einsum("rgsk,rkd->rgsd", w[..., :ctx], vp) + torch.einsum("rgsj,rjd->rgsd", w[..., ctx : ctx + Sb], va)
    return (out.permute(0, 1, 3, 2).contiguous().to(q.dtype),)  # [rows, G, d, Sb]
