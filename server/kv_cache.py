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

Appends are two-phase and all-or-nothing for a batch: `prepare_append` validates every sequence
and reserves every block the batch may need (new blocks and copy-on-write copies) or raises with
nothing changed; `commit` then cannot fail for lack of blocks: it applies table changes, writes
`[B, Hkv, S, d]` into the slots with one `store.write` and advances the
layer's lengths; `abort` returns the reservation. `rollback` undoes a committed plan at its layer
(the service uses it when the kernel fails after the append).

Threading: every method must be called from ONE thread (the service's asyncio loop); there are no
locks. A kernel worker thread may READ the store's pools (`store.decode`) through a committed
plan's `block_tables` while the loop goes on. `commit(plan, ..., hold=True)` makes that safe: the plan
then holds one reference to every block its tables name (vLLM's block pool style) and keeps its
sequences marked in flight at the layer until `finish(plan)` (or `rollback(plan)`). While held:
- a held block is never freed or reused (release/truncate/expiry only drop their own
  reference), and since its reference count is > 1 any write into it copies it first;
- `prepare_append` at that layer, `truncate` and `fork` of the sequence raise FAILED_PRECONDITION
  and `expire_idle` skips it (the service waits for `finish` before applying them: see
  `in_flight` and `tkg.server.service`);
- `rollback` restores exactly the lengths the plan appended.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tkg.kernel.kv_store import HostKVStore, KVGeometry, KVStore
from tkg.kernel_dtypes import BF16, FP8
from tkg.server.block_pool import BlockPool
from tkg.server.errors import FailedPrecondition, InvalidArgument, OutOfRange, ResourceExhausted
from tkg.server.sequences import SequenceTable

KV_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16,
    "float8_e4m3": FP8,  # 1 byte per element; the service stores value / scale, saturated (tkg.kernel_dtypes.to_fp8)
}  # fmt: skip
EVICT_IDLE_TTL = "idle_ttl"

# Batches of at most this many sequences take the scalar path of `prepare_append`, `commit` and
# `finish` when no block is shared (the common decode step): plain Python over numpy scalars
# beats the general path's ~25 numpy calls on tiny arrays (B=1: ~65 -> ~15 us per step).
SMALL_BATCH = 8


def kv_dtype(name: str | np.dtype) -> np.dtype:
    """The numpy dtype for a KV dtype name (`float32`, `float16`, `bfloat16`) or dtype."""
    key = name if isinstance(name, str) else np.dtype(name).name
    if key not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {sorted(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[key]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ragged(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries `starts[i] .. starts[i] + counts[i] - 1` of every row i, flattened: (row, column)."""
    counts = np.maximum(counts, 0)
    rows = np.repeat(np.arange(counts.size), counts)
    within = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, starts[rows] + within


@dataclass(frozen=True)
class SequenceState:
    """A snapshot of one sequence: tokens per layer and the block ids it holds (in order)."""

    seq_id: str
    lengths: tuple[int, ...]  # [num_layers]
    num_blocks: int
    block_ids: tuple[int, ...]  # [num_blocks]


@dataclass(frozen=True)
class KVCacheStats:
    """Counts for metrics (`tkg_kv_blocks_*`, `tkg_sequences_*`, `tkg_tokens_appended_total`)."""

    blocks_total: int
    blocks_used: int
    usage_ratio: float
    active_sequences: int
    tokens_appended: int
    evicted: dict[str, int]


@dataclass(eq=False)
class AppendPlan:
    """A validated, reserved append of `num_tokens` tokens at `layer` for a batch of sequences.

    `seq_lens` (int32 `[B]`, lengths after the append) is known at prepare; `block_tables` (int32
    `[B, max_blocks]`, `max_blocks = ceil(max(seq_lens) / block_len)`, copy-on-write applied) is
    set by `KVCache.commit`. Pass both to `KVCache.store.decode` at `layer`.
    """

    layer: int
    seq_ids: tuple[str, ...]
    positions: np.ndarray  # int64 [B], each sequence's length at `layer` before the append
    num_tokens: int
    seq_lens: np.ndarray  # int32 [B]
    _slots: np.ndarray = field(repr=False)  # int64 [B] SequenceTable slots
    _generations: np.ndarray = field(repr=False)  # int64 [B] slot generations at prepare
    _reserved: np.ndarray = field(repr=False)  # int32 block ids taken from the pool
    _state: str = "prepared"
    _held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)  # blocks held until finish
    _block_tables: np.ndarray | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def reserved_blocks(self) -> int:
        return int(self._reserved.size)

    @property
    def state(self) -> str:
        """`prepared`, `held` (committed, a kernel reads it), `committed`, `aborted` or `rolled_back`."""
        return self._state

    @property
    def block_tables(self) -> np.ndarray:
        if self._block_tables is None:
            raise RuntimeError(f"AppendPlan.block_tables: available after commit (plan is {self._state})")
        return self._block_tables


class KVCache:
    """Paged KV storage for `num_layers` layers plus the sequences living in it.

    Args:
        num_layers, num_kv_heads, head_dim: the attention geometry.
        block_len: tokens per block.
        num_blocks: blocks per layer (capacity; see `bytes_per_block` to size from bytes).
        max_context: the most tokens one sequence may hold.
        dtype: `float32`, `float16` or `bfloat16` (or the numpy dtype).
        max_sequences: optional cap on live sequences (RESOURCE_EXHAUSTED past it).
        clock: monotonic seconds, injectable for tests.
        store: the backend's KV store for this geometry (`tkg.kernel.kv_store.create_kv_store`);
            None: host numpy pools (`HostKVStore`, backend `reference`).
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
        return seq_id in self.seqs

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

    def create(self, seq_id: str | None = None) -> SequenceState:
        """A new empty sequence; None or "" picks a fresh id. ALREADY_EXISTS if the id is in use."""
        slot = self.seqs.add(seq_id or self._new_id(), self._clock())
        return self._state(slot)

    def get(self, seq_id: str) -> SequenceState:
        """Lengths per layer and held blocks of `seq_id` (NOT_FOUND if unknown or expired).

        A read: it does not count as use for idle expiry (only writes and decodes do)."""
        return self._state(self.seqs.slot("sequence_id", seq_id))

    def touch(self, seq_ids: Sequence[str]) -> None:
        """Mark the live ones of `seq_ids` used now (the service: a decode finished or queued)."""
        slots = [s for s in map(self.seqs._slot_of.get, seq_ids) if s is not None]
        self.seqs.touch(slots, self._clock())

    def release(self, seq_id: str) -> int:
        """Drop `seq_id`; returns how many blocks became free (blocks shared by a fork stay held)."""
        return self._drop(self.seqs.slot("sequence_id", seq_id))

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
        self.pool.incref(seqs.tables[src, :shared])
        seqs.tables[dst, :shared] = seqs.tables[src, :shared]
        seqs.tables[dst, shared:held] = copies
        self._copy_blocks(seqs.tables[src, shared:held], copies)
        seqs.num_blocks[dst] = held
        seqs.lengths[dst] = seqs.lengths[src]
        seqs.touch([dst], self._clock())  # the source is only read
        return self._state(dst)

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
            expired.append(self.seqs.id_of(slot))
            self._drop(slot)
        self.evicted[EVICT_IDLE_TTL] += len(expired)
        return expired

    # ---- appends ------------------------------------------------------------------------------

    def prepare_append(
        self, layer: int, seq_ids: Sequence[str], positions: Sequence[int] | np.ndarray, num_tokens: int
    ) -> AppendPlan:
        """Validate an append of `num_tokens` tokens to each sequence at `layer` and reserve blocks.

        `positions[b]` must equal sequence b's current length at `layer`. Raises (nothing changed):
        INVALID_ARGUMENT bad layer/num_tokens/batch or a sequence twice; NOT_FOUND unknown sequence;
        FAILED_PRECONDITION wrong position or an append already in flight at this layer;
        OUT_OF_RANGE past `max_context`; RESOURCE_EXHAUSTED not enough free blocks.
        """
        plan = self._prepare_small(layer, seq_ids, positions, num_tokens)
        if plan is not None:
            return plan
        seqs, BL = self.seqs, self.block_len
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if num_tokens < 1:
            raise InvalidArgument(f"num_tokens: expected >= 1, got {num_tokens}")
        B = len(seq_ids)
        if B < 1:
            raise InvalidArgument("sequence_ids: expected at least one sequence, got none")
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (B,):
            raise InvalidArgument(f"positions: expected {B} (one per sequence), got {pos.size}")
        slots = seqs.slots("sequence_ids", seq_ids)
        if len(set(seq_ids)) != B:
            first: dict[str, int] = {}
            for b, sid in enumerate(seq_ids):
                if sid in first:
                    raise InvalidArgument(
                        f"sequence_ids[{b}]: {sid!r} already at sequence_ids[{first[sid]}]; expected distinct ids"
                    )
                first[sid] = b
        lens = seqs.lengths[slots, layer]
        if (pos != lens).any():
            b = int(np.flatnonzero(pos != lens)[0])
            raise FailedPrecondition(
                f"positions[{b}]: {int(pos[b])} is not sequence {seq_ids[b]!r}'s length at layer {layer}; "
                f"expected {int(lens[b])}"
            )
        if seqs.pending[slots, layer].any():
            b = int(np.flatnonzero(seqs.pending[slots, layer])[0])
            raise FailedPrecondition(
                f"sequence_ids[{b}]: sequence {seq_ids[b]!r} already has an append in flight at layer {layer}"
            )
        ends = pos + num_tokens
        if ends.max() > self.max_context:
            b = int(np.flatnonzero(ends > self.max_context)[0])
            raise OutOfRange(
                f"positions[{b}]: {int(pos[b])} + {num_tokens} tokens exceeds max_context for sequence "
                f"{seq_ids[b]!r}; expected at most {self.max_context} tokens"
            )
        need, held = -(-ends // BL), seqs.num_blocks[slots]
        fresh = int(np.maximum(need - held, 0).sum())
        cow = 0
        if self.pool.shared_count:  # no fork alive: nothing can need a copy
            first_blk = pos // BL
            rows, cols = _ragged(first_blk, np.minimum(need, held) - first_blk)
            # An upper bound: a block shared by two writers of this batch may need only one copy.
            cow = int((self.pool.refcounts(seqs.tables[slots[rows], cols]) > 1).sum())
        if fresh + cow > self.pool.free_count:
            raise ResourceExhausted(
                f"KV cache: the batch needs {fresh + cow} free blocks ({fresh} new, {cow} copy-on-write), "
                f"{self.pool.free_count} of {self.num_blocks} free; expected at most {self.pool.free_count}"
            )
        reserved = self.pool.allocate(fresh + cow)
        seqs.pending[slots, layer] = True
        seqs.touch(slots, self._clock())
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=pos, num_tokens=num_tokens,
            seq_lens=ends.astype(np.int32), _slots=slots, _generations=seqs.generation[slots],
            _reserved=reserved,
        )  # fmt: skip

    def _prepare_small(
        self, layer: int, seq_ids: Sequence[str], positions: Sequence[int] | np.ndarray, num_tokens: int
    ) -> AppendPlan | None:
        """`prepare_append` of the common step in scalar Python: at most SMALL_BATCH distinct live
        sequences at their lengths, none in flight at `layer`, within max_context, room in the
        pool, and no shared block anywhere (so nothing needs a copy-on-write reservation). None,
        with nothing changed, for anything else: the general path then decides (and raises)."""
        B = len(seq_ids)
        if not 0 < B <= self.small_batch or self.pool.shared_count or num_tokens < 1:
            return None
        if not 0 <= layer < self.num_layers:
            return None
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (B,):
            return None
        seqs, BL, limit = self.seqs, self.block_len, self.max_context - num_tokens
        slot_of, lengths, pending, num_blocks = seqs._slot_of, seqs.lengths, seqs.pending, seqs.num_blocks
        slots: list[int] = []
        fresh = 0
        for seq_id, p in zip(seq_ids, pos.tolist(), strict=True):
            slot = slot_of.get(seq_id)
            if slot is None or lengths[slot, layer] != p or pending[slot, layer] or p > limit:
                return None
            fresh += max(0, -(-(p + num_tokens) // BL) - int(num_blocks[slot]))
            slots.append(slot)
        if len(set(slots)) < B or fresh > self.pool.free_count:
            return None
        reserved = self.pool.allocate(fresh)
        now = self._clock()
        for slot in slots:
            pending[slot, layer] = True
            seqs.last_used[slot] = now
        slot_ids = np.array(slots, dtype=np.int64)
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=pos, num_tokens=num_tokens,
            seq_lens=(pos + num_tokens).astype(np.int32), _slots=slot_ids, _generations=seqs.generation[slot_ids],
            _reserved=reserved,
        )  # fmt: skip

    def commit(self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, *, hold: bool = False) -> None:
        """Write `k_new`, `v_new` `[B, num_kv_heads, S, head_dim]` into the plan's slots, advance
        the lengths at `plan.layer` and set `plan.block_tables`.

        A shape error raises INVALID_ARGUMENT and aborts the plan (nothing changed). Values are
        cast to the cache dtype. Sequences released since prepare are skipped.

        `hold=True` (a kernel will read `plan.block_tables`): the plan keeps a reference to every
        block in its tables and its sequences stay in flight at the layer until `finish(plan)` or
        `rollback(plan)` (see the module docstring). Without it the plan is finished at once.
        """
        self._check_open(plan, "commit")
        expect = (plan.batch_size, self.num_kv_heads, plan.num_tokens, self.head_dim)
        for name, t in (("k", k_new), ("v", v_new)):
            if t.shape != expect:
                self.abort(plan)
                raise InvalidArgument(
                    f"{name}: expected shape [B, num_kv_heads, S, head_dim] = {list(expect)}, got {list(t.shape)}"
                )
        if plan.batch_size <= self.small_batch and not self.pool.shared_count:
            gen = self.seqs.generation
            if all(gen[s] == g for s, g in zip(plan._slots.tolist(), plan._generations.tolist(), strict=True)):
                self._commit_small(plan, k_new, v_new, hold)
                return
        seqs, BL, layer, S = self.seqs, self.block_len, plan.layer, plan.num_tokens
        slots, pos, ends = plan._slots, plan.positions, plan.seq_lens.astype(np.int64)
        live = seqs.generation[slots] == plan._generations
        all_live = bool(live.all())
        if not all_live:  # released since prepare: write nothing for them
            slots, pos, ends = slots[live], pos[live], ends[live]
            k_new, v_new = k_new[live], v_new[live]
        reserved, used = plan._reserved, 0
        need, held = -(-ends // BL), seqs.num_blocks[slots]
        # New blocks at the tables' ends (fewer than reserved when another layer grew them first).
        if (need > held).any():
            rows, cols = _ragged(held, need - held)
            used = rows.size
            seqs.tables[slots[rows], cols] = reserved[:used]
            seqs.num_blocks[slots] = np.maximum(need, held)
        if self.pool.shared_count:
            used = self._copy_on_write(slots, pos // BL, np.minimum(need, held), reserved, used)
        self.pool.free(reserved[used:])
        before = seqs.lengths[slots].max(axis=1)
        self.tokens_appended += int(np.maximum(ends - before, 0).sum())
        seqs.lengths[slots, layer] = ends
        if not hold:
            seqs.pending[slots, layer] = False
        width = max(1, _ceil_div(int(plan.seq_lens.max()), BL))
        tables = seqs.tables[plan._slots, :width]
        tok = pos[:, None] + np.arange(S)  # [B', S] positions written
        if all_live:
            blk = tables[np.arange(len(slots))[:, None], tok // BL]
        else:
            blk = tables[np.flatnonzero(live)[:, None], tok // BL]
            tables[~live] = 0
        off = tok % BL
        # [Hkv, B', S, d] values for the [B', S] slots: one store write, no token loop.
        self.store.write(layer, blk, off, k_new.transpose(1, 0, 2, 3), v_new.transpose(1, 0, 2, 3))
        plan._block_tables = tables
        if hold:
            # Every block the launch may read, once: [B, width] entries past a row's length are
            # block 0 padding (read-protected as well, harmlessly: it is a valid id).
            used = -(-plan.seq_lens.astype(np.int64) // BL)
            rows, cols = _ragged(np.zeros_like(used), np.where(live, used, 0))
            ids = tables[rows, cols]
            # With no block shared, no id is named twice (each table names its own blocks once).
            plan._held = np.unique(ids).astype(np.int32) if self.pool.shared_count else ids
            self.pool.incref(plan._held)
            plan._state = "held"
        else:
            plan._state = "committed"

    def _commit_small(self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, hold: bool) -> None:
        """`commit` in scalar Python for a small batch whose sequences are all live while no block
        is shared (so no write needs a copy first): the same tables, lengths, counts and writes."""
        seqs, BL, layer, S = self.seqs, self.block_len, plan.layer, plan.num_tokens
        tables, num_blocks, lengths, pending = seqs.tables, seqs.num_blocks, seqs.lengths, seqs.pending
        reserved, used, grown = plan._reserved, 0, 0
        slots, ends = plan._slots.tolist(), plan.seq_lens.tolist()
        blk: list[int] = []
        off: list[int] = []
        for slot, end in zip(slots, ends, strict=True):
            need, held = -(-end // BL), int(num_blocks[slot])
            if need > held:  # new blocks at the table's end (none when another layer grew it first)
                tables[slot, held:need] = reserved[used : used + need - held]
                used += need - held
                num_blocks[slot] = need
            row = lengths[slot]
            grown += max(0, end - max(row.tolist()))
            row[layer] = end
            if not hold:
                pending[slot, layer] = False
            for t in range(end - S, end):
                blk.append(int(tables[slot, t // BL]))
                off.append(t % BL)
        if used < reserved.size:
            self.pool.free(reserved[used:])
        self.tokens_appended += grown
        B = len(slots)
        tables_out = tables[plan._slots, : max(1, -(-max(ends) // BL))]
        self.store.write(
            layer, np.array(blk, dtype=np.int64).reshape(B, S), np.array(off, dtype=np.int64).reshape(B, S),
            k_new.transpose(1, 0, 2, 3), v_new.transpose(1, 0, 2, 3),
        )  # fmt: skip
        plan._block_tables = tables_out
        if hold:
            # No block is shared: the rows' used entries are distinct ids (no np.unique needed).
            counts = -(-plan.seq_lens.astype(np.int64) // BL)
            if B == 1:
                plan._held = tables_out[0, : counts[0]].copy()
            else:
                plan._held = tables_out[np.arange(tables_out.shape[1])[None, :] < counts[:, None]]
            self.pool.incref(plan._held)
            plan._state = "held"
        else:
            plan._state = "committed"

    def finish(self, plan: AppendPlan) -> None:
        """The launch reading a held plan's blocks is over: drop its block references and clear
        the in-flight mark of its (still live) sequences at the layer."""
        if plan._state != "held":
            raise RuntimeError(f"KVCache.finish: expected a held plan, got one {plan._state}")
        self._unhold(plan)
        plan._state = "committed"

    def _unhold(self, plan: AppendPlan) -> None:
        self.pool.decref(plan._held)
        plan._held = plan._held[:0]
        seqs, layer = self.seqs, plan.layer
        if plan.batch_size <= self.small_batch:
            gen, pending = seqs.generation, seqs.pending
            for slot, g in zip(plan._slots.tolist(), plan._generations.tolist(), strict=True):
                if gen[slot] == g:
                    pending[slot, layer] = False
            return
        slots = plan._slots[seqs.generation[plan._slots] == plan._generations]
        seqs.pending[slots, layer] = False

    def in_flight(self, seq_id: str) -> bool:
        """`seq_id` has an append prepared or a held plan (a kernel reading it) at some layer."""
        slot = self.seqs._slot_of.get(seq_id)
        return slot is not None and bool(self.seqs.pending[slot].any())

    def abort(self, plan: AppendPlan) -> None:
        """Return the plan's reserved blocks; nothing is appended."""
        self._check_open(plan, "abort")
        self.pool.free(plan._reserved)
        slots = plan._slots[self.seqs.generation[plan._slots] == plan._generations]
        self.seqs.pending[slots, plan.layer] = False
        plan._state = "aborted"

    def rollback(self, plan: AppendPlan) -> int:
        """Undo a committed or held `plan` at its layer: lengths back to `plan.positions`, blocks
        no layer needs any more returned to the pool, a hold dropped. Returns how many sequences
        were rolled back.

        Skipped: sequences released since, and sequences whose length at the layer moved on (a
        later append built on these tokens; impossible while the plan is held). Copy-on-write
        copies made by the commit stay (they hold the same data). A fork taken in between keeps
        its own copy of the tokens (impossible while held).
        """
        if plan._state not in ("committed", "held"):
            raise RuntimeError(f"KVCache.rollback: expected a committed plan, got one {plan._state}")
        if plan._state == "held":
            self._unhold(plan)
        seqs, layer = self.seqs, plan.layer
        slots, pos = plan._slots, plan.positions
        keep = (seqs.generation[slots] == plan._generations) & (seqs.lengths[slots, layer] == plan.seq_lens)
        slots, pos = slots[keep], pos[keep]
        if slots.size:
            before = seqs.lengths[slots].max(axis=1)
            seqs.lengths[slots, layer] = pos
            after = seqs.lengths[slots].max(axis=1)
            self.tokens_appended -= int((before - after).sum())
            need, held = -(-after // self.block_len), seqs.num_blocks[slots]
            rows, cols = _ragged(need, held - need)
            if rows.size:
                self.pool.decref(seqs.tables[slots[rows], cols])
                seqs.tables[slots[rows], cols] = 0
                seqs.num_blocks[slots] = np.minimum(need, held)
        plan._state = "rolled_back"
        return int(slots.size)

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

    # ---- internals ----------------------------------------------------------------------------

    def _copy_on_write(
        self, slots: np.ndarray, first: np.ndarray, upto: np.ndarray, reserved: np.ndarray, used: int
    ) -> int:
        """Give each sequence a private copy of every shared block it is about to write (blocks
        `first[i] .. upto[i]-1` of `slots[i]`), taking targets from `reserved[used:]`.

        Sequential on purpose: once one writer copied a block, a second writer in the same batch
        may be its last holder and write in place. Returns the new `used`.
        """
        tables = self.seqs.tables
        rows, cols = _ragged(first, upto - first)
        for slot, col in zip(slots[rows].tolist(), cols.tolist(), strict=True):
            old = tables[slot, col : col + 1].copy()
            if self.pool.refcount(int(old[0])) > 1:
                new = reserved[used : used + 1]
                used += 1
                self._copy_blocks(old, new)
                tables[slot, col] = new[0]
                self.pool.decref(old)
        return used

    def _copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        if src.size:
            self.store.copy_blocks(src, dst)

    def _drop(self, slot: int) -> int:
        freed = self.pool.decref(self.seqs.held(slot))
        self.seqs.remove(slot)
        return freed

    def _check_not_pending(self, slot: int, what: str) -> None:
        pending = self.seqs.pending[slot]
        if pending.any():
            raise FailedPrecondition(
                f"sequence {self.seqs.id_of(slot)!r} has an append in flight at layer {int(pending.argmax())}; "
                f"expected none to {what} it"
            )

    @staticmethod
    def _check_open(plan: AppendPlan, what: str) -> None:
        if plan._state != "prepared":
            raise RuntimeError(f"KVCache.{what}: plan is already {plan._state}")

    def _new_id(self) -> str:
        while True:
            seq_id = uuid.uuid4().hex
            if seq_id not in self.seqs:
                return seq_id

    def _state(self, slot: int) -> SequenceState:
        seqs = self.seqs
        return SequenceState(
            seqs.id_of(slot), tuple(seqs.lengths[slot].tolist()), int(seqs.num_blocks[slot]),
            tuple(seqs.held(slot).tolist()),
        )  # fmt: skip
