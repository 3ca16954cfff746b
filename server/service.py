"""The `tkg.v1.DecodeAttention` servicer on grpc.aio: the RPC layer.

Owns the handlers, the calls in flight (drain and warm-up refusals), the mapping of `ServiceError`
to the contract's status codes, and the sequence RPCs' use of the KV cache. Every RPC validates
everything (`tkg.server.wire`) before it changes anything. Decode requests go through the
`Batcher` (`tkg.server.batcher`, which owns the scheduling policy) to the step engine
(`tkg.server.step`, which owns the step's plans, the kernel launch and its undo). Mutations of a
sequence wait for launches and exports holding it (`tkg.server.holds`). Every RPC that reads or
writes a sequence's KV runs inside `Tiers.using` (`tkg.server.tiers`: a spilled sequence comes
back first, and nothing spills it meanwhile) and takes device blocks inside `Tiers.room`. Tenant
usage is charged by the deltas the KV cache reports to the `Ledger` (`tkg.server.tenants`).

Threading: one event loop thread runs every handler and every KV-cache mutation (the cache has no
locks); only the kernel call of a worker-thread launch runs elsewhere (see `tkg.server.step`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from tkg import __version__, protowire
from tkg.protowire import DecodeRequestView
from tkg.server import identity, migration
from tkg.server.batcher import Batcher, DecodeWork, LoneCaller
from tkg.server.config import ModelSpec
from tkg.server.cores import CorePolicy, tune_gil
from tkg.server.errors import InvalidArgument, ServiceError, Unavailable
from tkg.server.holds import Holds
from tkg.server.kv_cache import EVICT_IDLE_TTL, KVCache, SequenceState
from tkg.server.metrics import Metrics
from tkg.server.settings import ServeSettings
from tkg.server.step import StepEngine
from tkg.server.streams import DecodeStreams
from tkg.server.tenants import Ledger, inward, outward, scrub, visible_free
from tkg.server.tiers import Tiers
from tkg.server.wire import WireChecks, check_id
from tkg.server.writes import Writes
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")


class DecodeAttentionService(pb_grpc.DecodeAttentionServicer):
    """The RPC handlers over one KV cache (see the module docstring).

    Args:
        spec: the model spec.
        cache: the KV cache; its meter must charge `ledger` (`KVCache(meter=ledger.charge)`).
        settings: the instance's settings (queue, batch delay, message size, inline bounds, cores).
        metrics: the instance's metrics (attached to the cache and the queue here).
        ledger: per-tenant usage against quotas.
        tenant_count: configured tenants now (each gets an even share of the decode queue); re-read
            per request, so a SIGHUP's new table counts at once.
        per_tenant_info: GetServerInfo counts the caller's tenant only (an auth file is in use).
        tiers: the host and disk KV tiers over `cache` (None: none, everything lives on the device).
    """

    def __init__(
        self, spec: ModelSpec, cache: KVCache, settings: ServeSettings, metrics: Metrics, ledger: Ledger,
        *, tenant_count: Callable[[], int] = lambda: 1, per_tenant_info: bool = False, tiers: Tiers | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.cache = cache
        self.settings = settings
        self.metrics = metrics
        self.ledger = ledger
        self.tenant_count = tenant_count
        self.per_tenant_info = per_tenant_info
        self.draining = False
        self.ready = False  # `mark_ready` once the kernel backend is warmed up (UNAVAILABLE until then)
        self.instance_id = uuid.uuid4().hex  # a restart gets a new one: clients tell it from expiry
        self.started_at = time.time()
        self.wire = WireChecks(spec, spec.max_batch, cache.store)
        self.holds = Holds(cache)
        self.tiers = tiers if tiers is not None else Tiers(cache, meter=ledger.charge)
        self._inflight = 0  # calls between entry and exit, streams included
        self._idle = asyncio.Event()
        self._idle.set()
        lone = LoneCaller(lambda: self._inflight, settings.inline_kernel_bytes, settings.lone_inline_bytes)
        cores = CorePolicy(settings.kernel_cores, cache.store.takes_max_threads)
        self.engine = StepEngine(spec, cache, ledger, self.holds, lone, cores, metrics)
        self.batcher = Batcher(
            self.engine.run, spec.max_batch, settings.batch_delay_us * 1e-6, settings.max_pending, lone
        )
        self.streams = DecodeStreams(self)
        self.writes = Writes(
            cache, self.engine, self.holds, ledger, self.wire, settings.inline_write_bytes, self.tiers
        )  # fmt: skip
        tune_gil()
        metrics.attach(cache, pending=lambda: self.batcher.pending, running=lambda: self.batcher.running)
        metrics.attach_tiers(self.tiers)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()
        self.tiers.start()

    def mark_ready(self) -> None:
        """The backend is warmed up: RPCs other than GetServerInfo stop answering UNAVAILABLE."""
        self.ready = True

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls; wait (up to `grace_s`) for in-flight ones."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            log.warning("drain: %d calls still in flight after %.1fs", self._inflight, grace_s)

    async def close(self) -> None:
        await self.batcher.stop()
        self.engine.close()
        await self.tiers.stop()

    def expire_idle(self) -> list[str]:
        """Release idle sequences; queued decodes and exports count as activity."""
        queued = self.batcher.queued_sequences()
        busy, moving = self.holds.busy, self.tiers.busy
        expired = self.cache.expire_idle(
            None, self.spec.idle_ttl_s, busy=lambda s: s in queued or busy(s) or moving(s)
        )  # fmt: skip
        spilled = self.tiers.expire(self.spec.idle_ttl_s)  # wall-clock ages: they survive restarts
        self.cache.evicted[EVICT_IDLE_TTL] += len(spilled)
        expired += spilled
        for seq_id in expired[: len(expired) - len(spilled)]:
            self.tiers.released(seq_id)  # a write-back log goes with its sequence
        for seq_id in expired:  # their blocks were charged back by the cache's meter
            self.ledger.drop_sequence(seq_id)
        if expired:
            log.info("expired %d idle sequences", len(expired))
        return [outward(e) for e in expired]

    # ---- guards ----------------------------------------------------------------------------

    def check_access(self, method: str) -> None:
        """Credentials were checked by `tkg.server.auth.Guard` before the request was
        parsed; here: draining and warming up."""
        if self.draining:
            raise Unavailable("server: draining for shutdown; expected a retry on another replica")
        if not self.ready and method != "GetServerInfo":
            raise Unavailable("server: warming up the kernel backend; expected a retry in a moment")

    def enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    # ---- info --------------------------------------------------------------------------------

    def _seq_info(self, state: SequenceState, tier: str = "device") -> pb.SequenceInfo:
        return pb.SequenceInfo(
            sequence_id=outward(state.seq_id), lengths=state.lengths, num_blocks=state.num_blocks,
            instance_id=self.instance_id, base_position=state.base_position, tier=tier,
        )  # fmt: skip

    def server_info(self) -> pb.ServerInfo:
        s = self.spec
        free, active = self.cache.free_blocks, len(self.cache) + len(self.tiers.index)
        if self.per_tenant_info:  # another tenant's usage is not this caller's business
            tenant = identity.current().tenant
            used = self.ledger.of(tenant)
            active = used.sequences
            free = visible_free(tenant, used.blocks, self.cache.num_blocks, free)
        return pb.ServerInfo(
            num_layers=s.num_layers, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, kv_dtype=self.wire.kv_code, io_dtype=self.wire.io_code, block_len=s.block_len,
            num_blocks=self.cache.num_blocks, free_blocks=free,
            max_s_active=s.max_s_active, max_batch=s.max_batch, fuse_rope=s.fuse_rope,
            backend=self.settings.backend, version=__version__, max_context=s.max_context,
            softmax_scale=s.softmax_scale, sliding_window=[w or 0 for w in s.sliding_window],
            has_sinks=s.sinks is not None, max_message_bytes=self.settings.max_message_bytes,
            model=s.name, active_sequences=active, instance_id=self.instance_id,
            started_at=self.started_at,
        )  # fmt: skip

    # ---- sequences and quotas ----------------------------------------------------------------

    def _add_sequence(self, tenant: identity.Tenant, make: Callable[[], SequenceState]) -> SequenceState:
        """A new sequence of `tenant` made by `make` (create, fork, import) within its quotas: the
        sequence count is checked first, the blocks it took (charged by the cache's meter) after;
        past max_blocks the sequence is released again (nothing changed) and RESOURCE_EXHAUSTED raised."""
        self.ledger.check_sequence(tenant)
        before = self.ledger.of(tenant).blocks
        state = make()
        try:
            self.ledger.check_charged(tenant, self.ledger.of(tenant).blocks - before)
        except ServiceError:
            self.cache.release(state.seq_id)
            raise
        self.ledger.sequences_changed(tenant, 1)
        return state

    # ---- Decode ------------------------------------------------------------------------------

    async def decode(self, req: pb.DecodeRequest | DecodeRequestView, wire: bool = False) -> Any:
        """One Decode request of the calling tenant (`identity.current()`): validate, queue, answer.
        What the Decode RPC runs inside its guard (`wire`: the answer as its wire bytes, out copied
        once); in-process callers (tests, benchmarks) use it too and get the message."""
        return await self.decode_work(req, self.wire.decode(req, identity.current().tenant), wire)

    async def decode_work(
        self, req: pb.DecodeRequest | DecodeRequestView, work: DecodeWork, wire: bool = False
    ) -> Any:
        """Queue a validated request and build its response: the message, or with `wire` its
        bytes (`protowire.decode_response_bytes`; `total_us` then stops before out is copied in)."""
        # The tenant's share of the queue first, then the server-wide cap (in the batcher).
        tenants = self.tenant_count()
        max_pending = self.settings.max_pending
        self.ledger.enter_pending(work.tenant, max(1, max_pending // tenants) if tenants > 1 else None)
        tiers = self.tiers
        try:
            if tiers.enabled:  # spilled sequences come back, then room for the step's new blocks
                async with tiers.using(work.seq_ids):
                    need = 0  # known only once they are back
                    if not work.attend_only:
                        need = self.cache.blocks_needed(work.layer, work.seq_ids, work.s_active, work.positions)
                    async with tiers.room(need):
                        out, timing = await self.batcher.decode(work)
            else:
                out, timing = await self.batcher.decode(work)  # RESOURCE_EXHAUSTED when the queue is full
        finally:
            self.ledger.leave_pending(work.tenant)
        if wire:
            timing.total_us = int((time.perf_counter() - work.arrival) * 1e6)
            return protowire.decode_response_bytes(req.request_id, req.layer, out, timing, work.lse)
        resp = protowire.decode_response_message(req.request_id, req.layer, out, timing, work.lse)
        resp.timing.total_us = int((time.perf_counter() - work.arrival) * 1e6)
        return resp

    # ---- RPCs ------------------------------------------------------------------------------

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> pb.ServerInfo:
        return await self._unary("GetServerInfo", context, lambda: self.server_info())

    async def CreateSequence(self, request: pb.CreateSequenceRequest, context: Any) -> pb.SequenceInfo:
        def run() -> pb.SequenceInfo:
            tenant = identity.current().tenant
            if request.sequence_id:
                check_id("sequence_id", request.sequence_id)
            seq_id = inward(tenant, request.sequence_id or uuid.uuid4().hex)
            base = request.base_position  # keys at base + i: a context-parallel segment (0: as before)
            return self._seq_info(self._add_sequence(tenant, lambda: self.cache.create(seq_id, base)))

        return await self._unary("CreateSequence", context, run)

    async def GetSequence(self, request: pb.GetSequenceRequest, context: Any) -> pb.SequenceInfo:
        def run() -> pb.SequenceInfo:
            check_id("sequence_id", request.sequence_id)
            return self._seq_info(*self.tiers.state(inward(identity.current().tenant, request.sequence_id)))

        return await self._unary("GetSequence", context, run)

    async def PrefetchSequence(self, request: pb.PrefetchSequenceRequest, context: Any) -> pb.SequenceInfo:
        """Bring a spilled sequence back to the device; answers once it is there (at once when it
        already is). NOT_FOUND like GetSequence; RESOURCE_EXHAUSTED when no room can be made."""

        async def run() -> pb.SequenceInfo:
            check_id("sequence_id", request.sequence_id)
            seq_id = inward(identity.current().tenant, request.sequence_id)
            async with self.tiers.using([seq_id]):
                return self._seq_info(self.cache.get(seq_id))

        return await self._unary("PrefetchSequence", context, run)

    async def TruncateSequence(self, request: pb.TruncateSequenceRequest, context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            check_id("sequence_id", request.sequence_id)
            seq_id = inward(identity.current().tenant, request.sequence_id)
            async with self.tiers.using([seq_id]):
                await self.holds.settle(seq_id)
                await self.tiers.settle(seq_id)  # a write-back flush of it ends first
                self.cache.truncate(seq_id, request.length)
                await self.tiers.truncated(seq_id, request.length)  # persisted before it is acknowledged
                return self._seq_info(self.cache.get(seq_id))

        return await self._unary("TruncateSequence", context, run)

    async def ForkSequence(self, request: pb.ForkSequenceRequest, context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            tenant = identity.current().tenant
            check_id("source_id", request.source_id)
            if request.sequence_id:
                check_id("sequence_id", request.sequence_id)
            source = inward(tenant, request.source_id)
            async with self.tiers.using([source]):
                await self.holds.settle(source)
                seq_id = inward(tenant, request.sequence_id or uuid.uuid4().hex)
                # Takes blocks for the copied partial blocks only (full ones are shared).
                async with self.tiers.room(self.cache.fork_cost(source)):
                    return self._seq_info(self._add_sequence(tenant, lambda: self.cache.fork(source, seq_id)))

        return await self._unary("ForkSequence", context, run)

    async def ReleaseSequence(self, request: pb.ReleaseSequenceRequest, context: Any) -> pb.ReleaseSequenceResponse:
        async def run() -> pb.ReleaseSequenceResponse:
            check_id("sequence_id", request.sequence_id)
            seq_id = inward(identity.current().tenant, request.sequence_id)
            await self.tiers.settle(seq_id)  # a spill or restore under way ends first
            if self.tiers.drop(seq_id):  # spilled: no device block to free
                freed = 0
            else:
                await self.holds.settle(seq_id)
                freed = self.cache.release(seq_id)
                self.tiers.released(seq_id)
            self.ledger.drop_sequence(seq_id)
            return pb.ReleaseSequenceResponse(freed_blocks=freed)

        return await self._unary("ReleaseSequence", context, run)

    async def Decode(self, request: pb.DecodeRequest | DecodeRequestView, context: Any) -> bytes:
        return await self._unary("Decode", context, lambda: self.decode(request, wire=True))

    async def AppendKV(self, request_iterator: AsyncIterator[pb.AppendKVRequest], context: Any) -> pb.SequenceInfo:
        async def run() -> pb.SequenceInfo:
            tenant = identity.current().tenant
            self.ledger.open_stream(tenant)
            try:
                seq_id = None
                async for chunk in request_iterator:
                    if seq_id is None:
                        check_id("sequence_id", chunk.sequence_id)
                        seq_id = chunk.sequence_id
                    elif chunk.sequence_id != seq_id:
                        raise InvalidArgument(
                            f"sequence_id: {chunk.sequence_id!r}; expected {seq_id!r} "
                            "(one sequence per AppendKV stream)"
                        )
                    async with self.tiers.using([inward(tenant, seq_id)]):
                        await self.holds.settle(inward(tenant, seq_id))
                        await self.writes.append_chunk(chunk, tenant)
                if seq_id is None:
                    raise InvalidArgument("AppendKV: empty stream; expected at least one chunk")
                return self._seq_info(self.cache.get(inward(tenant, seq_id)))
            finally:
                self.ledger.close_stream(tenant)

        return await self._unary("AppendKV", context, run)

    async def ExportSequence(self, request: pb.ExportSequenceRequest, context: Any) -> AsyncIterator[pb.SequenceChunk]:
        """The sequence's header and K/V, every layer (see `tkg.server.migration`). Waits for a
        launch holding it; truncate/release/fork of it wait until the stream is done."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = identity.current().tenant
        seq_id = inward(tenant, request.sequence_id)
        self.enter()
        counted = False
        try:
            self.check_access("ExportSequence")
            self.ledger.open_stream(tenant)  # one of the tenant's streams (max_streams)
            counted = True
            check_id("sequence_id", request.sequence_id)
            async with self.tiers.using([seq_id]):
                await self.holds.settle(seq_id)
                self.cache.get(seq_id)  # NOT_FOUND before the stream starts
                with self.holds.pinned(seq_id):
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
            if counted:
                self.ledger.close_stream(tenant)
            self.leave()
            self.metrics.observe_request("ExportSequence", code.name, time.perf_counter() - t0, tenant.name)

    def export_messages(self, seq_id: str) -> Iterator[pb.SequenceChunk]:
        """The ExportSequence stream of cache sequence `seq_id` (also what a drain pushes)."""
        tokens = migration.chunk_tokens(self.cache, self.settings.max_message_bytes)
        return migration.export_messages(
            self.cache, seq_id, self.wire.kv_code, self.spec.fuse_rope, self.instance_id, tokens,
            self.tiers.host_source(seq_id),  # a drain pushes host-tier sequences without restoring them
        )  # fmt: skip

    async def ImportSequence(self, request_iterator: AsyncIterator[pb.SequenceChunk], context: Any) -> pb.SequenceInfo:
        """Accepts exactly what ExportSequence streams; all-or-nothing."""

        async def run() -> pb.SequenceInfo:
            ident = identity.current()
            tenant = ident.tenant
            # A tenant's own import is one of its streams; a replica's drain (a peer credential) is
            # bounded by the drain's concurrency instead, so a rolling update never fails on it.
            counted = not ident.peer
            if counted:
                self.ledger.open_stream(tenant)

            def admit(blocks: int) -> None:  # the header's declared size, before anything is taken
                self.ledger.check_sequence(tenant)
                self.ledger.check_blocks(tenant, blocks)

            importer = migration.Importer(
                self.cache, self.wire.kv_code, self.spec.fuse_rope, self.wire.kv_tensor, admit
            )
            try:
                async for msg in request_iterator:
                    if msg.sequence_id:
                        if importer.header is None:
                            check_id("sequence_id", msg.sequence_id)
                        msg.sequence_id = inward(tenant, msg.sequence_id)  # into the caller's namespace
                    if importer.header is None and self.tiers.enabled:  # checked, then room for its blocks
                        async with self.tiers.room(importer.check_header(msg)):
                            job = importer.add(msg)
                    else:
                        job = importer.add(msg)
                    if job is None:
                        continue
                    await self.writes.run(*job)  # into blocks only this import names
                return self._seq_info(self._add_sequence(tenant, importer.install))
            finally:
                importer.abandon()  # a reservation not installed goes back
                if counted:
                    self.ledger.close_stream(tenant)

        return await self._unary("ImportSequence", context, run)

    async def DecodeStream(
        self, request_iterator: AsyncIterator[pb.DecodeRequest], context: Any
    ) -> AsyncIterator[bytes | pb.DecodeResponse]:
        """Pipelined decode (`tkg.server.streams`): every message validated and queued as it
        arrives, answered in request order (an answer's wire bytes); a failing message gets an
        `error` response (a message)."""
        async with contextlib.aclosing(self.streams.serve(request_iterator, context)) as replies:
            async for reply in replies:
                yield reply

    async def _unary(self, method: str, context: Any, run: Callable[[], Any]) -> Any:
        """Guard, run, map ServiceError to its status code, record the duration by code."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        self.enter()
        try:
            self.check_access(method)
            result = run()
            if isinstance(result, Awaitable):
                result = await result
            return result
        except ServiceError as exc:
            code = exc.code
            await context.abort(exc.code, scrub(exc, identity.current().tenant).message)
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
            self.leave()
            self.metrics.observe_request(method, code.name, time.perf_counter() - t0, identity.current().tenant.name)
