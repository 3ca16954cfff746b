"""KV tiers: sequences past the device pool live in host memory or on disk, and come back on use.

Tier `device` is the KV cache's own store (`tkg.server.kv_cache`); tier `host` holds whole
sequences as numpy runs within `host_bytes`; tier `disk` holds them as files in a directory
(`tkg.server.spill_files`) within `disk_bytes`. A sequence lives whole in one tier. What the
cache does not hold is in `TierIndex` (the cache's `SequenceTable.outside`: its ids are taken and
count against `max_sequences`).

**Spill.** `room(n)` makes `n` device blocks available to its caller: while the pool's free
blocks less the blocks already promised to other callers fall short, the least recently used
idle resident sequence moves down: to `host` if it fits there (when the host is full, its records
used before the victim move on to `disk` first: `_demotions`), else to `disk` (idle: no append
in flight and not in `users`, which every RPC touching its KV joins, queued decodes and exports
included); RESOURCE_EXHAUSTED naming the full tiers when nothing can move. The promise lasts for
the `async with`: the caller takes its blocks inside it (so two callers never count the same
free block).

**Restore.** `using(ids)` brings each spilled sequence back (blocks reserved under a promise,
written off the loop, adopted in one loop step) and keeps all of them from being spilled until
the block exits; every RPC that reads or writes KV runs inside it. A restore that fails leaves the
sequence where it was; a corrupted file is dropped (NOT_FOUND, the reason logged).

**Threading.** Bookkeeping (index, promises, the cache) changes on the event loop only, with no
lock; the bulk copies (device <-> host runs, file reads and writes) run on the tiers' own threads
(`TIER_THREADS`), never the kernel thread, so a restore never delays a resident sequence's decode.
A thread only touches blocks no one else names (the spilled sequence's blocks, which nothing may
use meanwhile: it is in `moving`; or blocks reserved for a restore) and the run it was handed.

**Accounting.** A tenant's `max_blocks` counts its blocks in every tier: a spilled sequence is
charged its whole block count (sharing with a fork is lost once spilled) through the cache's meter,
under the sequence's own id (its owner, not the caller whose request caused the spill).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tkg.server import spill_files, tier_disk
from tkg.server.errors import NotFound, ResourceExhausted
from tkg.server.kv_cache import KVCache, SequenceState
from tkg.server.offload import run_on
from tkg.server.tier_index import Spilled, TierCounts, TierIndex, file_name
from tkg.server.writeback import WriteBack, log_payload

log = logging.getLogger("tkg.server")
T = TypeVar("T")

TIERS = ("device", "host", "disk")
TIER_THREADS = 2  # a restore need not wait behind another sequence's spill write


class Tiers:
    """The host and disk tiers of one cache, and the spills and restores between them.

    Args:
        cache: the device tier (its `seqs.outside` is set to this index here).
        host_bytes: the host tier's budget (0: no host tier).
        spill_dir: the disk tier's directory (None: no disk tier); adopted with `open_disk`.
        disk_bytes: the disk tier's budget (None: `default_disk_bytes`).
        meter: the cache's meter (`Ledger.charge`): blocks of spilled sequences stay charged.
        wall: wall-clock seconds (injectable for tests); the cache's own clock is monotonic.
        write_back: `--persist write-back` (with `spill_dir`): full blocks go to disk as they fill.
    """

    def __init__(
        self, cache: KVCache, *, host_bytes: int = 0, spill_dir: Path | None = None, disk_bytes: int | None = None,
        meter: Callable[[str, int], None] = lambda seq_id, delta: None,
        wall: Callable[[], float] = time.time, write_back: bool = False,
    ) -> None:  # fmt: skip
        if host_bytes < 0:
            raise ValueError(f"host_bytes: expected >= 0, got {host_bytes}")
        self.cache = cache
        self.index = TierIndex()
        cache.seqs.outside = self.index
        self.host_bytes = host_bytes
        self.spill_dir = spill_dir
        self.disk_bytes = 0 if spill_dir is None else disk_bytes
        self.block_bytes = cache.bytes_per_block(
            cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.block_len, cache.dtype
        )  # fmt: skip
        self.meter = meter
        self.wall = wall
        self.counts = TierCounts()
        self.on_restore: Callable[[float], None] = lambda seconds: None  # the metrics' histogram
        self.promised = 0  # device blocks promised to callers inside `room` (not yet taken)
        self._reserved = {"host": 0, "disk": 0}  # tier bytes of spills under way
        self._freeing = 0  # device blocks spills under way will free
        self._leaving_host = 0  # host bytes of records being demoted to disk
        self.moving: dict[str, asyncio.Future[None]] = {}  # sequences being spilled or restored
        self.users: Counter[str] = Counter()  # sequences callers are using (never spilled meanwhile)
        self._changed: asyncio.Event | None = None
        self._threads: ThreadPoolExecutor | None = None
        self.wb: WriteBack | None = None
        if write_back and spill_dir is not None:
            self.wb = WriteBack(
                cache, spill_dir, self.off, file_name, lambda s: s in self.moving, settled=self._notify
            )  # fmt: skip

    def start(self) -> None:
        """Start the write-back flusher (on the running loop), if any."""
        if self.wb is not None:
            self.wb.start()

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.spill_dir is not None

    # ---- where a sequence is ------------------------------------------------------------------

    def tier_of(self, seq_id: str) -> str | None:
        if seq_id in self.cache:
            return "device"
        rec = self.index.get(seq_id)
        return None if rec is None else rec.tier

    def state(self, seq_id: str) -> tuple[SequenceState, str]:
        """(state, tier) of a live sequence in any tier; NOT_FOUND like the cache's `get`."""
        rec = self.index.get(seq_id)
        if rec is None:
            return self.cache.get(seq_id), "device"
        return SequenceState(seq_id, rec.lengths, rec.num_blocks, (), rec.base_position), rec.tier

    def host_ids(self) -> list[str]:
        """The host tier's sequences (a drain pushes them to peers like resident ones)."""
        return [r.seq_id for r in self.index.oldest("host")]

    def host_source(self, seq_id: str) -> tuple[SequenceState, Callable[[int, int, int], Any]] | None:
        """(state, read(layer, start, end) -> k, v `[T, Hkv, d]`) of a host-tier sequence, read
        from its run without restoring it (`tkg.server.migration.export_messages`); None otherwise."""
        rec = self.index.get(seq_id)
        if rec is None or rec.payload is None:
            return None
        run, c = rec.payload, self.cache

        def read(layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
            k, v = (run[layer, i].reshape(c.num_kv_heads, -1, c.head_dim)[:, start:end] for i in (0, 1))
            return k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy()

        return self.state(seq_id)[0], read

    def busy(self, seq_id: str) -> bool:
        """Being moved, used or flushed: idle expiry keeps it."""
        return seq_id in self.moving or seq_id in self.users or (self.wb is not None and self.wb.busy(seq_id))

    # ---- what callers run inside ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def using(self, seq_ids: Iterable[str]) -> AsyncIterator[None]:
        """Every one of `seq_ids` that exists is on the device for the enclosed block and is not
        spilled meanwhile (ids that exist nowhere are left for the caller's own NOT_FOUND)."""
        ids = list(dict.fromkeys(seq_ids))
        if not self.enabled:
            yield
            return
        self.users.update(ids)
        try:
            for seq_id in ids:
                await self.resident(seq_id)
            yield
        finally:
            self.users.subtract(ids)
            for seq_id in ids:
                if self.users[seq_id] <= 0:
                    del self.users[seq_id]

    async def resident(self, seq_id: str) -> None:
        """Wait for a move of `seq_id` under way; restore it when it is spilled."""
        while True:
            moving = self.moving.get(seq_id)
            if moving is not None:
                await self._await_move(seq_id, moving)
                continue
            if seq_id in self.index:
                await self._restore(seq_id)
                continue
            return

    @contextlib.asynccontextmanager
    async def room(self, need: int) -> AsyncIterator[None]:
        """`need` device blocks free for the enclosed block (promised to it; see the module docstring)."""
        if not self.enabled or need <= 0:
            yield
            return
        await self._make_room(need)
        try:
            yield
        finally:
            self.promised -= need
            self._notify()

    async def settle(self, seq_id: str) -> None:
        """Wait until no move and no write-back flush of `seq_id` is under way (release and
        truncate act on a resting sequence)."""
        while (moving := self.moving.get(seq_id)) is not None or (self.wb is not None and self.wb.busy(seq_id)):
            if moving is not None:
                await self._await_move(seq_id, moving)
            elif self.wb is not None:
                await self.wb.settle(seq_id)

    async def truncated(self, seq_id: str, length: int) -> None:
        """`seq_id` (resident, settled) was truncated to `length`: persisted before the answer."""
        if self.wb is not None:
            await self.wb.truncated(seq_id, length)

    def released(self, seq_id: str) -> None:
        """Resident `seq_id` was released or expired: its write-back log goes too."""
        if self.wb is not None:
            self.wb.forget(seq_id)

    async def _await_move(self, seq_id: str, moving: asyncio.Future[None]) -> None:
        """Wait for the move of `seq_id` under way (its own method: race tests observe the wait)."""
        await asyncio.shield(moving)

    # ---- spilling ---------------------------------------------------------------------------

    async def _make_room(self, need: int) -> None:
        cache = self.cache
        if need > cache.num_blocks:
            raise ResourceExhausted(
                f"device tier: {need} blocks needed, the pool has {cache.num_blocks}; expected at most that"
            )
        tried: set[str] = set()  # a spill that failed is not retried by this call
        while cache.free_blocks - self.promised < need:
            short = need - (cache.free_blocks - self.promised)
            if self._freeing < short:
                victim = self._victim(tried)
                if victim is not None:
                    tried.add(victim[0])
                    self._start_spill(victim)
                    continue
                # Worth waiting for: spills under way (they free blocks) and write-back flushes (their
                # sequences may spill after). Never for restores: theirs come back in use, and a restore
                # waiting here for room would wait for itself.
                flushing = self.wb is not None and bool(self.wb.flushing)
                if not self._freeing and not flushing:
                    raise ResourceExhausted(self._full_message(need))
            await self._wait_change()
        self.promised += need

    def _full_message(self, need: int) -> str:
        host = f"host tier {self.index.bytes['host']} of {self.host_bytes} bytes" if self.host_bytes else "no host tier"
        disk = (
            f"disk tier {self.index.bytes['disk']} of {self.disk_bytes} bytes" if self.spill_dir is not None
            else "no disk tier"
        )  # fmt: skip
        return (
            f"device tier: {need} blocks needed, {max(0, self.cache.free_blocks - self.promised)} free and no idle "
            f"sequence can move down ({host}, {disk}); expected fewer sequences in use at once or larger tiers"
        )

    def _victim(self, skip: set[str]) -> tuple[str, str, list[Spilled]] | None:
        """(id, destination tier, host records to demote first) of the least recently used idle
        resident sequence that frees a block and fits a lower tier; None when there is none."""
        seqs = self.cache.seqs
        live = np.flatnonzero(seqs.live & ~seqs.pending.any(axis=1))
        for slot in live[np.argsort(seqs.last_used[live], kind="stable")].tolist():
            seq_id = seqs.id_of(slot)
            if seq_id in self.users or seq_id in self.moving or seq_id in skip or self.busy(seq_id):
                continue
            held = seqs.held(slot)
            if not held.size or not (self.cache.pool.refcounts(held) == 1).any():
                continue  # frees nothing: every block is shared with a fork that stays
            nbytes = held.size * self.block_bytes
            demote = self._demotions(nbytes, self.wall() - (self.cache._clock() - float(seqs.last_used[slot])))
            if demote:
                return seq_id, "host", demote
            dest = self._destination(nbytes)
            if dest is not None:
                return seq_id, dest, []
            return None  # the oldest does not fit anywhere: younger ones are no smaller in general
        return None

    def _demotions(self, nbytes: int, last_used: float) -> list[Spilled]:
        """Host records used before `last_used` (oldest first) whose move to disk makes room for
        `nbytes` on the host tier, when the host is full and the disk can take them: recency then
        orders the tiers (device, host, disk) instead of the host keeping older sequences than a
        newer one sent to disk. [] when the victim fits the host as it is, or this cannot work."""
        if not self.host_bytes or self.spill_dir is None or nbytes > self.host_bytes:
            return []
        over = self.index.bytes["host"] - self._leaving_host + self._reserved["host"] + nbytes - self.host_bytes
        if over <= 0:
            return []
        picked, freed = [], 0
        for rec in self.index.oldest("host"):
            if freed >= over or rec.last_used >= last_used:
                break
            if rec.seq_id in self.moving or rec.payload is None:
                continue
            picked.append(rec)
            freed += rec.nbytes
        disk_free = (self.disk_bytes or 0) - self.index.bytes["disk"] - self._reserved["disk"]
        return picked if freed >= over and freed <= disk_free else []

    def _destination(self, nbytes: int) -> str | None:
        for tier, budget in (("host", self.host_bytes), ("disk", self.disk_bytes or 0)):
            if tier == "disk" and self.spill_dir is None:
                continue
            leaving = self._leaving_host if tier == "host" else 0
            if self.index.bytes[tier] - leaving + self._reserved[tier] + nbytes <= budget:
                return tier
        return None

    def _start_spill(self, victim: tuple[str, str, list[Spilled]]) -> None:
        seq_id, dest, demote = victim
        for rec in demote:  # moving: a restore of one waits; its host bytes count as leaving
            self.moving[rec.seq_id] = asyncio.get_running_loop().create_future()
            self._reserved["disk"] += rec.nbytes
            self._leaving_host += rec.nbytes
        slot = self.cache.seqs.slot("sequence_id", seq_id)
        held = self.cache.seqs.held(slot).copy()
        freeing = int((self.cache.pool.refcounts(held) == 1).sum())
        nbytes = held.size * self.block_bytes
        self.moving[seq_id] = asyncio.get_running_loop().create_future()
        self._reserved[dest] += nbytes
        self._freeing += freeing
        task = asyncio.ensure_future(self._spill(seq_id, dest, held, nbytes, freeing, demote))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in `_spill`: retrieved here

    async def _spill(
        self, seq_id: str, dest: str, held: np.ndarray, nbytes: int, freeing: int, demote: list[Spilled]
    ) -> None:
        cache = self.cache
        for i, old in enumerate(demote):  # first the host's older sequences go to disk: the budget holds
            try:
                await self._demote(old)
            except BaseException:  # the victim stays; the demotions not yet begun are called off
                for rest in demote[i + 1 :]:
                    self._demotion_over(rest)
                self._reserved[dest] -= nbytes
                self._freeing -= freeing
                self._done_moving(seq_id)
                raise
        slot = cache.seqs.slot("sequence_id", seq_id)
        mono_age = cache._clock() - float(cache.seqs.last_used[slot])
        state = cache.get(seq_id)
        rec = Spilled(
            seq_id, state.lengths, state.base_position, held.size, self.wall() - mono_age, dest, nbytes,
        )  # fmt: skip
        try:
            payload = np.empty(cache.store.sequence_shape(held.size), cache.dtype)
            await self.off(lambda: cache.store.read_sequence(held, payload))
            if dest == "disk":
                rec.path = await self.off(lambda: self.write_run(rec, payload))
            else:
                rec.payload = payload
            # One loop step from here: the device copy goes, the tier copy comes, charges follow.
            cache.release(seq_id)
            self.index.add(rec)
            self.meter(seq_id, rec.num_blocks)
            self.counts.spills[dest] += 1
        except BaseException:
            log.warning("spill of sequence %r to %s failed; it stays on the device", seq_id[:64], dest, exc_info=True)
            raise
        finally:
            self._reserved[dest] -= nbytes
            self._freeing -= freeing
            self._done_moving(seq_id)

    async def _demote(self, rec: Spilled) -> None:
        """Move host record `rec` (marked moving by `_start_spill`) to the disk tier."""
        try:
            payload = rec.payload
            assert payload is not None
            path = await self.off(lambda: self.write_run(rec, payload))
            self.index.pop(rec.seq_id)  # one loop step: host bytes go, disk bytes come
            rec.tier, rec.payload, rec.path = "disk", None, path
            self.index.add(rec)
            self.counts.spills["disk"] += 1
        except BaseException:
            log.warning("demotion of sequence %r to disk failed; it stays on the host", rec.seq_id[:64], exc_info=True)
            raise
        finally:
            self._demotion_over(rec)

    def _demotion_over(self, rec: Spilled) -> None:
        """Undo `_start_spill`'s marks of demotion `rec`, done or called off: its disk reservation,
        its host bytes counted as leaving, its moving future."""
        self._reserved["disk"] -= rec.nbytes
        self._leaving_host -= rec.nbytes
        self._done_moving(rec.seq_id)

    def write_run(self, rec: Spilled, payload: np.ndarray) -> Path:
        assert self.spill_dir is not None
        path = self.spill_dir / file_name(rec.seq_id)
        header = spill_files.FileHeader(
            rec.seq_id, rec.lengths, rec.base_position, rec.last_used, rec.num_blocks, payload.dtype.name,
            tuple(payload.shape), payload.nbytes,
        )  # fmt: skip
        spill_files.write_file(path, header, payload)
        return path

    # ---- restoring --------------------------------------------------------------------------

    async def _restore(self, seq_id: str) -> None:
        rec = self.index.records[seq_id]
        cache = self.cache
        t0 = time.perf_counter()
        self.moving[seq_id] = asyncio.get_running_loop().create_future()
        result = "failed"
        try:
            async with self.room(rec.num_blocks):
                ids = cache.reserve(seq_id, rec.num_blocks)
            try:
                payload = rec.payload
                if payload is None:
                    assert rec.path is not None
                    path, from_log = rec.path, rec.from_log
                    payload = await self.off(lambda: _read(path, from_log))
                await self.off(lambda: cache.store.write_sequence(ids, payload))
            except spill_files.CorruptFile as exc:
                cache.unreserve(seq_id, ids)
                self._drop(seq_id)
                result = "corrupt"
                log.error("sequence %r dropped: %s", seq_id[:64], exc)
                raise NotFound(
                    f"sequence_id: {seq_id!r}'s stored KV failed its checksum and was dropped; expected a "
                    "sequence to re-create"
                ) from None
            except BaseException:
                cache.unreserve(seq_id, ids)
                raise
            # The file goes before the sequence can change (now, not later on a thread): after a
            # kill, a stale file must not bring back tokens a truncation removed. A write-back log
            # stays: it is the sequence's own, kept up to date from here.
            if rec.path is not None and not (rec.from_log and self.wb is not None):
                rec.path.unlink(missing_ok=True)
            # One loop step: the tier copy goes, the device copy comes.
            self.index.pop(seq_id)
            self.meter(seq_id, -rec.num_blocks)
            cache.adopt(seq_id, ids, rec.lengths, rec.base_position, count_tokens=False)
            result = "ok"
        finally:
            self.counts.restores[(rec.tier, result)] += 1
            if result == "ok":
                self.on_restore(time.perf_counter() - t0)
            self._done_moving(seq_id)

    # ---- release and expiry -------------------------------------------------------------------

    def drop(self, seq_id: str) -> bool:
        """Forget spilled `seq_id` (its blocks uncharged, its file removed); False when it is not spilled."""
        if seq_id not in self.index:
            return False
        self._drop(seq_id)
        return True

    def _drop(self, seq_id: str) -> None:
        rec = self.index.pop(seq_id)
        self.meter(seq_id, -rec.num_blocks)
        if rec.path is not None:
            self._unlink_later(rec.path)
        self.released(seq_id)

    def expire(self, ttl_s: float) -> list[str]:
        """Drop spilled sequences unused for more than `ttl_s` wall-clock seconds (not moving or in use)."""
        now = self.wall()
        gone = [
            s for s, r in self.index.records.items() if now - r.last_used > ttl_s and not self.busy(s)
        ]  # fmt: skip
        for seq_id in gone:
            self._drop(seq_id)
        return gone

    # ---- persistence (`tkg.server.tier_disk`) ----------------------------------------------------

    def open_disk(self, fingerprint: dict[str, Any]) -> list[str]:
        """Adopt the spill directory and load what it holds into the disk tier (`tier_disk.open_disk`)."""
        return tier_disk.open_disk(self, fingerprint)

    async def persist_all(self) -> tuple[int, int]:
        """Write every device- and host-tier sequence to disk at a drain (`tier_disk.persist_all`)."""
        return await tier_disk.persist_all(self)

    # ---- plumbing ----------------------------------------------------------------------------

    async def off(self, fn: Callable[[], T]) -> T:
        """`fn()` on a tiers thread; returns only once the thread let go (even when cancelled)."""
        return await run_on(self._pool(), fn)

    def _unlink_later(self, path: Path) -> None:
        self._pool().submit(lambda: path.unlink(missing_ok=True))

    def _pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(TIER_THREADS, thread_name_prefix="tkg-tiers")
        return self._threads

    def _done_moving(self, seq_id: str) -> None:
        fut = self.moving.pop(seq_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def stop(self) -> None:
        """Stop the write-back flusher (a flush under way finishes) and the threads."""
        if self.wb is not None:
            await self.wb.stop()
        self.close()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None


def _read(path: Path, from_log: bool = False) -> np.ndarray:
    if from_log:
        return log_payload(spill_files.read_log(path)[1])
    return spill_files.read_payload(path, spill_files.read_header(path))
