"""The KV tiers' disk persistence: adopting a spill directory at start (its spec checked, its
spill files and write-back logs loaded into the disk tier) and writing every sequence to it at a
drain. Functions over a `tkg.server.tiers.Tiers` (its index, meter, threads and write-back state):
the tiers move sequences, this module is what outlives the process.

Event loop only, like the tiers; file reads and writes at a drain run on the tiers' threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tkg.server import spill_files
from tkg.server.tier_index import Spilled, default_disk_bytes

if TYPE_CHECKING:
    from tkg.server.tiers import Tiers

log = logging.getLogger("tkg.server")


def open_disk(tiers: Tiers, fingerprint: dict[str, Any]) -> list[str]:
    """Adopt the spill directory (SpecMismatch on another spec) and load the sequences it holds
    into the disk tier; returns their ids. Corrupt files and stray temporaries are removed,
    each with the reason logged; the rest load."""
    if tiers.spill_dir is None:
        return []
    d = tiers.spill_dir
    spill_files.check_spec(d, fingerprint)
    if tiers.disk_bytes is None:
        tiers.disk_bytes = default_disk_bytes(d)
    for tmp in d.glob(".*.tmp"):
        log.warning("spill dir: removing %s (an interrupted write)", tmp.name)
        tmp.unlink(missing_ok=True)
    loaded = []
    want = tiers.cache.store.sequence_shape(0)
    for path in sorted(d.glob("*" + spill_files.SUFFIX)):
        try:
            h = spill_files.read_header(path)
            problem = _unfit(tiers, h, want)
        except spill_files.CorruptFile as exc:
            problem = str(exc)
        if problem is not None:
            log.error("spill dir: %s not loaded: %s", path.name, problem)
            path.unlink(missing_ok=True)
            continue
        rec = Spilled(
            h.sequence_id, h.lengths, h.base_position, h.num_blocks, h.last_used, "disk",
            h.num_blocks * tiers.block_bytes, path=path,
        )  # fmt: skip
        tiers.index.add(rec)
        tiers.meter(h.sequence_id, h.num_blocks)
        loaded.append(h.sequence_id)
    for path in sorted(d.glob("*" + spill_files.LOG_SUFFIX)):
        rec = _load_log(tiers, path, want)
        if rec is not None:
            tiers.index.add(rec)
            tiers.meter(rec.seq_id, rec.num_blocks)
            loaded.append(rec.seq_id)
    return loaded


def _load_log(tiers: Tiers, path: Path, want: tuple[int, ...]) -> Spilled | None:
    """A write-back log as a disk-tier sequence of its whole blocks (a torn tail cut back), or
    None: corrupt (removed), or the sequence already came from its spill file (the whole
    sequence; the log is its prefix)."""
    try:
        h, blocks = spill_files.read_log(path)
    except spill_files.CorruptFile as exc:
        log.error("spill dir: %s not loaded: %s", path.name, exc)
        path.unlink(missing_ok=True)
        return None
    n = int(blocks.shape[0])
    if h.shape != (*want[:3], *want[4:]) or h.dtype != tiers.cache.dtype.name:
        log.error("spill dir: %s not loaded: blocks %s%s; expected %s", path.name, h.dtype, list(h.shape), want)
        path.unlink(missing_ok=True)
        return None
    if h.sequence_id in tiers.index:
        if tiers.wb is not None:
            tiers.wb.flushed[h.sequence_id] = n
        else:  # nothing keeps it up to date from here: a stale log must not outlive the sequence
            path.unlink(missing_ok=True)
        return None
    if tiers.wb is not None:
        tiers.wb.flushed[h.sequence_id] = n
    lengths = (n * tiers.cache.block_len,) * tiers.cache.num_layers
    return Spilled(
        h.sequence_id, lengths, h.base_position, n, path.stat().st_mtime, "disk", n * tiers.block_bytes,
        path=path, from_log=True,
    )  # fmt: skip


def _unfit(tiers: Tiers, h: spill_files.FileHeader, want: tuple[int, ...]) -> str | None:
    cache = tiers.cache
    shape = (*want[:3], h.num_blocks, *want[4:])
    if h.shape != shape or h.dtype != cache.dtype.name:
        return f"payload {h.dtype}{list(h.shape)}; expected {cache.dtype.name}{list(shape)}"
    if h.sequence_id in tiers.index or h.sequence_id in cache:
        return f"sequence {h.sequence_id!r} twice"
    if h.base_position < 0 or h.base_position + max(h.lengths, default=0) > cache.max_context:
        return f"sequence ends past max_context {cache.max_context}"
    if h.num_blocks != -(-max(h.lengths, default=0) // cache.block_len) or len(h.lengths) != cache.num_layers:
        return f"{h.num_blocks} blocks for lengths {list(h.lengths)}"
    return None


async def persist_all(tiers: Tiers) -> tuple[int, int]:
    """Write every sequence of the device and host tiers to the disk tier (a drain with no
    peer to take them); (written, failed). Nothing moves meanwhile: calls have drained."""
    if tiers.spill_dir is None:
        return 0, 0
    cache, ok, failed = tiers.cache, 0, 0
    for seq_id in [*cache.sequence_ids(), *(r.seq_id for r in tiers.index.oldest("host"))]:
        try:
            await tiers.settle(seq_id)
            await _persist_one(tiers, seq_id)
            ok += 1
            tiers.counts.persisted["ok"] += 1
        except Exception:
            failed += 1
            tiers.counts.persisted["failed"] += 1
            log.exception("persist: sequence %r not written", seq_id[:64])
    return ok, failed


async def _persist_one(tiers: Tiers, seq_id: str) -> None:
    cache = tiers.cache
    rec = tiers.index.get(seq_id)
    if rec is None:  # on the device
        slot = cache.seqs.slot("sequence_id", seq_id)
        held = cache.seqs.held(slot).copy()
        state = cache.get(seq_id)
        age = cache._clock() - float(cache.seqs.last_used[slot])
        rec = Spilled(seq_id, state.lengths, state.base_position, held.size, tiers.wall() - age, "disk",
                      held.size * tiers.block_bytes)  # fmt: skip
        payload = np.empty(cache.store.sequence_shape(held.size), cache.dtype)
        await tiers.off(lambda: cache.store.read_sequence(held, payload))
        rec.path = await tiers.off(lambda: tiers.write_run(rec, payload))
        return
    if rec.tier == "host":
        assert rec.payload is not None
        payload = rec.payload
        path = await tiers.off(lambda: tiers.write_run(rec, payload))
        tiers.index.pop(seq_id)
        rec.tier, rec.payload, rec.path = "disk", None, path
        tiers.index.add(rec)
