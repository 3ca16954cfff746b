"""The cache and the kernel never race: each interleaving is forced with events, not sleeps.

A `GatedKernel` replaces the host KV store's `decode`: when the launch starts it snapshots the
K/V pools and computes the answer on the snapshot (what the kernel must return if nothing
touched its blocks meanwhile), then blocks the worker thread until the test opens the gate, and
only then runs the real kernel (or raises). The test does its racing RPCs while the kernel is
parked; with the fix they wait for the launch, without it they change the blocks underneath.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import numpy as np
import pytest
from support.fakes import FakeClock
from support.races import HKV, HQ, D, GatedKernel, appendkv, decode_req, make_service, rpc, started_decode
from support.service import Aborted, queued, reached, settle_waits

from tkg import codec
from tkg.kernel.kv_store import HostKVStore
from tkg.server import step as step_module
from tkg.server.errors import ServiceError
from tkg.v1 import decode_attention_pb2 as pb


@pytest.mark.parametrize("mutation", ["truncate", "release"])
def test_blocks_a_launch_reads_are_not_reused_until_it_ends(mutation: str) -> None:
    """A decode over 100 cached tokens is parked in the kernel; the sequence is truncated to 0 (or
    released) and a second sequence appends 100 tokens, which would land in the freed blocks.
    The decode must return the answer for its own data, and the mutation apply after it."""

    async def main() -> None:
        svc = make_service(num_blocks=8)
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        await appendkv(svc, "a", 0, 0, 100, seed=1)
        with GatedKernel() as kernel:
            decode = await started_decode(svc, kernel, "a", 100)
            if mutation == "truncate":
                call = rpc(svc, "TruncateSequence", pb.TruncateSequenceRequest(sequence_id="a"))
            else:
                call = rpc(svc, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id="a"))
            waiting = settle_waits(svc)
            mutate = asyncio.ensure_future(call)
            await reached(waiting, f"the {mutation} waiting for the launch")
            assert not mutate.done()
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="b"))
            with pytest.raises(Aborted) as err:  # a's 7 blocks are held: b cannot have them
                await appendkv(svc, "b", 0, 0, 100, seed=7)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            await appendkv(svc, "b", 0, 0, 16, seed=7)  # the one free block
            kernel.gate.set()
            resp = await decode
            got = codec.decode(resp.out, "out")
            np.testing.assert_allclose(got, kernel.expected, rtol=1e-6, atol=1e-6)
            await mutate
        if mutation == "truncate":
            assert svc.cache.get("a").lengths == (0, 0)
        else:
            assert "a" not in svc.cache
        await appendkv(svc, "b", 0, 16, 84, seed=8)  # now the blocks are back
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("racer", ["append_same_layer", "append_other_layer", "fork"])
def test_a_failed_step_appends_nothing_even_with_a_racing_write(racer: str) -> None:
    """The kernel fails while an AppendKV / ForkSequence of the same sequence races it: the step's
    token must be rolled back, and the racer applies to the rolled-back sequence (an AppendKV built
    on the failed token is refused, a fork carries no trace of it)."""

    async def main() -> None:
        svc = make_service()
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        await appendkv(svc, "a", 0, 0, 20, seed=1)
        await appendkv(svc, "a", 1, 0, 20, seed=2)
        before = svc.cache.free_blocks
        with GatedKernel(fail=MemoryError("boom")) as kernel:
            decode = await started_decode(svc, kernel, "a", 20)
            waiting = settle_waits(svc)
            if racer == "append_same_layer":  # built on the step's token (position 21)
                race = asyncio.ensure_future(appendkv(svc, "a", 0, 21, 3, seed=3))
            elif racer == "append_other_layer":
                race = asyncio.ensure_future(appendkv(svc, "a", 1, 20, 3, seed=3))
            else:
                fork = pb.ForkSequenceRequest(source_id="a", sequence_id="c")
                race = asyncio.ensure_future(rpc(svc, "ForkSequence", fork))
            await reached(waiting, f"the {racer} waiting for the launch")
            assert not race.done()
            kernel.gate.set()
            with pytest.raises(ServiceError, match="kernel: MemoryError: boom"):
                await decode
            result = await asyncio.gather(race, return_exceptions=True)
        a = svc.cache.get("a")
        if racer == "append_same_layer":
            assert isinstance(result[0], Aborted) and result[0].code == grpc.StatusCode.FAILED_PRECONDITION
            assert a.lengths == (20, 20) and svc.cache.free_blocks == before
        elif racer == "append_other_layer":
            assert a.lengths == (20, 23)
        else:
            assert svc.cache.get("c").lengths == (20, 20) and a.lengths == (20, 20)
        assert not svc.cache.in_flight("a")
        resp = await svc.decode(decode_req("a", 20))  # the retry of the failed step works
        assert list(resp.out.shape) == [1, HQ, 1, D]
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("where", ["commit", "second_commit", "stack_tables"])
def test_a_failure_between_prepare_and_the_kernel_rolls_back_the_whole_step(where: str, monkeypatch: Any) -> None:
    """Two requests in one batch; something raises after prepare: in the batch's one commit, in the
    second of two commits (a third request with a stale position makes the batch prepare per
    request, and only that one is refused), or while stacking the tables. Both get the error,
    neither keeps a token, nothing stays in flight or reserved, and the retries succeed."""

    async def main() -> None:
        svc = make_service()
        svc.batcher.delay_s = 60.0  # the batch forms from all requests (max_batch reached)
        ids = "abc" if where == "second_commit" else "ab"
        svc.batcher.max_batch = len(ids)
        svc.start()
        for sid in ids:
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
        free = svc.cache.free_blocks
        real_commit = svc.cache.commit
        calls = []

        def commit(plan: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(plan)
            if where == "commit" or (where == "second_commit" and len(calls) == 2):
                raise ValueError("commit broke")
            real_commit(plan, *args, **kwargs)

        def stack(tables: Any) -> None:
            raise ValueError("stacking broke")

        monkeypatch.setattr(svc.cache, "commit", commit)
        if where == "stack_tables":
            monkeypatch.setattr(step_module, "_stack_tables", stack)
        requests = [decode_req("a", 0), decode_req("b", 0, seed=1), decode_req("c", 5)][: len(ids)]
        results = await asyncio.gather(*(svc.decode(r) for r in requests), return_exceptions=True)
        assert [p.seq_ids for p in calls] == ([("a",), ("b",)] if where == "second_commit" else [("a", "b")])
        for r in results[:2]:
            assert isinstance(r, ServiceError) and "broke" in r.message
        if where == "second_commit":
            assert isinstance(results[2], ServiceError) and results[2].code == grpc.StatusCode.FAILED_PRECONDITION
        assert [svc.cache.get(s).lengths for s in ids] == [(0, 0)] * len(ids)
        assert not any(svc.cache.in_flight(s) for s in ids) and svc.cache.free_blocks == free
        monkeypatch.undo()
        svc.batcher.delay_s = 0.0
        for s in "ab":
            await svc.decode(decode_req(s, 0))
        assert [svc.cache.get(s).lengths for s in "ab"] == [(1, 0), (1, 0)]
        await svc.close()

    asyncio.run(main())


def test_a_cancelled_caller_does_not_hide_the_kernel_error_from_its_batch() -> None:
    async def main() -> None:
        svc = make_service()
        svc.batcher.delay_s = 60.0
        svc.batcher.max_batch = 2
        svc.start()
        for sid in "ab":
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
        with GatedKernel(fail=MemoryError("boom")) as kernel:
            first = asyncio.ensure_future(svc.decode(decode_req("a", 0)))
            second = asyncio.ensure_future(svc.decode(decode_req("b", 0)))
            await kernel.wait_started()
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)  # the cancellation has landed
            kernel.gate.set()
            with pytest.raises(ServiceError, match="kernel: MemoryError: boom"):
                await second
        assert first.cancelled()
        assert [svc.cache.get(s).lengths for s in "ab"] == [(0, 0), (0, 0)]
        await svc.close()

    asyncio.run(main())


def test_a_launch_cancelled_while_the_kernel_runs_is_undone_once_the_thread_lets_go() -> None:
    """The batch's task is cancelled (shutdown) while the worker thread's kernel reads the blocks:
    the step stays held (a racing truncate waits) until the kernel returns, then is undone whole;
    the caller gets no result for it, and the retry succeeds."""

    async def main() -> None:
        svc = make_service()
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        await appendkv(svc, "a", 0, 0, 20, seed=3)  # two blocks at each layer
        await appendkv(svc, "a", 1, 0, 20, seed=4)
        free = svc.cache.free_blocks
        with GatedKernel() as kernel:
            caller = await started_decode(svc, kernel, "a", 20)
            svc.batcher._task.cancel()
            await asyncio.gather(svc.batcher._task, return_exceptions=True)  # the batch's task is gone
            waiting = settle_waits(svc)
            truncate = asyncio.ensure_future(
                rpc(svc, "TruncateSequence", pb.TruncateSequenceRequest(sequence_id="a", length=16))
            )
            await reached(waiting, "the truncate waiting for the kernel")
            assert svc.cache.in_flight("a") and not truncate.done()  # the kernel still reads: held
            assert svc.cache.get("a").lengths == (21, 20)
            kernel.gate.set()
            info = await truncate  # applies once the step is undone
        assert list(info.lengths) == [16, 16] and svc.cache.get("a").num_blocks == 1
        assert not caller.done()  # never answered with the undone step's output
        caller.cancel()
        assert svc.cache.free_blocks == free + 1  # the second block back; nothing held any more
        assert not svc.cache.in_flight("a")
        svc.batcher.start()
        resp = await svc.decode(decode_req("a", 16))
        assert resp.timing.batch_size == 1 and svc.cache.get("a").lengths == (17, 16)
        await svc.close()

    asyncio.run(main())


def test_queued_work_keeps_a_sequence_alive_and_reads_do_not() -> None:
    """TTL 10 s: a decode queued for longer than the TTL keeps its sequence; a sequence only read
    (GetSequence) for longer than the TTL expires."""

    async def main() -> None:
        clock = FakeClock()
        svc = make_service(clock=clock)
        svc.batcher.delay_s = 3600.0  # the decode stays queued until the test lets it go
        svc.batcher.max_batch = 2
        svc.start()
        for sid in "ab":
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
        entered = queued(svc)
        decode = asyncio.ensure_future(svc.decode(decode_req("a", 0)))
        await reached(entered, "the decode entering the queue")
        assert svc.batcher.pending == 1
        clock.t += 6
        await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="b"))  # a read: no use
        clock.t += 6
        assert svc.expire_idle() == ["b"]  # 12 s idle; a is 12 s old too but has work queued
        svc.batcher._task.cancel()  # stop waiting for company; the queue stays
        await asyncio.gather(svc.batcher._task, return_exceptions=True)
        svc.batcher.delay_s = 0.0
        svc.batcher.start()
        await decode
        clock.t += 9
        assert svc.expire_idle() == []  # the decode counts from its end, 9 s ago
        clock.t += 2
        assert svc.expire_idle() == ["a"]
        await svc.close()

    asyncio.run(main())


def test_a_lone_callers_big_launch_leaves_the_loop() -> None:
    """After a streak of lone-caller batches, a launch reading more than `lone_inline_bytes` of
    K+V still runs on the worker thread; one under the cap runs on the loop."""
    from tkg.server.batcher import LONE_STREAK

    async def main() -> None:
        token_bytes = 2 * HKV * D * 4
        svc = make_service(inline_kernel_bytes=0, lone_inline_bytes=40 * token_bytes)
        svc.start()
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="a"))
        real = HostKVStore.decode
        threads = []

        def spy(*args: Any, **kwargs: Any) -> np.ndarray:
            threads.append(threading.current_thread() is threading.main_thread())
            return real(*args, **kwargs)

        HostKVStore.decode = spy  # type: ignore[method-assign]
        try:
            for pos in range(LONE_STREAK + 1):
                await svc.decode(decode_req("a", pos))
            assert threads[-1]  # lone streak, 10 tokens: on the loop
            await appendkv(svc, "a", 0, LONE_STREAK + 1, 60, seed=5)
            await svc.decode(decode_req("a", LONE_STREAK + 61))
            assert not threads[-1]  # 70 tokens > 40: the worker thread
        finally:
            HostKVStore.decode = real  # type: ignore[method-assign]
        await svc.close()

    asyncio.run(main())
