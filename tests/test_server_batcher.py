"""The batcher alone: which requests share a kernel launch, the queue bound, cancelled callers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tkg.server.batcher import Batcher, DecodeWork
from tkg.server.errors import ResourceExhausted


def _work(layer: int, seqs: list[str], S: int = 1) -> DecodeWork:
    z = np.zeros((len(seqs), 1, S, 2), np.float32)
    return DecodeWork(layer, S, seqs, np.zeros(len(seqs), np.int64), z, z, z)


class Recorder:
    """A run_batch that records each batch's sequence ids and answers every request."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[list[str]]] = []
        self.hold = hold

    async def __call__(self, batch: list[DecodeWork]) -> None:
        self.batches.append([w.seq_ids for w in batch])
        if self.hold is not None:
            await self.hold.wait()
        for w in batch:
            w.future.set_result(len(batch))


def _run(coro_fn) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro_fn(), timeout=10))


def test_coalesces_by_layer_and_s_and_defers_colliding_sequences() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch=8, delay_s=0.05, max_pending=100)
        works = [
            _work(0, ["a"]), _work(0, ["b", "c"]), _work(1, ["d"]),  # layer 1: its own launch
            _work(0, ["a"]),  # a again: collides with the forming batch, goes to the next one
            _work(0, ["e"], S=2),  # another S: its own launch
            _work(0, ["f"]),
        ]  # fmt: skip
        futures = [b.submit(w) for w in works]  # all queued before the dispatcher runs
        b.start()
        await asyncio.gather(*futures)
        await b.stop()
        assert rec.batches == [[["a"], ["b", "c"], ["f"]], [["d"]], [["a"]], [["e"]]]
        assert [f.result() for f in futures] == [3, 3, 1, 1, 1, 3]

    _run(main)


def test_max_batch_counts_sequences() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch=3, delay_s=0.0, max_pending=100)
        futures = [b.submit(_work(0, ids)) for ids in (["a", "b"], ["c", "d"], ["e"], ["f"])]
        b.start()
        await asyncio.gather(*futures)
        await b.stop()
        assert rec.batches == [[["a", "b"], ["e"]], [["c", "d"], ["f"]]]

    _run(main)


def test_requests_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    async def main() -> None:
        hold = asyncio.Event()
        rec = Recorder(hold)
        b = Batcher(rec, max_batch=16, delay_s=0.0, max_pending=100)
        b.start()
        first = b.submit(_work(0, ["a"]))
        while not rec.batches:  # the first launch has started and is held
            await asyncio.sleep(0)
        assert b.running == 1
        later = [b.submit(_work(0, [s])) for s in "bcd"]
        assert b.pending == 3
        hold.set()
        await asyncio.gather(first, *later)
        await b.stop()
        assert rec.batches == [[["a"]], [["b"], ["c"], ["d"]]]

    _run(main)


def test_queue_bound_is_resource_exhausted() -> None:
    async def main() -> None:
        b = Batcher(Recorder(), max_batch=4, delay_s=0.0, max_pending=2)
        b.submit(_work(0, ["a"]))
        b.submit(_work(0, ["b"]))
        with pytest.raises(ResourceExhausted, match=r"queue: 2 decode requests pending; expected fewer than 2"):
            b.submit(_work(0, ["c"]))
        await b.stop()

    _run(main)


def test_cancelled_callers_are_dropped_and_errors_reach_every_caller() -> None:
    async def main() -> None:
        seen: list[list[str]] = []

        async def failing(batch: list[DecodeWork]) -> None:
            seen.extend(w.seq_ids for w in batch)
            raise RuntimeError("boom")

        b = Batcher(failing, max_batch=4, delay_s=0.0, max_pending=10)
        gone = b.submit(_work(0, ["gone"]))
        gone.cancel()
        f1, f2 = b.submit(_work(0, ["a"])), b.submit(_work(0, ["b"]))
        b.start()
        for f in (f1, f2):
            with pytest.raises(RuntimeError, match="boom"):
                await f
        ok = Recorder()
        b._run_batch = ok  # the dispatcher survived the failure and keeps serving
        assert await b.submit(_work(0, ["c"])) == 1
        await b.stop()
        assert seen == [["a"], ["b"]] and ok.batches == [[["c"]]]

    _run(main)


class TaskRecorder(Recorder):
    """Also records which task ran each batch."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        super().__init__(hold)
        self.tasks: list[asyncio.Task | None] = []
        self.started = asyncio.Event()

    async def __call__(self, batch: list[DecodeWork]) -> None:
        self.tasks.append(asyncio.current_task())
        self.started.set()
        await super().__call__(batch)


def test_a_lone_caller_going_on_runs_in_its_own_task_and_others_take_the_queue() -> None:
    """`decode` runs the batch in the caller's task only for a lone caller whose request names the
    sequences of the last batch (a one-request batch); other sequences, or anything queued, go
    through the dispatcher as usual."""

    async def main() -> None:
        rec = TaskRecorder()
        b = Batcher(rec, max_batch=8, delay_s=0.0, max_pending=100)
        b.lone.alone = lambda: True  # type: ignore[method-assign]
        b.start()
        assert await b.decode(_work(0, ["a"])) == 1  # no batch yet: through the dispatcher
        me = asyncio.current_task()
        assert rec.tasks[-1] is not me
        assert await b.decode(_work(1, ["a"])) == 1  # "a" again, alone: here, in this task
        assert rec.tasks[-1] is me
        assert await b.decode(_work(0, ["b"])) == 1  # another caller's sequence: the queue
        assert rec.tasks[-1] is not me
        b.lone.alone = lambda: False  # type: ignore[method-assign]  # another call in flight
        assert await b.decode(_work(0, ["b"])) == 1
        assert rec.tasks[-1] is not me
        await b.stop()
        assert rec.batches == [[["a"]], [["a"]], [["b"]], [["b"]]]

    _run(main)


def test_launches_never_overlap_with_a_lone_callers_own_launch() -> None:
    """A request queued while a lone caller's launch runs in its task waits for that launch to end
    (the dispatcher takes the lock), and a lone caller finding a launch running queues."""

    async def main() -> None:
        hold = asyncio.Event()
        rec = TaskRecorder()
        b = Batcher(rec, max_batch=8, delay_s=0.0, max_pending=100)
        b.lone.alone = lambda: True  # type: ignore[method-assign]
        b.start()
        await b.decode(_work(0, ["a"]))
        rec.hold, rec.started = hold, asyncio.Event()
        own = asyncio.ensure_future(b.decode(_work(0, ["a"])))  # runs in its own task, parked on `hold`
        await rec.started.wait()
        assert rec.tasks[-1] is own and b.running == 1
        rec.started.clear()
        other = asyncio.ensure_future(b.decode(_work(0, ["a"])))  # same ids, but a launch is running
        queued = b.submit(_work(0, ["b"]))
        for _ in range(20):  # the dispatcher gets every chance to start a second launch
            await asyncio.sleep(0)
        assert len(rec.batches) == 2 and not rec.started.is_set()
        hold.set()
        assert await own == 1
        assert await queued == 2 and await other == 2  # "b" and "a" then share the next launch
        assert rec.batches[2:] == [[["b"], ["a"]]]  # "b" was queued before `other`'s task first ran
        await b.stop()

    _run(main)


def test_attend_only_and_lse_requests_never_share_a_launch_with_other_modes() -> None:
    """An attend-only request appends nothing and an lse request takes the partial kernel path:
    the batcher's key keeps each mode to launches of its own (context parallelism)."""

    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch=8, delay_s=0.05, max_pending=100)
        works = [_work(0, ["a"]), _work(0, ["b"]), _work(0, ["c"]), _work(0, ["d"]), _work(0, ["e"])]
        works[1].attend_only = works[1].return_lse = True
        works[2].return_lse = True
        works[3].attend_only = works[3].return_lse = True
        futures = [b.submit(w) for w in works]
        b.start()
        await asyncio.gather(*futures)
        await b.stop()
        assert rec.batches == [[["a"], ["e"]], [["b"], ["d"]], [["c"]]]

    _run(main)
