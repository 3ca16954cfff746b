"""Assemble and run one service instance: KV cache, servicer, gRPC server, health, reflection,
metrics HTTP port, idle-expiry task. `tkg serve` (`tkg.server.cli`) and in-process tests use it.

Startup order: the backend's KV store (pools allocated once) and the cache over it, gRPC server
with health NOT_SERVING (and RPCs answering UNAVAILABLE) until the warm-up has built every kernel
specialisation serving can need (device backends: every shape bucket; a log line says how many
and how long), then SERVING. `App.shutdown`: health NOT_SERVING, new calls UNAVAILABLE, idle
expiry stops, in-flight calls finish within the grace period; with `peers`, every resident
sequence is then pushed to the peer clients will route it to once this replica is gone
(`tkg.server.migration`), within what is left of the grace period; with `--spill-dir`, every
sequence still here (no peers, or a peer refused it) is written to the spill directory, which the
next start on it loads (`tkg.server.tiers`); then stop. What could not
move is logged by id and counted (`tkg_sequences_migrated_total`). A `--peers` entry naming this
replica itself is recognised by its instance id while the instance serves (`tkg.server.peers`) and
never pushed to, so every replica can share one list without `--advertise`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tkg.kernel.kv_store import KVGeometry, KVStore, LayerVariant, WarmUp, create_kv_store
from tkg.server import auth as auth_mod
from tkg.server import listeners, migration, peers, spill_files, tenants
from tkg.server.config import ConfigError, ModelSpec
from tkg.server.credentials import AuthTable
from tkg.server.kv_cache import KVCache
from tkg.server.metrics import Metrics
from tkg.server.service import DecodeAttentionService
from tkg.server.settings import ServeSettings
from tkg.server.tenants import Ledger
from tkg.server.tier_index import spec_fingerprint
from tkg.server.tiers import Tiers
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DecodeAttention"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SETTLE_S = 2.0  # at most this (and a quarter of the grace period) asking unknown --peers entries at a drain


@dataclass
class App:
    """A running instance (its event loop's objects; use from that loop)."""

    spec: ModelSpec
    settings: ServeSettings
    server: grpc.aio.Server
    service: DecodeAttentionService
    health: health.aio.HealthServicer
    metrics: Metrics
    port: int
    metrics_port: int | None
    authenticator: auth_mod.Authenticator
    warmed: WarmUp | None = None
    event_loop: str = "asyncio"  # the package of the loop it runs on: "uvloop" or "asyncio"
    addresses: list[str] = field(default_factory=list)  # where it listens (a TCP port 0 resolved)
    finder: peers.SelfFinder | None = None  # with --peers: which entries are this replica
    _expirer: asyncio.Task | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The one start-up line: address, backend, ports, geometry and KV bytes."""
        s, table = self.settings, self.authenticator.table
        return (
            f"listening on {' '.join(self.addresses)} backend={s.backend}{self._backend_text()} "
            f"metrics_port={'off' if self.metrics_port is None else self.metrics_port} "
            f"tls={'on' if s.tls_cert else 'off'}{'+mtls' if s.tls_client_ca else ''} "
            f"auth={'on' if table.enabled else 'off'} tenants={len(table.tenants)} "
            f"max_batch={self.spec.max_batch}{self._warm_up_text()}{self._tiers_text()} loop={self.event_loop} | "
            f"{self.spec.summary()}"
        )

    def reload_auth(self, table: AuthTable) -> None:
        """Put a new credential table in force (SIGHUP); calls already admitted keep theirs."""
        self.authenticator.table = table  # the service's tenant_count reads it per request

    def _backend_text(self) -> str:
        """` lnc=2` for device stores (the degree the store really launches at), then `auto`'s note."""
        lnc = getattr(self.service.cache.store, "lnc", None)
        note = f" ({self.settings.backend_note})" if self.settings.backend_note else ""
        return ("" if lnc is None else f" lnc={lnc}") + note

    def _tiers_text(self) -> str:
        """` tiers=host:8.0GiB,disk:/spill(100.0GiB),persist=write-back,loaded=12` when KV tiers are on."""
        t = self.service.tiers
        if not t.enabled:
            return ""
        parts = []
        if t.host_bytes:
            parts.append(f"host:{t.host_bytes / 2**30:.1f}GiB")
        if t.spill_dir is not None:
            parts.append(f"disk:{t.spill_dir}({(t.disk_bytes or 0) / 2**30:.1f}GiB)")
            parts.append(f"persist={self.settings.persist}")
            parts.append(f"loaded={len(t.index)}")
        return " tiers=" + ",".join(parts)

    def _warm_up_text(self) -> str:
        w = self.warmed
        return "" if w is None else f" warm_up={w.launches} launches/{w.compiled} compiled in {w.seconds:.2f}s"

    async def shutdown(self, grace_s: float) -> migration.PushReport | None:
        """Drain (health NOT_SERVING, new calls UNAVAILABLE, wait up to `grace_s` for in-flight
        calls, push sequences to `peers` until `grace_s` is over), then stop the gRPC server, the
        batcher and the metrics port. Returns the push report (None without peers)."""
        deadline = asyncio.get_running_loop().time() + grace_s
        if self.finder is not None:  # while still serving: a draining server refuses its own asks too
            await self.finder.settle(min(SETTLE_S, grace_s / 4))
        await self.health.enter_graceful_shutdown()
        if self._expirer is not None:  # nothing may expire while it is being moved
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
        await self.service.drain(grace_s)
        report = None
        if self.settings.peers:
            report = await self.push_to_peers(deadline)
        tiers = self.service.tiers
        if tiers.spill_dir is not None:  # what no peer took outlives the process on disk
            written, failed = await tiers.persist_all()
            log.info("drain: wrote %d sequences to %s, %d could not be written", written, tiers.spill_dir, failed)
        await self.server.stop(grace=1.0)
        listeners.remove_sockets(self.addresses)
        await self.service.close()
        self.metrics.close()
        return report

    async def push_to_peers(self, deadline: float) -> migration.PushReport:
        """Move every resident sequence to its peer (see `tkg.server.migration.push_all`), never
        to an entry of `--peers` known to be this replica."""
        cache, tiers, link = self.service.cache, self.service.tiers, peer_link(self.settings)
        targets = self.finder.others() if self.finder is not None else self.settings.peers

        def release(seq_id: str) -> None:  # moved: gone from whichever tier held it
            if not tiers.drop(seq_id):
                cache.release(seq_id)
                tiers.released(seq_id)

        # The device and host tiers go to peers; the disk tier stays on disk (with --spill-dir the
        # next start on it serves it again, under the same name: a StatefulSet's replica).
        seq_ids = [*cache.sequence_ids(), *tiers.host_ids()]
        report = await migration.push_all(
            seq_ids, self.service.export_messages, release, list(targets), deadline,
            metadata=link.metadata, channel_options=link.options, credentials=link.credentials,
            owner=lambda seq_id: (tenants.outward(seq_id), tenants.tenant_of(seq_id)),
        )  # fmt: skip
        self.metrics.migrated.labels("moved").inc(len(report.moved))
        self.metrics.migrated.labels("failed").inc(len(report.failed))
        for seq_id, why in report.failed.items():
            log.warning("drain: sequence %r not moved: %s", seq_id[:64], why)  # ids cut short in logs
        log.info("drain: moved %d sequences to peers, %d could not move", len(report.moved), len(report.failed))
        return report


def peer_link(s: ServeSettings) -> peers.PeerLink:
    """How this replica calls its peers (the drain's pushes and the instance-id asks)."""
    # Each sequence goes out under its tenant's id with `tkg-tenant` naming the tenant; the peer
    # honours that for a `peer` credential only (a token, or this replica's certificate under
    # mTLS). A tenant's own token can only move that tenant's sequences; the rest are refused
    # and stay in the push report's `failed`.
    creds = None
    if s.tls_cert:
        mtls = s.tls_client_ca is not None  # peers verify client certificates: present ours
        creds = grpc.ssl_channel_credentials(s.tls_cert, s.tls_key if mtls else None, s.tls_cert if mtls else None)
    limits = (("grpc.max_send_message_length", s.max_message_bytes),
              ("grpc.max_receive_message_length", s.max_message_bytes))  # fmt: skip
    return peers.PeerLink(creds, limits, (("authorization", f"Bearer {s.peer_token}"),) if s.peer_token else ())


def loop_runner(kind: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """How `tkg serve` runs its main coroutine: `uvloop.run` (kind "uvloop", or "auto" when uvloop
    is installed) or `asyncio.run` ("asyncio"). uvloop's loop (libuv, in Cython) runs each pass,
    callback and future hand-off in C: grpc.aio makes several per call, so a lone Decode's
    round trip costs ~30-40 us less on the 2-core build machine. ConfigError for "uvloop" without it."""
    if kind == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ConfigError("--event-loop: uvloop is not installed; expected pip install uvloop "
                              "(part of the server extra) or --event-loop asyncio") from None  # fmt: skip
        return asyncio.run
    return uvloop.run


def layer_variants(spec: ModelSpec) -> set[LayerVariant]:
    """The distinct (sliding window?, sinks?) kinds of layer: each is its own kernel specialisation."""
    return {LayerVariant(spec.window(i) is not None, spec.sinks is not None) for i in range(spec.num_layers)}


def make_store(spec: ModelSpec, settings: ServeSettings) -> KVStore:
    """The backend's KV store for the spec's geometry (pools allocated here, once)."""
    geometry = KVGeometry(
        spec.num_layers, spec.num_kv_heads, spec.num_blocks, spec.block_len, spec.head_dim, spec.kv_numpy_dtype,
        spec.io_numpy_dtype,
    )  # fmt: skip
    options: dict[str, object] = {"lnc": settings.lnc}  # host stores ignore it; device stores launch at it
    if settings.context_buckets is not None:
        options["context_buckets"] = settings.context_buckets
    if settings.batch_buckets is not None:
        options["batch_buckets"] = settings.batch_buckets
    return create_kv_store(
        settings.backend, geometry, max_context=spec.max_context, max_batch=spec.max_batch,
        max_s_active=spec.max_s_active, **options,
    )  # fmt: skip


def make_cache(spec: ModelSpec, settings: ServeSettings, ledger: Ledger) -> KVCache:
    """The KV cache over the backend's store, its block changes charged to `ledger`'s tenants."""
    return KVCache(
        num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        block_len=spec.block_len, num_blocks=spec.num_blocks, max_context=spec.max_context, dtype=spec.kv_dtype,
        max_sequences=settings.max_sequences or default_max_sequences(spec, tier_bytes(settings)),
        store=make_store(spec, settings), meter=ledger.charge,
    )  # fmt: skip


def tier_bytes(settings: ServeSettings) -> int:
    """Bytes of the host and disk tiers (the disk's default bound counted as its free space)."""
    disk = 0
    if settings.spill_dir is not None:
        disk = settings.spill_bytes if settings.spill_bytes is not None else _free_bytes(settings.spill_dir)
    return settings.host_cache_bytes + disk


def _free_bytes(path: str) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:  # the directory may not exist yet: its file system's
        p = p.parent
    return shutil.disk_usage(p).free


def make_tiers(
    spec: ModelSpec, settings: ServeSettings, cache: KVCache, ledger: Ledger, wall: Callable[[], float] = time.time
) -> Tiers:
    """The host and disk tiers; the spill directory adopted (ConfigError on another model's data)
    and its sequences loaded into the disk tier, charged to their tenants."""
    tiers = Tiers(
        cache, host_bytes=settings.host_cache_bytes, meter=ledger.charge, disk_bytes=settings.spill_bytes,
        spill_dir=None if settings.spill_dir is None else Path(settings.spill_dir), wall=wall,
        write_back=settings.persist == "write-back",
    )  # fmt: skip
    try:
        loaded = tiers.open_disk(spec_fingerprint(spec))
    except (spill_files.SpecMismatch, OSError) as exc:
        raise ConfigError(str(exc)) from None
    for seq_id in loaded:
        ledger.add_sequence(seq_id)
    if loaded:
        log.info("spill dir %s: %d sequences loaded into the disk tier", settings.spill_dir, len(loaded))
    return tiers


def warm_up(spec: ModelSpec, cache: KVCache) -> WarmUp:
    """Build every kernel specialisation serving needs (or run one tiny step on host backends), so
    no request pays for loading or compiling the backend."""
    t0 = time.perf_counter()
    report = cache.store.warm_up(layer_variants(spec), spec.num_q_heads)
    log.info(
        "warm-up: backend %s, %d launches, %d kernel specialisations compiled in %.2fs",
        cache.store.backend, report.launches, report.compiled, time.perf_counter() - t0,
    )  # fmt: skip
    return report


def default_max_sequences(spec: ModelSpec, tier_bytes: int = 0) -> int:
    """The server-wide cap without `--max-sequences`: every sequence holding a block needs one of
    `num_blocks` or a block's bytes in a lower tier, so more live sequences than that (or 1024) are
    empty ones, each still costing a block-table row of `max_context / block_len` entries."""
    return min(max(spec.num_blocks + tier_bytes // spec.bytes_per_block(), 1024), 2**31 - 1)


async def start(spec: ModelSpec, settings: ServeSettings) -> App:
    """Build and start an instance on the running loop; returns once it is SERVING.

    Raises OSError when the gRPC or metrics address cannot be bound.
    """
    ledger = Ledger()
    cache = make_cache(spec, settings, ledger)
    tiers = make_tiers(spec, settings, cache, ledger)
    metrics = Metrics(settings.backend, gateway=settings.gateway_metrics)
    authenticator = auth_mod.Authenticator(settings.auth)
    service = DecodeAttentionService(
        spec, cache, settings, metrics, ledger,
        tenant_count=lambda: max(1, len(authenticator.table.tenants)),  # SIGHUP swaps the table
        per_tenant_info=settings.auth_file is not None, tiers=tiers,
    )  # fmt: skip
    options: list[tuple[str, int]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ]
    if settings.max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    server = grpc.aio.server(options=options)
    # Every handler goes in behind the guard, auth on or off: it also parses requests itself, so a
    # malformed message is INVALID_ARGUMENT (gRPC alone answers UNKNOWN, INTERNAL or, on a stream,
    # nothing at all).
    guarded = auth_mod.GuardedServer(server, auth_mod.Guard(authenticator, metrics.observe_denied))
    pb_grpc.add_DecodeAttentionServicer_to_server(service, guarded)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME)), guarded
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 host needs brackets
    wanted = list(settings.listen) or [f"{host}:{settings.port}"]
    flag = "--listen" if settings.listen else f"--port {settings.port}"  # what the operator would change
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(settings.tls_key, settings.tls_cert)], root_certificates=settings.tls_client_ca,
                require_client_auth=settings.tls_client_ca is not None,
            )  # fmt: skip
            addresses = listeners.bind(wanted, lambda a: server.add_secure_port(a, creds))
        else:
            addresses = listeners.bind(wanted, server.add_insecure_port)
    except OSError as exc:
        raise OSError(f"{flag}: {exc}") from None
    port = listeners.tcp_port(addresses)
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    metrics_port = None
    if settings.metrics_port is not None:
        try:
            metrics_port = metrics.serve(settings.metrics_port, settings.metrics_host)
        except OSError as exc:  # name the port and the flag: "[Errno 98]" alone says neither
            await server.stop(None)
            raise OSError(
                f"--metrics-port {settings.metrics_port}: cannot listen on {settings.metrics_host}:"
                f"{settings.metrics_port} ({exc.strerror or exc}); expected a free port, or --metrics-port 0 "
                "to turn metrics off"
            ) from None
    service.start()
    warmed = await asyncio.get_running_loop().run_in_executor(None, warm_up, spec, cache)
    service.mark_ready()
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    app = App(spec, settings, server, service, health_servicer, metrics, port, metrics_port, authenticator, warmed,
              type(asyncio.get_running_loop()).__module__.split(".")[0], addresses)  # fmt: skip
    period = settings.expiry_period_s or min(max(spec.idle_ttl_s / 4, 0.05), 30.0)
    app._expirer = asyncio.get_running_loop().create_task(_expire_loop(service, period), name="tkg-expiry")
    if settings.peers:  # SERVING: it can answer its own ask now
        app.finder = peers.SelfFinder(settings.peers, service.instance_id, peer_link(settings))
        app.finder.start()
    return app


async def _expire_loop(service: DecodeAttentionService, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            service.expire_idle()
        except Exception:  # keep sweeping; a failure here must not end expiry for good
            log.exception("idle expiry failed")
