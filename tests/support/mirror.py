"""Helpers for the server's end-to-end tests: a client-side mirror of the KV cache that computes
expected decode outputs with the test oracle, raw-stub request builders, metrics scraping.

The mirror never shares code with the server's data path: it rotates keys and queries with the
oracle's RoPE, keeps each sequence's K/V as contiguous float64 arrays, and decodes each step with
`support.oracle.naive_decode`. (The RoPE frequencies, incl. their scaling, come from
`tkg.server.rope.inv_freqs`: a wrong table there would not show here.)
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Callable

import grpc
import ml_dtypes
import numpy as np

from support.oracle import naive_decode, rope
from tkg import codec
from tkg.dtypes import BF16
from tkg.server.rope import inv_freqs
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc


class Mirror:
    """What the server should hold, per (sequence, layer): K (rotated when the server fuses RoPE)
    and V as float64 `[T, Hkv, d]`; `decode` appends and returns the expected output."""

    def __init__(
        self, info: pb.ServerInfo, rope: dict | None = None, sinks: np.ndarray | None = None,
        fp8_scales: tuple[list[float], list[float]] | None = None,
    ) -> None:  # fmt: skip
        """`rope`: {"theta": .., "scaling": {..} or None} when the server fuses RoPE. `fp8_scales`:
        (k_scale, v_scale) per layer of a float8_e4m3 cache: it holds round(value / scale),
        saturated at +-240, so the mirror keeps exactly that times the scale."""
        self.info = info
        self.hkv, self.hq, self.d, self.bl = info.num_kv_heads, info.num_q_heads, info.head_dim, info.block_len
        self.inv = None if rope is None else inv_freqs(self.d, rope["theta"], rope.get("scaling"))
        scaling = (rope or {}).get("scaling") or {}
        m = 0.1 * math.log(scaling["factor"]) + 1 if scaling.get("type") == "yarn" else 1.0
        self.scale = m * m / math.sqrt(self.d)
        self.windows = [w or None for w in info.sliding_window]
        self.sinks = sinks
        self.fp8_scales = fp8_scales
        self.kv: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def length(self, sid: str, layer: int) -> int:
        return len(self.kv[(sid, layer)][0]) if (sid, layer) in self.kv else 0

    def append(self, sid: str, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v `[T, Hkv, d]` as sent."""
        start = self.length(sid, layer)
        k = k.astype(np.float64)
        if self.inv is not None:
            k = rope(k.transpose(1, 0, 2), np.arange(start, start + len(k)), self.inv).transpose(1, 0, 2)
        v = v.astype(np.float64)
        if self.fp8_scales is not None:
            ks, vs = self.fp8_scales[0][layer], self.fp8_scales[1][layer]
            k = fp8_stored(k, ks) * ks
            v = fp8_stored(v, vs) * vs
        empty = np.zeros((0, self.hkv, self.d))
        K, V = self.kv.get((sid, layer), (empty, empty))
        self.kv[(sid, layer)] = (np.concatenate([K, k]), np.concatenate([V, v]))

    def truncate(self, sid: str, length: int) -> None:
        for layer in range(self.info.num_layers):
            K, V = self.kv[(sid, layer)]
            self.kv[(sid, layer)] = (K[:length], V[:length])

    def fork(self, src: str, dst: str) -> None:
        for layer in range(self.info.num_layers):
            self.kv[(dst, layer)] = self.kv[(src, layer)]

    def release(self, sid: str) -> None:
        for layer in range(self.info.num_layers):
            self.kv.pop((sid, layer), None)

    def decode(self, layer: int, sids: list[str], q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q `[B, Hq, S, d]`, k/v `[B, Hkv, S, d]` -> expected `[B, Hq, S, d]` float64 (appends k/v)."""
        qf = q.astype(np.float64)
        out = np.zeros(qf.shape)
        sinks = None if self.sinks is None else self.sinks[layer]
        for b, sid in enumerate(sids):
            start = self.length(sid, layer)
            if self.inv is not None:
                qf[b] = rope(qf[b], np.arange(start, start + q.shape[2]), self.inv)
            self.append(sid, layer, k[b].transpose(1, 0, 2), v[b].transpose(1, 0, 2))
            K, V = self.kv[(sid, layer)]
            out[b] = naive_decode(qf[b], K, V, self.scale, self.windows[layer], sinks)
        return out


def fp8_stored(x: np.ndarray, scale: float) -> np.ndarray:
    """float64 of what a float8_e4m3 cache stores for x: x / scale (in fp32) rounded to e4m3, with
    finite values past +-240 clipped to +-240 first (written out here, not the server's helper)."""
    y = np.asarray(x, np.float32) / np.float32(scale)
    y = np.minimum(np.maximum(y, np.float32(-240.0)), np.float32(240.0))
    return y.astype(ml_dtypes.float8_e4m3).astype(np.float64)


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def tol(dtype: np.dtype) -> dict[str, float]:
    """Output tolerances: the output is rounded to the KV dtype (8 / 11 / 24 mantissa bits)."""
    if np.dtype(dtype) == BF16:
        return {"rtol": 2e-2, "atol": 2e-2}
    if np.dtype(dtype) == np.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    return {"rtol": 1e-4, "atol": 1e-5}


# ---- raw stubs ------------------------------------------------------------------------------


def decode_request(
    layer: int, sids: list[str], positions: list[int], q: np.ndarray, k: np.ndarray, v: np.ndarray, rid: str = ""
) -> pb.DecodeRequest:
    req = pb.DecodeRequest(request_id=rid, layer=layer, sequence_ids=sids, positions=positions)
    codec.encode(q, req.q)
    codec.encode(k, req.k)
    codec.encode(v, req.v)
    return req


def append_request(sid: str, layer: int, position: int, k: np.ndarray, v: np.ndarray) -> pb.AppendKVRequest:
    req = pb.AppendKVRequest(sequence_id=sid, layer=layer, position=position)
    codec.encode(k, req.k)
    codec.encode(v, req.v)
    return req


def stub(target: str, **channel: object) -> pb_grpc.DecodeAttentionStub:
    return pb_grpc.DecodeAttentionStub(grpc.insecure_channel(target, **channel))


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call expected to fail."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded; expected an error")


# ---- metrics --------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(port: int) -> dict[str, float]:
    """Every sample of the /metrics page: `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out
