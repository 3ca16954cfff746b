"""Prometheus metrics of the service (docs/operations.md "Metrics"), on their own HTTP port.

Base units (seconds), low-cardinality labels (method, code, backend, reason; never a sequence id),
latency buckets that resolve tens of microseconds. Each server owns a registry, so several servers
in one process (tests) do not collide.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tkg.server.kv_cache import EVICT_IDLE_TTL, KVCache
from tkg.server.tiers import Tiers

# 10 us .. 10 s, roughly x2 per bucket with 1-2.5-5 steps: a loopback decode is ~100 us to ~10 ms.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 2.5e-3, 5e-3, 7.5e-3,
    1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# The Gateway API Inference Extension's endpoint picker reads these three gauges (queue depth,
# running requests, KV utilisation); its defaults are vLLM's names, so `--gateway-metrics`
# exports exactly those, with the same meaning, next to ours.
GATEWAY_QUEUED = "vllm:num_requests_waiting"
GATEWAY_RUNNING = "vllm:num_requests_running"
GATEWAY_KV_USAGE = "vllm:kv_cache_usage_perc"


class _CacheCounters(Collector):
    """`tkg_tokens_appended_total` and `tkg_sequences_evicted_total{reason}`, read from the KV
    cache's own counts at scrape time (nothing to do per request)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily(
            "tkg_tokens_appended", "Tokens appended to sequences (counted once per token, not per layer)"
        )
        tokens.add_metric([], self.cache.tokens_appended)
        evicted = CounterMetricFamily("tkg_sequences_evicted", "Sequences released by the server", labels=["reason"])
        counts = {EVICT_IDLE_TTL: 0, **dict(self.cache.evicted)}  # dict(): one atomic copy
        for reason, n in sorted(counts.items()):
            evicted.add_metric([reason], n)
        yield tokens
        yield evicted


class _StoreCounters(Collector):
    """`tkg_device_transfer_bytes_total{direction}` and `tkg_kernel_compilations_total`, read from
    the kernel backend's KV store at scrape time (host backends: 0 transfers, 0 compilations)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        store = self.cache.store
        moved = store.transfer_bytes()
        transfer = CounterMetricFamily(
            "tkg_device_transfer_bytes", "Bytes copied between host and kernel device memory", labels=["direction"]
        )
        for direction in ("h2d", "d2h"):
            transfer.add_metric([direction], moved[direction])
        compiled = CounterMetricFamily(
            "tkg_kernel_compilations", "Kernel specialisations built (one per new compiled shape, warm-up included)"
        )
        compiled.add_metric([], store.compilations)
        yield transfer
        yield compiled


class _TierCollector(Collector):
    """`tkg_kv_tier_bytes{tier}`, `tkg_kv_tier_sequences{tier}`, `tkg_kv_spills_total{tier}`,
    `tkg_kv_restores_total{source,result}`, `tkg_kv_persisted_sequences_total{result}`, read from
    the tiers at scrape time."""

    def __init__(self, tiers: Tiers) -> None:
        self.tiers = tiers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        t, cache = self.tiers, self.tiers.cache
        size = GaugeMetricFamily("tkg_kv_tier_bytes", "KV bytes held per tier", labels=["tier"])
        count = GaugeMetricFamily("tkg_kv_tier_sequences", "Sequences living in each tier", labels=["tier"])
        size.add_metric(["device"], cache.used_blocks * t.block_bytes)
        count.add_metric(["device"], len(cache))
        for tier in ("host", "disk"):
            size.add_metric([tier], t.index.bytes[tier])
            count.add_metric([tier], t.index.count[tier])
        spills = CounterMetricFamily(
            "tkg_kv_spills", "Sequences moved down a tier, by the tier moved to", labels=["tier"]
        )
        for tier in ("host", "disk"):
            spills.add_metric([tier], t.counts.spills[tier])
        restores = CounterMetricFamily(
            "tkg_kv_restores", "Spilled sequences brought back, by source tier and result", labels=["source", "result"]
        )
        for (source, result), n in sorted(dict(t.counts.restores).items()):
            restores.add_metric([source, result], n)
        persisted = CounterMetricFamily(
            "tkg_kv_persisted_sequences", "Sequences written to the spill directory at a drain", labels=["result"]
        )
        for result in ("ok", "failed"):
            persisted.add_metric([result], t.counts.persisted[result])
        yield from (size, count, spills, restores, persisted)


class _Deferred(Collector):
    """The per-call metrics (`Metrics.per_call`), collected after the observations still pending
    are applied, so a scrape always sees every call answered before it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        self.metrics.flush()
        for metric in self.metrics.per_call:
            yield from metric.collect()


class Metrics:
    """Every metric of the contract, registered in a private registry.

    Per call, the request path only queues its observations (`_defer`: a deque append); the loop
    applies them to the histograms and counters on its next pass, after the reply has gone out,
    and a scrape applies whatever is still queued before it reads (`flush`). prometheus_client's
    observe and inc (a lock and a bucket search each, five per Decode) cost a lone Decode ~10 us
    of its latency on the build machine, cold after the kernel. Gauges and counters of state (KV
    blocks, sequences, queue) are read when scraped, from the objects `attach` is given.
    """

    def __init__(self, backend: str, gateway: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.backend = backend
        self.gateway = gateway
        r = self.registry
        # Registered through `_Deferred` (registry=None here): collected after a flush.
        self.request_duration = Histogram(
            "tkg_request_duration_seconds", "Server-side RPC duration by method and gRPC status code",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "tkg_queue_duration_seconds", "Time a decode request waited for its batch to launch",
            buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self.kernel_duration = Histogram(
            "tkg_kernel_duration_seconds",
            "Step time per batch launch (KV prepare, RoPE, append, attention kernel, finish)",
            ["backend"], buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self._kernel = self.kernel_duration.labels(backend)
        self.batch_size = Histogram("tkg_batch_size", "Sequences per kernel launch", buckets=BATCH_BUCKETS,
                                    registry=None)  # fmt: skip
        self.migrated = PromCounter(
            "tkg_sequences_migrated", "Sequences a draining replica pushed to a peer, by result (moved, failed)",
            ["result"], registry=r,
        )  # fmt: skip
        for result in ("moved", "failed"):
            self.migrated.labels(result)
        # Per tenant (configured in the auth file, so bounded); "" = refused before authentication.
        self.tenant_requests = PromCounter(
            "tkg_tenant_requests", "RPCs by tenant, method and gRPC status code",
            ["tenant", "method", "code"], registry=None,
        )  # fmt: skip
        self.per_call = (self.request_duration, self.queue_duration, self.kernel_duration, self.batch_size,
                         self.tenant_requests)  # fmt: skip
        r.register(_Deferred(self))
        self._requests: dict[tuple[str, str], Any] = {}
        self._tenant_requests: dict[tuple[str, str, str], Any] = {}
        # Observations not applied yet: appended on the loop, taken by `flush` on the loop (its next
        # pass) or on the scrape's thread (deque append and popleft are atomic).
        self._pending: deque[tuple[Any, ...]] = deque()
        self._flush_scheduled = False
        self._http: Any = None  # the /metrics server (a WSGIServer) once `serve` ran

    def attach(self, cache: KVCache, pending: Callable[[], int], running: Callable[[], int]) -> None:
        """Register the state gauges and counters, read from `cache` and the two callables."""
        r = self.registry
        gauges: list[tuple[str, str, Callable[[], float]]] = [
            ("tkg_kv_blocks_total", "KV blocks per layer", lambda: cache.num_blocks),
            ("tkg_kv_blocks_used", "KV blocks in use per layer", lambda: cache.used_blocks),
            ("tkg_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1)", lambda: cache.usage_ratio),
            ("tkg_sequences_active", "Live sequences, every KV tier", lambda: len(cache) + len(cache.seqs.outside)),
            ("tkg_requests_pending", "Decode requests waiting for a batch", pending),
            ("tkg_requests_running", "Decode requests in the running kernel launch", running),
        ]
        if self.gateway:
            gauges += [
                (GATEWAY_QUEUED, "Requests waiting (Gateway API Inference Extension)", pending),
                (GATEWAY_RUNNING, "Requests running (Gateway API Inference Extension)", running),
                (GATEWAY_KV_USAGE, "KV cache utilisation 0..1 (Gateway API Inference Extension)",
                 lambda: cache.usage_ratio),
            ]  # fmt: skip
        for name, doc, read in gauges:
            Gauge(name, doc, registry=r).set_function(read)
        r.register(_CacheCounters(cache))
        r.register(_StoreCounters(cache))

    def attach_tiers(self, tiers: Tiers) -> None:
        """The KV tiers' gauges and counters (read at scrape) and the restore-time histogram."""
        r = self.registry
        self.registry.register(_TierCollector(tiers))
        restore = Histogram(
            "tkg_kv_restore_seconds", "Time to bring a spilled sequence back to the device", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        tiers.on_restore = restore.observe

    def observe_request(self, method: str, code: str, seconds: float, tenant: str = "default") -> None:
        self._defer((self._apply_request, method, code, seconds, tenant))

    def count_tenant(self, tenant: str, method: str, code: str) -> None:
        self._defer((self._apply_tenant, tenant, method, code))

    def observe_denied(self, full_method: str, code: str) -> None:
        """A call refused by the auth guard (counted under tenant "")."""
        self.count_tenant("", full_method.rsplit("/", 1)[-1], code)

    def observe_batch(self, sequences: int, kernel_s: float, queue_s: list[float]) -> None:
        self._defer((self._apply_batch, sequences, kernel_s, queue_s))

    def _defer(self, item: tuple[Any, ...]) -> None:
        """Queue an observation; the loop applies the queue on its next pass (outside a loop: now)."""
        self._pending.append(item)
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Apply every queued observation (the loop after the replies; a scrape before it reads)."""
        pending = self._pending
        while pending:
            try:
                apply, *args = pending.popleft()
            except IndexError:  # another thread took the last one
                return
            apply(*args)

    def _apply_request(self, method: str, code: str, seconds: float, tenant: str) -> None:
        child = self._requests.get((method, code))
        if child is None:
            child = self._requests[(method, code)] = self.request_duration.labels(method, code)
        child.observe(seconds)
        self._apply_tenant(tenant, method, code)

    def _apply_tenant(self, tenant: str, method: str, code: str) -> None:
        key = (tenant, method, code)
        child = self._tenant_requests.get(key)
        if child is None:
            child = self._tenant_requests[key] = self.tenant_requests.labels(tenant, method, code)
        child.inc()

    def _apply_batch(self, sequences: int, kernel_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(sequences)
        self._kernel.observe(kernel_s)
        for q in queue_s:
            self.queue_duration.observe(q)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server (a daemon thread); returns the bound port (0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server, if any, and free its port."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
