"""The in-process service for tests: one factory instead of wiring the cache, ledger and service by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from tkg.kernel.kv_store import KVStore
from tkg.server.app import make_store, make_tiers
from tkg.server.config import ModelSpec, build_spec
from tkg.server.kv_cache import KVCache
from tkg.server.metrics import Metrics
from tkg.server.service import DecodeAttentionService
from tkg.server.settings import ServeSettings
from tkg.server.tenants import Ledger


def make_service(
    spec: dict[str, Any] | ModelSpec, *, backend: str = "reference", clock: Callable[[], float] | None = None,
    store: KVStore | None = None, ready: bool = True, tenant_count: Callable[[], int] = lambda: 1,
    per_tenant_info: bool = False, wall: Callable[[], float] = time.time, **settings: Any,
) -> DecodeAttentionService:  # fmt: skip
    """A service over a fresh KV cache of `spec` (a raw spec dict or a built one), wired as
    `tkg.server.app.start` wires it (the cache's meter charges the service's ledger), not started.

    `settings`: `ServeSettings` fields; unless given, no batch delay (`batch_delay_us=0`).
    `store`: the KV store; None: the backend's own, as the app makes it (`tkg.server.app.make_store`).
    `ready`: warmed up (RPCs answer) or still warming up (UNAVAILABLE).
    `wall`: the KV tiers' wall clock (with `host_cache_bytes` / `spill_dir` settings)."""
    s = spec if isinstance(spec, ModelSpec) else build_spec(spec)
    opts = ServeSettings(backend=backend, **{"batch_delay_us": 0, **settings})
    ledger = Ledger()
    cache = KVCache(
        num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, block_len=s.block_len,
        num_blocks=s.num_blocks, max_context=s.max_context, dtype=s.kv_dtype, clock=clock or time.monotonic,
        store=store or make_store(s, opts), meter=ledger.charge, max_sequences=opts.max_sequences,
    )  # fmt: skip
    tiers = make_tiers(s, opts, cache, ledger, wall)
    svc = DecodeAttentionService(
        s, cache, opts, Metrics(backend), ledger, tenant_count=tenant_count, per_tenant_info=per_tenant_info,
        tiers=tiers,
    )  # fmt: skip
    if ready:
        svc.mark_ready()
    return svc


class Aborted(Exception):
    """What `FakeContext.abort` raises: the status a handler ended its call with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """What the servicer uses of `grpc.aio.ServicerContext`."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def settle_waits(svc: DecodeAttentionService) -> asyncio.Event:
    """An event set once a call waits in `Holds.settle` because a launch or an export holds a
    sequence it names: a race test's proof that the call reached that wait, instead of counting
    event-loop passes and hoping it got there."""
    holds, cache, real = svc.holds, svc.cache, svc.holds.settle
    waiting = asyncio.Event()

    async def settle(*seq_ids: str) -> None:
        if any(cache.in_flight(s) or holds.busy(s) for s in seq_ids):
            waiting.set()
        await real(*seq_ids)

    holds.settle = settle  # type: ignore[method-assign]
    return waiting


def queued(svc: DecodeAttentionService) -> asyncio.Event:
    """An event set once a decode request enters the batcher's queue."""
    batcher, real = svc.batcher, svc.batcher.submit
    entered = asyncio.Event()

    def submit(work: Any) -> asyncio.Future:
        future = real(work)
        entered.set()
        return future

    batcher.submit = submit  # type: ignore[method-assign]
    return entered


async def reached(event: asyncio.Event, what: str, timeout: float = 10.0) -> None:
    """Wait for `event`; a clear failure naming `what` if it never comes (a bound, not a timing)."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"never happened: {what}") from None
