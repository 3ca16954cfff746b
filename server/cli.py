"""`tkg serve`: run the decode-attention service.

Startup order: config (clear error and exit 2 when bad), backend (exit 2 when unavailable), KV
cache (preallocated), gRPC server with health (NOT_SERVING until warmed up) and reflection, metrics
HTTP port, a warm-up kernel call, then SERVING. SIGTERM/SIGINT: health NOT_SERVING, new calls get
UNAVAILABLE, in-flight calls finish within `--grace-s`, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tkg.kernel import paged_decode
from tkg.kernel.backends import BackendUnavailable, names, resolve
from tkg.server.config import ConfigError, ModelSpec, load_spec
from tkg.server.kv_cache import KVCache
from tkg.server.metrics import Metrics
from tkg.server.service import DecodeAttentionService, ServiceOptions
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DecodeAttention"].full_name
DEFAULT_MAX_MESSAGE = 64 * 2**20

# Geometry overrides: flag -> (config key, type).
OVERRIDES: dict[str, type] = {
    "num_layers": int, "num_q_heads": int, "num_kv_heads": int, "head_dim": int, "kv_dtype": str,
    "block_len": int, "num_blocks": int, "kv_cache_bytes": int, "max_s_active": int, "max_context": int,
    "idle_ttl_s": float, "softmax_scale": float, "rope_theta": float, "sinks": str,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tkg serve", description="Serve decode attention over gRPC.")
    p.add_argument("--config", help="model-attention spec, JSON or YAML (keys: see README)")
    p.add_argument("--preset", help="built-in geometry: tiny (default), llama-3-8b, gpt-oss-20b")
    p.add_argument("--host", default="0.0.0.0", help="gRPC listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="metrics listen address")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (default 9400; -1 = off)")
    p.add_argument("--backend", default="auto", help=f"kernel backend: auto, {', '.join(names())}")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE, help="gRPC message limit")
    p.add_argument("--batch-delay-us", type=int, default=100, help="longest wait to fill a batch (us)")
    p.add_argument("--max-batch", type=int, help="sequences per kernel launch (default: the spec's max_batch)")
    p.add_argument("--max-pending", type=int, default=1024, help="queued decode requests before RESOURCE_EXHAUSTED")
    p.add_argument("--grace-s", type=float, default=20.0, help="drain time for in-flight calls on SIGTERM")
    p.add_argument("--auth-token", action="append", default=[], help="bearer token with full access (repeatable)")
    p.add_argument("--read-only-token", action="append", default=[], help="token for GetServerInfo/GetSequence only")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key): serve TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--gateway-metrics", action="store_true",
                   help="also export the Gateway API Inference Extension gauges (vllm:num_requests_waiting, ...)")
    p.add_argument("--fuse-rope", choices=["true", "false"], help="override the spec's fuse_rope")
    p.add_argument("--sliding-window", type=int, help="window for every layer (override)")
    p.add_argument("--log-level", default="INFO")
    for key, typ in OVERRIDES.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, help=argparse.SUPPRESS)
    return p


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    overrides = {k: getattr(args, k) for k in OVERRIDES}
    if args.fuse_rope is not None:
        overrides["fuse_rope"] = args.fuse_rope == "true"
    if args.max_batch is not None:
        overrides["max_batch"] = args.max_batch
    if args.sliding_window is not None:
        overrides["sliding_window"] = args.sliding_window
    return load_spec(args.config, args.preset, overrides)


def warm_up(spec: ModelSpec, cache: KVCache, backend: str) -> None:
    """One tiny kernel call, so the first request does not pay for loading/compiling the backend."""
    q = np.zeros((1, spec.num_q_heads, 1, spec.head_dim), dtype=spec.kv_numpy_dtype)
    paged_decode(
        q, cache.k[0], cache.v[0], np.zeros((1, 1), np.int32), np.ones(1, np.int32),
        scale=spec.softmax_scale, backend=backend,
    )  # fmt: skip


async def serve(args: argparse.Namespace, spec: ModelSpec, backend: str) -> int:
    cache = KVCache(
        num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        block_len=spec.block_len, num_blocks=spec.num_blocks, max_context=spec.max_context, dtype=spec.kv_dtype,
    )  # fmt: skip
    metrics = Metrics(backend, gateway=args.gateway_metrics)
    opts = ServiceOptions(
        backend=backend, max_batch=spec.max_batch, batch_delay_s=args.batch_delay_us * 1e-6,
        max_pending=args.max_pending, max_message_bytes=args.max_message_bytes,
        auth_tokens=frozenset(args.auth_token), read_only_tokens=frozenset(args.read_only_token),
    )  # fmt: skip
    service = DecodeAttentionService(spec, cache, opts, metrics)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", args.max_message_bytes),
            ("grpc.max_receive_message_length", args.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_DecodeAttentionServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{args.host}:{args.port}"
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("tkg serve: error: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        creds = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        print(f"tkg serve: error: cannot listen on {address} (in use or not allowed)", file=sys.stderr)
        return 1
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    metrics_port = metrics.serve(args.metrics_port, args.metrics_host) if args.metrics_port >= 0 else None
    service.start()
    await asyncio.get_running_loop().run_in_executor(None, warm_up, spec, cache, backend)
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s", spec.summary())
    # One machine-readable line: tests and scripts read the bound ports from it.
    print(f"tkg serve: listening on {args.host}:{port} backend={backend} metrics_port={metrics_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def expire_loop() -> None:
        period = min(max(spec.idle_ttl_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(period)
            service.expire_idle()

    expirer = asyncio.ensure_future(expire_loop())
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", args.grace_s)
    await health_servicer.enter_graceful_shutdown()
    await service.drain(args.grace_s)
    await server.stop(grace=1.0)
    expirer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expirer
    await service.close()
    print("tkg serve: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
        backend = resolve(args.backend)
    except (ConfigError, BackendUnavailable) as exc:
        print(f"tkg serve: error: {exc}", file=sys.stderr)
        return 2
    if args.max_batch is not None and args.max_batch < 1:
        print(f"tkg serve: error: --max-batch: {args.max_batch}; expected >= 1", file=sys.stderr)
        return 2
    return asyncio.run(serve(args, spec, backend))
