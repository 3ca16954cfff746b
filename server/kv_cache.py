"""`KVCache`: the service's paged KV cache: per-layer storage, sequences, two-phase appends.

Storage: every byte of KV lives in `store`, the kernel backend's `tkg.kernel.kv_store.KVStore`
(per layer K/V pools `[num_kv_heads, num_blocks, block_len, head_dim]`, allocated once at start:
host numpy for `reference`/`cpu`, device memory for `nki-emu`/`nki`). The cache writes new tokens
at (block, offset) slots, copies blocks for copy-on-write and reads blocks back only through it;
the bookkeeping (tables, lengths, reference counts) stays here on the host. Block ids come from
one `BlockPool` shared by all layers: block i is slot i in every layer, so
`num_blocks`/`free_blocks` are "per layer, every layer allocates alike".

A sequence owns a block table (an int32 row of `max_blocks_per_seq = ceil(max_context /
block_len)` entries, unused entries 0 so every entry is a valid id) and one length per layer
(layers advance independently within a decode step), kept as rows of `SequenceTable` arrays so a
batch's tables are one fancy index. It holds `ceil(max(lengths) / block_len)` blocks. Fork
shares the source's full blocks copy-on-write; a write into a block with reference count > 1
first copies it (all layers) into a fresh block.

Appends are two-phase and all-or-nothing for a batch (`prepare_append`, `commit`, `finish`,
`abort`, `rollback`, `undo`): see `tkg.server.appends`, the cache's base class.

Threading: every method must be called from ONE thread (the service's asyncio loop); there are no
locks. A kernel worker thread may READ the store's pools (`decode`) through a committed
plan's `block_tables` while the loop goes on. `commit(plan, ..., hold=True)` makes that safe: the plan
then holds one reference to every block its tables name (vLLM's block pool style) and keeps its
sequences marked in flight at the layer until `finish(plan)` (or `rollback(plan)`). While held:
- a held block is never freed or reused (release/truncate/expiry only drop their own
  reference), and since its reference count is > 1 any write into it copies it first;
- `prepare_append` at that layer, `truncate` and `fork` of the sequence raise FAILED_PRECONDITION
  and `expire_idle` skips it (the service waits for `finish` before applying them: see
  `in_flight` and `tkg.server.holds`);
- `rollback` restores exactly the lengths the plan appended.

Accounting: every block taken from or returned to the pool is reported to `meter(owner, delta)`
(delta > 0 taken, < 0 returned), once per operation, under the sequence id the operation acts on;
a batched append reports under its plan's `owner` (its first sequence), so a caller that accounts
per owner (the service: per tenant, `tkg.server.tenants.Ledger`) plans one owner's sequences at a
time. Expiry reports per sequence like a release, so usage never needs a recount.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tkg.dtypes import kv_dtype
from tkg.kernel.kv_store import HostKVStore, KVGeometry, KVStore
from tkg.server.appends import SMALL_BATCH, AppendOps, _ceil_div
from tkg.server.block_pool import BlockPool
from tkg.server.errors import FailedPrecondition, InvalidArgument, OutOfRange
from tkg.server.sequences import SequenceTable

EVICT_IDLE_TTL = "idle_ttl"


def _unmetered(owner: str, delta: int) -> None:
    """The meter of a cache nobody accounts for."""


@dataclass(frozen=True)
class SequenceState:
    """A snapshot of one sequence: tokens per layer and the block ids it holds (in order)."""

    seq_id: str
    lengths: tuple[int, ...]  # [num_layers]
    num_blocks: int
    block_ids: tuple[int, ...]  # [num_blocks]
    base_position: int = 0  # absolute position of the first token (positions are base + length)


@dataclass(frozen=True)
class KVCacheStats:
    """Counts for metrics (`tkg_kv_blocks_*`, `tkg_sequences_*`, `tkg_tokens_appended_total`)."""

    blocks_total: int
    blocks_used: int
    usage_ratio: float
    active_sequences: int
    tokens_appended: int
    evicted: dict[str, int]


class KVCache(AppendOps):
    """Paged KV storage for `num_layers` layers plus the sequences living in it.

    Args:
        num_layers, num_kv_heads, head_dim: the attention geometry.
        block_len: tokens per block.
        num_blocks: blocks per layer (capacity; see `bytes_per_block` to size from bytes).
        max_context: the most tokens one sequence may hold.
        dtype: `float32`, `float16`, `bfloat16` or `float8_e4m3` (or the numpy dtype).
        max_sequences: optional cap on live sequences (RESOURCE_EXHAUSTED past it).
        clock: monotonic seconds, injectable for tests.
        store: the backend's KV store for this geometry (`tkg.kernel.kv_store.create_kv_store`);
            None: host numpy pools (`HostKVStore`, backend `reference`).
        meter: `meter(owner, delta)` for every block taken (> 0) or returned (< 0), see the module
            docstring; None: not reported.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_len: int,
        num_blocks: int,
        max_context: int,
        dtype: str | np.dtype = "float32",
        max_sequences: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        store: KVStore | None = None,
        meter: Callable[[str, int], None] | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("block_len", block_len), ("num_blocks", num_blocks), ("max_context", max_context),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"KVCache: {name}: expected >= 1, got {value}")
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"KVCache: max_sequences: expected >= 1 or None, got {max_sequences}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_len = block_len
        self.num_blocks = num_blocks
        self.max_context = max_context
        self.max_blocks_per_seq = _ceil_div(max_context, block_len)
        self.dtype = kv_dtype(dtype)
        self._clock = clock
        self.pool = BlockPool(num_blocks)
        self.seqs = SequenceTable(num_layers, self.max_blocks_per_seq, max_sequences=max_sequences)
        geometry = KVGeometry(num_layers, num_kv_heads, num_blocks, block_len, head_dim, self.dtype)
        if store is None:
            store = HostKVStore(geometry)
        elif (store.geometry.pool_shape, store.geometry.num_layers, np.dtype(store.geometry.dtype)) != (
            geometry.pool_shape, num_layers, self.dtype,
        ):  # fmt: skip
            raise ValueError(f"KVCache: store: its geometry {store.geometry} does not match the cache's {geometry}")
        self.store = store
        self.small_batch = SMALL_BATCH  # batches up to this size take the scalar path (0: never; tests)
        self.tokens_appended = 0  # new tokens per sequence (growth of max(lengths)); layers count once
        self.evicted: Counter[str] = Counter()
        self._meter = meter if meter is not None else _unmetered

    @staticmethod
    def bytes_per_block(
        num_layers: int, num_kv_heads: int, head_dim: int, block_len: int, dtype: str | np.dtype
    ) -> int:
        """Bytes one block id costs across all layers, K and V."""
        return 2 * num_layers * num_kv_heads * block_len * head_dim * kv_dtype(dtype).itemsize

    # ---- counts -------------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return self.pool.free_count

    @property
    def used_blocks(self) -> int:
        return self.pool.used_count

    @property
    def usage_ratio(self) -> float:
        return self.pool.used_count / self.num_blocks

    def __len__(self) -> int:
        return len(self.seqs)

    def __contains__(self, seq_id: object) -> bool:
        """`seq_id` is resident (on the device tier)."""
        return seq_id in self.seqs

    def id_in_use(self, seq_id: str) -> bool:
        """`seq_id` names a live sequence in any tier (`SequenceTable.outside` included)."""
        return seq_id in self.seqs or seq_id in self.seqs.outside

    def sequence_ids(self) -> list[str]:
        """Live sequence ids."""
        return [seq_id for seq_id, _ in self.seqs.items()]

    def snapshot(self) -> list[SequenceState]:
        """Every live sequence's state, without marking them used."""
        return [self._state(slot) for _, slot in self.seqs.items()]

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            blocks_total=self.num_blocks, blocks_used=self.used_blocks, usage_ratio=self.usage_ratio,
            active_sequences=len(self.seqs), tokens_appended=self.tokens_appended, evicted=dict(self.evicted),
        )  # fmt: skip

    # ---- sequences ----------------------------------------------------------------------------

    def create(self, seq_id: str | None = None, base_position: int = 0) -> SequenceState:
        """A new empty sequence whose first token will sit at absolute position `base_position`
        (a context-parallel segment; 0 otherwise). None or "" picks a fresh id. ALREADY_EXISTS if
        the id is in use; INVALID_ARGUMENT for a base outside [0, max_context)."""
        if not 0 <= base_position < self.max_context:
            raise InvalidArgument(
                f"base_position: {base_position}; expected 0 <= base_position < {self.max_context} (max_context)"
            )
        slot = self.seqs.add(seq_id or self._new_id(), self._clock(), base_position)
        return self._state(slot)

    def get(self, seq_id: str) -> SequenceState:
        """Lengths per layer and held blocks of `seq_id` (NOT_FOUND if unknown or expired).

        A read: it does not count as use for idle expiry (only writes and decodes do)."""
        return self._state(self.seqs.slot("sequence_id", seq_id))

    def release(self, seq_id: str) -> int:
        """Drop `seq_id`; returns how many blocks became free (blocks shared by a fork stay held)."""
        return self._drop(self.seqs.slot("sequence_id", seq_id), seq_id)

    def truncate(self, seq_id: str, length: int) -> int:
        """Set every layer of `seq_id` to `length` tokens; returns how many blocks became free.

        OUT_OF_RANGE when `length` exceeds any layer's current length.
        """
        seqs = self.seqs
        slot = seqs.slot("sequence_id", seq_id)
        if length < 0:
            raise InvalidArgument(f"length: expected >= 0, got {length}")
        lengths = seqs.lengths[slot]
        shortest = int(lengths.argmin())
        if length > lengths[shortest]:
            raise OutOfRange(
                f"length: {length} is past sequence {seq_id!r}'s length {int(lengths[shortest])} at layer "
                f"{shortest}; expected <= {int(lengths[shortest])}"
            )
        self._check_not_pending(slot, "truncate")
        keep, held = _ceil_div(length, self.block_len), int(seqs.num_blocks[slot])
        freed = self.pool.decref(seqs.tables[slot, keep:held])
        if freed:
            self._meter(seq_id, -freed)
        seqs.tables[slot, keep:held] = 0
        seqs.num_blocks[slot] = keep
        lengths[:] = length
        seqs.touch([slot], self._clock())
        return freed

    def fork(self, source_id: str, seq_id: str | None = None) -> SequenceState:
        """A new sequence with `source_id`'s tokens: blocks full at every layer are shared
        copy-on-write, the rest (the partial last block) copied into fresh blocks, all layers.

        None or "" picks a fresh id. RESOURCE_EXHAUSTED (nothing changed) without room for the copy.
        """
        seqs = self.seqs
        src = seqs.slot("source_id", source_id)
        seq_id = seq_id or self._new_id()
        seqs.check_new_id(seq_id)
        self._check_not_pending(src, "fork")
        held = int(seqs.num_blocks[src])
        shared = min(int(seqs.lengths[src].min()) // self.block_len, held)
        copies = self.pool.allocate(held - shared)  # raises with nothing changed
        dst = seqs.add(seq_id, self._clock())  # may grow (reallocate) the arrays: index them after
        if copies.size:
            self._meter(seq_id, int(copies.size))
        self.pool.incref(seqs.tables[src, :shared])
        seqs.tables[dst, :shared] = seqs.tables[src, :shared]
        seqs.tables[dst, shared:held] = copies
        self._copy_blocks(seqs.tables[src, shared:held], copies)
        seqs.num_blocks[dst] = held
        seqs.lengths[dst] = seqs.lengths[src]
        seqs.base[dst] = seqs.base[src]
        seqs.touch([dst], self._clock())  # the source is only read
        return self._state(dst)

    def fork_cost(self, source_id: str) -> int:
        """Blocks `fork(source_id)` takes: copies of the blocks not full at every layer (0 if unknown)."""
        slot = self.seqs._slot_of.get(source_id)
        if slot is None:
            return 0
        held = int(self.seqs.num_blocks[slot])
        return held - min(int(self.seqs.lengths[slot].min()) // self.block_len, held)

    def expire_idle(self, now: float | None, ttl_s: float, busy: Callable[[str], bool] | None = None) -> list[str]:
        """Release sequences unused for more than `ttl_s` seconds at time `now` (the injected
        clock's seconds; None reads it); returns their ids, least recently used first.

        Kept: sequences with an append in flight, and those `busy(seq_id)` says have work queued.
        Counted in `evicted["idle_ttl"]`.
        """
        now = self._clock() if now is None else now
        expired = []
        for slot in self.seqs.idle(now, ttl_s):
            if self.seqs.pending[slot].any() or (busy is not None and busy(self.seqs.id_of(slot))):
                continue
            seq_id = self.seqs.id_of(slot)
            expired.append(seq_id)
            self._drop(slot, seq_id)
        self.evicted[EVICT_IDLE_TTL] += len(expired)
        return expired

    def in_flight(self, seq_id: str) -> bool:
        """`seq_id` has an append prepared or a held plan (a kernel reading it) at some layer."""
        slot = self.seqs._slot_of.get(seq_id)
        return slot is not None and bool(self.seqs.pending[slot].any())

    def decode(
        self, layer: int, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, block_tables: np.ndarray,
        seq_lens: np.ndarray, **options: object,
    ) -> np.ndarray:
        """One kernel launch at `layer` over the resident pools, for tables and lengths this cache
        built (committed plans' `block_tables` and `seq_lens`, stacked): `KVStore.decode` with the
        range check of the tables skipped (`trusted`), and the new k/v passed only to stores that
        read them with the step. Only reads the store: safe on the kernel worker thread while the
        plans are held (see the module docstring). Returns `[B, Hq, S, d]`."""
        store = self.store
        if not store.reads_new_kv:
            k_new = v_new = None
        return store.decode(layer, q, k_new, v_new, block_tables, seq_lens, trusted=True, **options)  # fmt: skip

    def attend_rows(
        self, layer: int, seq_ids: list[str], positions: np.ndarray, S: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What an attend-only launch (no new tokens) at `layer` reads: block tables int32 `[B, w]`,
        lengths int32 `[B]` and each sequence's first query as a key index `positions - base`
        int64 `[B]`. Marks the sequences used. Raises (nothing changed): NOT_FOUND naming
        `sequence_ids[b]`; FAILED_PRECONDITION when `positions[b]` is before the sequence's end
        (`base + length`); OUT_OF_RANGE past max_context.

        The tables are a snapshot of this instant: the launch must run before the loop applies
        anything else (the step runs attend-only launches inline) or hold the blocks."""
        seqs = self.seqs
        slots = seqs.slots("sequence_ids", seq_ids)
        base, lens = seqs.base[slots], seqs.lengths[slots, layer]
        pos = np.asarray(positions, dtype=np.int64)
        if (pos < base + lens).any():
            b = int(np.flatnonzero(pos < base + lens)[0])
            raise FailedPrecondition(
                f"positions[{b}]: {int(pos[b])} is before sequence {seq_ids[b]!r}'s end at layer {layer} "
                f"(base position {int(base[b])} + length {int(lens[b])}); expected at least {int(base[b] + lens[b])} "
                "for an attend_only request"
            )
        if (pos + S).max() > self.max_context:
            b = int(np.argmax(pos + S))
            raise OutOfRange(
                f"positions[{b}]: {int(pos[b])} + {S} queries exceeds max_context; expected at most {self.max_context}"
            )
        width = max(1, _ceil_div(int(lens.max()), self.block_len))
        tables = seqs.tables[slots, :width]  # fancy index: a copy
        seqs.touch(slots, self._clock())
        return tables, lens.astype(np.int32), pos - base

    def append(self, seq_id: str, layer: int, position: int, k: np.ndarray, v: np.ndarray) -> SequenceState:
        """Append `[T, num_kv_heads, head_dim]` tokens to one sequence at `layer` (AppendKV)."""
        for name, t in (("k", k), ("v", v)):
            if t.ndim != 3 or t.shape[1:] != (self.num_kv_heads, self.head_dim) or t.shape[0] < 1:
                raise InvalidArgument(
                    f"{name}: expected shape [T >= 1, {self.num_kv_heads}, {self.head_dim}], got {list(t.shape)}"
                )
        if v.shape != k.shape:
            raise InvalidArgument(f"v: expected shape {list(k.shape)} (as k), got {list(v.shape)}")
        plan = self.prepare_append(layer, [seq_id], [position], k.shape[0])
        self.commit(plan, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
        return self._state(int(plan._slots[0]))

    def read_tokens(self, seq_id: str, layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of tokens `start .. end-1` of `seq_id` at `layer` as cached: k, v `[T, num_kv_heads,
        head_dim]` (ExportSequence). A read: no use for idle expiry."""
        slot = self.seqs.slot("sequence_id", seq_id)
        if not 0 <= start <= end <= self.seqs.lengths[slot, layer]:
            raise OutOfRange(f"tokens {start}..{end}: expected within 0..{int(self.seqs.lengths[slot, layer])}")
        b0 = start // self.block_len
        ids = self.seqs.tables[slot, b0 : _ceil_div(end, self.block_len)]
        lo, hi = start - b0 * self.block_len, end - b0 * self.block_len
        out = []
        for blocks in self.store.read_blocks(layer, ids):  # [Hkv, nb, BL, d] host copies
            out.append(blocks.reshape(self.num_kv_heads, -1, self.head_dim)[:, lo:hi].transpose(1, 0, 2))
        return out[0], out[1]

    # ---- imports: blocks reserved before their sequence exists ----------------------------------

    def reserve(self, owner: str, n: int) -> np.ndarray:
        """`n` blocks (int32 `[n]`) for a sequence that does not exist yet (ImportSequence), metered
        under `owner`, the id it will have. RESOURCE_EXHAUSTED (nothing taken) without room.
        Nothing reads them until `adopt`; the caller returns them with `unreserve` otherwise."""
        ids = self.pool.allocate(n)
        if n:
            self._meter(owner, n)
        return ids

    def unreserve(self, owner: str, ids: np.ndarray) -> None:
        """Return blocks `reserve(owner, ...)` took and no sequence adopted."""
        self.pool.free(ids)
        if ids.size:
            self._meter(owner, -int(ids.size))

    def write_reserved(self, ids: np.ndarray, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store `[T, num_kv_heads, head_dim]` tokens at positions `start ..` of `layer` in reserved
        blocks `ids` (position t goes to block `ids[t // block_len]`). Touches only the store at
        those blocks, which nothing else names until `adopt`: safe on the kernel worker thread
        while the loop goes on, provided the loop neither adopts nor unreserves them meanwhile."""
        t = np.arange(start, start + k.shape[0])
        blk, off = ids[t // self.block_len][None], (t % self.block_len)[None]
        self.store.write(layer, blk, off, k.transpose(1, 0, 2)[:, None], v.transpose(1, 0, 2)[:, None])

    def adopt(
        self, seq_id: str, ids: np.ndarray, lengths: Sequence[int], base_position: int = 0, count_tokens: bool = True
    ) -> SequenceState:
        """Create `seq_id` holding reserved blocks `ids` (in order, written by `write_reserved`)
        with `lengths[layer]` tokens per layer, its first token at absolute `base_position`.
        ALREADY_EXISTS (nothing changed) if the id is taken. `count_tokens`: its tokens count as
        appended (an import; not a restore from a KV tier)."""
        seqs = self.seqs
        if len(ids) != _ceil_div(max(lengths, default=0), self.block_len):
            raise ValueError(f"KVCache.adopt: {len(ids)} blocks for lengths {list(lengths)}")
        slot = seqs.add(seq_id, self._clock(), base_position)
        seqs.tables[slot, : len(ids)] = ids
        seqs.num_blocks[slot] = len(ids)
        seqs.lengths[slot] = lengths
        if count_tokens:
            self.tokens_appended += max(lengths, default=0)
        return self._state(slot)

    # ---- internals ----------------------------------------------------------------------------

    def _copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        if src.size:
            self.store.copy_blocks(src, dst)

    def _drop(self, slot: int, seq_id: str) -> int:
        freed = self.pool.decref(self.seqs.held(slot))
        self.seqs.remove(slot)
        if freed:
            self._meter(seq_id, -freed)
        return freed

    def _check_not_pending(self, slot: int, what: str) -> None:
        pending = self.seqs.pending[slot]
        if pending.any():
            raise FailedPrecondition(
                f"sequence {self.seqs.id_of(slot)!r} has an append in flight at layer {int(pending.argmax())}; "
                f"expected none to {what} it"
            )

    def _new_id(self) -> str:
        while True:
            seq_id = uuid.uuid4().hex
            if seq_id not in self.seqs:
                return seq_id

    def _state(self, slot: int) -> SequenceState:
        seqs = self.seqs
        return SequenceState(
            seqs.id_of(slot), tuple(seqs.lengths[slot].tolist()), int(seqs.num_blocks[slot]),
            tuple(seqs.held(slot).tolist()), int(seqs.base[slot]),
        )  # fmt: skip
