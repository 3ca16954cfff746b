"""Rotary position embeddings applied by the service when it fuses RoPE (`fuse_rope`).

The service rotates q and the new k on the host before appending k to the cache (so the cache
holds rotated keys, as the kernel expects) and before the kernel call. Rotate-half convention
(HF/Llama), matching `attention_tkg`'s fused RoPE (docs/design/kernel.md step 2). Positions are
absolute token positions within the sequence.

Frequency scaling: `llama3` (Llama-3.1 wavelength-banded scaling), `linear` (position
interpolation) and `yarn` (NTK-by-parts; its attention factor is folded into the softmax scale by
`tkg.server.config`, since scaling q and k by m each is the same as scaling the logits by m^2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tkg.kernel.backends.host_ops import host_ops_available, native_rope_qk


def base_inv_freqs(head_dim: int, theta: float) -> np.ndarray:
    """Unscaled inverse frequencies `theta^(-2i/d)`, `[d/2]` float64."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _llama3(inv: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    factor = float(p["factor"])
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    orig = float(p.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    # Short wavelengths (high frequencies) stay; long ones are divided by `factor`; a smooth
    # blend in between, exactly as Llama 3.1 defines it.
    scaled = np.where(wavelen > low_wavelen, inv / factor, (1 - smooth) * inv / factor + smooth * inv)
    return np.where(wavelen < high_wavelen, inv, scaled)


def _yarn(inv: np.ndarray, p: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    factor = float(p["factor"])
    orig = float(p.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(p.get("beta_fast", 32.0)), float(p.get("beta_slow", 1.0))

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):  # gpt-oss sets truncate: false and keeps the fractional bounds
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if hi == lo:
        hi += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2) - lo) / (hi - lo), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency; 0: interpolate by `factor`
    return (inv / factor) * (1 - extrapolate) + inv * extrapolate


def yarn_attention_factor(scaling: dict[str, Any] | None) -> float:
    """YaRN's logit temperature m (q and k are each multiplied by m; 1.0 for other types)."""
    if not scaling or scaling.get("type") != "yarn":
        return 1.0
    if "attention_factor" in scaling:
        return float(scaling["attention_factor"])
    return 0.1 * math.log(float(scaling["factor"])) + 1.0


def inv_freqs(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies `[d/2]` float32 with the configured scaling applied."""
    inv = base_inv_freqs(head_dim, theta)
    kind = (scaling or {}).get("type")
    if kind is None:
        out = inv
    elif kind == "llama3":
        out = _llama3(inv, scaling)
    elif kind == "linear":
        out = inv / float(scaling["factor"])
    elif kind == "yarn":
        out = _yarn(inv, scaling, head_dim, theta)
    else:
        raise ValueError(f"rope_scaling.type: {kind!r}; expected one of llama3, linear, yarn")
    return out.astype(np.float32)


def angles(positions: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin `[B, 1, T, d/2]` float32 for absolute positions `[B, T]`.

    Angles are formed in float64: at positions near 128K a float32 product `pos * inv_freq`
    is off by up to ~0.01 rad, which bf16 keys would then carry forever in the cache.
    """
    ang = np.asarray(positions, dtype=np.float64)[:, None, :, None] * inv.astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


class RopeTable:
    """cos/sin of every position up to `max_context`, `[n, d/2]` float32 each, built on demand.

    The hot path then gathers rows instead of evaluating cos/sin per request (~10x less work for
    one token). The table grows by doubling to cover the highest position asked for, so a server
    with a 128K context but short sequences keeps it small. Values equal `angles(...)` exactly.
    """

    def __init__(self, inv: np.ndarray, max_context: int, initial: int = 4096) -> None:
        self.inv = inv
        self.max_context = max_context
        self._initial = min(initial, max_context)
        self.cos = np.empty((0, inv.size), dtype=np.float32)
        self.sin = np.empty((0, inv.size), dtype=np.float32)
        # `[n, d]` rows [cos, cos] and [-sin, sin]: rotate-half as x * cos2 + swap_halves(x) * sin2.
        self.cos2 = np.empty((0, 2 * inv.size), dtype=np.float32)
        self.sin2 = np.empty((0, 2 * inv.size), dtype=np.float32)
        # rotate_qk's native pass when the extension is built (False: always numpy, for tests).
        self.native = host_ops_available()

    def _grow(self, need: int) -> None:
        n = max(self._initial, len(self.cos))
        while n < need:
            n *= 2
        n = max(min(n, self.max_context), need)
        cos, sin = angles(np.arange(n)[None, :], self.inv)
        self.cos, self.sin = cos[0, 0], sin[0, 0]
        self.cos2 = np.concatenate([self.cos, self.cos], axis=-1)
        self.sin2 = np.concatenate([-self.sin, self.sin], axis=-1)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin `[B, 1, T, d/2]` float32 for absolute positions `[B, T]` (as `angles`)."""
        pos = np.asarray(positions)
        top = int(pos.max()) + 1
        if top > len(self.cos):
            self._grow(top)
        B, T = pos.shape
        return self.cos[pos].reshape(B, 1, T, -1), self.sin[pos].reshape(B, 1, T, -1)

    def rotate_tokens(self, k: np.ndarray, position: int) -> np.ndarray:
        """`rotate` of one sequence's keys `[T, heads, d]` at positions `position .. position+T-1`
        (an AppendKV chunk); returns k's dtype and layout."""
        cos, sin = self.lookup((position + np.arange(k.shape[0]))[None, :])
        return rotate(k.transpose(1, 0, 2)[None], cos, sin)[0].transpose(1, 0, 2)

    def rotate_qk(self, q: np.ndarray, k: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`rotate` of q `[B, Hq, T, d]` and k `[B, Hkv, T, d]` at absolute positions `[B, T]`,
        both in one pass; returns new arrays in q's and k's dtypes. Bit-identical to `rotate` with
        `lookup`: each half is the same two float32 products summed (x1 cos + (-x2 sin) == x1 cos -
        x2 sin), rounded once to the I/O dtype.

        One native pass (`tkg.kernel.backends.host_ops.native_rope_qk`: no float32 copies of the batch;
        83 vs 677 us for batch 64 of 32 + 8 heads, d=128, bf16, on the build machine) when the
        extension is built and `self.native`; else `rotate_qk_numpy`, the same operations in 7 numpy
        calls. The two agree bit for bit except for which NaN a NaN input yields (operand order of
        an IEEE add decides it; served inputs are finite, checked on arrival)."""
        pos = np.asarray(positions)
        if int(pos.max()) + 1 > len(self.cos):
            self._grow(int(pos.max()) + 1)
        if self.native:
            out = native_rope_qk(q, k, pos, self.cos2, self.sin2)
            if out is not None:
                return out
        return self.rotate_qk_numpy(q, k, pos)

    def rotate_into(
        self, store: Any, layer: int, blocks: np.ndarray, offsets: np.ndarray, q: np.ndarray, k: np.ndarray,
        v: np.ndarray, positions: np.ndarray,
    ) -> np.ndarray:
        """`rotate_qk` of q `[B, Hq, T, d]` and k `[B, Hkv, T, d]` at absolute positions `[B, T]`,
        with the rotated k and v `[B, Hkv, T, d]` written to `store` (a `tkg.kernel.kv_store.KVStore`)
        at `layer`'s slots (blocks, offsets) (int `[B, T]`). Returns the rotated q. One native pass
        when `self.native` and the store has one (`HostKVStore.write_rope`: the rotated k goes
        straight into its slots); else `rotate_qk` and `store.write`. The same bits either way."""  # fmt: skip
        pos = np.asarray(positions)
        if int(pos.max()) + 1 > len(self.cos):
            self._grow(int(pos.max()) + 1)
        write_rope = getattr(store, "write_rope", None) if self.native else None
        if write_rope is not None:
            q_rot = write_rope(layer, blocks, offsets, q, k, v, pos, self.cos2, self.sin2)
            if q_rot is not None:
                return q_rot
        q_rot, k_rot = self.rotate_qk(q, k, pos)
        store.write(layer, blocks, offsets, k_rot.transpose(1, 0, 2, 3), np.asarray(v).transpose(1, 0, 2, 3))
        return q_rot

    def rotate_qk_numpy(self, q: np.ndarray, k: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`rotate_qk` in numpy (no native module, or a call it does not cover); positions within
        the table (`rotate_qk` grows it first)."""
        pos = np.asarray(positions)
        hq, half = q.shape[1], q.shape[-1] // 2
        x = np.concatenate((q, k), axis=1, dtype=np.float32)  # [B, Hq + Hkv, T, d]
        swapped = np.concatenate((x[..., half:], x[..., :half]), axis=-1)
        x *= self.cos2[pos][:, None]
        swapped *= self.sin2[pos][:, None]
        x += swapped
        return x[:, :hq].astype(q.dtype), x[:, hq:].astype(k.dtype)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x `[B, heads, T, d]` with `angles(...)`; returns x's dtype."""
    half = x.shape[-1] // 2
    xf = np.asarray(x, dtype=np.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = np.empty(x.shape, dtype=np.float32)
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] with cos/sin repeated over both halves.
    np.subtract(x1 * cos, x2 * sin, out=out[..., :half])
    np.add(x2 * cos, x1 * sin, out=out[..., half:])
    return out.astype(x.dtype, copy=False)
