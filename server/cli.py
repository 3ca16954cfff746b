"""`tkg serve` (also `python -m tkg.server`): run the decode-attention service.

Config errors (spec keys or flags) and an unavailable backend print one line naming the key or
flag and the expected value, and exit 2; an address that cannot be bound exits 1. Then see
`tkg.server.app` for the start-up order. SIGTERM/SIGINT: health NOT_SERVING, new calls get
UNAVAILABLE, in-flight calls finish within `--grace-s`; with `--peers` every resident sequence is
pushed to its new home in what is left of it; exit 0. SIGHUP: re-read `--auth-file` and the token
file (a bad file is logged and the old credentials stay in force).

`--ready-file PATH` is the machine-readable start-up signal (the start-up line is for people): once
the server is SERVING it writes PATH atomically (a temporary file renamed over it), one JSON object
`{"pid", "port" (the first TCP listener's; 0 with Unix sockets only), "metrics_port" (null when off),
"backend", "instance_id", "address" (the first listener: "host:port" or "unix:PATH"), "addresses" (all)}`,
and removes it when the process exits after the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tkg.kernel.backends import BackendUnavailable, auto_skipped, names, neuron_env, require_serving, resolve
from tkg.server import app as app_mod
from tkg.server import credentials, listeners
from tkg.server.batcher import INLINE_KERNEL_BYTES
from tkg.server.config import ConfigError, ModelSpec, load_spec
from tkg.server.identity import QUOTA_KEYS, Quota
from tkg.server.presets import DEFAULT_PRESET, PRESETS
from tkg.server.settings import DEFAULT_MAX_MESSAGE, ServeSettings

log = logging.getLogger("tkg.server")

# Backends whose store launches NKI kernels on (emulated) NeuronCores: they take an LNC degree.
DEVICE_BACKENDS = ("nki", "nki-emu")

# Spec keys settable from the command line: --num-layers N etc. (override preset and file).
OVERRIDES: dict[str, type] = {
    "num_layers": int, "num_q_heads": int, "num_kv_heads": int, "head_dim": int, "kv_dtype": str,
    "block_len": int, "num_blocks": int, "kv_cache_bytes": int, "max_s_active": int, "max_context": int,
    "idle_ttl_s": float, "softmax_scale": float, "rope_theta": float, "sinks": str, "io_dtype": str,
    "k_scale": float, "v_scale": float,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tkg serve", description="Serve decode attention over gRPC.")
    g = p.add_argument_group("model-attention spec (preset, then file, then flags)")
    g.add_argument("--config", help="spec file, JSON or YAML (.yaml/.yml); keys in the README")
    g.add_argument("--hf-config", metavar="PATH", help="a transformers config.json (or its folder): geometry, "
                   "sliding windows, RoPE, dtype; applied before --config and flags; sinks via --sinks")  # fmt: skip
    g.add_argument("--preset", help=f"built-in spec: {', '.join(PRESETS)} (default {DEFAULT_PRESET} without --config)")
    for key, typ in OVERRIDES.items():
        g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, metavar=typ.__name__.upper(),
                       help=f"override spec key {key}")  # fmt: skip
    g.add_argument("--fuse-rope", choices=["true", "false"], help="override fuse_rope")
    g.add_argument("--rope-scaling", help='override rope_scaling, JSON (e.g. \'{"type": "linear", "factor": 2}\')')
    g.add_argument("--sliding-window", help="override sliding_window: W for every layer, or a comma list "
                   "with one entry per layer (an integer or 'none')")  # fmt: skip
    g.add_argument("--max-batch", type=int, help="sequences per kernel launch (override max_batch)")
    n = p.add_argument_group("serving")
    n.add_argument("--host", default="0.0.0.0", help="gRPC listen address (default 0.0.0.0)")
    n.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="listen on ADDR, host:port or unix:///path/tkg.sock (repeatable; replaces --host/--port): "
                   "a Unix socket spares a co-located caller the TCP stack")  # fmt: skip
    n.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    n.add_argument("--metrics-host", default="0.0.0.0", help="metrics listen address (default 0.0.0.0)")
    n.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (default 9400; 0 = off)")
    n.add_argument("--gateway-metrics", action="store_true", help="also export the three gauges the Gateway API "
                   "Inference Extension reads: vllm:num_requests_waiting, vllm:num_requests_running, "
                   "vllm:kv_cache_usage_perc")  # fmt: skip
    n.add_argument("--backend", default="auto", help=f"kernel backend: auto (default), {', '.join(names())}")
    n.add_argument("--context-buckets", help="device backends (nki, nki-emu): compiled context lengths, a comma "
                   "list (default: 256, 512, ... up to max_context); longer steps are INVALID_ARGUMENT")  # fmt: skip
    n.add_argument("--batch-buckets", help="device backends: compiled batch sizes, a comma list (default: 1, 2, 4, "
                   "... up to max_batch); batches are padded up to one, larger ones split")  # fmt: skip
    n.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE,
                   help=f"gRPC send/receive message limit (default {DEFAULT_MAX_MESSAGE})")  # fmt: skip
    n.add_argument("--batch-delay-us", type=int, default=100, help="longest wait to fill a batch, us (default 100)")
    n.add_argument("--max-pending", type=int, default=1024,
                   help="queued decode requests before RESOURCE_EXHAUSTED (default 1024)")  # fmt: skip
    n.add_argument("--inline-kernel-bytes", type=int, default=INLINE_KERNEL_BYTES,
                   help="launches reading at most this much K+V run on the event loop instead of the "
                   "kernel thread, whose hand-off costs more than they take "
                   f"(default {INLINE_KERNEL_BYTES}; 0 = never)")  # fmt: skip
    n.add_argument("--kernel-cores", type=int, default=0,
                   help="cores the kernel may use (cpu backend): all of them when it runs on the event loop, "
                   "one fewer on the kernel thread so the loop keeps serving (default 0 = the CPUs this "
                   "process may run on)")  # fmt: skip
    n.add_argument("--grace-s", type=float, default=20.0,
                   help="drain time on SIGTERM for in-flight calls and pushing sequences to --peers (default 20)")
    n.add_argument("--peers", default="", help="the replicas, host:port,... exactly as clients name them: "
                   "on SIGTERM each resident sequence moves to the one client routing picks without this replica "
                   "(this replica's own entry is left out: named by --advertise, or else recognised by its "
                   "instance id once it answers, so every replica can share one list)")
    n.add_argument("--advertise", default="", help="this replica's name as clients and --peers name it (host:port), "
                   "e.g. $(POD_NAME).tkg-headless.<namespace>.svc.cluster.local:50051 in a StatefulSet")
    n.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="the event loop: uvloop (libuv, in Cython: less per-call overhead than asyncio's own "
                   "loop) or asyncio; auto (default): uvloop when installed (the server extra installs it)")
    n.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    n.add_argument("--ready-file", metavar="PATH",
                   help="once SERVING, write PATH (atomically: a temporary file renamed over it) with one JSON "
                   'object {"pid", "port", "metrics_port" (null when off), "backend", "instance_id", "address" '
                   '("host:port")} for scripts and tests to read instead of parsing the log; removed on exit')
    n.add_argument("--max-sequences", type=int,
                   help="live sequences server-wide (default: num_blocks, at least 1024)")  # fmt: skip
    n.add_argument("--max-concurrent-streams", type=int,
                   help="concurrent calls per client connection (gRPC's HTTP/2 limit; default: gRPC's)")  # fmt: skip
    t = p.add_argument_group("KV tiers (docs/tiers.md): sequences past the device pool, and across restarts")
    t.add_argument("--host-cache-bytes", default="0", metavar="N",
                   help="host-memory tier for sequences spilled from the device pool (bytes; K/M/G/T suffixes, "
                   "powers of 1024; default 0 = off)")
    t.add_argument("--spill-dir", metavar="PATH",
                   help="disk tier and persistence: spilled sequences live here as checksummed files, and a drain "
                   "without peers writes every sequence here; a server started on it serves them again")
    t.add_argument("--spill-bytes", metavar="N",
                   help="the disk tier's bound (default: the file system's free space less max(1 GiB, 5%%))")
    t.add_argument("--persist", choices=["on-drain", "write-back"], default="on-drain",
                   help="when sequences reach --spill-dir: on-drain (at SIGTERM; spilled ones already are there), "
                   "or write-back (also every block once full at every layer, in the background: after a kill "
                   "each sequence comes back up to its last written block)")
    a = p.add_argument_group("security (tokens must be at least 16 characters)")
    a.add_argument("--auth-token", action="append", default=[],
                   help="bearer token with full access, tenant 'default' (repeatable; prefer --auth-token-file "
                   "or TKG_AUTH_TOKEN: the command line is visible in ps)")  # fmt: skip
    a.add_argument("--auth-token-file", help="file with full-access tokens, one per line (tenant 'default')")
    a.add_argument("--peer-token-file", help="file with the token a drain to --peers presents: a 'role: peer' "
                   "entry of the peers' auth files, so every tenant's sequences move (default: the first "
                   "--auth-token: tenant 'default' only; under mTLS this replica's certificate)")  # fmt: skip
    a.add_argument("--read-only-token", action="append", default=[],
                   help="bearer token for GetServerInfo/GetSequence/PrefetchSequence only (repeatable)")  # fmt: skip
    a.add_argument("--auth-file", help="tenants, roles, token hashes or client subjects, quotas (YAML/JSON; "
                   "re-read on SIGHUP)")  # fmt: skip
    a.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key the port serves TLS only")
    a.add_argument("--tls-key", help="PEM private key")
    a.add_argument("--tls-client-ca", help="PEM roots: require and verify client certificates (mTLS)")
    q = p.add_argument_group("per-tenant quota defaults (the auth file overrides them per tenant; 0 = none)")
    for key in QUOTA_KEYS:
        q.add_argument(f"--quota-{key.replace('_', '-')}", dest=f"quota_{key}", type=int, default=0,
                       metavar="N", help=f"{key} per tenant")  # fmt: skip
    return p


def auth_from_args(args: argparse.Namespace) -> tuple[credentials.AuthTable, Quota, str | None]:
    """The credential table, the quota defaults and the token a drain presents to --peers (the
    --peer-token-file's, else the first full-access token) from the security flags and the auth file."""
    defaults = Quota(**{k: getattr(args, f"quota_{k}") or None for k in QUOTA_KEYS})
    tokens = credentials.tokens_from(args.auth_token, args.auth_token_file)
    read_only = [credentials.check_token(t, "--read-only-token") for t in args.read_only_token]
    entries = credentials.read_auth_file(args.auth_file) if args.auth_file else []
    peer = credentials.tokens_from((), args.peer_token_file, env={}, source="--peer-token-file")[0] \
        if args.peer_token_file else (tokens[0] if tokens else None)  # fmt: skip
    mtls = bool(args.tls_client_ca)  # a client_subject without it could never match: refused, not ignored
    return credentials.build_table(tokens, read_only, entries, defaults, mtls=mtls), defaults, peer


def _window_list(text: str) -> int | list[int | None]:
    def one(item: str) -> int | None:
        item = item.strip().lower()
        if item in ("none", "null", ""):
            return None
        try:
            return int(item)
        except ValueError:
            raise ConfigError(f"--sliding-window: {item!r}; expected an integer or 'none'") from None

    items = [one(x) for x in text.split(",")]
    if len(items) == 1 and items[0] is not None:
        return items[0]
    return items


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    overrides: dict[str, Any] = {k: getattr(args, k) for k in OVERRIDES}
    if args.fuse_rope is not None:
        overrides["fuse_rope"] = args.fuse_rope == "true"
    if args.max_batch is not None:
        overrides["max_batch"] = args.max_batch
    if args.sliding_window is not None:
        overrides["sliding_window"] = _window_list(args.sliding_window)
    if args.rope_scaling is not None:
        try:
            overrides["rope_scaling"] = json.loads(args.rope_scaling)
        except json.JSONDecodeError as exc:
            example = '{"type": "linear", "factor": 2}'
            raise ConfigError(f"--rope-scaling: not JSON ({exc}); expected a mapping such as {example}") from None
    return load_spec(args.config, args.preset, overrides, hf_config=args.hf_config)


def settings_from_args(
    args: argparse.Namespace, backend: str, env: dict[str, str] | None = None, backend_note: str = ""
) -> ServeSettings:
    """Check the non-spec flags; a bad one raises ConfigError naming the flag and what is expected.
    Device backends (nki, nki-emu) take their LNC degree from NEURON_LOGICAL_NC_CONFIG in `env`
    (default: this process's environment), checked against the platform."""
    checks = (
        ("--port", args.port, 0, 65535), ("--metrics-port", args.metrics_port, 0, 65535),
        ("--max-message-bytes", args.max_message_bytes, 4096, 2**31 - 1),
        ("--batch-delay-us", args.batch_delay_us, 0, 10**7), ("--max-pending", args.max_pending, 1, 10**7),
        ("--inline-kernel-bytes", args.inline_kernel_bytes, 0, 2**40), ("--kernel-cores", args.kernel_cores, 0, 4096),
        *((f"--quota-{k.replace('_', '-')}", getattr(args, f"quota_{k}"), 0, 2**40) for k in QUOTA_KEYS),
        *(() if args.max_sequences is None else (("--max-sequences", args.max_sequences, 1, 2**31 - 1),)),
        *(() if args.max_concurrent_streams is None else
          (("--max-concurrent-streams", args.max_concurrent_streams, 1, 2**31 - 1),)),
    )  # fmt: skip
    for flag, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ConfigError(f"{flag}: {value}; expected an integer in [{lo}, {hi}]")
    try:
        listen = tuple(listeners.check_address(a) for a in args.listen)
        peers = tuple(listeners.check_address(p, "--peers") for p in args.peers.split(",") if p.strip())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    me = args.advertise.strip()
    if me:
        if me not in peers:  # a typo here would make the drain push to itself, or hash differently
            names = ", ".join(peers) or "the --peers entries (none given)"
            raise ConfigError(f"--advertise: {me!r} is not one of --peers; expected one of {names}")
        peers = tuple(p for p in peers if p != me)
    if args.grace_s < 0:
        raise ConfigError(f"--grace-s: {args.grace_s}; expected >= 0")
    buckets = {flag: _int_list(flag, text) for flag, text in
               (("--context-buckets", args.context_buckets), ("--batch-buckets", args.batch_buckets))}  # fmt: skip
    cert = key = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert/--tls-key: only one given; expected both (PEM chain and private key)")
        cert, key = _read_pem("--tls-cert", args.tls_cert), _read_pem("--tls-key", args.tls_key)
    client_ca = None
    if args.tls_client_ca:
        if cert is None:
            raise ConfigError("--tls-client-ca: given without --tls-cert/--tls-key; expected a TLS server as well")
        client_ca = _read_pem("--tls-client-ca", args.tls_client_ca)
    lnc = 2
    if backend in DEVICE_BACKENDS:
        try:
            lnc = neuron_env.lnc_config(os.environ if env is None else env)
        except neuron_env.NeuronConfigError as exc:
            raise ConfigError(str(exc)) from None
    table, defaults, peer_token = auth_from_args(args)
    host_bytes = parse_bytes("--host-cache-bytes", args.host_cache_bytes)
    spill_bytes = None if args.spill_bytes is None else parse_bytes("--spill-bytes", args.spill_bytes)
    if spill_bytes is not None and not args.spill_dir:
        raise ConfigError("--spill-bytes: given without --spill-dir; expected a directory for the disk tier")
    if args.persist == "write-back" and not args.spill_dir:
        raise ConfigError("--persist write-back: given without --spill-dir; expected a directory to write to")
    return ServeSettings(
        backend=backend, host=args.host, port=args.port, listen=listen, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port or None, max_message_bytes=args.max_message_bytes,
        batch_delay_us=args.batch_delay_us, max_pending=args.max_pending,
        auth=table, auth_file=args.auth_file, quota_defaults=defaults, peer_token=peer_token,
        tls_cert=cert, tls_key=key, tls_client_ca=client_ca, gateway_metrics=args.gateway_metrics,
        inline_kernel_bytes=args.inline_kernel_bytes, kernel_cores=args.kernel_cores, max_sequences=args.max_sequences,
        max_concurrent_streams=args.max_concurrent_streams, peers=peers,
        context_buckets=buckets["--context-buckets"], batch_buckets=buckets["--batch-buckets"],
        lnc=lnc, backend_note=backend_note, host_cache_bytes=host_bytes, spill_dir=args.spill_dir or None,
        spill_bytes=spill_bytes, persist=args.persist,
    )  # fmt: skip


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(flag: str, text: str) -> int:
    """A byte count: an integer, optionally with K, M, G or T (powers of 1024; "KiB"/"KB" alike)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        n = int(t[: len(t) - len(unit)] if unit else t) * _UNITS[unit]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r}; expected a byte count such as 8589934592 or 8G") from None
    if n < 0:
        raise ConfigError(f"{flag}: {text!r}; expected >= 0")
    return n


def _int_list(flag: str, text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: {text!r}; expected a comma list of positive integers, e.g. 256,1024")
    return values


def _read_pem(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path!r} ({exc.strerror}); expected a PEM file") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: {path!r} holds no PEM block; expected a PEM file")
    return data


def reload_auth(app: app_mod.App, args: argparse.Namespace) -> None:
    """SIGHUP: re-read the auth file and the token files; keep the table in force on any error."""
    try:
        table, _, _ = auth_from_args(args)
    except ConfigError as exc:
        log.error("auth reload failed, keeping the previous credentials: %s", exc)
        return
    app.reload_auth(table)
    log.info("auth reloaded: %d tenants, %d tokens, %d client subjects",
             len(table.tenants), len(table.tokens), len(table.subjects))  # fmt: skip


def ready_record(app: app_mod.App) -> dict[str, Any]:
    """What `--ready-file` holds for a started instance."""
    return {
        "pid": os.getpid(), "port": app.port, "metrics_port": app.metrics_port, "backend": app.settings.backend,
        "instance_id": app.service.instance_id, "address": app.addresses[0], "addresses": app.addresses,
    }  # fmt: skip


def write_ready_file(path: Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path` so that a reader never sees a partial file: a temporary file
    in the same folder (same file system), then `os.replace`, which is atomic."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def serve(
    spec: ModelSpec, settings: ServeSettings, grace_s: float, args: argparse.Namespace | None = None,
    ready_file: Path | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain for up to `grace_s` and return 0. With `ready_file`,
    write it once SERVING and remove it on the way out."""
    if ready_file is not None:  # a file left by an earlier run must not pass for this one's
        ready_file.unlink(missing_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before warm-up: a signal then still drains cleanly
        loop.add_signal_handler(sig, stop.set)
    try:
        app = await app_mod.start(spec, settings)
    except (OSError, ConfigError) as exc:  # a port in use; a spill directory of another spec
        print(f"tkg serve: error: {exc}", file=sys.stderr)
        return 1
    if args is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_auth, app, args)
    # One line with everything an operator needs to know; programs read --ready-file instead.
    print(f"tkg serve: {app.describe()}", flush=True)
    if ready_file is not None:
        try:
            write_ready_file(ready_file, ready_record(app))
        except OSError as exc:  # nobody would ever learn the server is up: do not serve unseen
            print(f"tkg serve: error: --ready-file: cannot write {str(ready_file)!r} ({exc.strerror})", file=sys.stderr)
            await app.shutdown(0.0)
            return 1
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.1fs", grace_s)
        report = await app.shutdown(grace_s)
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    if report is not None:
        print(f"tkg serve: drain moved {len(report.moved)} sequences, {len(report.failed)} could not move", flush=True)
    print("tkg serve: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
        backend = resolve(args.backend)
        require_serving(backend)  # e.g. nki: an nki too old, or no /dev/neuron* to run on: exit 2 now
        note = "; ".join(f"auto passed over {n}: {why}" for n, why in auto_skipped()) if args.backend == "auto" else ""
        settings = settings_from_args(args, backend, backend_note=note)
        run = app_mod.loop_runner(args.event_loop)
    except (ConfigError, BackendUnavailable) as exc:
        print(f"tkg serve: error: {exc}", file=sys.stderr)
        return 2
    ready_file = Path(args.ready_file) if args.ready_file else None
    return run(serve(spec, settings, args.grace_s, args, ready_file))
