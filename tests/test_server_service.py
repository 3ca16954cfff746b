"""The servicer without a network: start-up states and server bugs map to the right status codes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from support.service import Aborted, FakeContext, make_service

from tkg.codec import all_finite
from tkg.dtypes import BF16
from tkg.server.metrics import Metrics
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb


def _service() -> DecodeAttentionService:
    return make_service({"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "num_blocks": 4,
                         "kv_dtype": "float32", "max_batch": 4}, ready=False, max_pending=4,
                        max_message_bytes=2**20)  # fmt: skip


def _call(coro: Any) -> Any:
    return asyncio.run(coro)


def test_unavailable_while_warming_up_except_server_info() -> None:
    svc = _service()
    assert not svc.ready
    info = _call(svc.GetServerInfo(pb.GetServerInfoRequest(), FakeContext()))
    assert info.num_blocks == 4 and info.free_blocks == 4
    with pytest.raises(Aborted) as err:
        _call(svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext()))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details
    assert len(svc.cache) == 0
    svc.mark_ready()
    assert _call(svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext())).sequence_id == "s"


def test_a_server_bug_is_internal_and_counted() -> None:
    svc = _service()
    svc.mark_ready()

    def broken(seq_id: str) -> None:
        raise ZeroDivisionError("oops")

    svc.cache.get = broken  # type: ignore[method-assign]
    with pytest.raises(Aborted) as err:
        _call(svc.GetSequence(pb.GetSequenceRequest(sequence_id="s"), FakeContext()))
    assert err.value.code == grpc.StatusCode.INTERNAL and "ZeroDivisionError: oops" in err.value.details
    count = svc.metrics.registry.get_sample_value(
        "tkg_request_duration_seconds_count", {"method": "GetSequence", "code": "INTERNAL"}
    )
    assert count == 1


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_all_finite_of_several_arrays_finds_any_bad_value(dtype: np.dtype) -> None:
    q, k, v = (np.linspace(-3e4, 3e4, n, dtype=np.float32).astype(dtype).reshape(1, -1, 1, 4) for n in (16, 8, 8))
    assert all_finite(q, k, v) and all_finite(q[:0], k[:0], v[:0])
    for which in range(3):
        for bad in (np.nan, np.inf, -np.inf):
            arrays = [q.copy(), k.copy(), v.copy()]
            arrays[which].reshape(-1)[-1] = bad
            assert not all_finite(*arrays), (which, bad)


def test_metrics_of_a_call_apply_on_the_next_loop_pass_or_at_a_scrape() -> None:
    """On the loop, observations wait for its next pass (after the reply went out); a scrape in
    between still sees them; outside a loop they apply at once."""
    m = Metrics("reference")
    labels = {"method": "Decode", "code": "OK"}

    def count() -> float | None:
        return m.registry.get_sample_value("tkg_request_duration_seconds_count", labels)

    async def main() -> list[float | None]:
        seen = []
        m.observe_request("Decode", "OK", 0.001)
        m.observe_batch(3, 0.002, [1e-5, 2e-5])
        seen.append(m.request_duration.labels("Decode", "OK")._sum.get())  # not applied yet
        seen.append(count())  # a scrape applies it
        m.observe_request("Decode", "OK", 0.001)
        await asyncio.sleep(0)  # the loop's next pass applies it
        seen.append(m.request_duration.labels("Decode", "OK")._sum.get())
        return seen

    assert asyncio.run(main()) == [0.0, 1.0, pytest.approx(0.002)]
    m.observe_request("Decode", "OK", 0.001)  # no loop running: applied now
    assert count() == 3.0 and not m._pending
    assert m.registry.get_sample_value("tkg_queue_duration_seconds_count") == 2.0
    assert m.registry.get_sample_value("tkg_batch_size_sum") == 3.0
    tenant = {"tenant": "default", "method": "Decode", "code": "OK"}
    assert m.registry.get_sample_value("tkg_tenant_requests_total", tenant) == 3.0


def test_draining_refuses_new_calls() -> None:
    svc = _service()
    svc.mark_ready()
    _call(svc.drain(0.0))
    with pytest.raises(Aborted) as err:
        _call(svc.GetServerInfo(pb.GetServerInfoRequest(), FakeContext()))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_all_finite_matches_isfinite(dtype: np.dtype) -> None:
    a = np.array([0.0, -1.5, 3e4, 1e-7, -0.0], np.float32).astype(dtype)
    assert all_finite(a) and all_finite(a[:0])
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[3] = bad
        assert not all_finite(b) and not all_finite(b.reshape(5, 1)[1::2]) and all_finite(b[::2])


def test_one_failing_request_does_not_fail_its_batch() -> None:
    """Three requests coalesced into one launch; the one with a wrong position gets its own
    FAILED_PRECONDITION, the other two their rows, and nothing is appended for the failing one."""
    from tkg import codec
    from tkg.server.errors import FailedPrecondition

    async def main() -> None:
        svc = _service()
        svc.batcher.delay_s = 0.05  # hold the first request until the others are queued
        svc.start()
        svc.mark_ready()
        for sid in "abc":
            svc.cache.create(sid)
        rng = np.random.default_rng(0)

        def request(sid: str, pos: int) -> pb.DecodeRequest:
            req = pb.DecodeRequest(layer=0, sequence_ids=[sid], positions=[pos], request_id=sid)
            for name, heads in (("q", 2), ("k", 1), ("v", 1)):
                codec.encode(rng.standard_normal((1, heads, 1, 8)).astype(np.float32), getattr(req, name))
            return req

        results = await asyncio.gather(
            svc.decode(request("a", 0)), svc.decode(request("b", 3)), svc.decode(request("c", 0)),
            return_exceptions=True,
        )  # fmt: skip
        await svc.close()
        assert isinstance(results[1], FailedPrecondition) and "positions[0]: 3" in results[1].message
        for r in (results[0], results[2]):
            assert list(r.out.shape) == [1, 2, 1, 8] and r.timing.batch_requests == 2 and r.timing.batch_size == 2
        assert [svc.cache.get(s).lengths[0] for s in "abc"] == [1, 0, 1]

    asyncio.run(main())


def test_a_kernel_crash_after_the_append_rolls_the_step_back() -> None:
    """The kernel fails after k/v were appended: every caller gets the error and no sequence keeps
    the step's tokens (the retry with the same positions then succeeds)."""
    from tkg import codec
    from tkg.server.errors import ServiceError

    async def main() -> None:
        svc = _service()
        svc.start()
        svc.mark_ready()
        svc.cache.create("a")
        free = svc.cache.free_blocks
        req = pb.DecodeRequest(layer=0, sequence_ids=["a"], positions=[0])
        for name, heads in (("q", 2), ("k", 1), ("v", 1)):
            codec.encode(np.ones((1, heads, 1, 8), np.float32), getattr(req, name))
        def crash(*args: Any, **kwargs: Any) -> None:
            raise MemoryError("boom")

        svc.cache.store.decode = crash  # type: ignore[method-assign]
        try:
            with pytest.raises(ServiceError, match="kernel: MemoryError: boom"):
                await svc.decode(req)
        finally:
            del svc.cache.store.decode  # the class's method again
        assert svc.cache.get("a").lengths == (0,) and svc.cache.free_blocks == free
        resp = await svc.decode(req)
        assert list(resp.out.shape) == [1, 2, 1, 8] and svc.cache.get("a").lengths == (1,)
        await svc.close()

    asyncio.run(main())


def test_a_lone_caller_runs_on_the_loop_without_the_batch_delay_after_a_streak() -> None:
    """After LONE_STREAK single-caller batches the kernel skips the worker thread and the head
    skips the batch delay; before the streak both apply."""
    from tkg import codec
    from tkg.server.batcher import LONE_STREAK

    class NoThread:
        def submit(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("worker thread used")

    async def main() -> None:
        svc = _service()
        svc.batcher.lone.inline_kernel_bytes = 0  # no launch is small enough
        svc.start()
        svc.mark_ready()
        svc.cache.create("a")

        def request(pos: int) -> pb.DecodeRequest:
            req = pb.DecodeRequest(layer=0, sequence_ids=["a"], positions=[pos])
            for name, heads in (("q", 2), ("k", 1), ("v", 1)):
                codec.encode(np.ones((1, heads, 1, 8), np.float32), getattr(req, name))
            return req

        real_thread = svc.engine._kernel_thread
        svc.engine._kernel_thread = NoThread()  # type: ignore[assignment]
        from tkg.server.errors import ServiceError

        with pytest.raises(ServiceError, match="worker thread used"):
            await svc.decode(request(0))  # no streak yet: the launch goes to the worker
        svc.engine._kernel_thread = real_thread
        for pos in range(LONE_STREAK):
            await svc.decode(request(pos))
        svc.engine._kernel_thread = NoThread()  # type: ignore[assignment]
        svc.batcher.delay_s = 3600.0
        resp = await asyncio.wait_for(svc.decode(request(LONE_STREAK)), timeout=5)
        assert list(resp.out.shape) == [1, 2, 1, 8]
        svc.engine._kernel_thread = real_thread
        await svc.close()

    asyncio.run(main())
