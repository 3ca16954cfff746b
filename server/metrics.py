"""Prometheus metrics of the service (design/api.md "Metrics"), on their own HTTP port.

Base units (seconds), low-cardinality labels (method, code, backend, reason; never a sequence id),
latency buckets that resolve tens of microseconds. Each server owns a registry, so several servers
in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tkg.server.kv_cache import EVICT_IDLE_TTL, KVCacheStats

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


class Metrics:
    """Every metric of the contract, registered in a private registry."""

    def __init__(self, backend: str, gateway: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.backend = backend
        r = self.registry
        self.request_duration = Histogram(
            "tkg_request_duration_seconds", "Server-side RPC duration by method and gRPC status code",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "tkg_queue_duration_seconds", "Time a decode request waited for its batch to launch",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.kernel_duration = Histogram(
            "tkg_kernel_duration_seconds", "KV append + attention kernel time per batch launch",
            ["backend"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram("tkg_batch_size", "Sequences per kernel launch", buckets=BATCH_BUCKETS, registry=r)
        self.kv_blocks_total = Gauge("tkg_kv_blocks_total", "KV blocks per layer", registry=r)
        self.kv_blocks_used = Gauge("tkg_kv_blocks_used", "KV blocks in use per layer", registry=r)
        self.kv_usage = Gauge("tkg_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1)", registry=r)
        self.sequences_active = Gauge("tkg_sequences_active", "Sequences resident in the KV cache", registry=r)
        self.requests_pending = Gauge("tkg_requests_pending", "Decode requests waiting for a batch", registry=r)
        self.requests_running = Gauge("tkg_requests_running", "Decode requests in a running batch", registry=r)
        self.tokens_appended = Counter(
            "tkg_tokens_appended_total",
            "Tokens appended to sequences (counted once per token, not per layer)",
            registry=r,
        )
        self.evicted = Counter(
            "tkg_sequences_evicted_total", "Sequences released by the server", ["reason"], registry=r
        )
        self.evicted.labels(EVICT_IDLE_TTL)  # present (at 0) before the first eviction, for rate()
        self.gateway: tuple[Gauge, Gauge, Gauge] | None = None
        if gateway:
            self.gateway = (
                Gauge(GATEWAY_QUEUED, "Requests waiting (Gateway API Inference Extension)", registry=r),
                Gauge(GATEWAY_RUNNING, "Requests running (Gateway API Inference Extension)", registry=r),
                Gauge(GATEWAY_KV_USAGE, "KV cache utilisation 0..1 (Gateway API Inference Extension)", registry=r),
            )
        self._http: Any = None  # the /metrics server (a WSGIServer) once `serve` ran
        self._tokens_seen = 0
        self._evicted_seen: dict[str, int] = {}

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.request_duration.labels(method, code).observe(seconds)

    def observe_batch(self, sequences: int, kernel_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(sequences)
        self.kernel_duration.labels(self.backend).observe(kernel_s)
        for q in queue_s:
            self.queue_duration.observe(q)

    def set_queue(self, pending: int, running: int) -> None:
        self.requests_pending.set(pending)
        self.requests_running.set(running)
        if self.gateway is not None:
            self.gateway[0].set(pending)
            self.gateway[1].set(running)

    def update_cache(self, stats: KVCacheStats) -> None:
        """Refresh gauges and counters from the cache's own counts (cheap; called per batch)."""
        self.kv_blocks_total.set(stats.blocks_total)
        self.kv_blocks_used.set(stats.blocks_used)
        self.kv_usage.set(stats.usage_ratio)
        self.sequences_active.set(stats.active_sequences)
        if self.gateway is not None:
            self.gateway[2].set(stats.usage_ratio)
        if stats.tokens_appended > self._tokens_seen:
            self.tokens_appended.inc(stats.tokens_appended - self._tokens_seen)
            self._tokens_seen = stats.tokens_appended
        for reason, n in stats.evicted.items():
            seen = self._evicted_seen.get(reason, 0)
            if n > seen:
                self.evicted.labels(reason).inc(n - seen)
                self._evicted_seen[reason] = n

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
