"""`tkg.protowire` against protobuf itself: the request bytes the clients send are exactly what the
generated class serializes, and a response parsed without copies reads what the generated class
reads, for any field values, dtypes, shapes and layouts (strided, big-endian), unknown fields and
fields out of order; malformed responses are refused with the field named."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from tkg import codec, protowire
from tkg.client.messages import DecodeInput, decode_request
from tkg.v1 import decode_attention_pb2 as pb

DTYPES = [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)]
INT64 = st.integers(-(2**63), 2**63 - 1)


@contextlib.contextmanager
def views_from(n: int) -> Iterator[None]:
    """`protowire.VIEW_MIN_BYTES` set to `n`: 0 takes the view paths for any size, a huge value
    protobuf's own (the examples here are small: both paths run on each)."""
    old = protowire.VIEW_MIN_BYTES
    protowire.VIEW_MIN_BYTES = n
    try:
        yield
    finally:
        protowire.VIEW_MIN_BYTES = old


BOTH_PATHS = (0, 1 << 62)


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """A float array of `shape` in any wire dtype, maybe strided or big-endian."""
    dt = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31))
    a = np.random.default_rng(seed).standard_normal(shape).astype(dt)
    layout = draw(st.sampled_from(["plain", "strided", "big-endian"]))
    if layout == "strided" and a.ndim and a.shape[-1] > 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # the same values, not C-contiguous
    elif layout == "big-endian" and dt == np.float32:
        a = a.astype(">f4")
    return a


@st.composite
def requests(draw: st.DrawFn) -> tuple[DecodeInput, bool, bool]:
    B = draw(st.integers(0, 4))
    hq, hkv, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    ids = draw(st.lists(st.text(min_size=0, max_size=12), min_size=B, max_size=B))
    positions = draw(st.lists(INT64, min_size=B, max_size=B))
    layer = draw(st.integers(-(2**31), 2**31 - 1))
    rid = draw(st.text(max_size=20))
    q = draw(arrays((B, hq, s, d)))
    k, v = draw(arrays((B, hkv, s, d))), draw(arrays((B, hkv, s, d)))
    return DecodeInput(layer, ids, positions, q, k, v, rid), draw(st.booleans()), draw(st.booleans())


def _expected(d: DecodeInput, return_lse: bool, attend_only: bool) -> bytes:
    req = decode_request(d)
    req.return_lse, req.attend_only = return_lse, attend_only
    if attend_only:
        req.ClearField("k")
        req.ClearField("v")
    return req.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(requests())
def test_request_bytes_are_protobufs_own(drawn: tuple[DecodeInput, bool, bool]) -> None:
    d, return_lse, attend_only = drawn
    for n in BOTH_PATHS:
        with views_from(n):
            got = protowire.decode_request_bytes(
                d.layer, d.sequence_ids, d.positions, d.q, None if attend_only else d.k,
                None if attend_only else d.v, d.request_id, return_lse=return_lse, attend_only=attend_only,
            )  # fmt: skip
        assert got == _expected(d, return_lse, attend_only)


@given(INT64)
def test_varint_is_protobufs(n: int) -> None:
    assert protowire.varint(n) == pb.Tensor(shape=[n]).SerializeToString()[2:]


@st.composite
def responses(draw: st.DrawFn) -> pb.DecodeResponse:
    resp = pb.DecodeResponse(request_id=draw(st.text(max_size=10)), layer=draw(st.integers(-5, 2**31 - 1)))
    if draw(st.booleans()):
        resp.timing.CopyFrom(pb.Timing(total_us=draw(INT64), batch_size=draw(st.integers(0, 64))))
    if draw(st.booleans()):
        resp.error.CopyFrom(pb.Error(code=draw(st.integers(0, 16)), message=draw(st.text(max_size=10))))
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
        codec.encode(draw(arrays(shape)), resp.out)
    if draw(st.booleans()):
        codec.encode(draw(arrays((draw(st.integers(0, 3)), 2, 1))).astype(np.float32), resp.lse)
    return resp


def _same(got: protowire.DecodeAnswer, want: pb.DecodeResponse) -> None:
    assert (got.request_id, got.layer, got.timing) == (want.request_id, want.layer, want.timing)
    assert got.error == (want.error if want.HasField("error") else None)
    for name in ("out", "lse"):
        array = getattr(got, name)
        if not want.HasField(name):
            assert array is None
            continue
        expected = codec.decode(getattr(want, name), name)
        assert array.dtype == expected.dtype and array.shape == expected.shape and not array.flags.writeable
        np.testing.assert_array_equal(array, expected)


@settings(max_examples=200, deadline=None)
@given(responses(), st.permutations(range(6)), st.lists(st.sampled_from([0, 1, 2, 5]), max_size=3))
def test_a_parsed_response_reads_what_protobuf_reads(
    resp: pb.DecodeResponse, order: list[int], unknown: list[int]
) -> None:
    """Fields in any order and unknown fields of every wire type (a newer server's) change nothing."""
    fields = {number: pb.DecodeResponse() for number in range(1, 7)}
    for desc, value in resp.ListFields():
        if desc.message_type is None:
            setattr(fields[desc.number], desc.name, value)
        else:
            getattr(fields[desc.number], desc.name).CopyFrom(value)
    extras = {0: b"\x08\x96\x01", 1: b"\x09" + bytes(8), 2: b"\x0a\x03abc", 5: b"\x0d" + bytes(4)}
    # Unknown field numbers 100 + wire type: key = (number << 3) | type, as a varint.
    raw = b"".join(fields[order[i] + 1].SerializeToString() for i in range(6))
    for t in unknown:
        raw += protowire.varint((100 + t) << 3 | t) + extras[t][1:]
    for n in BOTH_PATHS:
        with views_from(n):
            _same(protowire.parse_decode_response(raw), resp)
    known = pb.DecodeResponse.FromString(raw)  # the bytes mean to protobuf what `resp` does
    known.DiscardUnknownFields()
    assert known == resp


def test_a_truncated_response_is_refused() -> None:
    resp = pb.DecodeResponse(request_id="r")
    codec.encode(np.ones((2, 3), np.float32), resp.out)
    raw = resp.SerializeToString()
    for cut in (len(raw) - 1, 4):
        with views_from(0), pytest.raises(codec.TensorError, match=r"runs past the message's end"):
            protowire.parse_decode_response(raw[:cut])
        with pytest.raises(DecodeError):  # protobuf's own parse, below VIEW_MIN_BYTES
            protowire.parse_decode_response(raw[:cut])


def test_a_response_tensor_of_the_wrong_size_names_its_field() -> None:
    resp = pb.DecodeResponse()
    resp.lse.CopyFrom(pb.Tensor(dtype=codec.dtype_from_numpy(np.dtype(np.float32)), shape=[2, 2], data=bytes(12)))
    bad = pb.DecodeResponse()
    bad.out.CopyFrom(pb.Tensor(dtype=999, shape=[1]))
    for n in BOTH_PATHS:
        with views_from(n):
            with pytest.raises(codec.TensorError, match=r"lse.data: 12 bytes, expected 16"):
                protowire.parse_decode_response(resp.SerializeToString())
            with pytest.raises(codec.TensorError, match=r"out.dtype: unsupported dtype 999"):
                protowire.parse_decode_response(bad.SerializeToString())


def test_the_stub_serializer_passes_bytes_and_serializes_messages() -> None:
    req = pb.DecodeRequest(request_id="x", layer=3)
    assert protowire.serialize(req) == req.SerializeToString()
    raw = req.SerializeToString()
    assert protowire.serialize(raw) is raw


@settings(max_examples=150, deadline=None)
@given(requests(), st.lists(st.sampled_from(["q", "k", "v"]), max_size=2))
def test_a_parsed_request_reads_what_protobuf_reads(drawn: tuple[DecodeInput, bool, bool], again: list[str]) -> None:
    """The server's view of a request: every field as protobuf parses it, q/k/v's data as views of
    the bytes; a tensor given twice merges as protobuf merges it (its data: the last wins)."""
    d, return_lse, attend_only = drawn
    raw = _expected(d, return_lse, attend_only)
    for name in again:  # a second occurrence of the field, as a merging sender might write it
        extra = pb.DecodeRequest()
        codec.encode(np.arange(3, dtype=np.float32), getattr(extra, name))
        raw += extra.SerializeToString()
    with views_from(0):
        view = protowire.parse_decode_request(raw)
    with views_from(1 << 62):
        assert protowire.parse_decode_request(raw) == pb.DecodeRequest.FromString(raw)
    want = pb.DecodeRequest.FromString(raw)
    for name in ("q", "k", "v"):
        got = protowire.tensor_bytes(view, name)
        assert bytes(got) == getattr(want, name).data and (len(got) == 0 or isinstance(got, memoryview))
        assert protowire.tensor_bytes(want, name) == getattr(want, name).data
        if want.HasField(name):  # (clearing an absent one would make it present)
            getattr(want, name).ClearField("data")
    assert isinstance(view, protowire.DecodeRequestView) and view.message == want
    assert view.sequence_ids == want.sequence_ids and view.HasField("k") == want.HasField("k")


@settings(max_examples=100, deadline=None)
@given(responses())
def test_response_bytes_are_protobufs_own(resp: pb.DecodeResponse) -> None:
    if not resp.HasField("out"):
        codec.encode(np.zeros((1, 2), np.float32), resp.out)
    resp.ClearField("error")  # the server's Decode answer has none (errors are statuses)
    resp.timing.SetInParent()  # always present in an answer
    out = codec.decode(resp.out)
    lse = codec.decode(resp.lse) if resp.HasField("lse") else None
    for n in BOTH_PATHS:
        with views_from(n):
            got = protowire.decode_response_bytes(resp.request_id, resp.layer, out, resp.timing, lse)
        assert got == resp.SerializeToString()


@pytest.mark.parametrize("n", [16, 4096], ids=["python-check", "native-check"])
def test_the_bound_check_reads_a_view_as_it_reads_bytes(n: int) -> None:
    """q/k/v reach `codec.bounded_bytes` as views of a request's bytes: both of its paths (small
    tensors in Python, large ones native) must answer for a view what they answer for bytes."""
    rng = np.random.default_rng(n)
    for dt in DTYPES:
        ok = rng.standard_normal(n).astype(dt)
        bad = ok.copy()
        bad[n // 2] = np.inf
        for a, want in ((ok, True), (bad, False)):
            raw = b"xx" + a.tobytes()
            view = memoryview(raw)[2:]
            assert codec.bounded_bytes(view, dt) is want and codec.bounded_bytes(bytes(view), dt) is want
