"""`AppendPlan`: one validated, reserved append of the KV cache's two-phase append
(`tkg.server.appends`), and `Writer`, the store write a commit may leave to its caller.

Shared by the append's general path (`tkg.server.appends`) and its fast paths
(`tkg.server.fast_appends`); the service's step engine holds plans between prepare and finish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# `commit`'s writer: (layer, blocks, offsets int [B', S], live bool [B] or None) -> None.
Writer = Callable[[int, np.ndarray, np.ndarray, "np.ndarray | None"], None]


@dataclass(eq=False)
class AppendPlan:
    """A validated, reserved append of `num_tokens` tokens at `layer` for a batch of sequences.

    `seq_lens` (int32 `[B]`, lengths after the append) is known at prepare; `block_tables` (int32
    `[B, max_blocks]`, `max_blocks = ceil(max(seq_lens) / block_len)`, copy-on-write applied) is
    set by `KVCache.commit`. Pass both to `KVCache.decode` at `layer`.
    """

    layer: int
    seq_ids: tuple[str, ...]
    positions: np.ndarray  # int64 [B], each sequence's length at `layer` before the append (a count, not absolute)
    num_tokens: int
    seq_lens: np.ndarray  # int32 [B]
    _slots: np.ndarray = field(repr=False)  # int64 [B] SequenceTable slots
    _generations: np.ndarray = field(repr=False)  # int64 [B] slot generations at prepare
    _reserved: np.ndarray = field(repr=False)  # int32 block ids taken from the pool
    _state: str = "prepared"  # prepared -> held | committed -> (rolled_back); or aborted
    _held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)  # blocks held until finish
    _block_tables: np.ndarray | None = field(default=None, repr=False)
    # commit(defer=True): the write it left to `write_deferred` (layer, block ids, offsets, live rows)
    _deferred: tuple[int, np.ndarray, np.ndarray, np.ndarray | None] | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def owner(self) -> str:
        """The sequence id its block changes are metered under (see the module docstring)."""
        return self.seq_ids[0]

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
