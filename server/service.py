"""The `tkg.v1.DecodeAttention` servicer on grpc.aio.

Every RPC validates everything before it changes anything; errors are `ServiceError`s carrying the
contract's status code and a message naming the field and the expected value. Decode requests go
through the `Batcher`: one kernel launch per batch of (layer, S)-compatible requests, run on a
worker thread so the event loop keeps receiving (a lone caller's launches run on the loop: see
`_run_batch`). A failure anywhere between a batch's prepare and its kernel's end rolls back
exactly that step's appends, so a failed step appends nothing. All KV-cache mutations happen on
the loop thread (the cache has no locks; see `tkg.server.kv_cache`).

Order of mutations against launches (the cache and the kernel never race): a launch on the worker
thread holds its sequences (and a reference to every block it reads) from its commit until the
kernel returns; a launch on the loop thread needs no hold, since no other code runs meanwhile.
TruncateSequence, ReleaseSequence, ForkSequence (of the source), AppendKV (each chunk) and
ExportSequence on a held sequence wait until that launch has finished, then apply: they act on
the state that includes the launch's tokens (or excludes them when it failed). Decodes queued
behind such a mutation see its result (e.g. FAILED_PRECONDITION after a truncate).

Event-loop bound: a launch runs on the loop thread only when it reads at most
`inline_kernel_bytes` of K+V, or `lone_inline_bytes` (8 MiB: under ~1 ms at the 10-30 GB/s a
decode kernel reaches on CPU) for a lone caller; every larger launch runs on the worker thread,
so no kernel blocks health checks or other RPCs for longer than one launch of that size.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from tkg import __version__, codec
from tkg.kernel_dtypes import BF16, FP8, to_fp8
from tkg.server import auth, migration
from tkg.server.batcher import Batcher, DecodeWork
from tkg.server.config import ModelSpec
from tkg.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ServiceError,
    Unavailable,
)
from tkg.server.kv_cache import AppendPlan, KVCache, SequenceState
from tkg.server.metrics import Metrics
from tkg.server.rope import RopeTable, rotate
from tkg.server.sequences import MAX_SEQUENCE_ID_LEN
from tkg.server.tenants import SEP, Ledger, inward, outward, scrub
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")

# Launches reading at most this much K+V run on the event loop thread (see `_run_batch`): at the
# 10-30 GB/s a decode kernel reaches here that is ~10-25 us, less than a round trip to the worker.
INLINE_KERNEL_BYTES = 256 * 1024

# A lone caller's launches run on the loop only up to this much K+V (the event-loop bound).
LONE_INLINE_BYTES = 8 * 2**20

# Batches in a row with a single caller before its kernel runs on the loop and its requests skip
# the batch delay (see `_run_batch`, `Batcher.lone_caller`).
LONE_STREAK = 8

# The GIL switch interval while a service runs (CPython's default: 5 ms). The kernel thread needs
# the GIL to start a launch and to hand its result back; while the loop runs other calls' Python
# it gets it only at the loop's next blocking call or after this interval. With 16 callers
# (`tkg bench serve`) the default left 1.5-2.4 ms between a launch's kernel and its step at batch
# 3.6-4.2, 0.7-0.9 ms at 0.5 ms (batch 4.3-5.4). The native pool's threads never take the GIL.
GIL_SWITCH_S = 5e-4

# DecodeStream messages read ahead of the one being answered: past it the stream is not read
# (gRPC flow control then holds the sender), so an unread stream holds at most this many requests.
STREAM_WINDOW = 8
LOG_ID_CHARS = 64  # ids and request ids are cut to this in logs
_SURE_ID_CHARS = MAX_SEQUENCE_ID_LEN // 4  # an id of at most this many characters fits in UTF-8


@dataclass(frozen=True)
class ServiceOptions:
    backend: str  # resolved kernel backend name
    max_batch: int  # sequences per kernel launch
    batch_delay_s: float
    max_pending: int  # queued decode requests before RESOURCE_EXHAUSTED
    max_message_bytes: int
    inline_kernel_bytes: int = INLINE_KERNEL_BYTES  # launches reading less K+V skip the worker thread
    lone_inline_bytes: int = LONE_INLINE_BYTES  # a lone caller's launches up to this much K+V, too
    kernel_cores: int = 0  # cores the kernel may use; 0: the CPUs this process may run on (see kernel_threads)


def _code_name(code: grpc.StatusCode) -> str:
    return code.name


class DecodeAttentionService(pb_grpc.DecodeAttentionServicer):
    """State: the KV cache, the batcher, the kernel worker thread, metrics, draining flag."""

    def __init__(self, spec: ModelSpec, cache: KVCache, options: ServiceOptions, metrics: Metrics) -> None:
        self.spec = spec
        self.cache = cache
        self.opts = options
        self.metrics = metrics
        self.draining = False
        self.instance_id = uuid.uuid4().hex  # a restart gets a new one: clients tell it from expiry
        self.started_at = time.time()
        self.ready = False  # set once the kernel backend is warmed up (UNAVAILABLE until then)
        self._rope = RopeTable(spec.inv_freqs(), spec.max_context) if spec.fuse_rope else None
        # One worker: the kernel uses every core itself; two launches at once would only fight.
        self._kernel_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tkg-kernel")
        if sys.getswitchinterval() > GIL_SWITCH_S:  # see GIL_SWITCH_S; a shorter one set elsewhere stays
            sys.setswitchinterval(GIL_SWITCH_S)
        self.batcher = Batcher(self._run_batch, options.max_batch, options.batch_delay_s, options.max_pending)
        self.batcher.lone_caller = self._lone_caller
        metrics.attach(cache, pending=lambda: self.batcher.pending, running=lambda: self.batcher.running)
        self._dtype_code = codec.DTYPE_NAMES[spec.wire_dtype]  # q/k/v/out on the wire
        self._kv_code = codec.DTYPE_NAMES[spec.kv_dtype]  # what the cache stores (and exports)
        self._fp8 = spec.kv_numpy_dtype == FP8
        self._cores = options.kernel_cores or available_cores()
        self._kv_token_bytes = 2 * spec.num_kv_heads * spec.head_dim * spec.kv_numpy_dtype.itemsize  # K + V
        self._inflight = 0
        self._decoding = 0  # decode requests (unary or stream messages) between receipt and reply
        self._lone_streak = 0  # batches in a row that were the only call in the server, same sequences
        self._lone_ids: list[str] | None = None  # sequence ids of the last launch, when it was one request
        self._idle = asyncio.Event()
        self._idle.set()
        self._settled = asyncio.Event()  # set (and replaced) whenever a launch or an export lets go
        self._pinned: Counter[str] = Counter()  # sequence id -> exports reading it
        self._waiters = 0  # mutations waiting in `_settle`
        self.ledger = Ledger()  # per-tenant usage against quotas (tkg.server.tenants)
        self.tenant_count: Callable[[], int] = lambda: 1  # configured tenants (the queue's fair share)
        self.per_tenant_info = False  # GetServerInfo counts the caller's tenant only (auth file in use)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls; wait (up to `grace_s`) for in-flight ones."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            log.warning("drain: %d calls still in flight after %.1fs", self._inflight, grace_s)

    async def close(self) -> None:
        await self.batcher.stop()
        self._kernel_thread.shutdown(wait=True)

    def expire_idle(self) -> list[str]:
        """Release idle sequences; queued decodes and exports count as activity."""
        queued = self.batcher.queued_sequences()
        expired = self.cache.expire_idle(None, self.spec.idle_ttl_s, busy=lambda s: s in queued or s in self._pinned)
        if expired:
            log.info("expired %d idle sequences", len(expired))
            self.ledger.recount((s.seq_id, s.block_ids) for s in self.cache.snapshot())
        return [outward(e) for e in expired]

    # ---- guards ----------------------------------------------------------------------------

    def _check_access(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Credentials were checked by `tkg.server.auth.Guard` before the request was
        parsed; here: draining and warming up."""
        if self.draining:
            raise Unavailable("server: draining for shutdown; expected a retry on another replica")
        if not self.ready and method != "GetServerInfo":
            raise Unavailable("server: warming up the kernel backend; expected a retry in a moment")

    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    # ---- info helpers ----------------------------------------------------------------------

    def _seq_info(self, state: SequenceState) -> pb.SequenceInfo:
        return pb.SequenceInfo(
            sequence_id=outward(state.seq_id), lengths=state.lengths, num_blocks=state.num_blocks,
            instance_id=self.instance_id,
        )  # fmt: skip

    def server_info(self) -> pb.ServerInfo:
        s = self.spec
        free, active = self.cache.free_blocks, len(self.cache)
        if self.per_tenant_info:  # another tenant's usage is not this caller's business
            tenant = auth.current().tenant
            used, limit = self.ledger.of(tenant), tenant.quota.max_blocks
            active = used.sequences
            free = free if limit is None else max(0, min(free, limit - used.blocks))
        return pb.ServerInfo(
            num_layers=s.num_layers, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, kv_dtype=self._kv_code, io_dtype=self._dtype_code, block_len=s.block_len,
            num_blocks=self.cache.num_blocks, free_blocks=free,
            max_s_active=s.max_s_active, max_batch=self.opts.max_batch, fuse_rope=s.fuse_rope,
            backend=self.opts.backend, version=__version__, max_context=s.max_context,
            softmax_scale=s.softmax_scale, sliding_window=[w or 0 for w in s.sliding_window],
            has_sinks=s.sinks is not None, max_message_bytes=self.opts.max_message_bytes,
            model=s.name, active_sequences=active, instance_id=self.instance_id,
            started_at=self.started_at,
        )  # fmt: skip

    # ---- validation ------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise InvalidArgument(f"layer: {layer}; expected 0 <= layer < {self.spec.num_layers}")

    @staticmethod
    def _check_id(field: str, seq_id: str, index: int | None = None) -> None:
        """INVALID_ARGUMENT naming `field` (`field[index]` with an index) for a bad sequence id.
        The usual id passes on its character count alone: no encoding, no field name formatted."""
        fits = len(seq_id) <= _SURE_ID_CHARS or len(seq_id.encode()) <= MAX_SEQUENCE_ID_LEN
        if seq_id and fits and SEP not in seq_id:
            return
        field = field if index is None else f"{field}[{index}]"
        if not seq_id:
            raise InvalidArgument(f"{field}: empty; expected a sequence id")
        size = len(seq_id.encode())
        if size > MAX_SEQUENCE_ID_LEN:
            raise InvalidArgument(f"{field}: {size} bytes; expected at most {MAX_SEQUENCE_ID_LEN} bytes (UTF-8)")
        # SEP is the tenant namespace separator: an id holding it could name another tenant's.
        raise InvalidArgument(f"{field}: contains the control character U+001F; expected an id without it")

    def _stored(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New K/V as the cache stores them: unchanged, or for an fp8 cache value / scale rounded
        to float8_e4m3 with values beyond +-240 saturated (inputs are finite: checked on arrival)."""
        if not self._fp8:
            return k, v
        ks, vs = self.spec.scales(layer)
        return to_fp8(np.asarray(k, np.float32) / np.float32(ks)), to_fp8(np.asarray(v, np.float32) / np.float32(vs))

    def _scale_options(self, layer: int) -> dict[str, float]:
        ks, vs = self.spec.scales(layer)
        return {} if (ks, vs) == (1.0, 1.0) else {"k_scale": ks, "v_scale": vs}

    def _tensor(
        self, t: pb.Tensor, field: str, shape: tuple[int | None, ...], names: str, code: int | None = None
    ) -> np.ndarray:
        """Check dtype (== KV dtype), rank and known dims on the message's Python ints, then
        decode (byte length checked in Python ints too) and check finiteness (`finite_bytes`)."""
        code = self._dtype_code if code is None else code
        if t.dtype != code:
            what = "KV dtype" if code == self._kv_code else "I/O dtype"
            raise InvalidArgument(
                f"{field}.dtype: {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}; "
                f"expected {pb.DType.Name(code)} (the server's {what})"
            )
        dims = tuple(t.shape)
        if len(dims) != len(shape) or any(e is not None and e != d for e, d in zip(shape, dims, strict=True)):
            want = [("?" if e is None else e) for e in shape]
            raise InvalidArgument(f"{field}.shape: {list(dims)}; expected {names} = {want}")
        data = t.data  # one copy out of the message, shared by the array and the finiteness check
        try:
            a = codec.decode(t, field, dims, data)
        except codec.TensorError as exc:
            raise InvalidArgument(str(exc)) from None
        if not finite_bytes(data, a.dtype):
            raise InvalidArgument(f"{field}: contains NaN or infinity; expected finite values")
        return a

    def _validate_decode(self, req: pb.DecodeRequest) -> DecodeWork:
        s = self.spec
        if len(req.request_id) > _SURE_ID_CHARS and len(req.request_id.encode()) > MAX_SEQUENCE_ID_LEN:
            raise InvalidArgument(
                f"request_id: {len(req.request_id.encode())} bytes; expected at most {MAX_SEQUENCE_ID_LEN} bytes"
            )
        self._check_layer(req.layer)
        B = len(req.sequence_ids)
        if B < 1 or self.opts.max_batch < B:
            raise InvalidArgument(f"sequence_ids: {B} sequences; expected 1..{self.opts.max_batch} (max_batch)")
        if len(req.positions) != B:
            raise InvalidArgument(f"positions: {len(req.positions)} entries; expected {B} (one per sequence_ids)")
        for b, sid in enumerate(req.sequence_ids):
            self._check_id("sequence_ids", sid, b)
        q = self._tensor(req.q, "q", (B, s.num_q_heads, None, s.head_dim), "[B, num_q_heads, S, head_dim]")
        S = q.shape[2]
        if not 1 <= S <= s.max_s_active:
            raise InvalidArgument(f"q.shape[2]: S={S}; expected 1..{s.max_s_active} (max_s_active)")
        kv_shape = (B, s.num_kv_heads, S, s.head_dim)
        k = self._tensor(req.k, "k", kv_shape, "[B, num_kv_heads, S, head_dim]")
        v = self._tensor(req.v, "v", kv_shape, "[B, num_kv_heads, S, head_dim]")
        positions = np.fromiter(req.positions, np.int64, B)
        self._check_buckets(S, positions)
        tenant = auth.current().tenant
        ids = [inward(tenant, sid) for sid in req.sequence_ids] if tenant.namespace else list(req.sequence_ids)
        return DecodeWork(req.layer, S, ids, positions, q, k, v, tenant=tenant)

    async def _settle(self, *seq_ids: str) -> None:
        """Wait until no launch and no export holds any of `seq_ids` (see the module docstring)."""
        while any(self.cache.in_flight(s) or s in self._pinned for s in seq_ids):
            self._waiters += 1
            try:
                await self._settled.wait()
            finally:
                self._waiters -= 1

    def _notify_settled(self) -> None:
        event, self._settled = self._settled, asyncio.Event()
        event.set()

    def _check_buckets(self, S: int, positions: np.ndarray) -> None:
        """INVALID_ARGUMENT for a step no compiled shape bucket covers (device backends compile
        only at start); past max_context the cache answers OUT_OF_RANGE instead."""
        store = self.cache.store
        if store.max_s_active is not None and store.max_s_active < S:
            raise InvalidArgument(
                f"q.shape[2]: S={S} exceeds the largest compiled s_active bucket {store.max_s_active} of backend "
                f"{store.backend}; expected at most {store.max_s_active}"
            )
        limit = store.max_context
        if limit is not None and limit < self.spec.max_context and positions.size:
            ends = positions + S
            b = int(ends.argmax())
            if limit < ends[b] <= self.spec.max_context:
                raise InvalidArgument(
                    f"positions[{b}]: {int(positions[b])} + S={S} tokens exceeds the largest compiled context bucket "
                    f"{limit} of backend {store.backend} (--context-buckets); expected at most {limit} tokens"
                )

    def _lone_caller(self) -> bool:
        """One caller has been alone for LONE_STREAK batches and nothing else is in flight."""
        return self._lone_streak > LONE_STREAK and self._decoding <= 1 and self._inflight <= 1

    # ---- the batch -------------------------------------------------------------------------

    async def _run_batch(self, batch: list[DecodeWork]) -> None:
        """Prepare the batch (one plan per tenant's run of requests; per request only to single out
        a failing one), append all, one kernel launch, split the output (`_launch`).

        A launch on the worker thread holds its plans' blocks from commit to the kernel's end
        (`KVCache.commit(hold=True)`); an inline one needs no hold (nothing else runs on the loop
        meanwhile). Any failure in between rolls back exactly this step's appends and gives every
        caller still waiting the real error. `Timing.kernel_us` is the step's span from here to
        its plans' finish (prepare, append, kernel, finish); `attention_us` the kernel call alone."""
        t_start = time.perf_counter()
        S = batch[0].s_active
        ready, plans = self._prepare(batch, S)
        if not ready:
            return
        try:
            await self._launch(ready, plans, S, t_start)
        except asyncio.CancelledError:
            raise  # the step is undone once the kernel thread has let go (`_kernel_done`)
        except Exception as exc:
            if not isinstance(exc, ServiceError):  # the kernel failing is a server bug: report it, keep serving
                log.exception("decode step failed for layer %d, %d requests", batch[0].layer, len(ready))
                exc = ServiceError(f"kernel: {type(exc).__name__}: {exc}")
            for work in ready:
                if not work.future.done():  # a cancelled caller must not hide the error from the rest
                    work.future.set_exception(exc)
        if self._waiters:  # let mutations waiting for this launch apply before the next batch prepares
            await asyncio.sleep(0)

    def _deliver(
        self, ready: list[DecodeWork], out: np.ndarray, lens: np.ndarray, attention_s: float, t_start: float
    ) -> None:
        """The step is over (plans finished): metrics, and each caller's rows of `out` with its Timing."""
        kernel_s = time.perf_counter() - t_start
        self.metrics.observe_batch(len(lens), kernel_s, [t_start - w.arrival for w in ready])
        kernel_us, attention_us, size = int(kernel_s * 1e6), int(attention_s * 1e6), len(lens)
        row = 0
        for work in ready:
            timing = pb.Timing(
                queue_us=int((t_start - work.arrival) * 1e6), kernel_us=kernel_us, attention_us=attention_us,
                batch_size=size, batch_requests=len(ready),
            )  # fmt: skip
            if not work.future.done():  # a cancelled caller's rows are appended all the same
                work.future.set_result((out[row : row + work.size], timing))
            row += work.size

    def _prepare(self, batch: list[DecodeWork], S: int) -> tuple[list[DecodeWork], list[tuple[Any, AppendPlan]]]:
        """Reserve the batch's appends. A batch of one tenant's requests takes one `prepare_append`
        over all its sequences (its cost is per call, not per sequence); when that fails, or the
        batch mixes tenants (blocks are charged per tenant), one per request, so that only the
        failing requests get their error. Returns the requests that go ahead, in batch order, and
        their (tenant, plan)s, each plan covering the next `plan.batch_size` of their rows."""
        cache = self.cache
        tenant = batch[0].tenant
        if len(batch) > 1 and all(w.tenant is tenant for w in batch):
            plan = None
            try:
                ids = [sid for work in batch for sid in work.seq_ids]
                plan = cache.prepare_append(batch[0].layer, ids, np.concatenate([w.positions for w in batch]), S)
                self._charge_blocks(tenant, plan)
                return batch, [(tenant, plan)]
            except ServiceError:
                pass  # nothing was reserved; find out which requests fail
        ready, plans = [], []
        for work in batch:
            try:
                plan = cache.prepare_append(work.layer, work.seq_ids, work.positions, S)
                self._charge_blocks(work.tenant, plan)
            except ServiceError as exc:
                if not work.future.done():
                    work.future.set_exception(exc)
                continue
            ready.append(work)
            plans.append((work.tenant, plan))
        return ready, plans

    async def _launch(
        self, ready: list[DecodeWork], plans: list[tuple[Any, AppendPlan]], S: int, t_start: float
    ) -> None:
        """Commit every prepared plan, run the kernel, finish the plans and answer the callers
        (`_deliver`); on any failure abort/roll back every plan of the step and re-raise.

        A launch on the worker thread is finished and answered by `_kernel_done`, which the
        thread schedules on the loop as its last act: on the loop's first pass after the kernel,
        not a pass or two later when this coroutine resumes (under load each pass runs every
        other call's ready work first)."""
        cache, spec = self.cache, self.spec
        layer = ready[0].layer
        done: asyncio.Future | None = None
        try:
            if len(ready) == 1:
                q, k, v = ready[0].q, ready[0].k, ready[0].v
            else:
                q, k, v = (np.concatenate([getattr(w, x) for w in ready]) for x in "qkv")
            if self._rope is not None:
                pos = np.concatenate([w.positions for w in ready])[:, None] + np.arange(S)[None, :]  # [B, S]
                q, k = self._rope.rotate_qk(q, k, pos)  # once for the whole batch's q and k
            k, v = self._stored(layer, k, v)
            lens = np.concatenate([p.seq_lens for _, p in plans]) if len(plans) > 1 else plans[0][1].seq_lens
            inline = self._inline(ready, int(lens.sum()) * self._kv_token_bytes)
            row = 0
            for tenant, plan in plans:
                n = plan.batch_size
                with self._pool_delta(tenant):
                    # A launch on the worker thread holds the blocks it reads while the loop goes on;
                    # an inline one runs before the loop can apply anything else: no hold needed.
                    cache.commit(plan, k[row : row + n], v[row : row + n], hold=not inline)
                row += n
            tables = _stack_tables([p.block_tables for _, p in plans])
            store = cache.store
            new_kv = (k, v) if store.reads_new_kv else (None, None)  # device stores send the new tokens with the step
            kernel = functools.partial(
                _timed, store.decode, layer, q, *new_kv, tables, lens,
                scale=spec.softmax_scale, window=spec.window(layer), sinks=spec.layer_sinks(layer),
                **self._kernel_options(inline), **self._scale_options(layer),
            )  # fmt: skip
            if inline:
                out, attention_s = kernel()
            else:
                loop = asyncio.get_running_loop()
                job = self._kernel_thread.submit(kernel)
                done = loop.create_future()
                step = (ready, plans, lens, t_start, done)
                job.add_done_callback(lambda job: _call_on(loop, self._kernel_done, job, *step))
        except BaseException:
            self._undo(plans)
            raise
        if done is None:
            if self._waiters:  # nobody waits on the event otherwise: no need to replace it
                self._notify_settled()
            self._deliver(ready, out, lens, attention_s, t_start)
            return
        await done  # cancelled: `_kernel_done` undoes the step once the thread has let go

    def _kernel_done(
        self, job: Any, ready: list[DecodeWork], plans: list[tuple[Any, AppendPlan]], lens: np.ndarray,
        t_start: float, done: asyncio.Future,
    ) -> None:
        """On the loop, as soon as the worker thread's kernel is over: finish the plans and answer
        the callers; or, when the kernel failed or the batch's task was cancelled meanwhile, undo
        the step. Resolves `done` (what `_launch` waits for)."""
        try:
            out, attention_s = job.result()
            if done.cancelled():
                raise asyncio.CancelledError
            for tenant, plan in plans:
                with self._pool_delta(tenant):
                    self.cache.finish(plan)
        except BaseException as exc:
            self._undo(plans)
            if not done.done():
                done.set_exception(exc)
            return
        try:
            self._notify_settled()
            self._deliver(ready, out, lens, attention_s, t_start)
        except BaseException as exc:  # a bug here must still end the step (`_run_batch` reports it)
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)

    def _undo(self, plans: list[tuple[Any, AppendPlan]]) -> None:
        """All-or-nothing: the failed step leaves no tokens and no held blocks behind."""
        for tenant, plan in plans:
            with self._pool_delta(tenant):
                if plan.state == "prepared":
                    self.cache.abort(plan)
                elif plan.state in ("held", "committed"):
                    self.cache.rollback(plan)
        self._notify_settled()

    def _inline(self, ready: list[DecodeWork], kv_bytes: int) -> bool:
        """Run this launch on the loop thread? Handing a launch to the worker thread and back
        costs ~50-100 us of loop time. It buys a loop free to accept the next calls while the
        kernel runs (grpc.aio accepts one call per loop pass), which is what lets batches form
        under load. A lone caller gains nothing from it, so after LONE_STREAK batches in a row of
        one request for the same sequences with nothing else in flight, its kernel runs on the loop
        up to `lone_inline_bytes`; the first overlapping call (seen in `_inflight`) switches back.
        The same sequences: grpc.aio starts one call per loop pass, so a burst of new callers would
        each look alone, run inline one by one and never batch; a change of sequences restarts the
        streak instead. A launch reading less KV than the hand-off costs always runs on the loop."""
        ids = ready[0].seq_ids if len(ready) == 1 else None
        lone = ids is not None and self._decoding <= 1 and self._inflight <= 1 and not self.batcher.pending
        if not lone:
            self._lone_streak = 0
        else:  # another caller's first lone launch starts a new streak at 1
            self._lone_streak = self._lone_streak + 1 if ids == self._lone_ids else 1
        self._lone_ids = ids
        if kv_bytes <= self.opts.inline_kernel_bytes:
            return True
        return self._lone_streak > LONE_STREAK and kv_bytes <= self.opts.lone_inline_bytes

    @contextlib.contextmanager
    def _pool_delta(self, tenant: auth.Tenant) -> Iterator[None]:
        """Charge `tenant` with the KV blocks the enclosed cache operation takes or returns
        (one tenant's operation touches only its own sequences' blocks)."""
        free = self.cache.free_blocks
        try:
            yield
        finally:
            if self.cache.free_blocks != free:
                self.ledger.blocks_changed(tenant, free - self.cache.free_blocks)

    def _add_sequence(self, tenant: auth.Tenant, make: Callable[[], SequenceState]) -> SequenceState:
        """A new sequence of `tenant` made by `make` (create, fork, import) within its quotas: the
        sequence count is checked first, the blocks it took after; past max_blocks the sequence
        is released again (nothing changed) and RESOURCE_EXHAUSTED raised."""
        self.ledger.check_sequence(tenant)
        free = self.cache.free_blocks
        state = make()
        taken = free - self.cache.free_blocks
        try:
            self.ledger.check_blocks(tenant, taken)
        except ServiceError:
            self.cache.release(state.seq_id)
            raise
        self.ledger.sequences_changed(tenant, 1)
        self.ledger.blocks_changed(tenant, taken)
        return state

    def _charge_blocks(self, tenant: auth.Tenant, plan: Any) -> None:
        """Charge a prepared append's reservation to `tenant`; past its max_blocks quota the plan
        is aborted (nothing changed) and RESOURCE_EXHAUSTED raised."""
        if plan.reserved_blocks:
            try:
                self.ledger.check_blocks(tenant, plan.reserved_blocks)
            except ServiceError:
                self.cache.abort(plan)
                raise
            self.ledger.blocks_changed(tenant, plan.reserved_blocks)

    def _kernel_options(self, inline: bool) -> dict[str, Any]:
        """Options of one launch for the store's kernel: the `cpu` kernel's thread cap (`kernel_threads`)."""
        if self.opts.backend != "cpu":
            return {}
        return {"max_threads": kernel_threads(self._cores, inline)}

    async def _decode_one(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        return await self._decode_work(req, self._validate_decode(req))

    async def _decode_work(self, req: pb.DecodeRequest, work: DecodeWork) -> pb.DecodeResponse:
        """Queue a validated request (`_validate_decode`) and build its response."""
        # The tenant's share of the queue first, then the server-wide cap (in the batcher).
        tenants = self.tenant_count()
        self.ledger.enter_pending(work.tenant, max(1, self.opts.max_pending // tenants) if tenants > 1 else None)
        self._decoding += 1
        try:
            out, timing = await self.batcher.decode(work)  # RESOURCE_EXHAUSTED when the queue is full
        finally:
            self._decoding -= 1
            self.ledger.leave_pending(work.tenant)
        resp = pb.DecodeResponse(request_id=req.request_id, layer=req.layer, timing=timing)
        codec.encode(out, resp.out)
        resp.timing.total_us = int((time.perf_counter() - work.arrival) * 1e6)
        return resp

    # ---- RPCs ------------------------------------------------------------------------------

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> pb.ServerInfo:
        return await self._unary("GetServerInfo", context, lambda: self.server_info())

    async def CreateSequence(self, request: pb.CreateSequenceRequest, context: Any) -> pb.SequenceInfo:
        def run() -> pb.SequenceInfo:
            tenant = auth.current().tenant
            if request.sequence_id:
                self._check_id("sequence_id", request.sequence_id)
            seq_id = inward(tenant, request.sequence_id or uuid.uuid4().hex)
            return self._seq_info(self._add_sequence(tenant, lambda: self.cache.create(seq_id)))

        return await self._unary("CreateSequence", context, run)

    async def GetSequence(self, request: pb.GetSequenceRequest, context: Any) -> pb.SequenceInfo:
        def run() -> pb.SequenceInfo:
            self._check_id("sequence_id", request.sequence_id)
            return self._seq_info(self.cache.get(inward(auth.current().tenant, request.sequence_id)))

        return await self._unary("GetSequence", context, run)

    async def TruncateSequence(self, request: pb.TruncateSequenceRequest, context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            tenant = auth.current().tenant
            self._check_id("sequence_id", request.sequence_id)
            seq_id = inward(tenant, request.sequence_id)
            await self._settle(seq_id)
            with self._pool_delta(tenant):
                self.cache.truncate(seq_id, request.length)
            return self._seq_info(self.cache.get(seq_id))

        return await self._unary("TruncateSequence", context, run)

    async def ForkSequence(self, request: pb.ForkSequenceRequest, context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            tenant = auth.current().tenant
            self._check_id("source_id", request.source_id)
            if request.sequence_id:
                self._check_id("sequence_id", request.sequence_id)
            source = inward(tenant, request.source_id)
            await self._settle(source)
            seq_id = inward(tenant, request.sequence_id or uuid.uuid4().hex)
            # Takes blocks for the copied partial blocks only (full ones are shared).
            return self._seq_info(self._add_sequence(tenant, lambda: self.cache.fork(source, seq_id)))

        return await self._unary("ForkSequence", context, run)

    async def ReleaseSequence(self, request: pb.ReleaseSequenceRequest, context: Any) -> pb.ReleaseSequenceResponse:
        async def run() -> pb.ReleaseSequenceResponse:
            tenant = auth.current().tenant
            self._check_id("sequence_id", request.sequence_id)
            seq_id = inward(tenant, request.sequence_id)
            await self._settle(seq_id)
            with self._pool_delta(tenant):
                freed = self.cache.release(seq_id)
            self.ledger.sequences_changed(tenant, -1)
            return pb.ReleaseSequenceResponse(freed_blocks=freed)

        return await self._unary("ReleaseSequence", context, run)

    async def Decode(self, request: pb.DecodeRequest, context: Any) -> pb.DecodeResponse:
        return await self._unary("Decode", context, lambda: self._decode_one(request))

    async def AppendKV(self, request_iterator: AsyncIterator[pb.AppendKVRequest], context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            tenant = auth.current().tenant
            self.ledger.open_stream(tenant)
            try:
                seq_id = None
                async for chunk in request_iterator:
                    if seq_id is None:
                        self._check_id("sequence_id", chunk.sequence_id)
                        seq_id = chunk.sequence_id
                    elif chunk.sequence_id != seq_id:
                        raise InvalidArgument(
                            f"sequence_id: {chunk.sequence_id!r}; expected {seq_id!r} "
                            "(one sequence per AppendKV stream)"
                        )
                    await self._settle(inward(tenant, seq_id))
                    self._append_chunk(chunk, tenant)
                if seq_id is None:
                    raise InvalidArgument("AppendKV: empty stream; expected at least one chunk")
                return self._seq_info(self.cache.get(inward(tenant, seq_id)))
            finally:
                self.ledger.close_stream(tenant)

        return await self._unary("AppendKV", context, run)

    def _append_chunk(self, chunk: pb.AppendKVRequest, tenant: auth.Tenant) -> None:
        """One chunk, all-or-nothing; earlier chunks of the stream stay appended."""
        s = self.spec
        self._check_layer(chunk.layer)
        k = self._tensor(chunk.k, "k", (None, s.num_kv_heads, s.head_dim), "[T, num_kv_heads, head_dim]")
        T = k.shape[0]
        if T < 1:
            raise InvalidArgument("k.shape[0]: 0 tokens; expected at least 1")
        v = self._tensor(chunk.v, "v", (T, s.num_kv_heads, s.head_dim), "[T, num_kv_heads, head_dim]")
        # The cache checks these too; checking here names this RPC's own field (`position`).
        seq_id = inward(tenant, chunk.sequence_id)
        length = self.cache.get(seq_id).lengths[chunk.layer]
        if chunk.position != length:
            raise FailedPrecondition(
                f"position: {chunk.position} is not sequence {chunk.sequence_id!r}'s length at layer {chunk.layer}; "
                f"expected {length} (chunks must be contiguous)"
            )
        if length + T > s.max_context:
            raise OutOfRange(
                f"position: {chunk.position} + {T} tokens exceeds max_context for sequence {chunk.sequence_id!r}; "
                f"expected at most {s.max_context} tokens"
            )
        if self._rope is not None:
            cos, sin = self._rope.lookup((chunk.position + np.arange(T))[None, :])
            k = rotate(k.transpose(1, 0, 2)[None], cos, sin)[0].transpose(1, 0, 2)
        plan = self.cache.prepare_append(chunk.layer, [seq_id], [chunk.position], T)
        self._charge_blocks(tenant, plan)
        with self._pool_delta(tenant):
            k, v = self._stored(chunk.layer, k, v)
            self.cache.commit(plan, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])

    async def ExportSequence(self, request: pb.ExportSequenceRequest, context: Any) -> AsyncIterator[pb.SequenceChunk]:
        """The sequence's header and K/V, every layer (see `tkg.server.migration`). Waits for a
        launch holding it; truncate/release/fork of it wait until the stream is done."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = auth.current().tenant
        seq_id = inward(tenant, request.sequence_id)
        self._enter()
        pinned = False
        try:
            self._check_access("ExportSequence", context)
            self._check_id("sequence_id", request.sequence_id)
            await self._settle(seq_id)
            self.cache.get(seq_id)  # NOT_FOUND before the stream starts
            self._pinned[seq_id] += 1
            pinned = True
            for msg in self.export_messages(seq_id):
                msg.sequence_id = request.sequence_id  # the caller's id, without the tenant prefix
                yield msg
        except ServiceError as exc:
            code = exc.code
            await context.abort(exc.code, scrub(exc, tenant).message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("ExportSequence failed")
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"server: {type(exc).__name__}: {exc}")
        finally:
            if pinned:
                self._pinned[seq_id] -= 1
                if not self._pinned[seq_id]:
                    del self._pinned[seq_id]
                self._notify_settled()
            self._leave()
            self.metrics.observe_request("ExportSequence", _code_name(code), time.perf_counter() - t0, tenant.name)

    def export_messages(self, seq_id: str) -> Iterator[pb.SequenceChunk]:
        tokens = migration.chunk_tokens(self.cache, self.opts.max_message_bytes)
        return migration.export_messages(
            self.cache, seq_id, self._kv_code, self.spec.fuse_rope, self.instance_id, tokens
        )

    async def ImportSequence(self, request_iterator: AsyncIterator[pb.SequenceChunk], context: Any) -> pb.SequenceInfo:
        """Accepts exactly what ExportSequence streams; all-or-nothing."""

        async def run() -> pb.SequenceInfo:
            tenant = auth.current().tenant
            tensor = functools.partial(self._tensor, code=self._kv_code)  # exported K/V travel as stored
            importer = migration.Importer(self.cache, self._kv_code, self.spec.fuse_rope, tensor)
            async for msg in request_iterator:
                if msg.sequence_id:
                    if importer.header is None:
                        self._check_id("sequence_id", msg.sequence_id)
                    msg.sequence_id = inward(tenant, msg.sequence_id)  # into the caller's namespace
                importer.add(msg)
            return self._seq_info(self._add_sequence(tenant, importer.install))

        return await self._unary("ImportSequence", context, run)

    async def DecodeStream(
        self, request_iterator: AsyncIterator[pb.DecodeRequest], context: Any
    ) -> AsyncIterator[pb.DecodeResponse]:
        """Pipelined decode: every message is validated and queued as it arrives; responses come
        back in request order; a failing message gets an `error` response and the stream goes on.

        At most STREAM_WINDOW messages are read ahead of the reply being sent: a caller that does
        not read its replies stops the server reading its requests (gRPC flow control then holds
        the sender). When the stream ends, work still queued for it is cancelled."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = auth.current().tenant
        try:
            self._check_access("DecodeStream", context)
            self.ledger.open_stream(tenant)
        except ServiceError as exc:
            self.metrics.observe_request("DecodeStream", _code_name(exc.code), time.perf_counter() - t0, tenant.name)
            await context.abort(exc.code, exc.message)
        self._enter()
        # What was read but not yet answered, in request order, then the end marker: a task per
        # message still queued or running, or its response when it was answered as it was read.
        results: asyncio.Queue[asyncio.Task | pb.DecodeResponse | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    t0, work = self._stream_begin(req)
                    if type(work) is not DecodeWork:  # invalid: answered now, no task
                        await results.put(work)
                    elif results.empty() and not self._decoding and self._lone_caller():
                        # Nothing else in flight and a lone caller: its launch runs on the loop
                        # whether in a task or here (`Batcher.decode`, `_inline`); here it costs
                        # no task and no extra loop pass per message.
                        await results.put(await self._stream_one(req, t0, work))
                    else:
                        task = asyncio.ensure_future(self._stream_one(req, t0, work))
                        try:
                            await results.put(task)  # waits while the window is full: no more reading
                        except asyncio.CancelledError:
                            task.cancel()
                            raise
            except asyncio.CancelledError:
                raise
            except Exception:  # the caller's half of the stream broke: answer what was read
                log.debug("DecodeStream: reading the requests failed", exc_info=True)
            await results.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await results.get()) is not None:
                yield item if type(item) is pb.DecodeResponse else await item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            reader.cancel()
            while not results.empty():  # the stream ended with work still queued: drop it
                item = results.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()
            self.ledger.close_stream(tenant)
            self._leave()
            self.metrics.observe_request("DecodeStream", _code_name(code), time.perf_counter() - t0, tenant.name)

    def _stream_begin(self, req: pb.DecodeRequest) -> tuple[float, DecodeWork | pb.DecodeResponse]:
        """(arrival time, the validated work) of a stream message, or its error response."""
        t0 = time.perf_counter()
        try:
            if self.draining:
                raise Unavailable("server: draining for shutdown; expected a retry on another replica")
            return t0, self._validate_decode(req)
        except Exception as exc:
            return t0, self._stream_failed(req, t0, exc)

    async def _stream_one(self, req: pb.DecodeRequest, t0: float, work: DecodeWork) -> pb.DecodeResponse:
        try:
            resp = await self._decode_work(req, work)
        except Exception as exc:
            return self._stream_failed(req, t0, exc)
        self.metrics.observe_request("DecodeStream.message", "OK", time.perf_counter() - t0, work.tenant.name)
        return resp

    def _stream_failed(self, req: pb.DecodeRequest, t0: float, exc: Exception) -> pb.DecodeResponse:
        """The error response of a failed stream message (the stream goes on), counted by code."""
        if isinstance(exc, ServiceError):
            code = exc.code
            resp = _error_response(req, code, scrub(exc, auth.current().tenant).message)
        else:  # a server bug fails this message, not the stream
            log.error("DecodeStream message %r failed", req.request_id[:LOG_ID_CHARS], exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            resp = _error_response(req, code, f"server: {type(exc).__name__}: {exc}")
        self.metrics.observe_request(
            "DecodeStream.message", _code_name(code), time.perf_counter() - t0, auth.current().tenant.name
        )
        return resp

    async def _unary(self, method: str, context: Any, run: Callable[[], Any]) -> Any:
        """Guard, run, map ServiceError to its status code, record the duration by code."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        self._enter()
        try:
            self._check_access(method, context)
            result = run()
            if isinstance(result, Awaitable):
                result = await result
            return result
        except ServiceError as exc:
            code = exc.code
            await context.abort(exc.code, scrub(exc, auth.current().tenant).message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # a server bug: say so with INTERNAL instead of gRPC's bare UNKNOWN
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"server: {type(exc).__name__}: {exc}")
        finally:
            self._leave()
            self.metrics.observe_request(method, _code_name(code), time.perf_counter() - t0, auth.current().tenant.name)


# Per float dtype: the unsigned view, the bits below the sign, and the exponent bits. The
# exponent is the top of the bits below the sign, so a value is NaN or infinite exactly when those
# bits, read as an unsigned integer, reach the all-ones exponent.
_EXPONENT = {
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    BF16: (np.uint16, 0x7FFF, 0x7F80),
    FP8: (np.uint8, 0x7F, 0x78),
}


def _harmless_top_bytes(mask: int) -> bytes:
    """Values of a little-endian float's top byte (the sign and the exponent's high bits, `mask`)
    that leave an exponent bit clear: a value whose top byte is one of them is finite."""
    return bytes(b for b in range(256) if b & mask != mask)


# Per float dtype: bytes per value and the harmless top bytes (`_harmless_top_bytes`).
_TOP_BYTE = {
    np.dtype(np.float32): (4, _harmless_top_bytes(0x7F)),
    np.dtype(np.float16): (2, _harmless_top_bytes(0x7C)),
    BF16: (2, _harmless_top_bytes(0x7F)),
    FP8: (1, _harmless_top_bytes(0x78)),
}


def finite_bytes(data: bytes, dtype: np.dtype) -> bool:
    """No NaN or infinity among the little-endian `dtype` values in `data` (a tensor's wire bytes).

    Two C loops over bytes (every value's top byte, then deleting the harmless ones), no numpy:
    on a request's path numpy's call machinery, cold after the kernel, cost ~20 us per request
    on the build machine for what these do in a few. Top bytes that could hold a NaN or infinity
    (or a finite value near the dtype's limit) get the exact check (`all_finite`)."""
    size, harmless = _TOP_BYTE[dtype]
    if not data[size - 1 :: size].translate(None, harmless):
        return True
    return all_finite(np.frombuffer(data, dtype))


def all_finite(*arrays: np.ndarray) -> bool:
    """No NaN or infinity in any of `arrays` (one dtype: float32/float16/bfloat16/float8_e4m3),
    read as integers: `max(bits & ~sign) < exponent` over all of them in one pass (two numpy
    calls), ~8x faster than `np.isfinite` on bfloat16, whose ufuncs go through ml_dtypes'
    generic loops. `finite_bytes` is cheaper still on a request's wire bytes."""
    uint, magnitude, exponent = _EXPONENT[arrays[0].dtype]
    views = [a.view(uint).reshape(-1) for a in arrays]
    bits = views[0] if len(views) == 1 else np.concatenate(views)
    if not bits.size:
        return True
    return int(np.bitwise_and(bits, magnitude).max()) < exponent


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask; a cgroup CPU quota is not looked at)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def kernel_threads(cores: int, inline: bool) -> int:
    """Threads the kernel may use for one launch out of `cores`.

    On the event loop (inline) the loop waits for the kernel anyway, so it gets every core. On the
    worker thread the loop goes on receiving, (de)serializing and answering calls during the
    launch; a kernel on every core would preempt it (and be preempted: its fork-join then waits
    for the slowest thread), so it leaves the loop one core. Idle kernel workers sleep (the native
    pool never spins), so an unused core costs nothing."""
    return max(1, cores if inline else cores - 1)


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` on `loop`'s thread, from another thread (dropped once the loop is closed)."""
    with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody left to answer
        loop.call_soon_threadsafe(fn, *args)


def _timed(fn: Callable[..., np.ndarray], *args: Any, **kwargs: Any) -> tuple[np.ndarray, float]:
    """`fn(*args, **kwargs)` and the seconds it took (measured on the thread that runs it)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _error_response(req: pb.DecodeRequest, code: grpc.StatusCode, message: str) -> pb.DecodeResponse:
    error = pb.Error(code=code.value[0], message=message)
    request_id = req.request_id if len(req.request_id) <= MAX_SEQUENCE_ID_LEN else req.request_id[:MAX_SEQUENCE_ID_LEN]
    return pb.DecodeResponse(request_id=request_id, layer=req.layer, error=error)


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
