"""`--persist write-back`: every resident sequence's full blocks go to its log on disk as they fill.

A block is full when every layer has all its tokens: from then on nothing writes it (appends
write at or past each layer's length; a truncation back into it waits here first), so a
background pass (`flush`, every `period_s`) can copy it off the loop while decodes go on. After a
SIGKILL the restarted server loads each log as a disk-tier sequence of its whole blocks, every
layer at `blocks * block_len` tokens: at or below what the client sent, and the client's position
check then says what to re-send. A truncation cuts the log before it is acknowledged, so a restart
never reports tokens the client rolled back. Logs: `tkg.server.spill_files` (`create_log`,
`append_blocks`, `cut_log`, `read_log`).

Event loop only for the bookkeeping (`flushed`, `flushing`); the copies and file writes run on the
tiers' threads, each on blocks nothing writes meanwhile (above) of a sequence the tiers will not
move while it is flushing (`busy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from tkg.server import spill_files
from tkg.server.kv_cache import KVCache

log = logging.getLogger("tkg.server")
T = TypeVar("T")
FLUSH_PERIOD_S = 0.05  # a killed server loses at most the blocks that filled in the last ~50 ms


class WriteBack:
    """The write-back logs of one cache's sequences (see the module docstring).

    Args:
        off: runs a function on the tiers' threads (`Tiers._off`).
        name: the log file name of a cache id (`tkg.server.tier_index.file_name`, other suffix).
        moving: sequences the tiers are moving (not flushed meanwhile: their blocks may go).
        settled: called whenever a flush ends (callers waiting to spill that sequence re-check).
    """

    def __init__(
        self, cache: KVCache, directory: Path, off: Callable[[Callable[[], T]], Awaitable[T]],
        name: Callable[[str], str], moving: Callable[[str], bool], period_s: float = FLUSH_PERIOD_S,
        settled: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.cache = cache
        self.directory = directory
        self._off = off
        self._name = name
        self._moving = moving
        self.period_s = period_s
        self._on_settled = settled
        self.flushed: dict[str, int] = {}  # blocks in each sequence's log
        self.flushing: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task | None = None

    def path(self, seq_id: str) -> Path:
        return self.directory / (self._name(seq_id).removesuffix(spill_files.SUFFIX) + spill_files.LOG_SUFFIX)

    def busy(self, seq_id: str) -> bool:
        return seq_id in self.flushing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tkg-writeback")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self.flushing:  # a flush under way finishes: its blocks are whole in the file
            await asyncio.shield(next(iter(self.flushing.values())))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.flush()
            except Exception:  # keep flushing; one failed pass must not end write-back for good
                log.exception("write-back: a flush failed")

    async def flush(self) -> int:
        """Write every resident sequence's newly full blocks; returns how many blocks were written."""
        seqs = self.cache.seqs
        live = np.flatnonzero(seqs.live)
        full = seqs.lengths[live].min(axis=1) // self.cache.block_len if live.size else live
        jobs = []
        for slot, n in zip(live.tolist(), full.tolist(), strict=True):
            seq_id = seqs.id_of(slot)
            done = self.flushed.get(seq_id, 0)
            if n > done and seq_id not in self.flushing and not self._moving(seq_id):
                jobs.append(self._flush_one(seq_id, done, seqs.tables[slot, done:n].copy()))
        written = await asyncio.gather(*jobs)
        return sum(written)

    async def _flush_one(self, seq_id: str, done: int, ids: np.ndarray) -> int:
        cache, path = self.cache, self.path(seq_id)
        self.flushing[seq_id] = asyncio.get_running_loop().create_future()
        try:
            store = cache.store
            shape = store.sequence_shape(ids.size)
            header = spill_files.FileHeader(
                seq_id, (), int(cache.seqs.base[cache.seqs.slot("sequence_id", seq_id)]), 0.0, 0, cache.dtype.name,
                (shape[0], shape[1], shape[2], shape[4], shape[5]), 0,
            )  # fmt: skip

            def write() -> None:
                run = np.empty(shape, cache.dtype)
                store.read_sequence(ids, run)
                if done == 0:
                    spill_files.create_log(path, header)
                spill_files.append_blocks(path, done, np.moveaxis(run, 3, 0))

            await self._off(write)
            self.flushed[seq_id] = done + ids.size
            return int(ids.size)
        finally:
            self._settled(seq_id)

    async def settle(self, seq_id: str) -> None:
        while (f := self.flushing.get(seq_id)) is not None:
            await asyncio.shield(f)

    async def truncated(self, seq_id: str, length: int) -> None:
        """`seq_id` was truncated to `length` tokens: its log keeps only the blocks still full
        (the caller settled first, so no flush of it is under way)."""
        keep = length // self.cache.block_len
        if self.flushed.get(seq_id, 0) <= keep:
            return
        self.flushed[seq_id] = keep
        path = self.path(seq_id)
        self.flushing[seq_id] = asyncio.get_running_loop().create_future()
        try:
            await self._off(lambda: spill_files.cut_log(path, keep))
        finally:
            self._settled(seq_id)

    def forget(self, seq_id: str) -> None:
        """`seq_id` is gone (released, expired): its log goes too. Call once it has settled."""
        if self.flushed.pop(seq_id, None) is not None:
            self.path(seq_id).unlink(missing_ok=True)

    def _settled(self, seq_id: str) -> None:
        f = self.flushing.pop(seq_id, None)
        if f is not None and not f.done():
            f.set_result(None)
        self._on_settled()

    def load(self, path: Path) -> tuple[spill_files.FileHeader, np.ndarray]:
        """A log found at start: its header and whole blocks `[n, L, 2, Hkv, block_len, d]` (a torn
        tail cut off); `flushed` notes them."""
        header, blocks = spill_files.read_log(path)
        self.flushed[header.sequence_id] = int(blocks.shape[0])
        return header, blocks


def log_payload(blocks: np.ndarray) -> np.ndarray:
    """`[n, L, 2, Hkv, block_len, d]` log blocks as a sequence run `[L, 2, Hkv, n, block_len, d]`."""
    return np.ascontiguousarray(np.moveaxis(blocks, 0, 3))
