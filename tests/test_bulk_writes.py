"""Large AppendKV chunks and import messages are written off the event loop (issue #21 item 3),
under the concurrency rule: reserved and committed on the loop, copied on the kernel worker
thread, the sequence held meanwhile. The copy is parked on a gate (events, no timing): another
RPC completes while it is parked, a truncate of the sequence waits for it, a failed or cancelled
copy rolls back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.service import Aborted, FakeContext, make_service, reached, settle_waits

from tkg import codec
from tkg.kernel.kv_store import HostKVStore
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb

L, HKV, D, BL = 2, 2, 16, 8
BOUND = 4096  # bytes of K+V written on the loop; a 64-token chunk (16 KiB) goes to the thread


def service(**settings: Any) -> DecodeAttentionService:
    raw = {"num_layers": L, "num_q_heads": 2, "num_kv_heads": HKV, "head_dim": D, "block_len": BL,
           "num_blocks": 32, "kv_dtype": "float32", "max_context": 128, "max_batch": 4, "fuse_rope": True}  # fmt: skip
    return make_service(raw, max_pending=8, max_message_bytes=2**22, inline_write_bytes=BOUND, **settings)


def kv(T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, HKV, D), dtype=np.float32), rng.standard_normal((T, HKV, D), dtype=np.float32)


async def chunks(sid: str, layer: int, position: int, k: np.ndarray, v: np.ndarray) -> AsyncIterator[Any]:
    msg = pb.AppendKVRequest(sequence_id=sid, layer=layer, position=position)
    codec.encode(k, msg.k)
    codec.encode(v, msg.v)
    yield msg


class GatedWrite:
    """`HostKVStore.write` parked on `gate` (a threading.Event) when it runs on a thread other
    than the event loop's; `entered` (an asyncio.Event) is set, on the loop, once it is parked.
    On the loop thread it writes at once and records that it did (`on_loop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail: BaseException | None = None) -> None:
        self.loop, self.fail = loop, fail
        self.gate, self.entered = threading.Event(), asyncio.Event()
        self.real = HostKVStore.write
        self.on_loop = 0
        self.loop_thread = threading.get_ident()

    def __enter__(self) -> GatedWrite:
        gated = self

        def write(store: HostKVStore, *args: Any) -> None:
            if threading.get_ident() == gated.loop_thread:
                gated.on_loop += 1
            else:
                gated.loop.call_soon_threadsafe(gated.entered.set)
                if not gated.gate.wait(30):
                    raise AssertionError("the test never opened the gate")
                if gated.fail is not None:
                    raise gated.fail
            gated.real(store, *args)

        HostKVStore.write = write  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        HostKVStore.write = self.real  # type: ignore[method-assign]
        self.gate.set()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_a_large_append_runs_off_the_loop_while_other_calls_complete_and_a_truncate_waits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    svc = service()
    k, v = kv(64, 1)

    async def main() -> None:
        ctx = FakeContext()
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="a"), ctx)
        with GatedWrite(loop) as gated:
            append = asyncio.ensure_future(svc.AppendKV(chunks("a", 0, 0, k, v), ctx))
            await reached(gated.entered, "the append's copy parked on the worker thread")
            info = await svc.GetServerInfo(pb.GetServerInfoRequest(), ctx)  # the loop is free
            assert info.num_layers == L and not append.done()
            waiting = settle_waits(svc)
            truncate = asyncio.ensure_future(
                svc.TruncateSequence(pb.TruncateSequenceRequest(sequence_id="a", length=0), ctx)
            )
            await reached(waiting, "the truncate waiting for the write in flight")
            assert not truncate.done() and not append.done()
            gated.gate.set()
            assert list((await append).lengths) == [64, 0]
            assert list((await truncate).lengths) == [0, 0]  # applied after the write, not before
            assert gated.on_loop == 0

    loop.run_until_complete(main())
    assert svc.cache.free_blocks == 32


def test_the_copied_tokens_are_the_ones_a_small_append_would_store(loop: asyncio.AbstractEventLoop) -> None:
    """The same chunk through the off-loop path and through the loop path (RoPE fused) gives the
    same cached K/V."""
    k, v = kv(64, 2)
    got = []
    for bound in (BOUND, 1 << 30):
        svc = make_service(
            {"num_layers": L, "num_q_heads": 2, "num_kv_heads": HKV, "head_dim": D, "block_len": BL,
             "num_blocks": 32, "kv_dtype": "float32", "max_context": 128, "max_batch": 4, "fuse_rope": True},
            max_pending=8, max_message_bytes=2**22, inline_write_bytes=bound,
        )  # fmt: skip

        async def main(svc: DecodeAttentionService = svc) -> None:
            await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="a"), FakeContext())
            await svc.AppendKV(chunks("a", 1, 0, k, v), FakeContext())

        loop.run_until_complete(main())
        got.append(svc.cache.read_tokens("a", 1, 0, 64))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])
    assert not np.array_equal(got[0][0], k)  # RoPE was applied (on the thread, for the first)


@pytest.mark.parametrize("how", ["fails", "cancelled"])
def test_a_failed_or_cancelled_copy_rolls_the_chunk_back(loop: asyncio.AbstractEventLoop, how: str) -> None:
    svc = service()
    k, v = kv(64, 3)

    async def main() -> None:
        ctx = FakeContext()
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="a"), ctx)
        await svc.AppendKV(chunks("a", 0, 0, *kv(4, 9)), ctx)  # small: on the loop
        free = svc.cache.free_blocks
        with GatedWrite(loop, fail=MemoryError("boom") if how == "fails" else None) as gated:
            append = asyncio.ensure_future(svc.AppendKV(chunks("a", 0, 4, k, v), ctx))
            await reached(gated.entered, "the copy parked")
            if how == "cancelled":
                append.cancel()
                await asyncio.sleep(0)
                assert not append.done()  # it waits for the thread to let go before undoing
                assert svc.cache.in_flight("a")
            gated.gate.set()
            if how == "fails":
                with pytest.raises(Aborted) as err:
                    await append
                assert err.value.code == grpc.StatusCode.INTERNAL
            else:
                with pytest.raises(asyncio.CancelledError):
                    await append
        assert svc.cache.get("a").lengths == (4, 0)
        assert svc.cache.free_blocks == free and not svc.cache.in_flight("a")
        await svc.AppendKV(chunks("a", 0, 4, k, v), ctx)  # the position is free again

    loop.run_until_complete(main())


def test_a_large_import_message_is_written_off_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    svc = service()
    k, v = kv(64, 4)

    async def stream() -> AsyncIterator[pb.SequenceChunk]:
        h = pb.SequenceHeader(lengths=[64, 0], num_layers=L, num_kv_heads=HKV, head_dim=D,
                              kv_dtype=pb.DTYPE_FLOAT32, fuse_rope=True, chunks=1)  # fmt: skip
        yield pb.SequenceChunk(sequence_id="m", header=h)
        msg = pb.SequenceChunk(sequence_id="m", layer=0, position=0)
        codec.encode(k, msg.k)
        codec.encode(v, msg.v)
        yield msg

    async def main() -> None:
        ctx = FakeContext()
        with GatedWrite(loop) as gated:
            imp = asyncio.ensure_future(svc.ImportSequence(stream(), ctx))
            await reached(gated.entered, "the import's copy parked on the worker thread")
            assert (await svc.GetServerInfo(pb.GetServerInfoRequest(), ctx)).num_layers == L
            assert not imp.done() and "m" not in svc.cache  # not installed before its data is
            gated.gate.set()
            assert list((await imp).lengths) == [64, 0]
            assert gated.on_loop == 0
        got_k, got_v = svc.cache.read_tokens("m", 0, 0, 64)
        np.testing.assert_array_equal(got_k, k)
        np.testing.assert_array_equal(got_v, v)

    loop.run_until_complete(main())
