"""Torch implementation of the `cpu` backend: every `attention_tkg` flag, and `paged_decode`.

This is the path the `cpu` backend takes when its native extension is not built, and its
general path for layouts the native kernel does not cover. The math is `kernel/backends/reference.py`'s,
done with torch ops in float32 (scores, softmax and the PV sum all accumulate in fp32; only the
final outputs are rounded to the I/O dtype). Inputs are shared with numpy without copies
(`tkg.kernel.arrays.from_numpy`); the fp32 copies of the cache are made per call.

`paged_decode` packs the G = Hq/Hkv q heads of each kv head into one `[G*S, d]` matrix, so each
cached block is read once per kv head rather than once per q head (research/kvcache.md 5.3).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from tkg.kernel.arrays import FP8_TO_F32, as_f32, from_numpy
from tkg.kernel.backends import reference
from tkg.kernel.backends.reference import prior_visibility, unshuffle_block_mask
from tkg.kernel.paged import PagedArgs
from tkg.kernel.validate import KernelCall

NAME = "cpu-torch"


def _t(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (bf16 included), no copy."""
    return from_numpy(np.ascontiguousarray(a))


_FP8_TABLE = torch.from_numpy(FP8_TO_F32)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """A tensor as float32 (a new tensor); uint8 tensors are fp8 e4m3 bits (`arrays.from_numpy`)."""
    if t.dtype == torch.uint8:
        return _FP8_TABLE[t.to(torch.int64)]
    return t.to(torch.float32, copy=True)


def _f32(a: np.ndarray) -> torch.Tensor:
    return _tf32(_t(a))


def _write(dst: np.ndarray, src: torch.Tensor) -> None:
    """Round `src` (fp32) to `dst`'s dtype and store it into the numpy destination in place."""
    view = from_numpy(dst) if dst.flags.c_contiguous else None
    if view is not None:
        view.copy_(src)
    else:
        tmp = np.empty(dst.shape, dtype=dst.dtype)
        from_numpy(tmp).copy_(src)
        dst[...] = tmp


class _Workspace(threading.local):
    """Per-thread flat buffers reused across calls: fresh large tensors per step cost page faults."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous `shape` view of the thread's `name` buffer, grown (x1.5) when too small."""
        n = math.prod(shape)
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, int(1.5 * (0 if buf is None else buf.numel()))), dtype=dtype)
            self.bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


_WS = _Workspace()


def _gather_f32(pool: torch.Tensor, blocks: torch.Tensor, L: int, name: str) -> torch.Tensor:
    """`[Hkv, L, d]` float32: the first L tokens of `blocks` of every kv head, in reused buffers."""
    Hkv, _, BL, d = pool.shape
    shape = (Hkv, blocks.numel(), BL, d)
    if pool.dtype == torch.float32:
        dst = _WS.take(name, torch.float32, shape)
        torch.index_select(pool, 1, blocks, out=dst)
    elif pool.dtype == torch.uint8:  # fp8 e4m3 bits: decode by table
        bits = torch.index_select(pool, 1, blocks).reshape(-1).to(torch.int64)
        dst = _WS.take(name, torch.float32, shape)
        torch.index_select(_FP8_TABLE, 0, bits, out=dst.view(-1))
    else:
        io = _WS.take(name + "-io", pool.dtype, shape)
        torch.index_select(pool, 1, blocks, out=io)
        dst = _WS.take(name, torch.float32, shape)
        dst.copy_(io)
    return dst.view(Hkv, -1, d)[:, :L]


def _queries(call: KernelCall) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, H, S, d]` and k_active `[B, S, d]`, fp32 torch, RoPE and the 1/sqrt(d) scale applied."""
    q, ka = reference.queries(call, fused_rope=True)
    return (
        torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(ka, dtype=np.float32)),
    )



def _prior(call: KernelCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The first Sp cached keys and values of each row, `[B, Sp, d]` fp32 (scratch: the caller may write).

    Block KV gathers into the thread's reused workspaces (the cache is large; fresh buffers per call
    cost page faults); the flat cache is small enough to copy.
    """
    cfg = call.cfg
    B, Sp, d = cfg.bs, cfg.curr_sprior, cfg.d_head
    if cfg.is_block_kv:
        table = torch.from_numpy(call.active_blocks_table.astype(np.int64)).reshape(-1)
        K = _gather_f32(_t(call.k_prior).unsqueeze(0), table, Sp * B, "k").view(B, Sp, d)
        V = _gather_f32(_t(call.v_prior).unsqueeze(0), table, Sp * B, "v").view(B, Sp, d)
        return K, V
    kp = _t(call.k_prior)[:B, 0]
    K = kp[:, :Sp, :] if cfg.tp_k_prior else kp[:, :, :Sp].transpose(1, 2)
    V = _t(call.v_prior)[:B, 0, :Sp, :]
    return _tf32(K).contiguous(), _tf32(V).contiguous()


def _visibility(call: KernelCall) -> torch.Tensor:
    """Boolean `[B, H or 1, S, Sp]`: may query i of row b, head h see key k."""
    cfg = call.cfg
    B, S, Sp = cfg.bs, cfg.s_active, cfg.curr_sprior
    if not cfg.use_pos_id:
        m = call.mask
        if cfg.is_block_kv:
            m = unshuffle_block_mask(m, call.mask_block_len)
        return torch.from_numpy(np.ascontiguousarray(m.transpose(1, 2, 3, 0) != 0))  # [B, H, S, Sp]
    prior = torch.from_numpy(np.array(prior_visibility(call).transpose(0, 2, 1)))  # [B, S, Sp-S]
    active = torch.from_numpy(np.ascontiguousarray(call.mask.transpose(1, 2, 3, 0) != 0))  # [B, H, S, S]
    H = active.shape[1]
    return torch.cat([prior.unsqueeze(1).expand(B, H, S, Sp - S), active], dim=3)


def _no_visible_key(row_max: torch.Tensor) -> ValueError:
    """The reference's error for a fully masked row; row_max is `[B, H, S]`."""
    b, h, i = (int(x) for x in torch.nonzero(torch.isneginf(row_max))[0])
    return ValueError(
        f"attention_tkg: mask: every key is masked for row b={b}, head h={h}, query i={i}; "
        "expected at least one visible key (the active diagonal) or a finite sink"
    )


@torch.inference_mode()
def run(call: KernelCall) -> None:
    """Fill `call.out` (and `call.k_out`, `call.dbg`) exactly as `reference.run` does, with torch ops."""
    cfg = call.cfg
    B, H, S, d, Sp = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior
    q, ka = _queries(call)  # [B, H, S, d], [B, S, d]
    va = _f32(call.v_active)[:, 0]
    K, V = _prior(call)
    K[:, Sp - S :] = ka
    V[:, Sp - S :] = va

    # The H q heads of a row share its keys: one [H*S, d] x [d, Sp] product per row.
    scores = torch.bmm(q.reshape(B, H * S, d), K.transpose(1, 2)).view(B, H, S, Sp)
    vis = _visibility(call)
    scores = scores.masked_fill(~vis, float("-inf"))
    # A V row no query sees may hold NaN/inf garbage: zero it, since p = 0 times NaN is NaN.
    V = V.masked_fill(~vis.reshape(B, -1, Sp).any(dim=1).unsqueeze(2), 0.0)
    row_max = scores.amax(dim=3)  # [B, H, S]
    sink = None
    if call.sink is not None:
        sink = torch.from_numpy(as_f32(call.sink).reshape(1, H, 1).copy())
        row_max = torch.maximum(row_max, sink)
    # A sink of -inf is no sink: its row still has nothing to normalise over.
    if torch.isneginf(row_max).any():
        raise _no_visible_key(row_max)
    p = torch.exp(scores - row_max.unsqueeze(3))
    denom = p.sum(dim=3)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    out = torch.bmm(p.view(B, H * S, Sp), V).view(B, H, S, d) / denom.unsqueeze(3)

    reference.store_outputs(call, out.numpy(), ka.numpy())
    if call.dbg is not None:
        full = {
            "qk": scores.transpose(2, 3),
            "qk_max": row_max.unsqueeze(2),
            "qk_exp": p.transpose(2, 3),
            "exp_sum": denom.unsqueeze(2),
        }
        for name, dst in call.dbg.items():
            _write(dst, full[name])


@torch.inference_mode()
def paged_decode(args: PagedArgs, **_options: object) -> None:
    """Fill `args.out` `[B, Hq, S, d]` for one decode step over the paged pools (see `tkg.kernel.paged`).

    The whole batch in a dozen torch ops: every sequence's blocks of every kv head gathered once into
    a reused fp32 workspace `[Hkv, B, Lmax, d]` (shorter sequences padded with block 0, masked), the
    G = Hq/Hkv q heads of a kv head packed as `[G*S, d]` rows, one batched QK^T and one PV. Few ops
    matter more than the padding: each torch op is a fork-join of its thread pool, which stalls for a
    time slice whenever another process holds a core (per-sequence loops measured 10-20x slower on a
    loaded 2-core machine). Query i of a sequence of length L sits at position t = L - S + i and sees
    keys j <= t (and t - j < window). Options meant for the native kernel (threads) do not apply here.

    Partial calls (`args.partial`, `tkg.kernel.paged`): `args.lse` gets each query's log-sum-exp;
    attend-only (`args.q_start`) puts query i at `q_start + i` past every cached key. A query that
    sees no key (attend-only, or an empty sequence) gets out 0 and lse -inf.
    """
    q = _t(args.q)
    B, Hq, S, d = q.shape
    Hkv, BL = args.num_kv_heads, args.block_len
    G = Hq // Hkv
    lens = args.seq_lens.astype(np.int64)
    if B == 0 or int(lens.max()) == 0:  # only attend-only calls get here with no key at all
        args.out[...] = 0
        if args.lse is not None:
            args.lse[...] = -np.inf
        return
    nblk = -(-int(lens.max()) // BL)
    Lp = nblk * BL
    ids = np.zeros((B, nblk), dtype=np.int64)  # block 0 past a sequence's end: in range, masked below
    for b in range(B):
        used = -(-int(lens[b]) // BL)
        ids[b, :used] = args.block_tables[b, :used]
    ids_t = torch.from_numpy(ids.reshape(-1))
    K = _gather_f32(_t(args.k_cache), ids_t, B * Lp, "k").reshape(Hkv * B, Lp, d)
    V = _gather_f32(_t(args.v_cache), ids_t, B * Lp, "v").reshape(Hkv * B, Lp, d)
    qf = q.to(torch.float32) * float(args.scale * args.k_scale)  # the pools hold K / k_scale
    qf = qf.view(B, Hkv, G * S, d).transpose(0, 1).reshape(Hkv * B, G * S, d)
    scores = torch.bmm(qf, K.transpose(1, 2)).view(Hkv, B, G, S, Lp)
    t = torch.from_numpy(args.query_index()).view(B, S, 1)
    j = torch.arange(Lp).view(1, 1, Lp)
    hidden = j > t
    if args.q_start is not None:  # attend-only: queries sit past the end, padding is not behind them
        hidden |= j >= torch.from_numpy(lens).view(B, 1, 1)
    if args.window is not None:
        hidden |= (t - j) >= args.window
    scores.masked_fill_(hidden.view(1, B, 1, S, Lp), float("-inf"))
    row_max = scores.amax(dim=4, keepdim=True)  # normal calls: the diagonal is always visible, finite
    sinks = None
    if args.sinks is not None:
        sinks = torch.from_numpy(as_f32(args.sinks).reshape(Hkv, 1, G, 1, 1).copy())
        row_max = torch.maximum(row_max, sinks)
    if args.partial:  # a query may see nothing here: shift by 0 instead of -inf (exp(-inf) = 0 stays)
        seen = torch.isfinite(row_max)
        row_max = torch.where(seen, row_max, torch.zeros(()))
        if args.q_start is not None:  # a padded V row no query sees may hold garbage: 0 * NaN is NaN
            V.masked_fill_(hidden.all(dim=1).repeat(Hkv, 1).unsqueeze(2), 0.0)
    p = torch.exp_(scores.sub_(row_max))
    denom = p.sum(dim=4, keepdim=True)
    if sinks is not None:
        denom += torch.exp(sinks - row_max)
    o = torch.bmm(p.view(Hkv * B, G * S, Lp), V).view(Hkv, B, G, S, d).div_(denom)
    if args.v_scale != 1.0:  # the pools hold V / v_scale
        o.mul_(args.v_scale)
    if args.partial:
        o.masked_fill_(~seen, 0.0)  # 0 / 0 where nothing was seen: out 0 by contract
        if args.lse is not None:
            lse = torch.where(seen, row_max + torch.log(denom), float("-inf"))  # [Hkv, B, G, S, 1]
            _write(args.lse, lse.squeeze(4).transpose(0, 1).reshape(B, Hq, S))
    _write(args.out, o.transpose(0, 1).reshape(B, Hq, S, d))


# The `cpu` backend's partial calls come here too (`tkg.kernel.paged.partial_decoder`).
paged_decode_partial = paged_decode
