"""Who waits for whom on a sequence: mutations wait until no launch and no export holds it.

A launch on the kernel worker thread holds its sequences (the KV cache's in-flight marks) from its
commit until the kernel returns; an ExportSequence stream pins its sequence while it reads.
TruncateSequence, ReleaseSequence, ForkSequence (of the source), AppendKV (each chunk) and
ExportSequence wait here (`settle`) until neither holds any sequence they name, then apply: they
act on the state that includes the launch's tokens (or excludes them when it failed). Decodes
queued behind such a mutation see its result (e.g. FAILED_PRECONDITION after a truncate).

Event-loop only, no locks: `settle` re-checks after every wake-up, since another waiter may have
run first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

from tkg.server.kv_cache import KVCache


class Holds:
    """The exports pinning sequences, and the event mutations wait on (see the module docstring)."""

    def __init__(self, cache: KVCache) -> None:
        self._cache = cache
        self._pinned: Counter[str] = Counter()  # sequence id -> exports reading it
        self._settled = asyncio.Event()  # set (and replaced) whenever a launch or an export lets go
        self.waiters = 0  # mutations waiting in `settle`

    def busy(self, seq_id: str) -> bool:
        """An export is reading `seq_id` (idle expiry keeps it)."""
        return seq_id in self._pinned

    async def settle(self, *seq_ids: str) -> None:
        """Wait until no launch and no export holds any of `seq_ids`."""
        cache, pinned = self._cache, self._pinned
        while any(cache.in_flight(s) or s in pinned for s in seq_ids):
            self.waiters += 1
            try:
                await self._settled.wait()
            finally:
                self.waiters -= 1

    def notify(self) -> None:
        """Something let go: every waiter re-checks."""
        event, self._settled = self._settled, asyncio.Event()
        event.set()

    @contextlib.contextmanager
    def pinned(self, seq_id: str) -> Iterator[None]:
        """`seq_id` is read by an export for the enclosed block."""
        self._pinned[seq_id] += 1
        try:
            yield
        finally:
            self._pinned[seq_id] -= 1
            if not self._pinned[seq_id]:
                del self._pinned[seq_id]
            self.notify()
