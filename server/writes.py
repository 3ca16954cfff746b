"""Bulk writes into the KV cache: AppendKV chunks and ImportSequence messages, on the event loop
or, above the loop's bound, on the kernel worker thread (issue #21 item 3: one 28 MiB AppendKV held
the loop ~190 ms, and every other caller's GetServerInfo with it).

The bound (`ServeSettings.inline_write_bytes`, default `INLINE_WRITE_BYTES`): the most K+V one
write may copy on the loop. Above it the concurrency rule
(architecture.md, fourth round) holds: the cache's bookkeeping stays on the loop; the loop
reserves the slots (`prepare_append`) and applies the tables and lengths without the store write
(`commit(defer=True)`, the plan held, so `Holds.settle` keeps truncate, release, fork and export
of the sequence waiting, as for a launch); the thread computes RoPE and the fp8 rounding of the
chunk's own arrays and writes them into the plan's slots (`write_deferred`); the loop then
finishes the plan, or rolls it back when the write failed or the call was cancelled
(`StepEngine.off_loop` returns only once the thread let go). An import writes into blocks it
reserved and no sequence names yet (`KVCache.write_reserved`).
"""

from __future__ import annotations

from collections.abc import Callable

from tkg.server.appends import ONE_SEQUENCE
from tkg.server.holds import Holds
from tkg.server.identity import Tenant
from tkg.server.kv_cache import KVCache
from tkg.server.step import StepEngine
from tkg.server.tenants import Ledger, inward
from tkg.server.tiers import Tiers
from tkg.server.wire import WireChecks
from tkg.v1 import decode_attention_pb2 as pb


class Writes:
    """AppendKV chunks and import writes (see the module docstring). Event loop only, but for
    what it hands to the worker thread.

    Args:
        bound: bytes of K+V a write may take on the loop; larger ones go to the worker thread.
    """

    def __init__(
        self, cache: KVCache, engine: StepEngine, holds: Holds, ledger: Ledger, wire: WireChecks, bound: int,
        tiers: Tiers | None = None,
    ) -> None:  # fmt: skip
        self.cache, self.engine, self.holds, self.ledger, self.wire = cache, engine, holds, ledger, wire
        self.bound = bound
        self.tiers = tiers if tiers is not None else Tiers(cache)

    async def run(self, write: Callable[[], None], size: int) -> None:
        """`write()` of `size` bytes: on the loop up to the bound, else on the worker thread
        (returns only once the thread let go of it, even when cancelled)."""
        if size <= self.bound:
            write()
        else:
            await self.engine.off_loop(write)

    async def append_chunk(self, chunk: pb.AppendKVRequest, tenant: Tenant) -> None:
        """One chunk, all-or-nothing; earlier chunks of the stream stay appended. The cache checks
        the position (contiguous per layer) and max_context, naming this RPC's fields; RoPE runs
        only once the position is known good.

        A chunk above the bound is checked (its tensors decoded and scanned for NaN/inf: the
        chunk's own bytes only) and written off the loop (see the module docstring)."""
        if len(chunk.k.data) + len(chunk.v.data) > self.bound:  # decoding and the finiteness scan, too
            k, v = await self.engine.off_loop(lambda: self.wire.append_chunk(chunk))
        else:
            k, v = self.wire.append_chunk(chunk)
        seq_id, layer, position = inward(tenant, chunk.sequence_id), chunk.layer, chunk.position
        need = self.cache.blocks_needed(layer, [seq_id], k.shape[0], [position])  # 0 for a bad position
        async with self.tiers.room(need):
            plan = self.cache.prepare_append(layer, [seq_id], [position], k.shape[0], ONE_SEQUENCE)
        try:
            self.ledger.check_charged(tenant, plan.reserved_blocks)  # the cache's meter charged it
        except BaseException:
            self.cache.abort(plan)
            raise
        engine = self.engine
        if k.nbytes + v.nbytes <= self.bound:
            try:
                k, v = engine.stored(layer, engine.rotate_chunk(k, position), v)
            except BaseException:
                self.cache.abort(plan)
                raise
            self.cache.commit(plan, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
            return
        self.cache.commit(plan, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], hold=True, defer=True)

        def write() -> None:  # on the kernel thread: the chunk's own arrays and the plan's slots only
            ks, vs = engine.stored(layer, engine.rotate_chunk(k, position), v)
            self.cache.write_deferred(plan, ks.transpose(1, 0, 2)[None], vs.transpose(1, 0, 2)[None])

        try:
            await engine.off_loop(write)
        except BaseException:
            self.cache.rollback(plan)
            raise
        else:
            self.cache.finish(plan)
        finally:
            self.holds.notify()
