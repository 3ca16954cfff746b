"""Tenant namespaces and per-tenant usage against quotas.

**Namespaces.** A tenant's sequence ids live in the KV cache as `namespace + id`
(`tkg.server.identity.namespace_of`: "" for `default`, `name + "\\x1f"` otherwise). Every id a caller
sends is prefixed with its own namespace before the cache sees it, so another tenant's sequence is
simply absent (NOT_FOUND, the same message as a never-created id) on every RPC, fork sources
included, and two tenants may use the same id. Ids going back out (SequenceInfo, error messages)
lose the prefix again (`outward`).

**Usage.** `Ledger` counts per tenant what its quota limits: live sequences, KV blocks held,
decode requests pending (queued or running) and open streams. Blocks are charged by the deltas
the KV cache reports (`charge`, the cache's `meter`), under the tenant whose sequence the
operation acted on, idle expiry included; an operation that takes blocks is checked against the
quota right after (`check_charged`) and undone by the caller when over. Forks share blocks only
within a tenant, so a block shared copy-on-write counts once. `recount` recomputes usage from a
cache snapshot: the invariant the deltas must keep (the tests compare the two).

**What a tenant learns of the shared pool** (`visible_free`). Quotas may overcommit the pool (the
sum of max_blocks above num_blocks), so the pool's free count is the other tenants' usage. A
tenant learns its own usage and quota, and of the pool only whether it is full: GetServerInfo's
`free_blocks` is its quota left (no quota: the pool's size less its own blocks), or 0 while the
pool has no free block; a refusal for want of blocks says "more than the shared pool has free
now" with no count (`tkg.server.errors.pool_full`). What is left to learn is what any refusal
says: that fewer blocks than asked for are free (docs/security.md).

Everything runs on the event loop thread, like the KV cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from tkg.server.errors import ResourceExhausted, ServiceError
from tkg.server.identity import DEFAULT_TENANT, Tenant

SEP = "\x1f"


def inward(tenant: Tenant, seq_id: str) -> str:
    """The cache's id for `tenant`'s `seq_id`."""
    ns = tenant.namespace
    return ns + seq_id if ns else seq_id


def outward(seq_id: str) -> str:
    """The caller's id for a cache id (the tenant prefix removed)."""
    _, sep, tail = seq_id.partition(SEP)
    return tail if sep else seq_id


def tenant_of(seq_id: str) -> str:
    """The tenant name a cache id belongs to."""
    head, sep, _ = seq_id.partition(SEP)
    return head if sep else DEFAULT_TENANT


def scrub(exc: ServiceError, tenant: Tenant) -> ServiceError:
    """`exc` with the tenant's namespace removed from the ids its message quotes (repr form)."""
    ns = tenant.namespace
    if ns:
        exc.message = exc.message.replace(repr(ns)[1:-1], "")
        exc.args = (exc.message,)
    return exc


def visible_free(tenant: Tenant, used_blocks: int, num_blocks: int, pool_free: int) -> int:
    """GetServerInfo.free_blocks for `tenant` holding `used_blocks` of a pool of `num_blocks` with
    `pool_free` free: what it may still take by its quota, or 0 when the shared pool is full.
    Never `min(pool_free, quota left)`: that moved as other tenants allocated."""
    if pool_free <= 0:
        return 0
    limit = tenant.quota.max_blocks
    cap = num_blocks if limit is None else min(limit, num_blocks)
    return max(0, cap - used_blocks)


@dataclass
class Usage:
    sequences: int = 0
    blocks: int = 0
    pending: int = 0
    streams: int = 0


class Ledger:
    """Per-tenant usage (keyed by tenant name) and the quota checks."""

    def __init__(self) -> None:
        self.usage: dict[str, Usage] = {}

    def of(self, tenant: Tenant) -> Usage:
        u = self.usage.get(tenant.name)
        if u is None:
            u = self.usage[tenant.name] = Usage()
        return u

    @staticmethod
    def _over(tenant: Tenant, quota: str, used: int, adding: int, limit: int, unit: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"quota {quota} of tenant {tenant.name!r}: {used} {unit} in use, {adding} more requested; "
            f"expected at most {limit} (release some first or ask for a larger quota)"
        )

    # ---- sequences ----------------------------------------------------------------------------

    def check_sequence(self, tenant: Tenant) -> None:
        """RESOURCE_EXHAUSTED when the tenant already holds `max_sequences`."""
        limit, u = tenant.quota.max_sequences, self.of(tenant)
        if limit is not None and u.sequences + 1 > limit:
            raise self._over(tenant, "max_sequences", u.sequences, 1, limit, "sequences")

    def sequences_changed(self, tenant: Tenant, delta: int) -> None:
        u = self.of(tenant)
        u.sequences = max(0, u.sequences + delta)

    # ---- blocks -------------------------------------------------------------------------------

    def charge(self, seq_id: str, delta: int) -> None:
        """`delta` blocks taken (> 0) or returned (< 0) for cache sequence `seq_id`'s tenant (the
        KV cache's meter)."""
        name = tenant_of(seq_id)
        u = self.usage.get(name)
        if u is None:
            u = self.usage[name] = Usage()
        u.blocks += delta

    def check_charged(self, tenant: Tenant, taken: int) -> None:
        """RESOURCE_EXHAUSTED when the `taken` blocks just charged put `tenant` past max_blocks
        (the caller then undoes the operation, which returns them)."""
        limit, u = tenant.quota.max_blocks, self.of(tenant)
        if limit is not None and taken > 0 and u.blocks > limit:
            raise self._over(tenant, "max_blocks", u.blocks - taken, taken, limit, "KV blocks")

    def check_blocks(self, tenant: Tenant, adding: int) -> None:
        """RESOURCE_EXHAUSTED when `adding` more blocks would put `tenant` past max_blocks (asked
        before taking them: an import's declared size)."""
        limit, u = tenant.quota.max_blocks, self.of(tenant)
        if limit is not None and u.blocks + adding > limit:
            raise self._over(tenant, "max_blocks", u.blocks, adding, limit, "KV blocks")

    def add_sequence(self, seq_id: str) -> None:
        """Cache sequence `seq_id` appeared without a request (loaded from a spill directory)."""
        name = tenant_of(seq_id)
        u = self.usage.get(name)
        if u is None:
            u = self.usage[name] = Usage()
        u.sequences += 1

    def drop_sequence(self, seq_id: str) -> None:
        """Cache sequence `seq_id` is gone (released or expired)."""
        u = self.usage.get(tenant_of(seq_id))
        if u is not None:
            u.sequences = max(0, u.sequences - 1)

    # ---- pending decode requests and streams ---------------------------------------------------

    def enter_pending(self, tenant: Tenant, share: int | None) -> None:
        """One more decode request; RESOURCE_EXHAUSTED past `max_pending` or the tenant's `share`
        of the server's queue (`--max-pending` split evenly between the configured tenants; None:
        one tenant, the queue's own bound applies)."""
        u = self.of(tenant)
        limits = [x for x in (share, tenant.quota.max_pending) if x is not None]
        limit = min(limits) if limits else None
        if limit is not None and u.pending + 1 > limit:
            raise self._over(tenant, "max_pending", u.pending, 1, limit, "decode requests")
        u.pending += 1

    def leave_pending(self, tenant: Tenant) -> None:
        self.of(tenant).pending -= 1

    def open_stream(self, tenant: Tenant) -> None:
        limit, u = tenant.quota.max_streams, self.of(tenant)
        if limit is not None and u.streams + 1 > limit:
            raise self._over(tenant, "max_streams", u.streams, 1, limit, "streams")
        u.streams += 1

    def close_stream(self, tenant: Tenant) -> None:
        self.of(tenant).streams -= 1

    # ---- recount ------------------------------------------------------------------------------

    def recount(self, states: Iterable[tuple[str, Iterable[int]]]) -> None:
        """Set sequences and blocks from `(cache id, held block ids)` of every live sequence."""
        seqs: Counter[str] = Counter()
        blocks: dict[str, set[int]] = {}
        for seq_id, held in states:
            name = tenant_of(seq_id)
            seqs[name] += 1
            blocks.setdefault(name, set()).update(held)
        for name in set(self.usage) | set(seqs):
            u = self.usage.setdefault(name, Usage())
            u.sequences, u.blocks = seqs.get(name, 0), len(blocks.get(name, ()))
