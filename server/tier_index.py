"""The KV tiers' records: what a spilled sequence is, the index of them by tier, the counters, and
the names and bounds of the disk tier's files (`tkg.server.tiers` moves sequences; this holds them).

Event-loop only, like the KV cache: the index changes in the loop steps that end a spill or a restore.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tkg.server import spill_files

DISK_MARGIN = 1 << 30  # --spill-bytes default: the disk's free space less this (or 5%, the larger)


@dataclass(eq=False)
class Spilled:
    """A sequence held outside the device: its cache state and where its run is."""

    seq_id: str
    lengths: tuple[int, ...]
    base_position: int
    num_blocks: int
    last_used: float  # wall-clock seconds (time.time()): idle expiry survives restarts
    tier: str  # "host" or "disk"
    nbytes: int  # the run's bytes (num_blocks whole blocks, every layer, K and V)
    payload: np.ndarray | None = None  # host tier: [num_layers, 2, Hkv, num_blocks, block_len, d]
    path: Path | None = None  # disk tier: a spill file, or a write-back log (`from_log`)
    from_log: bool = False  # loaded at start from a write-back log (whole blocks only)


@dataclass
class TierCounts:
    """Counters for metrics (`tkg_kv_spills_total`, `tkg_kv_restores_total`, ...), read at scrape."""

    spills: Counter[str] = field(default_factory=Counter)  # tier moved to
    restores: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source, result)
    persisted: Counter[str] = field(default_factory=Counter)  # result


class TierIndex:
    """The sequences outside the device, by cache id, with each tier's bytes (a `SequenceTable.outside`)."""

    def __init__(self) -> None:
        self.records: dict[str, Spilled] = {}
        self.bytes = {"host": 0, "disk": 0}
        self.count = {"host": 0, "disk": 0}

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, seq_id: str) -> Spilled | None:
        return self.records.get(seq_id)

    def add(self, rec: Spilled) -> None:
        self.records[rec.seq_id] = rec
        self.bytes[rec.tier] += rec.nbytes
        self.count[rec.tier] += 1

    def pop(self, seq_id: str) -> Spilled:
        rec = self.records.pop(seq_id)
        self.bytes[rec.tier] -= rec.nbytes
        self.count[rec.tier] -= 1
        return rec

    def oldest(self, tier: str) -> Iterator[Spilled]:
        """`tier`'s records, least recently used first."""
        return iter(sorted((r for r in self.records.values() if r.tier == tier), key=lambda r: r.last_used))


def file_name(seq_id: str) -> str:
    """The disk tier's file for a cache id (ids may hold any character: hashed)."""
    return hashlib.sha256(seq_id.encode()).hexdigest()[:40] + spill_files.SUFFIX


def default_disk_bytes(directory: Path) -> int:
    """`--spill-bytes` unset: the free space of `directory`'s file system less a margin, plus what
    spill files there already use."""
    usage = shutil.disk_usage(directory)
    held = sum(p.stat().st_size for p in directory.glob("*" + spill_files.SUFFIX))
    return max(0, usage.free - max(DISK_MARGIN, usage.total // 20)) + held


def spec_fingerprint(spec: Any) -> dict[str, Any]:
    """What the stored bytes of a spill directory mean (`tkg.server.config.ModelSpec`): geometry,
    KV and I/O dtype, fp8 scales, RoPE, windows, sinks, block length. Any difference refuses it."""
    sinks = None
    if spec.sinks is not None:
        sinks = hashlib.sha256(np.ascontiguousarray(spec.sinks, np.float32).tobytes()).hexdigest()
    return {
        "num_layers": spec.num_layers, "num_q_heads": spec.num_q_heads, "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "block_len": spec.block_len, "kv_dtype": spec.kv_dtype,
        "io_dtype": spec.wire_dtype, "k_scale": list(spec.k_scale), "v_scale": list(spec.v_scale),
        "fuse_rope": spec.fuse_rope, "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling,
        "sliding_window": list(spec.sliding_window), "sinks_sha256": sinks,
    }  # fmt: skip
