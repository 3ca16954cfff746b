"""How the service launches a batch: one KV-cache prepare for the whole batch, the attention
call's own time in `Timing`, and the kernel's thread cap on and off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from support.races import decode_req, make_service, rpc

from tkg.kernel import paged
from tkg.server import batcher as batcher_module
from tkg.server.cores import kernel_threads
from tkg.server.errors import ServiceError
from tkg.v1 import decode_attention_pb2 as pb


def test_a_batch_is_prepared_once_and_a_stale_request_fails_alone(monkeypatch: Any) -> None:
    """Three requests in one batch: one `prepare_append` over all their sequences. With a stale
    position among them the batch is prepared per request: only that request fails (FAILED_PRECONDITION)."""

    async def main() -> None:
        svc = make_service()
        svc.batcher.delay_s, svc.batcher.max_batch = 60.0, 3  # the batch forms from all three
        svc.start()
        for sid in "abc":
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
        real, calls = svc.cache.prepare_append, []

        def prepare(layer: int, seq_ids: Any, *args: Any) -> Any:
            calls.append(list(seq_ids))
            return real(layer, seq_ids, *args)

        monkeypatch.setattr(svc.cache, "prepare_append", prepare)
        out = await asyncio.gather(*(svc.decode(decode_req(s, 0)) for s in "abc"))
        assert calls == [["a", "b", "c"]]
        assert [r.timing.batch_requests for r in out] == [3, 3, 3]
        calls.clear()
        reqs = [decode_req("a", 1), decode_req("b", 0), decode_req("c", 1)]  # b's position is stale
        out = await asyncio.gather(*(svc.decode(r) for r in reqs), return_exceptions=True)
        assert calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
        assert isinstance(out[1], ServiceError) and out[1].code == grpc.StatusCode.FAILED_PRECONDITION
        assert [r.timing.batch_size for r in (out[0], out[2])] == [2, 2]
        assert [svc.cache.get(s).lengths[0] for s in "abc"] == [2, 1, 2]
        await svc.close()

    asyncio.run(main())


def test_timing_reports_the_attention_call_within_the_kernel_time(monkeypatch: Any) -> None:
    """`attention_us` is the attention call alone, measured where it runs; `kernel_us` also holds
    the KV append around it."""

    async def main() -> None:
        svc = make_service()
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        real = svc.cache.store.decode

        def slow(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.02:  # the worker thread, not a sleep on the loop
                pass
            return real(*args, **kwargs)

        monkeypatch.setattr(svc.cache.store, "decode", slow)
        resp = await svc.decode(decode_req("a", 0))
        t = resp.timing
        assert 20_000 <= t.attention_us <= t.kernel_us <= t.total_us
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("inline", [False, True])
def test_the_cpu_kernel_leaves_the_loop_a_core_only_off_the_loop(inline: bool, monkeypatch: Any) -> None:
    async def main() -> None:
        big = 2**40 if inline else -1
        svc = make_service(backend="cpu", kernel_cores=3, inline_kernel_bytes=big)
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        real, seen = paged.run_paged, []

        def spy(*args: Any, **kwargs: Any) -> Any:  # what the host store's decode calls
            seen.append((kwargs.get("max_threads"), threading.current_thread().name))
            return real(*args, **kwargs)

        monkeypatch.setattr(paged, "run_paged", spy)
        await svc.decode(decode_req("a", 0))
        (threads, thread_name), = seen
        assert threads == (3 if inline else 2)
        assert thread_name.startswith("tkg-kernel") != inline
        await svc.close()

    asyncio.run(main())


def test_kernel_threads_never_below_one() -> None:
    assert [kernel_threads(c, inline=False) for c in (1, 2, 8)] == [1, 1, 7]
    assert [kernel_threads(c, inline=True) for c in (1, 2, 8)] == [1, 2, 8]


def test_another_callers_request_ends_the_lone_streak() -> None:
    """A caller alone for LONE_STREAK launches skips the batch delay; a request for other sequences
    (a new caller: grpc.aio starts one call per loop pass, so a burst arrives one by one) ends the
    streak, so the requests behind it wait for company and batch again."""

    async def main() -> None:
        svc = make_service()
        svc.start()
        for sid in "ab":
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
        for pos in range(batcher_module.LONE_STREAK + 2):
            await svc.decode(decode_req("a", pos))
        assert svc.batcher.lone.alone()
        await svc.decode(decode_req("b", 0))  # alone in the server, but not the same caller
        assert not svc.batcher.lone.alone()
        await svc.close()

    asyncio.run(main())
