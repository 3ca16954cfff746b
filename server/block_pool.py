"""`BlockPool`: the ids of the KV cache's fixed-size blocks, a free stack and reference counts.

The pool knows nothing about layers, heads or bytes: a block id names the same slot in every
layer's storage (as in vLLM), so one pool serves all layers. A block is *free* when its
reference count is 0 and its id sits on the free stack; every block table holding an id owns one
reference to it. Allocation pops from the stack and freeing pushes onto it, both O(k) numpy
slices with no scan of the pool. LIFO order reuses recently freed (cache-warm) blocks first.

Not thread-safe: the owner (`KVCache`) serialises all calls (see its docstring).
"""

from __future__ import annotations

import numpy as np

from tkg.kernel.backends.host_ops import native_refcount_add
from tkg.server.errors import pool_full

# Below this many ids numpy's calls are as quick as the native call's checks.
_NATIVE_MIN = 16


class BlockPool:
    """`num_blocks` block ids with a free stack and int32 reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Stack of free ids, top at `_top - 1`; reversed so a fresh pool hands out 0, 1, 2, ...
        self._stack = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)
        self._top = num_blocks
        self._ref = np.zeros(num_blocks, dtype=np.int32)
        # Blocks with more than one holder; 0 lets appends skip copy-on-write checks entirely.
        self._shared = 0

    @property
    def free_count(self) -> int:
        return self._top

    @property
    def used_count(self) -> int:
        return self.num_blocks - self._top

    @property
    def shared_count(self) -> int:
        """Blocks held by more than one block table."""
        return self._shared

    def refcount(self, block_id: int) -> int:
        return int(self._ref[block_id])

    def refcounts(self, ids: np.ndarray) -> np.ndarray:
        """Reference counts of `ids` (int32, a copy)."""
        return self._ref[ids]

    def allocate(self, n: int) -> np.ndarray:
        """Take `n` free blocks, each with reference count 1; int32 `[n]`.

        Raises ResourceExhausted (`pool_full`) (nothing taken) when fewer than `n` are free.
        """
        if n > self._top:
            raise pool_full(n)
        ids = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._ref[ids] = 1
        return ids

    def incref(self, ids: np.ndarray) -> None:
        """One more holder for each of `ids` (distinct, all currently held)."""
        if ids.size > _NATIVE_MIN:
            try:
                done = native_refcount_add(self._ref, ids, +1)
            except ValueError:
                raise RuntimeError(f"BlockPool.incref: free block among {ids.tolist()}") from None
            if done is not None:
                self._shared += done[1]
                return
        if ids.size and (self._ref[ids] <= 0).any():
            raise RuntimeError(f"BlockPool.incref: free block among {ids.tolist()}")
        self._ref[ids] += 1
        self._shared += int((self._ref[ids] == 2).sum())

    def decref(self, ids: np.ndarray) -> int:
        """One holder fewer for each of `ids` (distinct); returns how many became free."""
        if not ids.size:
            return 0
        if ids.size > _NATIVE_MIN:  # a step's held blocks: one native pass instead of five numpy ones
            try:
                done = native_refcount_add(self._ref, ids, -1)
            except ValueError:
                raise RuntimeError(f"BlockPool.decref: double free among {ids.tolist()}") from None
            if done is not None:
                freed, became_one = done
                self._shared -= became_one
                self._push(freed)
                return int(freed.size)
        if (self._ref[ids] <= 0).any():
            raise RuntimeError(f"BlockPool.decref: double free among {ids.tolist()}")
        self._ref[ids] -= 1
        left = self._ref[ids]
        self._shared -= int((left == 1).sum())
        freed = ids[left == 0]
        self._push(freed)
        return int(freed.size)

    def free(self, ids: np.ndarray) -> None:
        """Return blocks held only by the caller (reference count 1), e.g. unused reservations."""
        if ids.size and (self._ref[ids] != 1).any():
            raise RuntimeError(f"BlockPool.free: blocks {ids.tolist()} are not exclusively held")
        self._ref[ids] = 0
        self._push(ids)

    def _push(self, ids: np.ndarray) -> None:
        n = ids.size
        # Reversed so that allocate(n) right after free(ids) hands the same ids back in order.
        self._stack[self._top : self._top + n] = ids[::-1]
        self._top += n
