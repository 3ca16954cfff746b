"""Memory a refused or failed call leaves behind (issue #21 item 1), measured, not assumed.

A real gRPC server on loopback (in this process, behind the auth guard) takes N calls of a few
MiB each; `tracemalloc` measures what is still allocated after the loop. The cyclic garbage
collector is switched off for the loop and never called: a payload that only a reference cycle
keeps alive then stays, as it would in a server between two collector runs (the probe saw 60
refused 60 MiB Decodes hold 1.9 GiB), instead of vanishing at a lucky moment. Memory after N
refused or failed calls must be within 10% (plus one payload: the last call's buffers may still
be on their way out) of memory after N successful ones.
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from support.inproc import InProcServer, settings
from support.wait import wait_for

from tkg import codec
from tkg.server import credentials
from tkg.server.config import build_spec
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

TOKEN = "memory-test-token-0123456789"
SPEC = {"num_layers": 2, "num_q_heads": 8, "num_kv_heads": 8, "head_dim": 64, "block_len": 16,
        "num_blocks": 64, "max_context": 512, "kv_dtype": "float32"}  # fmt: skip
TOKENS = 512  # one chunk: K and V [512, 8, 64] float32 = 1 MiB each, 2 MiB a call
PAYLOAD = 2 * TOKENS * 8 * 64 * 4
N = 12  # calls per loop: the old code kept N payloads (24 MiB), far past the bound


@pytest.fixture(scope="module")
def server() -> Iterator[InProcServer]:
    table = credentials.build_table(full_tokens=[TOKEN])
    srv = InProcServer(settings(auth=table), build_spec(dict(SPEC)))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def stub(server: InProcServer) -> Iterator[pb_grpc.DecodeAttentionStub]:
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options=opts) as channel:
        yield pb_grpc.DecodeAttentionStub(channel)


GOOD = (("authorization", f"Bearer {TOKEN}"),)
WRONG = (("authorization", "Bearer not-the-token-at-all-0000"),)


def chunk(seq_id: str, position: int = 0, layer: int = 0) -> pb.AppendKVRequest:
    rng = np.random.default_rng(position)
    msg = pb.AppendKVRequest(sequence_id=seq_id, layer=layer, position=position)
    codec.encode(rng.standard_normal((TOKENS, 8, 64), dtype=np.float32), msg.k)
    codec.encode(rng.standard_normal((TOKENS, 8, 64), dtype=np.float32), msg.v)
    return msg


def import_stream(seq_id: str, bad_position: bool) -> list[pb.SequenceChunk]:
    """A header declaring 512 tokens on both layers, then layer 0's K/V (at a wrong position when
    `bad_position`: INVALID_ARGUMENT on that message, after the importer took its buffers)."""
    header = pb.SequenceHeader(lengths=[TOKENS, TOKENS], num_layers=2, num_kv_heads=8, head_dim=64,
                               kv_dtype=pb.DTYPE_FLOAT32,
                               chunks=2)  # fmt: skip
    out = [pb.SequenceChunk(sequence_id=seq_id, header=header)]
    for layer in range(2):
        c = chunk(seq_id, layer=layer)
        msg = pb.SequenceChunk(sequence_id=seq_id, layer=layer, position=1 if bad_position else 0)
        msg.k.CopyFrom(c.k)
        msg.v.CopyFrom(c.v)
        out.append(msg)
    return out


def retained(call: Callable[[int], None], bound: float | None = None) -> int:
    """Bytes still allocated (traced) after `N` calls of `call(i)`, the collector off throughout.

    With `bound`: polled until at most `bound` (or 10 s pass): the server's side of the last call
    may still be finishing when the client has its status; a payload held by a cycle never goes."""
    call(-1)  # warm up: first-call allocations (channels, caches) are not what is measured
    before = tracemalloc.get_traced_memory()[0]
    for i in range(N):
        call(i)
    now = lambda: tracemalloc.get_traced_memory()[0] - before  # noqa: E731
    if bound is not None:
        with contextlib.suppress(AssertionError):
            wait_for(lambda: now() <= bound, timeout=10, what="the calls' memory to be released")
    return now()


def expect_code(code: grpc.StatusCode, fn: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()


@pytest.fixture
def traced() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()  # never collected during the loops (and never collected by hand)
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
        if was:
            gc.enable()


def test_refused_and_failed_calls_leave_no_more_than_successful_ones(
    stub: pb_grpc.DecodeAttentionStub, traced: None
) -> None:
    def ok(i: int) -> None:  # the yardstick: a 2 MiB AppendKV that succeeds, then its release
        seq = f"ok{i}"
        stub.CreateSequence(pb.CreateSequenceRequest(sequence_id=seq), metadata=GOOD)
        stub.AppendKV(iter([chunk(seq)]), metadata=GOOD)
        stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=seq), metadata=GOOD)

    def refused_decode(i: int) -> None:  # never parsed: the guard refuses the raw bytes
        req = pb.DecodeRequest(request_id=f"r{i}", sequence_ids=["x"], positions=[0])
        req.q.CopyFrom(chunk("x").k)
        req.k.CopyFrom(chunk("x").v)
        expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.Decode(req, metadata=WRONG))

    def refused_append(i: int) -> None:
        expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.AppendKV(iter([chunk("x")]), metadata=WRONG))

    def failed_append(i: int) -> None:  # parsed, checked, refused: layer out of range
        stub.CreateSequence(pb.CreateSequenceRequest(sequence_id=f"bad{i}"), metadata=GOOD)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                    lambda: stub.AppendKV(iter([chunk(f"bad{i}", layer=7)]), metadata=GOOD))  # fmt: skip
        stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=f"bad{i}"), metadata=GOOD)

    def failed_import(i: int) -> None:  # the importer holds its buffers when the stream fails
        msgs = import_stream(f"imp{i}", bad_position=True)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.ImportSequence(iter(msgs), metadata=GOOD))

    base = retained(ok)
    bound = 1.1 * (base + PAYLOAD)
    got = {f.__name__: retained(f, bound) for f in (refused_decode, refused_append, failed_append, failed_import)}
    over = {name: n for name, n in got.items() if n > bound}
    assert not over, (
        f"bytes retained after {N} calls: successful {base}, bound {bound:.0f}; over it: {over} "
        f"(a payload is {PAYLOAD} bytes)"
    )
