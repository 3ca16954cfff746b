"""Request builders and result types for `tkg.client.core` and both client shells (numpy <-> proto)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from tkg import codec, protowire
from tkg.client.errors import TkgError, from_code
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE = 64 * 2**20
# `SequenceInfo.tier`, warmest first: where a sequence's KV lives now (api.md, KV tiers). A server
# without tiers leaves the field empty.
TIERS = ("device", "host", "disk")
DECODE_METHOD = "/tkg.v1.DecodeAttention/Decode"
DECODE_STREAM_METHOD = "/tkg.v1.DecodeAttention/DecodeStream"


@dataclass(frozen=True)
class Timing:
    """Server-side microseconds of one decode request and the batch it ran in."""

    queue_us: int
    kernel_us: int
    total_us: int
    batch_size: int
    batch_requests: int
    attention_us: int = 0  # the attention kernel call alone (a part of kernel_us)

    @classmethod
    def from_pb(cls, t: pb.Timing) -> Timing:
        return cls(t.queue_us, t.kernel_us, t.total_us, t.batch_size, t.batch_requests, t.attention_us)


@dataclass
class DecodeResult:
    """A decode step's output `[B, num_q_heads, S, head_dim]` (None when `error` is set)."""

    request_id: str
    layer: int
    out: np.ndarray | None
    timing: Timing | None
    error: TkgError | None = None
    ok: np.ndarray | None = None  # bool [B], set in a PartialDecodeError's result: which rows succeeded


@dataclass
class DecodeInput:
    """One decode request: q `[B, Hq, S, d]`, k and v `[B, Hkv, S, d]` (the server's KV dtype)."""

    layer: int
    sequence_ids: Sequence[str]
    positions: Sequence[int]
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    request_id: str = ""
    extra: dict = field(default_factory=dict)


def coldest_tier(tiers: Sequence[str]) -> str:
    """The tier a use of all of `tiers` waits for (several segments of one sequence): the coldest
    of them. Empty entries (a server without tiers) are ignored; a name this client does not know
    counts as colder than "disk" (nothing says it is ready). "" when every entry is empty."""
    known = [t for t in tiers if t]
    return max(known, key=lambda t: TIERS.index(t) if t in TIERS else len(TIERS), default="")


def decode_request(d: DecodeInput) -> pb.DecodeRequest:
    """`d` as a DecodeRequest message (tests and benchmarks; the clients send `request_bytes`)."""
    return protowire.decode_request_message(d.layer, d.sequence_ids, d.positions, d.q, d.k, d.v, d.request_id)


def request_bytes(d: DecodeInput) -> bytes:
    """`decode_request(d)`'s wire bytes, each tensor copied once (`tkg.protowire`): what the clients send."""
    return protowire.decode_request_bytes(d.layer, d.sequence_ids, d.positions, d.q, d.k, d.v, d.request_id)


def stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.DecodeAttentionStub:
    """The generated stub over `channel` (sync or aio), with Decode and DecodeStream sending
    `request_bytes` as they are and answering `protowire.DecodeAnswer`s (tensors not copied)."""
    s = pb_grpc.DecodeAttentionStub(channel)
    s.Decode = channel.unary_unary(
        DECODE_METHOD, request_serializer=protowire.serialize, response_deserializer=protowire.parse_decode_response
    )
    s.DecodeStream = channel.stream_stream(
        DECODE_STREAM_METHOD, request_serializer=protowire.serialize,
        response_deserializer=protowire.parse_decode_response,
    )  # fmt: skip
    return s


def decode_result(resp: protowire.DecodeAnswer) -> DecodeResult:
    if resp.error is not None and resp.error.code != 0:
        return DecodeResult(resp.request_id, resp.layer, None, None, from_code(resp.error.code, resp.error.message))
    if resp.out is None:
        raise codec.TensorError("out: absent from the response; expected a tensor")
    return DecodeResult(resp.request_id, resp.layer, resp.out, Timing.from_pb(resp.timing))


def append_chunks(
    sequence_id: str, layer: int, position: int, k: np.ndarray, v: np.ndarray, chunk_tokens: int
) -> Iterator[pb.AppendKVRequest]:
    """AppendKV messages of at most `chunk_tokens` tokens each (k, v `[T, Hkv, d]`)."""
    if k.shape != v.shape or k.ndim != 3:
        raise ValueError(f"k, v: shapes {k.shape} and {v.shape}; expected equal [T, num_kv_heads, head_dim]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: {chunk_tokens}; expected >= 1")
    for start in range(0, k.shape[0], chunk_tokens):
        msg = pb.AppendKVRequest(sequence_id=sequence_id, layer=layer, position=position + start)
        codec.encode(k[start : start + chunk_tokens], msg.k)
        codec.encode(v[start : start + chunk_tokens], msg.v)
        yield msg


def channel_options(max_message_bytes: int, extra: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Keepalive a minute apart: keeps idle connections warm without tripping the server's
        # too_many_pings limit (research/serving.md 4.2).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        *extra,
    ]


def uses_tls(tls: bool, root_certificates: bytes | None, certificate_chain: bytes | None) -> bool:
    """Whether `open_channels` opens TLS channels: when asked, or when roots or a client certificate are given."""
    return tls or root_certificates is not None or certificate_chain is not None


def open_channels(
    targets: Sequence[str], *, aio: bool, tls: bool, root_certificates: bytes | None, max_message_bytes: int,
    certificate_chain: bytes | None = None, private_key: bytes | None = None,
) -> list:
    """One channel per target (grpc.aio when `aio`), TLS when asked or when roots or a client
    certificate are given; `certificate_chain` + `private_key` (PEM) answer a server asking for
    client certificates (mTLS)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key: only one given; expected both (PEM) or neither")
    api = grpc.aio if aio else grpc
    opts = channel_options(max_message_bytes)
    if uses_tls(tls, root_certificates, certificate_chain):
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        return [api.secure_channel(t, creds, options=opts) for t in targets]
    return [api.insecure_channel(t, options=opts) for t in targets]


def auth_metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    return tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token else ())


def merge_rows(parts: list[tuple[list[int], np.ndarray]], total: int) -> np.ndarray:
    """Scatter per-replica outputs back into the caller's sequence order."""
    first = parts[0][1]
    out = np.empty((total, *first.shape[1:]), dtype=first.dtype)
    for positions, rows in parts:
        out[positions] = rows
    return out
