"""Wire fuzzer: every RPC gets hypothesis-built messages (any field values, tensors that are
nearly right, ids of live sequences) and raw garbage bytes. No call may end INTERNAL or UNKNOWN
(bytes that do not parse are INVALID_ARGUMENT: `tkg.server.auth.Guard` parses them),
the server keeps SERVING, and once everything the fuzz created is released the block and
sequence accounting is back where it started."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.mirror import append_request, decode_request
from support.server_proc import ServerProc, start_server

from tkg.v1 import decode_attention_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["DecodeAttention"]
METHODS = {m.name: m for m in SERVICE.methods}
IDS = ["fz-a", "fz-b", "fz-c"]  # live sequences the fuzz may hit
NUM_BLOCKS, HQ, HKV, D = 64, 2, 1, 8
ARGS = ("--backend", "reference", "--num-layers", "2", "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
        "--head-dim", str(D), "--block-len", "8", "--num-blocks", str(NUM_BLOCKS), "--max-context", "64",
        "--kv-dtype", "float32", "--max-batch", "4", "--max-message-bytes", "65536")  # fmt: skip
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INT_RANGES = {FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1)}
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def tensors() -> st.SearchStrategy[pb.Tensor]:
    """Anything from nonsense to a tensor the server accepts (float32, small dims, right bytes)."""

    @st.composite
    def plausible(draw: st.DrawFn) -> pb.Tensor:
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5))
        n = int(np.prod(shape)) if shape else 1
        dtype = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16, 0, 77]))
        values = draw(st.sampled_from(["normal", "raw", "short"]))
        if values == "normal":
            data = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(n).astype(np.float32).tobytes()
        elif values == "raw":
            data = draw(st.binary(min_size=4 * n, max_size=4 * n)) if n <= 64 else bytes(4 * n)
        else:
            data = draw(st.binary(max_size=16))
        return pb.Tensor(dtype=dtype, shape=shape, data=data)

    return st.one_of(plausible(), messages(pb.Tensor.DESCRIPTOR, 1))


def scalar(f: Any) -> st.SearchStrategy:
    if f.type in INT_RANGES:
        lo, hi = INT_RANGES[f.type]
        return st.one_of(st.integers(-3, 70), st.integers(lo, hi))
    if f.type == FD.TYPE_STRING:
        return st.one_of(st.sampled_from([*IDS, ""]), st.text(max_size=300))
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_ENUM:
        return st.integers(-2, 6)
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(allow_nan=True, width=32 if f.type == FD.TYPE_FLOAT else 64)
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for {f.full_name}")


def messages(desc: Any, depth: int = 2) -> st.SearchStrategy:
    """A strategy for messages of `desc`: every field set or not, any value of its type."""
    cls = getattr(pb, desc.name)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for f in desc.fields:
            if not draw(st.booleans()):
                continue
            if f.type == FD.TYPE_MESSAGE:
                if depth <= 0:
                    continue
                sub = tensors() if f.message_type.name == "Tensor" else messages(f.message_type, depth - 1)
                getattr(msg, f.name).CopyFrom(draw(sub))
            elif f.is_repeated:
                getattr(msg, f.name).extend(draw(st.lists(scalar(f), max_size=5)))
            else:
                setattr(msg, f.name, draw(scalar(f)))
        return msg

    return build()


class Wire:
    """Raw calls (bytes in, bytes out) to one server, recording what the fuzz created."""

    def __init__(self, srv: ServerProc) -> None:
        self.channel = grpc.insecure_channel(srv.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.created: set[str] = set()
        self.codes: dict[str, int] = {}

    def call(self, method: str, payload: bytes | list[bytes]) -> grpc.StatusCode:
        m = METHODS[method]
        path = f"/{SERVICE.full_name}/{method}"
        kind = {(False, False): "unary_unary", (True, False): "stream_unary", (False, True): "unary_stream",
                (True, True): "stream_stream"}[(m.client_streaming, m.server_streaming)]  # fmt: skip
        rpc = getattr(self.channel, kind)(path)
        if m.client_streaming and isinstance(payload, bytes):
            payload = [payload]
        try:
            out = rpc(iter(payload) if m.client_streaming else payload, timeout=20)
            replies = list(out) if m.server_streaming else [out]
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code, replies = exc.code(), []
            assert code not in FORBIDDEN, f"{method}: {code.name}: {exc.details()}"
        self.codes[f"{method}:{code.name}"] = self.codes.get(f"{method}:{code.name}", 0) + 1
        if m.output_type.name == "SequenceInfo":
            for r in replies:
                self.created.add(pb.SequenceInfo.FromString(r).sequence_id)
        if method == "DecodeStream":  # per-message errors carry codes too
            for r in replies:
                err = pb.DecodeResponse.FromString(r).error
                assert err.code not in (c.value[0] for c in FORBIDDEN), f"DecodeStream message: {err}"
        return code

    def info(self) -> pb.ServerInfo:
        return pb.ServerInfo.FromString(self.channel.unary_unary(f"/{SERVICE.full_name}/GetServerInfo")(b""))

    def serving(self) -> bool:
        return self.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    srv = start_server(*ARGS)
    w = Wire(srv)
    try:
        for sid in IDS:
            w.call("CreateSequence", pb.CreateSequenceRequest(sequence_id=sid).SerializeToString())
        yield w
    finally:
        srv.stop(signal.SIGKILL)


@st.composite
def near_valid_decode(draw: st.DrawFn) -> pb.DecodeRequest:
    """A decode the server may well accept (live ids, right heads, small positions), so the fuzz
    also runs the append + kernel path and its position/capacity errors, not only validation."""
    B = draw(st.integers(1, 2))
    S = draw(st.integers(1, 2))
    req = pb.DecodeRequest(
        layer=draw(st.sampled_from([0, 1, 1, 2, -1])),
        sequence_ids=draw(st.lists(st.sampled_from(IDS), min_size=B, max_size=B)),
        positions=draw(st.lists(st.integers(0, 3), min_size=B, max_size=B)),
        request_id=draw(st.text(max_size=8)),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for name, heads in (("q", HQ), ("k", HKV), ("v", HKV)):
        a = rng.standard_normal((B, heads, S, D)).astype(np.float32)
        if draw(st.integers(0, 9)) == 9:  # hypothesis favours small draws: the poison is the rare one
            a.flat[0] = draw(st.sampled_from([np.nan, np.inf, 1e38]))
        t = getattr(req, name)
        t.dtype, t.data = pb.DTYPE_FLOAT32, a.tobytes()
        t.shape.extend(a.shape)
    return req


def _requests() -> st.SearchStrategy[tuple[str, bytes | list[bytes]]]:
    def one(name: str) -> st.SearchStrategy:
        m = METHODS[name]
        msgs = messages(m.input_type).map(lambda x: x.SerializeToString())
        if name in ("Decode", "DecodeStream"):
            msgs = st.one_of(msgs, near_valid_decode().map(lambda x: x.SerializeToString()))
        if m.client_streaming:
            return st.tuples(st.just(name), st.lists(msgs, min_size=0, max_size=3))
        return st.tuples(st.just(name), msgs)

    return st.one_of([one(name) for name in METHODS])


@SETTINGS
@given(req=_requests())
def test_fuzzed_messages_never_break_the_server(wire: Wire, req: tuple[str, Any]) -> None:
    wire.call(*req)


@SETTINGS
@given(method=st.sampled_from(sorted(METHODS)), junk=st.lists(st.binary(min_size=1, max_size=120), min_size=1,
                                                               max_size=3))
def test_garbage_bytes_are_invalid_argument_or_parse(wire: Wire, method: str, junk: list[bytes]) -> None:
    wire.call(method, junk if METHODS[method].client_streaming else junk[0])


def test_unparseable_bytes_are_invalid_argument_on_every_rpc(wire: Wire) -> None:
    bad = b"\xff\xff\xff\xff"  # a field tag that can never parse
    for method in METHODS:
        m = METHODS[method]
        path = f"/{SERVICE.full_name}/{method}"
        kind = {(False, False): "unary_unary", (True, False): "stream_unary", (False, True): "unary_stream",
                (True, True): "stream_stream"}[(m.client_streaming, m.server_streaming)]  # fmt: skip
        rpc = getattr(wire.channel, kind)(path)
        with pytest.raises(grpc.RpcError) as info:
            out = rpc(iter([bad]) if m.client_streaming else bad, timeout=20)
            if m.server_streaming:
                list(out)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "not a valid message" in info.value.details(), method


def release_everything(wire: Wire) -> pb.ServerInfo:
    for sid in {*IDS, *wire.created}:
        wire.call("ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id=sid).SerializeToString())
    return wire.info()


def test_after_the_fuzz_health_and_accounting_are_unchanged(wire: Wire) -> None:
    """Runs last in this module (pytest keeps file order): release everything, count blocks.

    Run alone, no fuzz ran and no block was ever taken, so that count would hold whatever release
    does; hence a second round on work whose block use is known: KV at both layers, a fork sharing
    it, a decode of the fork (its own copy of the shared last block), then the release of both."""
    assert wire.serving()
    info = release_everything(wire)
    assert (info.active_sequences, info.free_blocks) == (0, NUM_BLOCKS)
    print("fuzz codes:", dict(sorted(wire.codes.items())))

    rng = np.random.default_rng(0)
    src, fork = "fz-acct-src", "fz-acct-fork"
    ok = grpc.StatusCode.OK
    assert wire.call("CreateSequence", pb.CreateSequenceRequest(sequence_id=src).SerializeToString()) == ok
    for layer in (0, 1):
        k, v = (rng.standard_normal((12, HKV, D)).astype(np.float32) for _ in range(2))  # 12 tokens: 2 blocks of 8
        assert wire.call("AppendKV", append_request(src, layer, 0, k, v).SerializeToString()) == ok
    assert wire.call("ForkSequence", pb.ForkSequenceRequest(source_id=src, sequence_id=fork).SerializeToString()) == ok
    q, k, v = (rng.standard_normal((1, h, 1, D)).astype(np.float32) for h in (HQ, HKV, HKV))
    assert wire.call("Decode", decode_request(0, [fork], [12], q, k, v).SerializeToString()) == ok
    info = wire.info()
    assert info.active_sequences == 2 and info.free_blocks <= NUM_BLOCKS - 2, info  # at least the 12 tokens' 2
    info = release_everything(wire)
    assert (info.active_sequences, info.free_blocks) == (0, NUM_BLOCKS)
