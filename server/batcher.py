"""Coalesce concurrent decode requests of one layer and one S into one kernel launch.

Requests wait in arrival order. The dispatcher takes the oldest, waits until it is
`delay_s` old (or the batch is full), then takes every queued request with the same (layer, S)
whose sequences do not collide with the batch, up to `max_batch` sequences, and runs the batch.
While a batch runs, new requests queue up, so under load batches form without any delay
(continuous batching); the delay only helps when requests trickle in.

The scheduling policy lives here too, in one record, `LoneCaller`: a single caller that has had the
server to itself for a while gets its head dispatched at once, since nobody could join it (`decode`
even runs it in the caller's own task when nothing else is queued or running), and its kernel on
the event loop (`LoneCaller.inline`, asked by the step engine); the first overlapping call makes
the delay and the worker thread apply again.

Everything here runs on the event loop thread (no locks): `submit`, `decode` and the dispatcher
task interleave only at their awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tkg.server.errors import ResourceExhausted

# Launches reading at most this much K+V run on the event loop thread: at the 10-30 GB/s a decode
# kernel reaches here that is ~10-25 us, less than a round trip to the worker thread.
INLINE_KERNEL_BYTES = 256 * 1024

# A lone caller's launch runs on the loop when its kernel is expected to take at most this long
# (`launch_inline`). What the worker thread buys a lone caller is a loop free for calls nobody is
# making. What it costs, measured (`tkg bench host` cases, cpu backend, 2 cores shared with other
# work, load 2-4): the hand-off there and back plus the hold and finish of the plans, 175-550 us
# of the step's host time at batch 8-64 ctx 1024 (host p50 old -> new rule, interleaved runs:
# batch 8 ctx 1024 470-660 -> 250-320 us, batch 64 ctx 1024 1740-1970 -> 1060-1150 us, batch 8
# ctx 4096 1100 -> 470 us), and on a 2-core host the kernel runs on one core instead of two. What
# running on the loop costs: calls arriving meanwhile wait for the kernel before they are read. A
# newcomer's Decode would wait for this launch anyway (launches never overlap), so it loses only
# its validation's overlap; other RPCs (health checks, sequence RPCs) wait up to this long, a
# tenth of the 1 s timeout of grpc_health_probe and of a Kubernetes probe. Measured kernels: batch
# 8 ctx 1024 2-18 ms and ctx 4096 11-22 ms (on the loop), batch 64 ctx 1024 23-90 ms (near the
# bound: on a loaded host some go back to the worker), batch 64 ctx 4096 ~165 ms (the worker); a
# trn2 kernel on these steps is estimated at 60 us - 1.6 ms. Not for concurrent callers, even on
# 2 cores: every launch on the loop (`--inline-kernel-bytes 2**40`, `tkg bench serve`) made the
# mean batch of 64 callers 1.1-1.4 sequences instead of 35-37 (the blocked loop reads one call per
# pass after each kernel, so batches stop forming) and their tokens/s 580-700 instead of 860-920.
LONE_STALL_S = 0.1

# A lone caller's launches run on the loop only up to this much K+V besides (an operator's cap on
# top of LONE_STALL_S; the default leaves the time bound alone in charge).
LONE_INLINE_BYTES = 2**40

# AppendKV chunks and ImportSequence messages of more K+V than this are written into the cache on
# the kernel worker thread (`tkg.server.writes`): a copy of ~1 ms at most on the loop.
INLINE_WRITE_BYTES = 8 * 2**20

# Launches in a row of one request for the same sequences, with nothing else in flight, before
# that caller counts as alone (its requests skip the batch delay, its kernels run on the loop).
LONE_STREAK = 8


def launch_inline(
    kv_bytes: int, lone: bool, seconds_per_byte: float | None, inline_kernel_bytes: int, lone_inline_bytes: int,
    stall_s: float = LONE_STALL_S,
) -> bool:  # fmt: skip
    """Run a launch reading `kv_bytes` of K+V on the event loop thread (True) or the worker thread?

    Tiny launches always on the loop (`inline_kernel_bytes`: the hand-off costs more than the
    kernel). Others only for a `lone` caller (`LoneCaller`: nobody else's calls to overlap with),
    up to `lone_inline_bytes`, and only when the kernel's expected time, `kv_bytes` times the
    `seconds_per_byte` measured on recent launches, is within `stall_s` (LONE_STALL_S: how long
    other calls may wait for the loop); with no measurement yet, on the worker thread."""
    if kv_bytes <= inline_kernel_bytes:
        return True
    if not lone or seconds_per_byte is None or kv_bytes > lone_inline_bytes:
        return False
    return kv_bytes * seconds_per_byte <= stall_s


@dataclass
class DecodeWork:
    """One validated Decode request waiting for its batch."""

    layer: int
    s_active: int
    seq_ids: list[str]
    positions: np.ndarray  # int64 [B]
    q: np.ndarray  # [B, Hq, S, d] KV dtype
    k: np.ndarray | None  # [B, Hkv, S, d]; None for attend_only
    v: np.ndarray | None  # [B, Hkv, S, d]; None for attend_only
    tenant: Any = None  # the caller's `tkg.server.identity.Tenant` (quota accounting)
    arrival: float = field(default_factory=time.perf_counter)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    return_lse: bool = False  # answer (out float32, lse float32 [B, Hq, S])
    attend_only: bool = False  # no new tokens: nothing appended, positions are the first queries'
    lse: np.ndarray | None = None  # with return_lse, set by the step with the result: float32 [B, Hq, S]

    @property
    def key(self) -> tuple[int, int, bool, bool]:
        """Requests coalesce into one launch only with equal keys: an attend-only launch appends
        nothing and reads differently, and an lse launch takes the partial kernel path."""
        return (self.layer, self.s_active, self.return_lse, self.attend_only)

    @property
    def size(self) -> int:
        return len(self.seq_ids)


RunBatch = Callable[[list[DecodeWork]], Awaitable[None]]


class LoneCaller:
    """The one record of "a single caller has the server to itself" (see the module docstring).

    Updated at every launch (`launched`) and after every kernel (`kernel_ran`: its measured
    speed); read by the batcher (skip the delay, run in the caller's task) and by the step engine
    (`inline`: run the kernel on the loop). "The same sequences": grpc.aio starts one call per loop
    pass, so a burst of new callers would each look alone, run inline one by one and never batch;
    a change of sequences restarts the streak instead.

    Args:
        calls: calls in flight in the whole service (every RPC, streams included).
        inline_kernel_bytes: launches reading at most this much K+V always run on the loop.
        lone_inline_bytes: a lone caller's launches run on the loop up to this much K+V (and
            `stall_s` of expected kernel time).
        stall_s: the longest a lone caller's kernel is expected to keep the loop (LONE_STALL_S).
    """

    def __init__(
        self, calls: Callable[[], int], inline_kernel_bytes: int = INLINE_KERNEL_BYTES,
        lone_inline_bytes: int = LONE_INLINE_BYTES, stall_s: float = LONE_STALL_S,
    ) -> None:  # fmt: skip
        self._calls = calls
        self.inline_kernel_bytes = inline_kernel_bytes
        self.lone_inline_bytes = lone_inline_bytes
        self.stall_s = stall_s
        self.ids: list[str] | None = None  # sequence ids of the last launch, when it was one request
        self.streak = 0  # launches in a row of that one request with nothing else in flight
        self.decoding = 0  # decode requests between receipt and reply (`Batcher.decode`)
        self.seconds_per_byte: float | None = None  # the last kernel's time per K+V byte read (`kernel_ran`)

    def launched(self, batch: list[DecodeWork], queued: int) -> None:
        """A launch of `batch` starts, `queued` requests still waiting behind it."""
        ids = batch[0].seq_ids if len(batch) == 1 else None
        if ids is None or self.decoding > 1 or self._calls() > 1 or queued:
            self.streak = 0
        else:  # another caller's first lone launch starts a new streak at 1
            self.streak = self.streak + 1 if ids == self.ids else 1
        self.ids = ids

    def alone(self) -> bool:
        """One caller has been alone for LONE_STREAK launches and nothing else is in flight now."""
        return self.streak > LONE_STREAK and self.decoding <= 1 and self._calls() <= 1

    def kernel_ran(self, kv_bytes: int, seconds: float) -> None:
        """A kernel read `kv_bytes` of K+V in `seconds` (its own call, measured on its thread).
        Launches within `inline_kernel_bytes` are not counted: their time is mostly the call's
        fixed cost, which would make the next large launch look far slower than it is. The last
        launch alone counts: a lone caller's launches differ little from one to the next, and a
        slow outlier only sends the next launch to the worker thread, which measures again. A
        worker-thread launch runs on one core fewer than an inline one (`cores.kernel_threads`),
        so a speed measured there errs on the slow side (keeps launches off the loop)."""
        if kv_bytes > self.inline_kernel_bytes:
            self.seconds_per_byte = seconds / kv_bytes

    def inline(self, kv_bytes: int) -> bool:
        """Run a launch reading `kv_bytes` of K+V on the loop thread (`launch_inline`)? Handing a
        launch to the worker thread buys a loop free to accept the next calls while the kernel
        runs (grpc.aio accepts one call per loop pass), which is what lets batches form under
        load; a lone caller gains nothing from it and pays the hand-offs (LONE_STALL_S)."""
        lone = self.streak > LONE_STREAK
        return launch_inline(
            kv_bytes, lone, self.seconds_per_byte, self.inline_kernel_bytes, self.lone_inline_bytes, self.stall_s
        )


class Batcher:
    """Queue + dispatcher task. `submit()` on the event loop; `run_batch` resolves the futures.

    Args:
        run_batch: runs one batch and resolves its futures (the step engine's `run`).
        lone: the scheduling record (a fresh one, no calls counted, when None).
    """

    def __init__(
        self, run_batch: RunBatch, max_batch: int, delay_s: float, max_pending: int, lone: LoneCaller | None = None
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.max_pending = max_pending
        self._queue: list[DecodeWork] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.running = 0  # requests in the batch being run
        self._launching = asyncio.Lock()  # held while a batch runs: one launch at a time
        self.lone = lone if lone is not None else LoneCaller(lambda: 0)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="tkg-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for work in self._queue:
            if not work.future.done():
                work.future.cancel()
        self._queue.clear()

    def queued_sequences(self) -> set[str]:
        """Ids of the sequences with a decode waiting in the queue (idle expiry keeps them)."""
        return {sid for work in self._queue for sid in work.seq_ids}

    def submit(self, work: DecodeWork) -> asyncio.Future:
        if len(self._queue) >= self.max_pending:
            raise ResourceExhausted(
                f"queue: {len(self._queue)} decode requests pending; expected fewer than {self.max_pending} "
                "(retry with backoff)"
            )
        self._queue.append(work)
        self._wakeup.set()
        return work.future

    def runs_alone(self) -> bool:
        """A request arriving now would run at once: nothing queued, nothing launching and a lone
        caller (the DecodeStream reader then answers the message itself, without a task)."""
        return not self._queue and not self.lone.decoding and self.lone.alone()

    async def decode(self, work: DecodeWork) -> Any:
        """Queue `work` (`submit`) and wait for its result. A lone caller (`LoneCaller.alone`) whose
        request finds nothing queued and no launch running runs its batch in its own task instead:
        no queue, no dispatcher wake-up, two event-loop passes fewer per call. Only when the
        request names the sequences of the last batch, and that batch was one request: grpc.aio
        starts one call per loop pass, so a burst of other callers' requests would each look alone
        and never meet in a batch; through the queue they do. Launches never overlap: the
        dispatcher takes its next batch only once such a launch is over."""
        lone = self.lone
        lone.decoding += 1
        try:
            alone = work.seq_ids == lone.ids  # the same caller going on, not a burst of new ones
            if not alone or self._queue or self._launching.locked() or not lone.alone():
                return await self.submit(work)
            async with self._launching:
                await self._launch([work])
            return await work.future
        finally:
            lone.decoding -= 1

    def _take(self) -> list[DecodeWork]:
        """Remove and return the next batch: the oldest request and compatible followers."""
        head = self._queue[0]
        batch, seen, size, rest = [head], set(head.seq_ids), head.size, []
        for work in self._queue[1:]:
            fits = work.key == head.key and size + work.size <= self.max_batch
            if fits and seen.isdisjoint(work.seq_ids):
                batch.append(work)
                seen.update(work.seq_ids)
                size += work.size
            else:
                rest.append(work)
        self._queue = rest
        return batch

    def _compatible_size(self, head: DecodeWork) -> int:
        return sum(w.size for w in self._queue if w.key == head.key)

    async def _wait_for_company(self, head: DecodeWork) -> None:
        """Until `head` is `delay_s` old or a full batch is queued. The event loop's timers only
        resolve about a millisecond (epoll), so the last stretch is spent in single loop passes,
        each of which still receives incoming requests."""
        deadline = head.arrival + self.delay_s
        while self._compatible_size(head) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            await asyncio.sleep(left - 1.5e-3 if left > 2e-3 else 0)

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) > 1 or not self.lone.alone():
                await self._wait_for_company(self._queue[0])
            async with self._launching:  # a lone caller's own launch (`decode`) may be running
                if not self._queue:
                    continue
                batch = [w for w in self._take() if not w.future.done()]  # drop cancelled callers
                if batch:
                    await self._launch(batch)

    async def _launch(self, batch: list[DecodeWork]) -> None:
        """Run one batch (the caller holds `_launching`)."""
        self.lone.launched(batch, len(self._queue))
        self.running = len(batch)
        try:
            await self._run_batch(batch)
        except Exception as exc:  # a bug in run_batch must not kill the dispatcher
            for work in batch:
                if not work.future.done():
                    work.future.set_exception(exc)
        finally:
            self.running = 0
