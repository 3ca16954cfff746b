"""DecodeRequest and DecodeResponse to and from their wire bytes without protobuf's tensor copies.

A batch-64 step of the llama-3-8b geometry carries 0.79 MB of q/k/v and 0.5 MB of out. Through the
generated classes each tensor's bytes were copied three times on the way out (`tobytes`, into the
message, `SerializeToString`) and twice on the way in (into the message, out of it by `.data`):
~165 us to encode the request and ~50 us to read it, warm, on the build machine, more after a
kernel step has flushed the caches. Here, both sides of Decode and DecodeStream:

- `decode_request_bytes` (clients) and `decode_response_bytes` (the server's Decode answer): the
  message's bytes with each tensor copied once (one `bytes.join`). The small fields and each
  tensor's dtype and shape are still serialized by protobuf, and the bytes are exactly
  `SerializeToString()`'s (tested).
- `parse_decode_request` (the server's deserializer) and `parse_decode_response` (the clients'):
  the tensors' data as views of the received bytes (no copy); every other field, the tensors'
  dtype and shape included, parsed by protobuf from the bytes less those data, so a field given
  twice, out of order or unknown means what it means to protobuf.

The proto3 wire format: a field is a varint key `(number << 3) | wire type`, then a varint (type
0), 8 bytes (type 1), a varint length and that many bytes (type 2), or 4 bytes (type 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tkg import codec
from tkg.v1 import decode_attention_pb2 as pb

_MASK64 = (1 << 64) - 1


def varint(n: int) -> bytes:
    """`n` as a protobuf varint (a negative int64 as its 64-bit two's complement, 10 bytes)."""
    n &= _MASK64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


_DATA_KEY = _key(3, 2)  # Tensor.data


def tensor_field(number: int, array: np.ndarray) -> list[bytes | np.ndarray]:
    """The parts of a Tensor field `number` holding `array`: to be joined with the message's
    other parts. The data part is `array`'s own memory (copied once, by the join)."""
    code, a = codec.wire_array(array)
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # a copy only for a strided array
    head = pb.Tensor(dtype=code, shape=array.shape).SerializeToString()
    parts: list[bytes | np.ndarray] = [head]
    size = len(head)
    if data.size:  # proto3 leaves an empty bytes field out
        data_head = _DATA_KEY + varint(data.size)
        parts += [data_head, data]
        size += len(data_head) + data.size
    return [_key(number, 2) + varint(size), *parts]


def decode_request_message(
    layer: int,
    sequence_ids: Sequence[str],
    positions: Sequence[int],
    q: np.ndarray | None,
    k: np.ndarray | None,
    v: np.ndarray | None,
    request_id: str = "",
    return_lse: bool = False,
    attend_only: bool = False,
) -> pb.DecodeRequest:
    """The DecodeRequest message (through protobuf's class: each tensor copied by `codec.encode`);
    a tensor None is left out."""
    req = pb.DecodeRequest(
        request_id=request_id, layer=layer, sequence_ids=sequence_ids, positions=[int(p) for p in positions],
        return_lse=return_lse, attend_only=attend_only,
    )  # fmt: skip
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a is not None:
            codec.encode(a, getattr(req, name))
    return req


def decode_request_bytes(
    layer: int,
    sequence_ids: Sequence[str],
    positions: Sequence[int],
    q: np.ndarray,
    k: np.ndarray | None,
    v: np.ndarray | None,
    request_id: str = "",
    return_lse: bool = False,
    attend_only: bool = False,
) -> bytes:
    """A DecodeRequest's wire bytes; `k`, `v` None: the fields are left out (attend-only)."""
    if q.nbytes + (0 if k is None else k.nbytes) + (0 if v is None else v.nbytes) < VIEW_MIN_BYTES:
        return decode_request_message(
            layer, sequence_ids, positions, q, k, v, request_id, return_lse, attend_only
        ).SerializeToString()
    head = decode_request_message(layer, sequence_ids, positions, None, None, None, request_id).SerializeToString()
    parts: list[bytes | np.ndarray] = [head, *tensor_field(5, q)]
    if k is not None:
        parts += tensor_field(6, k)
    if v is not None:
        parts += tensor_field(7, v)
    if return_lse or attend_only:
        parts.append(pb.DecodeRequest(return_lse=return_lse, attend_only=attend_only).SerializeToString())
    return b"".join(parts)


def serialize(message: bytes | pb.DecodeRequest | pb.DecodeResponse) -> bytes:
    """The serializer of Decode and DecodeStream messages, both sides: bytes made here go as they
    are; a message (an error answer, a test's request) is serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass
class DecodeAnswer:
    """A DecodeResponse read by `parse_decode_response`: `out` and `lse` are read-only views of the
    response's bytes, None where the field is absent; `error` None where absent."""

    request_id: str
    layer: int
    out: np.ndarray | None
    timing: pb.Timing
    error: pb.Error | None
    lse: np.ndarray | None


class DecodeRequestView:
    """A DecodeRequest read by `parse_decode_request`: the message's attributes (`message`: all of
    it but q/k/v's data, their dtype and shape kept), and `tensor_data`: each present tensor's data
    as a view of the request's bytes (b"" when the tensor has none)."""

    __slots__ = ("message", "tensor_data")

    def __init__(self, message: pb.DecodeRequest, tensor_data: dict[str, memoryview | bytes]) -> None:
        self.message, self.tensor_data = message, tensor_data

    def __getattr__(self, name: str) -> object:
        return getattr(self.message, name)


def tensor_bytes(request: pb.DecodeRequest | DecodeRequestView, name: str) -> memoryview | bytes:
    """The data of tensor `name` of a Decode request, however it was read (a copy only for a message)."""
    if type(request) is DecodeRequestView:
        return request.tensor_data.get(name, b"")
    return getattr(request, name).data


def _varint_at(raw: bytes, i: int) -> tuple[int, int]:
    """(value, next offset) of the varint at `i`; IndexError past the end."""
    value = shift = 0
    while True:
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise codec.TensorError("message: a varint longer than 10 bytes")


def _split(raw: bytes, tensors: dict[int, str]) -> tuple[bytes, dict[str, memoryview]]:
    """`raw` without the data of its Tensor fields `tensors` (number -> name), and those data as
    views of `raw`. Each Tensor field stays, re-framed without its data, so parsing the rest gives
    what protobuf gives for everything else (a field given twice merges; its data: the last wins).
    codec.TensorError when the framing is broken."""
    buf = memoryview(raw)
    data: dict[str, memoryview] = {}
    try:
        parts = _scan(raw, buf, 0, len(raw), tensors, data)
    except IndexError:
        raise codec.TensorError("message: a field runs past the message's end") from None
    return raw if parts is None else b"".join(parts), data


_TENSOR_DATA = {3: "data"}  # Tensor.data


def _scan(
    raw: bytes, buf: memoryview, lo: int, hi: int, tensors: dict[int, str], data: dict[str, memoryview]
) -> list[memoryview | bytes] | None:
    """The fields of the message `raw[lo:hi]` with those in `tensors` taken out: their data views
    go into `data` (by name), the rest is returned as parts to join, None when nothing was taken.
    A Tensor field (`tensors` names its number) is re-framed around its own parts; `Tensor.data`
    (`tensors` is `_TENSOR_DATA`) is dropped. IndexError past `hi`.

    One loop, inlined for one-byte keys and lengths: a batch-64 request has 64 `sequence_ids`
    fields to step over."""
    parts: list[memoryview | bytes] = []
    i, run = lo, lo  # `run`: where the current stretch of kept fields began
    taken = False
    while i < hi:
        start = i
        key = raw[i]
        i += 1
        if key >= 0x80:
            key, i = _varint_at(raw, start)
        wire_type = key & 7
        if wire_type == 2:
            length = raw[i]
            i += 1
            if length >= 0x80:
                length, i = _varint_at(raw, i - 1)
            value_at = i
            i += length
            if i > hi:
                raise IndexError
            name = tensors.get(key >> 3)
            if name is None:
                continue
            taken = True
            if run < start:
                parts.append(buf[run:start])
            run = i
            if tensors is _TENSOR_DATA:
                data[name] = buf[value_at:i]
                continue
            inner: dict[str, memoryview] = {}
            sub = _scan(raw, buf, value_at, i, _TENSOR_DATA, inner)
            head = buf[value_at:i] if sub is None else b"".join(sub)
            parts.append(_key(key >> 3, 2) + varint(len(head)))
            parts.append(head)
            if "data" in inner:
                data[name] = inner["data"]
        elif wire_type == 0:
            while raw[i] >= 0x80:
                i += 1
            i += 1
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise codec.TensorError(f"message: wire type {wire_type} of field {key >> 3}; expected 0, 1, 2 or 5")
    if i > hi:
        raise IndexError
    if not taken:
        return None
    if run < hi:
        parts.append(buf[run:hi])
    return parts


_REQUEST_TENSORS = {5: "q", 6: "k", 7: "v"}
_RESPONSE_TENSORS = {3: "out", 6: "lse"}

# Below this many bytes a message goes through protobuf's own classes: the copies cost less than
# the Python around the views (measured at batch 1 of the llama-3-8b geometry, 10 KB: the views
# ~5-10 us slower per side; at batch 64, 0.8 MB: 35-140 us quicker per side).
VIEW_MIN_BYTES = 128 << 10


def parse_decode_request(raw: bytes) -> pb.DecodeRequest | DecodeRequestView:
    """A DecodeRequest's wire bytes as the server reads them (its Decode and DecodeStream
    deserializer): from VIEW_MIN_BYTES a DecodeRequestView, else the message. Read the tensors'
    data with `tensor_bytes`. A ValueError (codec.TensorError or protobuf's DecodeError) when broken."""
    if len(raw) < VIEW_MIN_BYTES:
        return pb.DecodeRequest.FromString(raw)
    rest, data = _split(raw, _REQUEST_TENSORS)
    return DecodeRequestView(pb.DecodeRequest.FromString(rest), data)


def parse_decode_response(raw: bytes) -> DecodeAnswer:
    """The DecodeAnswer of a DecodeResponse's wire bytes (the clients' deserializer): from
    VIEW_MIN_BYTES the tensors view `raw` (kept alive by their arrays). codec.TensorError when one
    is malformed."""
    rest, data = _split(raw, _RESPONSE_TENSORS) if len(raw) >= VIEW_MIN_BYTES else (raw, {})
    msg = pb.DecodeResponse.FromString(rest)
    # A tensor without data in `data` reads its own (b"" once split off: an empty tensor).
    arrays = {
        name: codec.decode(getattr(msg, name), name, data=data.get(name)) if msg.HasField(name) else None
        for name in _RESPONSE_TENSORS.values()
    }
    return DecodeAnswer(
        request_id=msg.request_id, layer=msg.layer, out=arrays["out"], timing=msg.timing,
        error=msg.error if msg.HasField("error") else None, lse=arrays["lse"],
    )  # fmt: skip


def decode_response_message(
    request_id: str, layer: int, out: np.ndarray, timing: pb.Timing, lse: np.ndarray | None = None
) -> pb.DecodeResponse:
    """The DecodeResponse message (through protobuf's class; `out` and `lse` copied by `codec.encode`)."""
    resp = pb.DecodeResponse(request_id=request_id, layer=layer, timing=timing)
    codec.encode(out, resp.out)
    if lse is not None:  # return_lse: out is float32 too
        codec.encode(lse, resp.lse)
    return resp


def decode_response_bytes(
    request_id: str, layer: int, out: np.ndarray, timing: pb.Timing, lse: np.ndarray | None = None
) -> bytes:
    """A DecodeResponse's wire bytes, `out` and `lse` copied once (the server's Decode answer):
    exactly `SerializeToString()` of the message with those fields."""
    if out.nbytes + (0 if lse is None else lse.nbytes) < VIEW_MIN_BYTES:
        return decode_response_message(request_id, layer, out, timing, lse).SerializeToString()
    parts: list[bytes | np.ndarray] = [pb.DecodeResponse(request_id=request_id, layer=layer).SerializeToString()]
    parts += tensor_field(3, out)
    t = timing.SerializeToString()
    parts.append(_key(4, 2) + varint(len(t)) + t)
    if lse is not None:
        parts += tensor_field(6, lse)
    return b"".join(parts)


def answer_of(message: pb.DecodeResponse) -> DecodeAnswer:
    """A DecodeResponse message as the clients read one (fakes and tests that build messages)."""
    return parse_decode_response(message.SerializeToString())
