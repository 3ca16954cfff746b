"""The decode step engine: one batch of Decode requests through the KV cache and one kernel launch.

Owns the step's lifecycle over the cache's two-phase append (`tkg.server.kv_cache`): prepare (one
plan per tenant's run of requests, quota-checked), RoPE of q and k once for the batch, the fp8
conversion of the new k/v, commit, the launch (`KVCache.decode`, on the event loop or on the one
kernel worker thread), finish, and answering each caller with its rows and `Timing`. A failure
anywhere between prepare and the kernel's end undoes exactly this step (`KVCache.undo`), so a
failed step appends nothing and holds no block.

Threading (relied on, not locked): everything but the kernel call runs on the event loop thread.
A launch on the worker thread holds its plans' blocks from commit to the kernel's end
(`KVCache.commit(hold=True)`) and is finished on the loop by `_kernel_done`, which the thread
schedules as its last act; an inline launch needs no hold, since no other code runs meanwhile.
Which launches run inline is the batcher's scheduling record (`LoneCaller.inline`), fed the
speed of every kernel (`_deliver`): the event-loop bound is one lone caller's launch expected to
take LONE_STALL_S.

Context parallelism (docs/context-parallel.md): a batch is all attend-only or all appending,
all return_lse or none (the batcher's key). An lse batch answers out in float32 and its lse
`[B, Hq, S]` (`DecodeWork.lse`). An attend-only batch appends nothing and has no plan: its launch
always runs inline, on the loop, reading the tables as they are at that instant (nothing else runs
meanwhile, so no hold is needed; relied on in `_run_attend_only`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from tkg import codec
from tkg.dtypes import FP8, to_fp8
from tkg.server.appends import AppendPlan
from tkg.server.batcher import DecodeWork, LoneCaller
from tkg.server.config import ModelSpec
from tkg.server.cores import CorePolicy
from tkg.server.errors import ServiceError
from tkg.server.holds import Holds
from tkg.server.identity import Tenant
from tkg.server.kv_cache import KVCache
from tkg.server.metrics import Metrics
from tkg.server.offload import run_on
from tkg.server.rope import RopeTable
from tkg.server.tenants import Ledger
from tkg.v1 import decode_attention_pb2 as pb

log = logging.getLogger("tkg.server")

T = TypeVar("T")
Plans = list[tuple[Tenant, AppendPlan]]  # each plan covers the next `plan.batch_size` rows of the batch


class StepEngine:
    """Runs batches (`run`, the batcher's `run_batch`); see the module docstring.

    Args:
        spec: the model spec (RoPE, windows, sinks, fp8 scales, softmax scale).
        cache: the KV cache (its store holds the pools the kernel reads).
        ledger: per-tenant usage; a plan's reservation is checked against its tenant's quota.
        holds: mutations waiting for launches to let go (notified when a step ends).
        lone: the batcher's scheduling record (which launches run on the loop).
        cores: the kernel's per-launch options (thread cap).
        metrics: per-step observations.
    """

    def __init__(
        self, spec: ModelSpec, cache: KVCache, ledger: Ledger, holds: Holds, lone: LoneCaller,
        cores: CorePolicy, metrics: Metrics,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.cache = cache
        self.ledger = ledger
        self.holds = holds
        self.lone = lone
        self.cores = cores
        self.metrics = metrics
        self.rope = RopeTable(spec.inv_freqs(), spec.max_context) if spec.fuse_rope else None
        # One worker: the kernel uses every core itself; two launches at once would only fight.
        self._kernel_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tkg-kernel")
        self._fp8 = spec.kv_numpy_dtype == FP8
        # RoPE of q and k in the commit's store write (`_commit_rotated`): a store with that pass
        # (`HostKVStore.write_rope`) that does not read the new k with the step (it is never
        # materialised rotated), and no fp8 conversion between the rotation and the store.
        store = cache.store
        self._rope_in_write = (
            self.rope is not None and not self._fp8 and not store.reads_new_kv and hasattr(store, "write_rope")
        )
        self._kv_token_bytes = 2 * spec.num_kv_heads * spec.head_dim * spec.kv_numpy_dtype.itemsize  # K + V

    def close(self) -> None:
        """Wait for a launch still on the worker thread, then stop the thread."""
        self._kernel_thread.shutdown(wait=True)

    # ---- bulk work off the loop ------------------------------------------------------------------

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` on the kernel worker thread (one thread for all store work: a device store needs
        that; launches and bulk writes also take turns instead of fighting over the cores), awaited
        on the loop. Returns or raises only once the thread has let go of `fn`, even when the
        caller is cancelled meanwhile (CancelledError is raised after): `fn` writes into memory
        the caller reserved, and the caller's undo must not free it under the thread."""
        return await run_on(self._kernel_thread, fn)

    # ---- the tensors of a step ------------------------------------------------------------------

    def stored(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New K/V as the cache stores them: unchanged, or for an fp8 cache value / scale rounded
        to float8_e4m3 with values beyond +-240 saturated (inputs are finite: checked on arrival)."""
        if not self._fp8:
            return k, v
        ks, vs = self.spec.scales(layer)
        return to_fp8(np.asarray(k, np.float32) / np.float32(ks)), to_fp8(np.asarray(v, np.float32) / np.float32(vs))

    def rotate_chunk(self, k: np.ndarray, position: int) -> np.ndarray:
        """An AppendKV chunk's keys `[T, Hkv, d]` at positions `position ..`, RoPE'd when the server fuses it."""
        if self.rope is None:
            return k
        return self.rope.rotate_tokens(k, position)

    def _read_bytes(self, layer: int, lens: np.ndarray) -> int:
        """Bytes of K+V a launch over sequences of `lens` tokens (int32 `[B]`) reads: a sliding
        window's layer reads its last `window` tokens only (what the scheduling decision weighs,
        so that a windowed layer's speed is not credited to a full layer's launch)."""
        window = self.spec.window(layer)
        tokens = int(lens.sum()) if window is None else int(np.minimum(lens, window).sum())
        return tokens * self._kv_token_bytes

    def _scale_options(self, layer: int) -> dict[str, float]:
        ks, vs = self.spec.scales(layer)
        return {} if (ks, vs) == (1.0, 1.0) else {"k_scale": ks, "v_scale": vs}

    # ---- the batch ------------------------------------------------------------------------------

    async def run(self, batch: list[DecodeWork]) -> None:
        """Prepare the batch, append all, one kernel launch, split the output (`_launch`).

        Any failure in between rolls back exactly this step's appends and gives every caller
        still waiting the real error. `Timing.kernel_us` is the step's span from here to its
        plans' finish (prepare, append, kernel, finish); `attention_us` the kernel call alone."""
        t_start = time.perf_counter()
        if batch[0].attend_only:
            self._run_attend_only(batch, t_start)
            return
        ready, plans = self._prepare(batch, batch[0].s_active)
        if not ready:
            return
        try:
            await self._launch(ready, plans, t_start)
        except asyncio.CancelledError:
            raise  # the step is undone once the kernel thread has let go (`_kernel_done`)
        except Exception as exc:
            if not isinstance(exc, ServiceError):  # the kernel failing is a server bug: report it, keep serving
                log.exception("decode step failed for layer %d, %d requests", batch[0].layer, len(ready))
                exc = ServiceError(f"kernel: {type(exc).__name__}: {exc}")
            for work in ready:
                if not work.future.done():  # a cancelled caller must not hide the error from the rest
                    work.future.set_exception(exc)
        if self.holds.waiters:  # let mutations waiting for this launch apply before the next batch prepares
            await asyncio.sleep(0)

    def _run_attend_only(self, batch: list[DecodeWork], t_start: float) -> None:
        """An attend-only batch: no new tokens, so nothing to prepare, commit or undo. Each
        request's sequences are checked alone (only the failing ones get their error); the rest
        take one launch at their first queries' key indices, never with sinks (a sink counts once,
        in the segment that appends).

        Runs on the loop start to end (inline): the tables read by `attend_rows` stay valid for the
        launch because nothing else can run until it returns."""
        layer, S, spec = batch[0].layer, batch[0].s_active, self.spec
        ready, rows = [], []
        for work in batch:
            try:
                rows.append(self.cache.attend_rows(layer, work.seq_ids, work.positions, S))
            except ServiceError as exc:
                if not work.future.done():
                    work.future.set_exception(exc)
                continue
            ready.append(work)
        if not ready:
            return
        try:
            q = ready[0].q if len(ready) == 1 else np.concatenate([w.q for w in ready])
            if self.rope is not None:
                pos = np.concatenate([w.positions for w in ready])[:, None] + np.arange(S)[None, :]  # [B, S]
                no_k = np.zeros((q.shape[0], 0, S, q.shape[3]), q.dtype)
                q, _ = self.rope.rotate_qk(q, no_k, pos)  # the same arithmetic as an appending step's q
            tables = _stack_tables([t for t, _, _ in rows])
            lens = np.concatenate([n for _, n, _ in rows])
            q_start = np.concatenate([f for _, _, f in rows])
            out, attention_s = _timed(
                self.cache.decode, layer, q, None, None, tables, lens, scale=spec.softmax_scale,
                window=spec.window(layer), sinks=None, return_lse=ready[0].return_lse, q_start=q_start,
                # without return_lse the answer is in the I/O dtype, as any Decode's
                **({} if ready[0].return_lse else {"out": np.empty(q.shape, q.dtype)}), **self._scale_options(layer),
            )  # fmt: skip
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("attend-only step failed for layer %d, %d requests", layer, len(ready))
                exc = ServiceError(f"kernel: {type(exc).__name__}: {exc}")
            for work in ready:
                if not work.future.done():
                    work.future.set_exception(exc)
            return
        self._deliver(ready, out, len(lens), self._read_bytes(layer, lens), attention_s, t_start)

    def _prepare(self, batch: list[DecodeWork], S: int) -> tuple[list[DecodeWork], Plans]:
        """Reserve the batch's appends. A batch of one tenant's requests takes one `prepare_append`
        over all its sequences (its cost is per call, not per sequence); when that fails, or the
        batch mixes tenants (blocks are charged per tenant), one per request, so that only the
        failing requests get their error. Returns the requests that go ahead, in batch order, and
        their (tenant, plan)s."""
        tenant = batch[0].tenant
        if len(batch) > 1 and all(w.tenant is tenant for w in batch):
            try:
                ids = [sid for work in batch for sid in work.seq_ids]
                positions = np.concatenate([w.positions for w in batch])
                return batch, [(tenant, self._plan(tenant, batch[0].layer, ids, positions, S))]
            except ServiceError:
                pass  # nothing was reserved; find out which requests fail
        ready, plans = [], []
        for work in batch:
            try:
                plan = self._plan(work.tenant, work.layer, work.seq_ids, work.positions, S)
            except ServiceError as exc:
                if not work.future.done():
                    work.future.set_exception(exc)
                continue
            ready.append(work)
            plans.append((work.tenant, plan))
        return ready, plans

    def _plan(self, tenant: Tenant, layer: int, ids: list[str], positions: np.ndarray, S: int) -> AppendPlan:
        """A prepared append within `tenant`'s max_blocks quota (over it: aborted, nothing changed)."""
        plan = self.cache.prepare_append(layer, ids, positions, S)  # the cache charges the ledger
        try:
            self.ledger.check_charged(tenant, plan.reserved_blocks)
        except ServiceError:
            self.cache.abort(plan)
            raise
        return plan

    async def _launch(self, ready: list[DecodeWork], plans: Plans, t_start: float) -> None:
        """Commit every prepared plan, run the kernel, finish the plans and answer the callers
        (`_deliver`); on any failure undo every plan of the step and re-raise.

        A launch on the worker thread is finished and answered by `_kernel_done`, which the
        thread schedules on the loop as its last act: on the loop's first pass after the kernel,
        not a pass or two later when this coroutine resumes (under load each pass runs every
        other call's ready work first)."""
        cache, spec = self.cache, self.spec
        layer, S = ready[0].layer, ready[0].s_active
        done: asyncio.Future | None = None
        try:
            if len(ready) == 1:
                q, k, v = ready[0].q, ready[0].k, ready[0].v
            else:
                q, k, v = (np.concatenate([getattr(w, x) for w in ready]) for x in "qkv")
            lens = np.concatenate([p.seq_lens for _, p in plans]) if len(plans) > 1 else plans[0][1].seq_lens
            kv_bytes = self._read_bytes(layer, lens)
            inline = self.lone.inline(kv_bytes)
            # A launch on the worker thread holds the blocks it reads while the loop goes on; an
            # inline one runs before the loop can apply anything else: no hold needed.
            fused = self._rope_in_write and len(plans) == 1
            if self.rope is not None:
                if len(ready) == 1 and S == 1:  # [B, 1]: a view, no numpy call on a small array
                    pos = ready[0].positions[:, None]
                else:
                    pos = np.concatenate([w.positions for w in ready])[:, None] + np.arange(S)[None, :]  # [B, S]
                if fused:  # RoPE of q and k and the store write in one pass
                    q = self._commit_rotated(plans[0][1], q, k, v, pos, not inline)
                else:
                    q, k = self.rope.rotate_qk(q, k, pos)  # once for the whole batch's q and k
            if not fused:
                k, v = self.stored(layer, k, v)
                row = 0
                for _, plan in plans:
                    n = plan.batch_size
                    cache.commit(plan, k[row : row + n], v[row : row + n], hold=not inline)
                    row += n
            tables = _stack_tables([p.block_tables for _, p in plans])
            if ready[0].return_lse:
                extra: dict[str, Any] = {"return_lse": True}
            elif len(ready) == 1:  # the answer is all of out: encoded without a copy (`codec.output_array`)
                extra = {"out": codec.output_array(q.shape, q.dtype)}
            else:
                extra = {}
            kernel = functools.partial(
                _timed, cache.decode, layer, q, k, v, tables, lens,
                scale=spec.softmax_scale, window=spec.window(layer), sinks=spec.layer_sinks(layer),
                **self.cores.options(inline), **self._scale_options(layer), **extra,
            )  # fmt: skip
            if inline:
                out, attention_s = kernel()
            else:
                loop = asyncio.get_running_loop()
                job = self._kernel_thread.submit(kernel)
                done = loop.create_future()
                step = (ready, plans, len(lens), kv_bytes, t_start, done)
                job.add_done_callback(lambda job: _call_on(loop, self._kernel_done, job, *step))
        except BaseException:
            self._undo(plans)
            raise
        if done is None:
            if self.holds.waiters:  # nobody waits on the event otherwise: no need to replace it
                self.holds.notify()
            self._deliver(ready, out, len(lens), kv_bytes, attention_s, t_start)
            return
        await done  # cancelled: `_kernel_done` undoes the step once the thread has let go

    def _commit_rotated(
        self, plan: AppendPlan, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, hold: bool
    ) -> np.ndarray:
        """Commit `plan` (the whole batch) with RoPE of q and k done in its store write
        (`RopeTable.rotate_into`: one native pass writes the rotated k straight into its slots);
        returns the rotated q. k and v are stored as they come (no fp8 cache: `stored` is the
        identity), and the store does not read them with the step (`_rope_in_write`): the launch
        gets the unrotated k, which it ignores. The same bits as `rotate_qk`, then `stored` and `commit`."""
        assert self.rope is not None
        rope, store, rotated = self.rope, self.cache.store, []

        def write(layer: int, blocks: np.ndarray, offsets: np.ndarray, live: np.ndarray | None) -> None:
            if live is None:
                rotated.append(rope.rotate_into(store, layer, blocks, offsets, q, k, v, pos))
                return
            # Sequences released since prepare (not within one step: kept general): rotate all, write the live.
            q_rot, k_rot = rope.rotate_qk(q, k, pos)
            rotated.append(q_rot)
            store.write(layer, blocks, offsets, k_rot[live].transpose(1, 0, 2, 3), v[live].transpose(1, 0, 2, 3))

        self.cache.commit(plan, k, v, hold=hold, writer=write)
        return rotated[0]

    def _kernel_done(
        self, job: Future, ready: list[DecodeWork], plans: Plans, size: int, kv_bytes: int, t_start: float,
        done: asyncio.Future,
    ) -> None:  # fmt: skip
        """On the loop, as soon as the worker thread's kernel is over: finish the plans and answer
        the callers; or, when the kernel failed or the batch's task was cancelled meanwhile, undo
        the step. Resolves `done` (what `_launch` waits for)."""
        try:
            out, attention_s = job.result()
            if done.cancelled():
                raise asyncio.CancelledError
            for _, plan in plans:
                self.cache.finish(plan)
        except BaseException as exc:
            self._undo(plans)
            if not done.done():
                done.set_exception(exc)
            return
        try:
            self.holds.notify()
            self._deliver(ready, out, size, kv_bytes, attention_s, t_start)
        except BaseException as exc:  # a bug here must still end the step (`run` reports it)
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)

    def _undo(self, plans: Plans) -> None:
        """All-or-nothing: the failed step leaves no tokens and no held blocks behind."""
        for _, plan in plans:
            self.cache.undo(plan)
        self.holds.notify()

    def _deliver(
        self, ready: list[DecodeWork], out: Any, size: int, kv_bytes: int, attention_s: float, t_start: float
    ) -> None:
        """The step is over (plans finished): metrics, and each caller's rows of `out` with its Timing.
        `out` is the kernel's `[B, Hq, S, d]`, or (out float32, lse `[B, Hq, S]`) for a return_lse batch;
        `size` its B sequences, which read `kv_bytes` of K+V (`_read_bytes`)."""
        lse = None
        if isinstance(out, tuple):
            out, lse = out
        kernel_s = time.perf_counter() - t_start
        self.lone.kernel_ran(kv_bytes, attention_s)
        self.metrics.observe_batch(size, kernel_s, [t_start - w.arrival for w in ready])
        kernel_us, attention_us = int(kernel_s * 1e6), int(attention_s * 1e6)
        row = 0
        for work in ready:
            timing = pb.Timing(
                queue_us=int((t_start - work.arrival) * 1e6), kernel_us=kernel_us, attention_us=attention_us,
                batch_size=size, batch_requests=len(ready),
            )  # fmt: skip
            if not work.future.done():  # a cancelled caller's rows are appended all the same
                if lse is not None:
                    work.lse = lse[row : row + work.size]
                work.future.set_result((out[row : row + work.size], timing))
            row += work.size


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` on `loop`'s thread, from another thread (dropped once the loop is closed)."""
    with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody left to answer
        loop.call_soon_threadsafe(fn, *args)


def _timed(fn: Callable[..., np.ndarray], *args: Any, **kwargs: Any) -> tuple[np.ndarray, float]:
    """`fn(*args, **kwargs)` and the seconds it took (measured on the thread that runs it)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _stack_tables(tables: list[np.ndarray]) -> np.ndarray:
    """Stack per-request block tables `[B_i, n_i]` into `[sum B_i, max n_i]` (pad with block 0)."""
    if len(tables) == 1:
        return tables[0]
    width = max(t.shape[1] for t in tables)
    out = np.zeros((sum(t.shape[0] for t in tables), width), dtype=np.int32)
    row = 0
    for t in tables:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out
