"""`KVCache`: the service's paged KV cache: per-layer storage, sequences, two-phase appends.

Storage: per layer `k[layer]` and `v[layer]`, numpy `[num_kv_heads, num_blocks, block_len,
head_dim]` (head-major: `k[layer][g]` is exactly the kernel's `[num_blocks, block_len, d]` pool
for kv head g), allocated and written once at start so the hot path never allocates or page-faults
on cache memory. Block ids come from one `BlockPool` shared by all layers: block i is slot i in
every layer, so `num_blocks`/`free_blocks` are "per layer, every layer allocates alike".

A sequence owns a block table (an int32 row of `max_blocks_per_seq = ceil(max_context /
block_len)` entries, unused entries 0 so every entry is a valid id) and one length per layer
(layers advance independently within a decode step). It holds `ceil(max(lengths) / block_len)`
blocks. Fork shares the source's full blocks copy-on-write; a write into a block with reference
count > 1 first copies it (all layers) into a fresh block.

Appends are two-phase and all-or-nothing for a batch: `prepare_append` validates every sequence
and reserves every block the batch may need (new blocks and copy-on-write copies) or raises with
nothing changed; `commit` then cannot fail for lack of blocks: it applies table changes, writes
`[B, Hkv, S, d]` into the slots with one fancy-indexed assignment per tensor and advances the
layer's lengths; `abort` returns the reservation.

Threading: every method must be called from ONE thread (the service's asyncio loop); there are no
locks. A kernel worker thread may READ `k[layer]`/`v[layer]` through a committed plan's
`block_tables` while the loop goes on: later commits write only into blocks of their own
sequences or into freshly reserved blocks (copy-on-write targets), never into blocks another live
sequence reads. Releasing a sequence while its kernel runs can let its blocks be reused; only that
(released) sequence's output is affected.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tkg.kernel_dtypes import BF16
from tkg.server.block_pool import BlockPool
from tkg.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

KV_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
MAX_SEQUENCE_ID_LEN = 256
EVICT_IDLE_TTL = "idle_ttl"


def kv_dtype(name: str | np.dtype) -> np.dtype:
    """The numpy dtype for a KV dtype name (`float32`, `float16`, `bfloat16`) or dtype."""
    key = name if isinstance(name, str) else np.dtype(name).name
    if key not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {sorted(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[key]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Sequence:
    """A sequence's mutable state (internal; callers see `SequenceState` snapshots)."""

    __slots__ = ("alive", "last_used", "lengths", "num_blocks", "pending", "seq_id", "table")

    def __init__(self, seq_id: str, num_layers: int, max_blocks: int, now: float) -> None:
        self.seq_id = seq_id
        self.table = np.zeros(max_blocks, dtype=np.int32)  # physical block of each logical block
        self.num_blocks = 0  # entries of `table` that are held
        self.lengths = np.zeros(num_layers, dtype=np.int64)  # tokens cached, per layer
        self.pending = np.zeros(num_layers, dtype=bool)  # a prepared, uncommitted append per layer
        self.last_used = now
        self.alive = True

    def held(self) -> np.ndarray:
        return self.table[: self.num_blocks]


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
    set by `KVCache.commit`. Pass both to `tkg.kernel.paged_decode` with `k[layer]`/`v[layer]`.
    """

    layer: int
    seq_ids: tuple[str, ...]
    positions: np.ndarray  # int64 [B], each sequence's length at `layer` before the append
    num_tokens: int
    seq_lens: np.ndarray  # int32 [B]
    _seqs: list[_Sequence] = field(repr=False)
    _reserved: np.ndarray = field(repr=False)  # int32 block ids taken from the pool
    _state: str = "prepared"
    _block_tables: np.ndarray | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def reserved_blocks(self) -> int:
        return int(self._reserved.size)

    @property
    def state(self) -> str:
        """`prepared`, `committed` or `aborted`."""
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
    ) -> None:
        for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("block_len", block_len), ("num_blocks", num_blocks), ("max_context", max_context),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"KVCache: {name}: expected >= 1, got {value}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_len = block_len
        self.num_blocks = num_blocks
        self.max_context = max_context
        self.max_blocks_per_seq = _ceil_div(max_context, block_len)
        self.dtype = kv_dtype(dtype)
        self.max_sequences = max_sequences
        self._clock = clock
        self.pool = BlockPool(num_blocks)
        shape = (num_kv_heads, num_blocks, block_len, head_dim)
        self.k: list[np.ndarray] = [self._touched(shape) for _ in range(num_layers)]
        self.v: list[np.ndarray] = [self._touched(shape) for _ in range(num_layers)]
        # Least recently used first: idle expiry pops from the front.
        self._seqs: OrderedDict[str, _Sequence] = OrderedDict()
        self.tokens_appended = 0  # new tokens per sequence (growth of max(lengths)), all layers count once
        self.evicted: Counter[str] = Counter()

    def _touched(self, shape: tuple[int, ...]) -> np.ndarray:
        # Writing every page now keeps first-touch page faults off the decode path.
        a = np.empty(shape, dtype=self.dtype)
        a.fill(0)
        return a

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
        return len(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def sequence_ids(self) -> list[str]:
        """Live sequence ids, least recently used first."""
        return list(self._seqs)

    def snapshot(self) -> list[SequenceState]:
        """Every live sequence's state, least recently used first, without marking them used."""
        return [self._state(s) for s in self._seqs.values()]

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            blocks_total=self.num_blocks, blocks_used=self.used_blocks, usage_ratio=self.usage_ratio,
            active_sequences=len(self._seqs), tokens_appended=self.tokens_appended, evicted=dict(self.evicted),
        )  # fmt: skip

    # ---- sequences ----------------------------------------------------------------------------

    def create(self, seq_id: str | None = None) -> SequenceState:
        """A new empty sequence; None or "" picks a fresh id. ALREADY_EXISTS if the id is in use."""
        if seq_id:
            self._check_id("sequence_id", seq_id)
            if seq_id in self._seqs:
                raise AlreadyExists(f"sequence_id: {seq_id!r} is already in use; expected an unused id")
        else:
            seq_id = self._new_id()
        self._check_room()
        seq = _Sequence(seq_id, self.num_layers, self.max_blocks_per_seq, self._clock())
        self._seqs[seq_id] = seq
        return self._state(seq)

    def get(self, seq_id: str) -> SequenceState:
        """Lengths per layer and held blocks of `seq_id` (NOT_FOUND if unknown or expired)."""
        seq = self._lookup("sequence_id", seq_id)
        self._touch(seq)
        return self._state(seq)

    def release(self, seq_id: str) -> int:
        """Drop `seq_id`; returns how many blocks became free (blocks shared by a fork stay held)."""
        seq = self._lookup("sequence_id", seq_id)
        return self._drop(seq)

    def truncate(self, seq_id: str, length: int) -> int:
        """Set every layer of `seq_id` to `length` tokens; returns how many blocks became free.

        OUT_OF_RANGE when `length` exceeds any layer's current length.
        """
        seq = self._lookup("sequence_id", seq_id)
        if length < 0:
            raise InvalidArgument(f"length: expected >= 0, got {length}")
        shortest = int(seq.lengths.argmin())
        if length > seq.lengths[shortest]:
            raise OutOfRange(
                f"length: {length} is past sequence {seq_id!r}'s length {int(seq.lengths[shortest])} at layer "
                f"{shortest}; expected <= {int(seq.lengths[shortest])}"
            )
        self._check_not_pending(seq, "truncate")
        keep = _ceil_div(length, self.block_len)
        freed = self.pool.decref(seq.table[keep : seq.num_blocks])
        seq.table[keep : seq.num_blocks] = 0
        seq.num_blocks = keep
        seq.lengths[:] = length
        self._touch(seq)
        return freed

    def fork(self, source_id: str, seq_id: str | None = None) -> SequenceState:
        """A new sequence with `source_id`'s tokens: blocks full at every layer are shared
        copy-on-write, the rest (the partial last block) copied into fresh blocks, all layers.

        None or "" picks a fresh id. RESOURCE_EXHAUSTED (nothing changed) without room for the copy.
        """
        src = self._lookup("source_id", source_id)
        if seq_id:
            self._check_id("sequence_id", seq_id)
            if seq_id in self._seqs:
                raise AlreadyExists(f"sequence_id: {seq_id!r} is already in use; expected an unused id")
        else:
            seq_id = self._new_id()
        self._check_not_pending(src, "fork")
        self._check_room()
        shared = min(int(src.lengths.min()) // self.block_len, src.num_blocks)
        copies = self.pool.allocate(src.num_blocks - shared)  # raises with nothing changed
        seq = _Sequence(seq_id, self.num_layers, self.max_blocks_per_seq, self._clock())
        self.pool.incref(src.table[:shared])
        seq.table[:shared] = src.table[:shared]
        seq.table[shared : src.num_blocks] = copies
        self._copy_blocks(src.table[shared : src.num_blocks], copies)
        seq.num_blocks = src.num_blocks
        seq.lengths[:] = src.lengths
        self._seqs[seq_id] = seq
        self._touch(src)
        return self._state(seq)

    def expire_idle(self, now: float | None, ttl_s: float) -> list[str]:
        """Release sequences unused for more than `ttl_s` seconds at time `now` (the injected
        clock's seconds; None reads it); returns their ids, least recently used first.

        Sequences with an append in flight are kept. Counted in `evicted["idle_ttl"]`.
        """
        now = self._clock() if now is None else now
        expired = []
        for seq in list(self._seqs.values()):
            if now - seq.last_used <= ttl_s:
                break  # least recently used first: the rest are fresher
            if seq.pending.any():
                continue
            self._drop(seq)
            expired.append(seq.seq_id)
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
        seqs = [self._lookup(f"sequence_ids[{b}]", sid) for b, sid in enumerate(seq_ids)]
        if len(set(seq_ids)) != B:
            first: dict[str, int] = {}
            for b, sid in enumerate(seq_ids):
                if sid in first:
                    raise InvalidArgument(
                        f"sequence_ids[{b}]: {sid!r} already at sequence_ids[{first[sid]}]; expected distinct ids"
                    )
                first[sid] = b
        lens = np.fromiter((s.lengths[layer] for s in seqs), dtype=np.int64, count=B)
        for b in np.flatnonzero(pos != lens)[:1]:
            raise FailedPrecondition(
                f"positions[{b}]: {int(pos[b])} is not sequence {seqs[b].seq_id!r}'s length at layer {layer}; "
                f"expected {int(lens[b])}"
            )
        for b, s in enumerate(seqs):
            if s.pending[layer]:
                raise FailedPrecondition(
                    f"sequence_ids[{b}]: sequence {s.seq_id!r} already has an append in flight at layer {layer}"
                )
        ends = pos + num_tokens
        for b in np.flatnonzero(ends > self.max_context)[:1]:
            raise OutOfRange(
                f"positions[{b}]: {int(pos[b])} + {num_tokens} tokens exceeds max_context for sequence "
                f"{seqs[b].seq_id!r}; expected at most {self.max_context} tokens"
            )
        fresh = cow = 0
        for s, p, e in zip(seqs, pos.tolist(), ends.tolist(), strict=True):
            fresh += max(0, _ceil_div(e, self.block_len) - s.num_blocks)
            written = s.table[p // self.block_len : min(_ceil_div(e, self.block_len), s.num_blocks)]
            # An upper bound: a block shared by two writers of this batch may need only one copy.
            cow += int((self.pool.refcounts(written) > 1).sum())
        if fresh + cow > self.pool.free_count:
            raise ResourceExhausted(
                f"KV cache: the batch needs {fresh + cow} free blocks ({fresh} new, {cow} copy-on-write), "
                f"{self.pool.free_count} of {self.num_blocks} free"
            )
        reserved = self.pool.allocate(fresh + cow)
        now = self._clock()
        for s in seqs:
            s.pending[layer] = True
            self._touch(s, now)
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=pos, num_tokens=num_tokens,
            seq_lens=ends.astype(np.int32), _seqs=seqs, _reserved=reserved,
        )  # fmt: skip

    def commit(self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Write `k_new`, `v_new` `[B, num_kv_heads, S, head_dim]` into the plan's slots, advance
        the lengths at `plan.layer` and set `plan.block_tables`.

        A shape error raises INVALID_ARGUMENT and aborts the plan (nothing changed). Values are
        cast to the cache dtype. Sequences released since prepare are skipped.
        """
        self._check_open(plan, "commit")
        expect = (plan.batch_size, self.num_kv_heads, plan.num_tokens, self.head_dim)
        for name, t in (("k", k_new), ("v", v_new)):
            if t.shape != expect:
                self.abort(plan)
                raise InvalidArgument(f"{name}: expected shape [B, num_kv_heads, S, head_dim] = {list(expect)}, "
                                      f"got {list(t.shape)}")  # fmt: skip
        BL, layer, S = self.block_len, plan.layer, plan.num_tokens
        reserved, used = plan._reserved, 0
        live = np.fromiter((s.alive for s in plan._seqs), dtype=bool, count=plan.batch_size)
        for s, p, e in zip(plan._seqs, plan.positions.tolist(), plan.seq_lens.tolist(), strict=True):
            if not s.alive:
                continue
            need = _ceil_div(e, BL)
            first, held = p // BL, s.num_blocks
            if need > held:  # another layer may have grown the table since prepare
                s.table[held:need] = reserved[used : used + need - held]
                used += need - held
                s.num_blocks = need
            idx = np.arange(first, min(need, held))
            shared = idx[self.pool.refcounts(s.table[idx]) > 1]
            if shared.size:
                dst = reserved[used : used + shared.size]
                used += shared.size
                old = s.table[shared].copy()
                self._copy_blocks(old, dst)
                s.table[shared] = dst
                self.pool.decref(old)
            grown = e - int(s.lengths.max())
            if grown > 0:
                self.tokens_appended += grown
            s.lengths[layer] = e
            s.pending[layer] = False
        self.pool.free(reserved[used:])
        width = max(1, _ceil_div(int(plan.seq_lens.max()), BL))
        tables = np.stack([s.table[:width] for s in plan._seqs])
        tok = plan.positions[:, None] + np.arange(S)  # [B, S] positions written
        blk = np.take_along_axis(tables, tok // BL, axis=1)[live]
        off = (tok % BL)[live]
        # [Hkv, NB, BL, d][:, blk, off] is [Hkv, B', S, d]: one scatter per tensor, no token loop.
        self.k[layer][:, blk, off] = k_new[live].transpose(1, 0, 2, 3)
        self.v[layer][:, blk, off] = v_new[live].transpose(1, 0, 2, 3)
        plan._block_tables = tables
        plan._state = "committed"

    def abort(self, plan: AppendPlan) -> None:
        """Return the plan's reserved blocks; nothing is appended."""
        self._check_open(plan, "abort")
        self.pool.free(plan._reserved)
        for s in plan._seqs:
            s.pending[plan.layer] = False
        plan._state = "aborted"

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
        return self._state(plan._seqs[0])

    # ---- internals ----------------------------------------------------------------------------

    def _copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        if not src.size:
            return
        for store in (self.k, self.v):
            for a in store:
                a[:, dst] = a[:, src]

    def _drop(self, seq: _Sequence) -> int:
        freed = self.pool.decref(seq.held())
        seq.num_blocks = 0
        seq.alive = False
        del self._seqs[seq.seq_id]
        return freed

    def _touch(self, seq: _Sequence, now: float | None = None) -> None:
        seq.last_used = self._clock() if now is None else now
        self._seqs.move_to_end(seq.seq_id)

    def _lookup(self, field_name: str, seq_id: str) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise NotFound(f"{field_name}: no sequence {seq_id!r} (unknown, released or expired)")
        return seq

    def _check_id(self, field_name: str, seq_id: str) -> None:
        if not isinstance(seq_id, str) or len(seq_id) > MAX_SEQUENCE_ID_LEN:
            raise InvalidArgument(f"{field_name}: expected a string of at most {MAX_SEQUENCE_ID_LEN} characters")

    def _check_room(self) -> None:
        if self.max_sequences is not None and len(self._seqs) >= self.max_sequences:
            raise ResourceExhausted(f"sequences: {len(self._seqs)} live; expected at most {self.max_sequences}")

    @staticmethod
    def _check_not_pending(seq: _Sequence, what: str) -> None:
        if seq.pending.any():
            raise FailedPrecondition(
                f"sequence {seq.seq_id!r} has an append in flight at layer {int(seq.pending.argmax())}; "
                f"expected none to {what} it"
            )

    @staticmethod
    def _check_open(plan: AppendPlan, what: str) -> None:
        if plan._state != "prepared":
            raise RuntimeError(f"KVCache.{what}: plan is already {plan._state}")

    def _new_id(self) -> str:
        while True:
            seq_id = uuid.uuid4().hex
            if seq_id not in self._seqs:
                return seq_id

    def _state(self, seq: _Sequence) -> SequenceState:
        return SequenceState(seq.seq_id, tuple(seq.lengths.tolist()), seq.num_blocks, tuple(seq.held().tolist()))
