"""DecodeStream reads at most a window of messages ahead: a caller that leaves its replies unread
cannot grow the server's memory, and work queued for a stream that ends is cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from support.fakes import replied
from support.mirror import decode_request
from support.server_proc import start_server
from support.service import FakeContext, make_service

from tkg.server.batcher import LONE_STREAK
from tkg.server.identity import ANONYMOUS
from tkg.server.service import DecodeAttentionService
from tkg.server.streams import STREAM_WINDOW
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc


def _service() -> DecodeAttentionService:
    return make_service({"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "num_blocks": 4,
                         "kv_dtype": "float32", "max_batch": 4}, max_pending=4, max_message_bytes=2**20)  # fmt: skip


def test_an_unread_stream_stops_being_read_after_the_window() -> None:
    svc = _service()
    pulled = 0

    async def requests():
        nonlocal pulled
        for i in range(60):
            pulled += 1
            yield pb.DecodeRequest(request_id=str(i))  # invalid: each is answered at once with an error

    async def main() -> tuple[int, list[pb.DecodeResponse]]:
        svc.start()
        replies = svc.DecodeStream(requests(), FakeContext())
        first = replied(await replies.__anext__())
        for _ in range(500):  # loop passes, not time: every ready task gets to run
            await asyncio.sleep(0)
        seen = pulled
        rest = [replied(r) async for r in replies]
        await svc.close()
        return seen, [first, *rest]

    seen, replies = asyncio.run(main())
    # One answered, a window of queued replies, one read and waiting for room.
    assert seen <= STREAM_WINDOW + 2, seen
    assert [r.request_id for r in replies] == [str(i) for i in range(60)]
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in replies)


def test_queued_work_is_cancelled_when_the_stream_ends() -> None:
    svc = _service()
    q = np.zeros((1, 2, 1, 8), np.float32)
    k = np.zeros((1, 1, 1, 8), np.float32)

    async def never(batch) -> None:
        await asyncio.Event().wait()

    async def main() -> tuple[list[bool], int]:
        svc.start()
        svc.batcher._run_batch = never  # type: ignore[assignment]
        svc.cache.create("s")
        arrived = asyncio.Event()

        async def requests():
            for _ in range(4):
                yield decode_request(0, ["s"], [0], q, k, k)
            arrived.set()
            await asyncio.Event().wait()  # the caller keeps the stream open

        replies = svc.DecodeStream(requests(), FakeContext())
        first = asyncio.ensure_future(replies.__anext__())
        await arrived.wait()
        while svc.batcher.pending + svc.batcher.running < 4:
            await asyncio.sleep(0)
        futures = [w.future for w in svc.batcher._queue]
        first.cancel()  # the caller goes away
        await asyncio.gather(first, return_exceptions=True)
        await replies.aclose()
        for _ in range(50):
            await asyncio.sleep(0)
        cancelled = [f.cancelled() for f in futures]
        pending = svc.ledger.of(ANONYMOUS.tenant).pending
        await svc.close()
        return cancelled, pending

    cancelled, pending = asyncio.run(main())
    assert cancelled and all(cancelled), cancelled
    assert pending == 0


def test_lone_inline_queued_and_invalid_messages_keep_request_order() -> None:
    """A lone caller's messages are answered by the reader itself (no task per message); a burst
    read while one is answered mixes that with queued tasks and invalid messages: the replies
    still come back in request order, each with its own result, and the stream can end with
    finished replies still unread."""
    svc = _service()
    q = np.ones((1, 2, 1, 8), np.float32)
    k = np.ones((1, 1, 1, 8), np.float32)
    ran_in: dict[str, asyncio.Task] = {}
    stream_one = svc.streams.one

    async def spy(req: pb.DecodeRequest, t0: float, work: object) -> pb.DecodeResponse:
        ran_in[req.request_id] = asyncio.current_task()
        return await stream_one(req, t0, work)

    svc.streams.one = spy  # type: ignore[method-assign]

    async def main() -> tuple[list[pb.DecodeResponse], int]:
        svc.start()
        svc.cache.create("a")
        svc.cache.create("b")
        inbox: asyncio.Queue[pb.DecodeRequest | None] = asyncio.Queue()

        async def requests():
            while (r := await inbox.get()) is not None:
                yield r

        replies = svc.DecodeStream(requests(), FakeContext())
        pos = 0
        for i in range(LONE_STREAK + 4):  # ping-pong until the server sees a lone caller
            inbox.put_nowait(decode_request(0, ["a"], [pos], q, k, k, rid=f"p{i}"))
            pos += 1
            r = replied(await replies.__anext__())
            assert r.request_id == f"p{i}" and not r.HasField("error"), r
        late = [ran_in[f"p{i}"] for i in range(LONE_STREAK + 2, LONE_STREAK + 4)]
        assert late[0] is late[1] and late[0] is not asyncio.current_task()  # the reader's own task
        burst = [
            decode_request(0, ["a"], [pos], q, k, k, rid="x0"),
            decode_request(7, ["a"], [pos + 1], q, k, k, rid="bad-layer"),
            decode_request(0, ["b"], [0], q, k, k, rid="x1"),
            decode_request(0, ["a"], [pos + 1], q, k, k, rid="x2"),
            decode_request(0, ["a"], [pos + 5], q, k, k, rid="stale"),
            decode_request(0, ["a"], [pos + 2], q, k, k, rid="x3"),
        ]
        for r in burst:
            inbox.put_nowait(r)
        got = [replied(await replies.__anext__()) for _ in burst]
        assert ran_in["x0"] is late[0] and len({id(ran_in[r]) for r in ("x1", "x2", "x3")}) == 3
        # The caller goes away with finished replies unread (a task's and an invalid message's).
        inbox.put_nowait(decode_request(0, ["a"], [pos + 3], q, k, k, rid="unread"))
        inbox.put_nowait(decode_request(7, ["a"], [pos + 4], q, k, k, rid="unread-bad"))
        while "unread" not in ran_in or not ran_in["unread"].done():
            await asyncio.sleep(0)
        for _ in range(20):  # loop passes, not time: the reader takes the invalid one too
            await asyncio.sleep(0)
        await replies.aclose()
        streams = svc.ledger.of(ANONYMOUS.tenant).streams
        await svc.close()
        return got, streams

    got, streams = asyncio.run(main())
    assert [r.request_id for r in got] == ["x0", "bad-layer", "x1", "x2", "stale", "x3"]
    codes = [r.error.code if r.HasField("error") else 0 for r in got]
    invalid, stale = grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert codes == [0, invalid, 0, 0, stale, 0]
    assert all(r.timing.batch_size >= 1 for r, c in zip(got, codes, strict=True) if c == 0)
    assert streams == 0


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Server memory an unread stream may add: the requests read ahead (STREAM_WINDOW + 2, ~1.25 MiB
# each here) and their replies (1 MiB each), what gRPC buffers of both directions (measured: the
# client stops after ~17 messages; +41 MiB), and allocator slack. Without the window all 60
# messages and replies are held: ~135 MiB.
MEMORY_BOUND = 64 * 2**20


def test_server_memory_stays_flat_under_an_unread_stream() -> None:
    B, HQ, HKV, D, N = 64, 32, 4, 128, 60
    srv = start_server("--backend", "reference", "--num-layers", "1", "--num-q-heads", str(HQ), "--num-kv-heads",
                       str(HKV), "--head-dim", str(D), "--kv-dtype", "float32", "--block-len", "16",
                       "--num-blocks", "300", "--max-context", "128", "--max-batch", str(B))  # fmt: skip
    try:
        channel = grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 2**26),
                                                             ("grpc.max_send_message_length", 2**26)])  # fmt: skip
        st = pb_grpc.DecodeAttentionStub(channel)
        ids = [f"s{i}" for i in range(B)]
        for sid in ids:
            st.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
        rng = np.random.default_rng(0)
        q = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
        k = rng.standard_normal((B, HKV, 1, D)).astype(np.float32)
        # Warm the server's allocator with a few read replies before measuring.
        warm = list(st.DecodeStream(iter([decode_request(0, ids, [0] * B, q, k, k)])))
        assert not warm[0].HasField("error"), warm[0].error
        base = _rss_bytes(srv.proc.pid)
        sent = [0]
        done = threading.Event()

        def requests() -> Iterator[pb.DecodeRequest]:
            for step in range(1, N + 1):
                sent[0] = step
                yield decode_request(0, ids, [step] * B, q, k, k, rid=str(step))
            done.set()

        replies = st.DecodeStream(requests())  # replies left unread for now
        # Wait until the client cannot send more (the server stopped reading) or sent everything.
        last, still = -1, 0
        while not done.is_set() and still < 10:
            time.sleep(0.1)
            still = still + 1 if sent[0] == last else 0
            last = sent[0]
        peak = _rss_bytes(srv.proc.pid) - base
        blocked_at = sent[0]
        got = [r.request_id for r in replies]  # now read: the stream runs to the end
        assert got == [str(i) for i in range(1, N + 1)]
        assert blocked_at < N, "the client could send every message with no reply read"
        assert peak < MEMORY_BOUND, f"server RSS grew {peak / 2**20:.1f} MiB; expected < {MEMORY_BOUND / 2**20:.0f}"
        print(f"unread stream: client blocked after {blocked_at} of {N} messages, server RSS +{peak / 2**20:.1f} MiB")
        channel.close()
    finally:
        assert srv.stop() == 0
