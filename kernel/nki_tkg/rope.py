"""Fused rotate-half RoPE of q and k_active, on the d partitions (`fuse_rope=True`).

Output layouts are the kernel's SBUF layouts: q `[d, B*H*S]` (rotated, times 1/sqrt(d)) and
k_active `[d, B*S]` (rotated, not scaled; also written to `k_out`).

Angles live on all d partitions at once: `ang[i, b*S+s] = inv_freqs[i % (d/2)] * pos[b, s]`, so
cos and sin come out already duplicated over both halves (`emb = concat(freqs, freqs)`). The
scalar engine's sine is valid on [-pi, pi] only, so angles are reduced first:
`r = ang - 2pi*round(ang/2pi)` with 2pi split in a short high part (exact products) and a
correction, then `sin(r)`, and `cos(ang) = sin(r + pi/2)` folded back into [-pi, pi].
"""

import math

import nki.isa as nisa
import nki.language as nl

from tkg.kernel.nki_tkg.psum import PsumRing

TWO_PI_HI = 6.28125  # 2*pi rounded to 8 significant bits: n * TWO_PI_HI is exact for n < 2**15
TWO_PI_LO = 2.0 * math.pi - TWO_PI_HI
PI_SAFE = 3.141592  # a hair inside pi, so clamped angles stay in the sine's valid range


def reduce_angle(ang, tmp, ni):
    """ang <- ang - 2pi*round(ang/2pi), clamped into [-pi, pi] (tmp fp32, ni int32, ang's shape)."""
    nisa.tensor_scalar(tmp, ang, op0=nl.multiply, operand0=1.0 / (2.0 * math.pi))
    nisa.tensor_copy(ni, tmp)  # fp32 -> int32 rounds to nearest
    nisa.tensor_copy(tmp, ni)
    nisa.scalar_tensor_tensor(ang, data=tmp, op0=nl.multiply, operand0=-TWO_PI_HI, op1=nl.add, operand1=ang)
    nisa.scalar_tensor_tensor(ang, data=tmp, op0=nl.multiply, operand0=-TWO_PI_LO, op1=nl.add, operand1=ang)
    nisa.tensor_scalar(ang, ang, op0=nl.maximum, operand0=-PI_SAFE, op1=nl.minimum, operand1=PI_SAFE)


def cos_sin(d: int, bs_cols: int, inv_freqs, rope_pos_ids, sbm):
    """(cos, sin) `[d, B*S]` fp32 of `inv_freqs[i % (d/2)] * rope_pos_ids[b, s]`."""
    half = d // 2
    pos = sbm.alloc((d, bs_cols), nl.float32, "rope_pos")
    nisa.dma_copy(pos, rope_pos_ids.ap([[0, d], [1, bs_cols]], offset=0), dge_mode=nisa.dge_mode.none)
    inv = sbm.alloc((d, 1), nl.float32, "rope_inv")
    nisa.dma_copy(inv[0:half, :], inv_freqs[0:half, :], dge_mode=nisa.dge_mode.none)
    nisa.dma_copy(inv[half:d, :], inv_freqs[0:half, :], dge_mode=nisa.dge_mode.none)
    sin = sbm.alloc((d, bs_cols), nl.float32, "rope_sin")
    cos = sbm.alloc((d, bs_cols), nl.float32, "rope_cos")
    sbm.open_scope()
    ang = sbm.alloc((d, bs_cols), nl.float32, "rope_ang")
    tmp = sbm.alloc((d, bs_cols), nl.float32, "rope_tmp")
    ni = sbm.alloc((d, bs_cols), nl.int32, "rope_n")
    nisa.tensor_scalar(ang, pos, op0=nl.multiply, operand0=inv)
    reduce_angle(ang, tmp, ni)
    nisa.activation(sin, op=nl.sin, data=ang)
    # cos(a) = sin(a + pi/2); a + pi/2 is in [-pi/2, 3pi/2]: subtract 2pi where it passed pi.
    nisa.tensor_scalar(ang, ang, op0=nl.add, operand0=0.5 * math.pi)
    nisa.tensor_scalar(tmp, ang, op0=nl.greater, operand0=math.pi, op1=nl.multiply, operand1=-2.0 * math.pi)
    nisa.tensor_tensor(ang, ang, tmp, op=nl.add)
    nisa.tensor_scalar(ang, ang, op0=nl.maximum, operand0=-PI_SAFE, op1=nl.minimum, operand1=PI_SAFE)
    nisa.activation(cos, op=nl.sin, data=ang)
    sbm.close_scope()
    return cos, sin


def load_transposed(x, rows: int, d: int, sbm, ring: PsumRing):
    """x `[B, heads, S, d]` in HBM -> `[d, rows]` fp32 SBUF (row-major load, PE transpose)."""
    xr = sbm.alloc((rows, d), x.dtype, "rope_in")
    nisa.dma_copy(xr, x.reshape((rows, d)), dge_mode=nisa.dge_mode.none)
    ps = ring.next((d, rows), x.dtype, "ropeT")
    nisa.nc_transpose(ps, xr)
    xt = sbm.alloc((d, rows), nl.float32, "rope_x")
    nisa.tensor_copy(xt, ps)
    return xt


def rotate(xt, dst, cos, sin, d: int, B: int, heads: int, S: int, scale: float, sbm):
    """dst `[d, B*heads*S]` <- (x*cos + rotate_half(x)*sin) * scale; cos/sin repeat over heads."""
    half = d // 2
    cols = B * heads * S
    sbm.open_scope()
    rot = sbm.alloc((d, cols), nl.float32, "rope_rot")
    # rotate_half moves whole 32/64-partition halves (hence d % 64 == 0).
    nisa.tensor_scalar(rot[0:half, :], xt[half:d, :], op0=nl.multiply, operand0=-1.0)
    nisa.tensor_copy(rot[half:d, :], xt[0:half, :])
    bs = B * S
    cos_v = cos.ap([[bs, d], [S, B], [0, heads], [1, S]], offset=0)
    sin_v = sin.ap([[bs, d], [S, B], [0, heads], [1, S]], offset=0)
    nisa.tensor_tensor(xt, xt, cos_v, op=nl.multiply)
    nisa.tensor_tensor(rot, rot, sin_v, op=nl.multiply)
    nisa.tensor_tensor(xt, xt, rot, op=nl.add)
    nisa.tensor_scalar(dst, xt, op0=nl.multiply, operand0=scale)
    sbm.close_scope()


def fused_rope(pl, cfg, q, k_active, inv_freqs, rope_pos_ids, k_out, store_k_out: bool, sbm, ring: PsumRing):
    """Rotate q and k_active; return (q_sb `[d, B*H*S]`, ka_sb `[d, B*S]`) in the io dtype.

    Writes `k_out` (SBUF `[d, B*S]`, or HBM `[B, 1, d, S]` when `store_k_out`).
    """
    d = pl.d
    B = pl.B
    H = pl.H
    S = pl.S
    io = q.dtype
    q_sb = sbm.alloc((d, B * H * S), io, "q_rope")
    ka_sb = sbm.alloc((d, B * S), io, "k_rope")
    sbm.open_scope()
    cos, sin = cos_sin(d, B * S, inv_freqs, rope_pos_ids, sbm)
    if cfg.qk_in_sb:
        qt = sbm.alloc((d, B * H * S), nl.float32, "rope_q")
        kt = sbm.alloc((d, B * S), nl.float32, "rope_k")
        nisa.tensor_copy(qt, q)
        nisa.tensor_copy(kt, k_active)
    else:
        qt = load_transposed(q, B * H * S, d, sbm, ring)
        kt = load_transposed(k_active, B * S, d, sbm, ring)
    rotate(qt, q_sb, cos, sin, d, B, H, S, 1.0 / math.sqrt(d), sbm)
    rotate(kt, ka_sb, cos, sin, d, B, 1, S, 1.0, sbm)
    sbm.close_scope()
    if cfg.k_out_in_sb:
        nisa.tensor_copy(k_out, ka_sb)
    elif store_k_out:
        dst = k_out.ap([[S, d], [d * S, B], [1, S]], offset=0)
        nisa.dma_copy(dst, ka_sb, dge_mode=nisa.dge_mode.none)
    return q_sb, ka_sb
