"""`SequenceTable`: per-sequence bookkeeping of the KV cache as rows of preallocated arrays.

Each live sequence occupies a *slot*: row `slot` of
- `tables` int32 `[capacity, max_blocks_per_seq]`: physical block of each logical block (entries
  past `num_blocks[slot]` are 0, so any prefix of a row is a valid kernel block table),
- `num_blocks` int64 `[capacity]`: blocks held,
- `lengths` int64 `[capacity, num_layers]`: tokens cached per layer,
- `base` int64 `[capacity]`: absolute position of the first cached token (context-parallel
  segments start past 0; positions are `base + length`, lengths stay counts),
- `pending` bool `[capacity, num_layers]`: an append prepared but not yet committed at that layer,
- `last_used` float64 `[capacity]`: clock seconds of the last use,
- `generation` int64 `[capacity]`: bumped when the slot is freed, so a plan can tell that "its"
  sequence was released meanwhile even if the slot was reused,
- `live` bool `[capacity]`: the slot holds a sequence.

Rows make batch operations single numpy expressions (`lengths[slots, layer]`,
`tables[slots, :w]`) instead of Python loops over sequences (vLLM's model runner keeps its block
table as one 2-D array for the same reason). Capacity doubles when the slots run out (on create,
never on the append path). Marking a batch used is one array store; idle expiry scans
`last_used` vectorised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from tkg.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

MAX_SEQUENCE_ID_LEN = 256  # bytes of a caller's id (the service checks it)
# The cache's own limit: a caller's id plus its tenant's namespace prefix (`tkg.server.tenants`).
MAX_CACHE_ID_LEN = MAX_SEQUENCE_ID_LEN + 65


class Outside(Protocol):
    """Sequences living outside the table (the KV tiers' index): their ids are taken and they
    count against `max_sequences`."""

    def __contains__(self, seq_id: object) -> bool: ...
    def __len__(self) -> int: ...


class _Nowhere:
    def __contains__(self, seq_id: object) -> bool:
        return False

    def __len__(self) -> int:
        return 0


class SequenceTable:
    """Slots of per-sequence state; see the module docstring for the arrays."""

    def __init__(
        self, num_layers: int, max_blocks_per_seq: int, capacity: int = 64, max_sequences: int | None = None
    ) -> None:
        self.num_layers = num_layers
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_sequences = max_sequences
        if max_sequences is not None:
            capacity = min(capacity, max_sequences)
        capacity = max(capacity, 1)
        self.tables = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.lengths = np.zeros((capacity, num_layers), dtype=np.int64)
        self.base = np.zeros(capacity, dtype=np.int64)
        self.pending = np.zeros((capacity, num_layers), dtype=bool)
        self.last_used = np.zeros(capacity, dtype=np.float64)
        self.generation = np.zeros(capacity, dtype=np.int64)
        self.live = np.zeros(capacity, dtype=bool)
        self._free_slots = list(range(capacity - 1, -1, -1))  # a stack; slot 0 first
        self._slot_of: dict[str, int] = {}
        self._id_of: list[str | None] = [None] * capacity
        self.outside: Outside = _Nowhere()  # set by `tkg.server.tiers.Tiers`

    @property
    def capacity(self) -> int:
        return self.num_blocks.shape[0]

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._slot_of

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, slot) pairs in creation order (a snapshot: safe to remove while iterating)."""
        return iter(list(self._slot_of.items()))

    def idle(self, now: float, ttl_s: float) -> list[int]:
        """Live slots unused for more than `ttl_s` at `now`, least recently used first."""
        slots = np.flatnonzero(self.live & (now - self.last_used > ttl_s))
        return slots[np.argsort(self.last_used[slots], kind="stable")].tolist()

    def id_of(self, slot: int) -> str:
        seq_id = self._id_of[slot]
        if seq_id is None:
            raise KeyError(f"slot {slot} is free")
        return seq_id

    def slot(self, field_name: str, seq_id: str) -> int:
        """The slot of `seq_id`; NOT_FOUND naming `field_name` when it is not live."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            raise NotFound(
                f"{field_name}: no sequence {seq_id!r} (unknown, released or expired); expected a live sequence id"
            )
        return slot

    def slots(self, field_name: str, seq_ids: Sequence[str]) -> np.ndarray:
        """int64 `[B]` slots of `seq_ids`; NOT_FOUND naming `field_name[b]` for the first unknown."""
        try:
            return np.fromiter(map(self._slot_of.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))
        except KeyError:
            for b, seq_id in enumerate(seq_ids):
                self.slot(f"{field_name}[{b}]", seq_id)
            raise

    def check_new_id(self, seq_id: str) -> None:
        """INVALID_ARGUMENT for a malformed id, ALREADY_EXISTS for one in use, RESOURCE_EXHAUSTED when full."""
        if not isinstance(seq_id, str) or len(seq_id) > MAX_CACHE_ID_LEN:
            raise InvalidArgument(
                f"sequence_id: expected a string of at most {MAX_CACHE_ID_LEN} characters "
                f"(an id of up to {MAX_SEQUENCE_ID_LEN} bytes plus its tenant's prefix)"
            )
        if seq_id in self._slot_of or seq_id in self.outside:
            raise AlreadyExists(f"sequence_id: {seq_id!r} is already in use; expected an unused id")
        live = len(self._slot_of) + len(self.outside)
        if self.max_sequences is not None and live >= self.max_sequences:
            raise ResourceExhausted(
                f"sequences: {live} live; expected at most {self.max_sequences} (every KV tier counts)"
            )

    def add(self, seq_id: str, now: float, base: int = 0) -> int:
        """A zeroed slot for `seq_id` (checked with `check_new_id` first) whose first token sits at
        absolute position `base`, most recently used."""
        self.check_new_id(seq_id)
        if not self._free_slots:
            self._grow()
        slot = self._free_slots.pop()
        self.base[slot] = base
        self._slot_of[seq_id] = slot
        self._id_of[slot] = seq_id
        self.live[slot] = True
        self.last_used[slot] = now
        return slot

    def remove(self, slot: int) -> None:
        """Free `slot` (the caller has returned its blocks)."""
        del self._slot_of[self.id_of(slot)]
        self._id_of[slot] = None
        self.live[slot] = False
        self.tables[slot, : self.num_blocks[slot]] = 0
        self.num_blocks[slot] = 0
        self.lengths[slot] = 0
        self.base[slot] = 0
        self.pending[slot] = False
        self.generation[slot] += 1
        self._free_slots.append(slot)

    def touch(self, slots: np.ndarray | list[int], now: float) -> None:
        """Mark `slots` used at `now`."""
        self.last_used[slots] = now

    def held(self, slot: int) -> np.ndarray:
        """The block ids `slot` holds (a view)."""
        return self.tables[slot, : self.num_blocks[slot]]

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2

        def widen(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new, *a.shape[1:]), dtype=a.dtype)
            out[:old] = a
            return out

        self.tables, self.num_blocks, self.lengths = widen(self.tables), widen(self.num_blocks), widen(self.lengths)
        self.base = widen(self.base)
        self.pending, self.last_used, self.generation, self.live = (
            widen(self.pending), widen(self.last_used), widen(self.generation), widen(self.live),
        )  # fmt: skip
        self._id_of.extend([None] * (new - old))
        self._free_slots.extend(range(new - 1, old - 1, -1))
