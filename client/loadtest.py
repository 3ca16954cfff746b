"""`tkg loadtest`: drive a running tkg server over gRPC and report like ghz.

A run: read the geometry (`GetServerInfo` on every replica), create `--sequences` sequences in
groups of `--batch` (each group's ids chosen so that all of it lives on one replica), ingest a
`--context`-token prompt per layer with AppendKV, then issue Decode requests (or DecodeStream
messages with `--stream`) until `--steps` requests or `--duration` seconds have been measured after
`--warmup` requests. Each request is one decode step of one layer for one group: groups cycle
through `--layers`, and after `--max-new-tokens` generated tokens a group is truncated back to its
prompt so the cache stays bounded. Sequences are released at the end (also on Ctrl-C).

Load shapes: closed loop (`--concurrency` workers, each with one request in flight) or open loop
(`--rps`: requests are scheduled at a fixed rate and latency is counted from the scheduled time,
so a saturated server shows up as latency instead of silently lowering the rate).

Statistics cover measured requests only; latencies are of OK requests (like ghz). The server's own
`Timing` splits each OK request's latency into queue, kernel and the rest (network, serialization,
client). Only gRPC is used: no server import, no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import math
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tkg import codec
from tkg.client import routing
from tkg.client.aio import AsyncClient
from tkg.client.errors import TkgError, Unknown
from tkg.client.html_report import write_html
from tkg.client.messages import DecodeInput, DecodeResult
from tkg.client.stats import Recorder, emit, rate_check, render, summarize, timeline

PROG = "tkg loadtest"
# Caps that keep a mistyped flag from turning into an unbounded run.
MAX_DURATION_S = 3600.0
MAX_STEPS = 10_000_000
MAX_CONCURRENCY = 1024
MAX_RPS = 100_000.0
# AppendKV chunk payload target: well under gRPC's default 4 MiB even if the server kept it.
CHUNK_BYTES = 2 * 2**20


class UsageError(Exception):
    """A bad flag or a run the server's geometry cannot hold (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Drive a running tkg server (Decode or DecodeStream) and report latency and throughput.",
    )
    p.add_argument("--target", action="append", default=[],
                   help="host:port (or unix:///path.sock) of a replica; repeat or comma-separate for several, "
                        "or dns:///name:port (default localhost:50051)")
    load = p.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, default=1,
                      help="workers, each with one request in flight (default 1); with --rps the most in flight")
    load.add_argument("--rps", type=float, default=0.0, help="open loop: requests per second (default: closed loop)")
    load.add_argument("--sequences", type=int, help="sequences to create (default concurrency x batch)")
    load.add_argument("--batch", type=int, default=1, help="sequences per request (default 1)")
    load.add_argument("--context", type=int, default=128, help="prompt tokens ingested per sequence (default 128)")
    load.add_argument("--s-active", type=int, default=1, help="new tokens per sequence per step, S (default 1)")
    load.add_argument("--layers", type=int, default=1, help="layers to cycle through (default 1)")
    load.add_argument("--max-new-tokens", type=int, default=256,
                      help="tokens generated per sequence before it is truncated back to its prompt (default 256)")
    load.add_argument("--stream", action="store_true", help="use DecodeStream (one stream per worker)")
    load.add_argument("--connections", type=int, default=1, help="channels per replica (default 1)")
    stop = p.add_argument_group("run length")
    stop.add_argument("-n", "--steps", type=int, help="measured requests (default: 200 unless --duration)")
    stop.add_argument("-z", "--duration", type=float, help="measured seconds (instead of --steps)")
    stop.add_argument("--warmup", type=int, default=10, help="requests before measuring (default 10)")
    stop.add_argument("--timeout", type=float, default=20.0, help="deadline per call, seconds (default 20)")
    sec = p.add_argument_group("connection")
    sec.add_argument("--insecure", action="store_true", help="plaintext (no TLS), as ghz --insecure")
    sec.add_argument("--cacert", help="PEM root certificates for TLS (default: the system roots)")
    sec.add_argument("--cert", help="PEM client certificate, for a server started with --tls-client-ca (mTLS)")
    sec.add_argument("--key", help="PEM private key of --cert")
    sec.add_argument("--token", help="bearer token, sent as 'authorization: Bearer <token>'")
    sec.add_argument("-H", "--header", action="append", default=[], metavar="KEY:VALUE",
                     help="extra call metadata (repeatable)")
    sec.add_argument("--max-message-bytes", type=int, default=64 * 2**20, help="gRPC message limit (default 64 MiB)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write a ghz-like JSON report to FILE ('-' = stdout)")
    out.add_argument("--html", metavar="FILE", help="write a self-contained HTML report to FILE: latency histogram "
                     "and percentiles over time, throughput over time, status codes, server timing, options")
    out.add_argument("--progress", choices=["auto", "bar", "lines", "off"], default="auto",
                     help="progress on stderr: a bar on a TTY, periodic lines otherwise (default auto)")
    out.add_argument("--seed", type=int, default=0, help="random data seed (default 0)")
    return p  # fmt: skip


def _read_file(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path!r} ({exc.strerror})") from None


@dataclass(frozen=True)
class Plan:
    """The validated run: flags checked against each other (geometry checks come later)."""

    targets: list[str]
    concurrency: int
    rps: float
    sequences: int
    batch: int
    context: int
    s_active: int
    layers: int
    max_new_tokens: int
    stream: bool
    connections: int
    steps: int | None
    duration: float | None
    warmup: int
    timeout: float
    tls: bool
    root_certificates: bytes | None
    token: str | None
    metadata: tuple[tuple[str, str], ...]
    max_message_bytes: int
    seed: int
    certificate_chain: bytes | None = None  # PEM client certificate and key (mTLS)
    private_key: bytes | None = None

    @property
    def groups(self) -> int:
        return self.sequences // self.batch


def _positive(name: str, value: float, lo: float = 1, hi: float | None = None) -> None:
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise UsageError(f"--{name}: {value}; expected {want}")


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Check the flags (UsageError naming the flag and the expected value)."""
    try:
        targets = routing.resolve_targets(args.target or ["localhost:50051"])
    except (ValueError, OSError) as exc:
        raise UsageError(f"--target: {exc}") from None
    _positive("concurrency", args.concurrency, 1, MAX_CONCURRENCY)
    if args.rps < 0 or args.rps > MAX_RPS:
        raise UsageError(f"--rps: {args.rps}; expected 0 (closed loop) or up to {MAX_RPS:g}")
    _positive("batch", args.batch)
    _positive("context", args.context, 0)
    _positive("s-active", args.s_active)
    _positive("layers", args.layers)
    _positive("max-new-tokens", args.max_new_tokens)
    _positive("connections", args.connections, 1, 64)
    _positive("warmup", args.warmup, 0)
    _positive("timeout", args.timeout, 0.001)
    _positive("max-message-bytes", args.max_message_bytes, 1024)
    sequences = args.sequences if args.sequences is not None else args.concurrency * args.batch
    _positive("sequences", sequences)
    if sequences % args.batch:
        raise UsageError(f"--sequences: {sequences}; expected a multiple of --batch ({args.batch})")
    if args.steps is not None and args.duration is not None:
        raise UsageError("--steps and --duration: both given; expected one of them")
    steps, duration = args.steps, args.duration
    if duration is not None:
        _positive("duration", duration, 0.01, MAX_DURATION_S)
    elif steps is None:
        steps = 200
    if steps is not None:
        _positive("steps", steps, 1, MAX_STEPS)
    if args.insecure and args.cacert:
        raise UsageError("--insecure and --cacert: both given; expected plaintext or TLS, not both")
    if bool(args.cert) != bool(args.key) or (args.insecure and args.cert):
        raise UsageError("--cert/--key: expected both, and TLS (not --insecure)")
    roots, cert, cert_key = (_read_file(flag, path) for flag, path in
                        (("--cacert", args.cacert), ("--cert", args.cert), ("--key", args.key)))  # fmt: skip
    metadata = []
    for h in args.header:
        key, sep, value = h.partition(":")
        if not sep or not key.strip():
            raise UsageError(f"-H/--header: {h!r}; expected KEY:VALUE")
        # gRPC metadata keys are lowercase ASCII; reject rather than let the call fail later.
        key = key.strip()
        if key != key.lower() or not all(ch.isalnum() or ch in "-_." for ch in key):
            raise UsageError(f"-H/--header: key {key!r}; expected lowercase letters, digits, '-', '_' or '.'")
        metadata.append((key, value.strip()))
    return Plan(
        targets=targets, concurrency=args.concurrency, rps=args.rps, sequences=sequences, batch=args.batch,
        context=args.context, s_active=args.s_active, layers=args.layers, max_new_tokens=args.max_new_tokens,
        stream=args.stream, connections=args.connections, steps=steps, duration=duration, warmup=args.warmup,
        timeout=args.timeout, tls=not args.insecure, root_certificates=roots, token=args.token,
        certificate_chain=cert, private_key=cert_key, metadata=tuple(metadata),
        max_message_bytes=args.max_message_bytes, seed=args.seed,
    )  # fmt: skip


@dataclass
class Group:
    """`batch` sequences on one replica, decoded together; one request in flight at a time.

    `lengths[l]` is every member's cached length at layer l (they move in lockstep)."""

    index: int
    replica: int
    ids: list[str]
    lengths: np.ndarray
    next_layer: int = 0


def make_groups(plan: Plan) -> list[Group]:
    """`plan.groups` groups of `plan.batch` fresh ids, group g pinned to replica g mod n: its ids are
    chosen so that they route there, so a request never has to be split across replicas."""
    run = uuid.uuid4().hex[:8]
    n = len(plan.targets)
    groups = []
    for g in range(plan.groups):
        replica, ids = g % n, []
        for i in range(plan.batch):
            attempt = 0
            while True:
                sid = f"lt-{run}-{g}-{i}" + (f"-{attempt}" if attempt else "")
                if n == 1 or routing.pick(plan.targets, sid) == replica:
                    break
                attempt += 1
            ids.append(sid)
        groups.append(Group(g, replica, ids, np.zeros(plan.layers, np.int64)))
    return groups


@dataclass
class Progress:
    """Shared counters the workers update and the progress reporter reads."""

    started: int = 0  # requests handed to workers (warm-up included)
    completed: int = 0  # requests finished (warm-up included)
    measure_start: float | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class Runner:
    """One load-test run against `plan.targets` (create inside the event loop)."""

    def __init__(self, plan: Plan, err: TextIO | None = None) -> None:
        self.plan = plan
        self.err = err if err is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.rec = Recorder()
        self.progress = Progress()
        self.created: list[tuple[int, str]] = []  # (replica, sequence id)
        self.info: Any = None
        # Per replica, `connections` single-target clients: a group talks only to its replica,
        # and DecodeStream needs a single-target client.
        self.clients = [
            [self._client(t) for _ in range(plan.connections)] for t in plan.targets
        ]
        self.end_time: float | None = None
        # Open loop: the measured requests are those SCHEDULED from here on (set by `_tickets`), so a
        # backlog that built up during a slow warm-up is neither measured nor a reason to exceed --rps.
        self._window_start: float | None = None
        self.t_first: float | None = None

    def _client(self, target: str) -> AsyncClient:
        p = self.plan
        return AsyncClient(
            target, timeout=p.timeout, token=p.token, tls=p.tls, root_certificates=p.root_certificates,
            certificate_chain=p.certificate_chain, private_key=p.private_key, metadata=p.metadata,
            max_message_bytes=p.max_message_bytes,
        )  # fmt: skip

    def client_for(self, group: Group) -> AsyncClient:
        conns = self.clients[group.replica]
        return conns[(group.index // len(self.clients)) % len(conns)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for conns in self.clients for c in conns), return_exceptions=True)

    # ---- setup -----------------------------------------------------------------------------

    async def check_servers(self) -> None:
        """GetServerInfo on every replica: reachability, matching geometry, limits vs the plan."""
        infos = []
        for r, target in enumerate(self.plan.targets):
            try:
                infos.append(await self.clients[r][0].server_info(timeout=min(self.plan.timeout, 10.0)))
            except TkgError as exc:
                hint = ""
                if exc.code.name == "UNAVAILABLE" and self.plan.tls:
                    hint = " (a plaintext server? add --insecure)"
                raise ConnectionError(f"cannot use {target}: {exc.code.name}: {exc.details}{hint}") from None
        geo = lambda i: (i.num_layers, i.num_q_heads, i.num_kv_heads, i.head_dim, i.kv_dtype)  # noqa: E731
        for target, info in zip(self.plan.targets[1:], infos[1:], strict=True):
            if geo(info) != geo(infos[0]):
                raise UsageError(
                    f"--target: {target} serves geometry {geo(info)}, {self.plan.targets[0]} {geo(infos[0])}; "
                    "expected one model across replicas"
                )
        info = self.info = infos[0]
        p = self.plan
        if p.layers > info.num_layers:
            raise UsageError(f"--layers: {p.layers}; expected <= {info.num_layers} (the server's num_layers)")
        if p.s_active > info.max_s_active:
            raise UsageError(f"--s-active: {p.s_active}; expected <= {info.max_s_active} (the server's max_s_active)")
        if p.batch > info.max_batch:
            raise UsageError(f"--batch: {p.batch}; expected <= {info.max_batch} (the server's max_batch)")
        peak = p.context + p.max_new_tokens + p.s_active
        if info.max_context and peak > info.max_context:
            raise UsageError(
                f"--context + --max-new-tokens: {p.context} + {p.max_new_tokens} (+S) = {peak} tokens; "
                f"expected <= {info.max_context} (the server's max_context)"
            )
        per_seq = math.ceil(peak / info.block_len)
        # Blocks are per layer and every sequence allocates on every layer alike; spread over replicas.
        need = per_seq * math.ceil(p.sequences / len(p.targets))
        free = min(i.free_blocks for i in infos)
        if need > free:
            raise UsageError(
                f"--sequences x (--context + --max-new-tokens): needs about {need} KV blocks per layer per "
                f"replica, the server has {free} free; expected fewer sequences or tokens"
            )

    async def ingest(self, groups: list[Group]) -> None:
        """Create every sequence and AppendKV its prompt on each layer (8 sequences at a time)."""
        p, info = self.plan, self.info
        dtype = codec.dtype_to_numpy(codec.io_dtype_code(info))
        rng = np.random.default_rng(p.seed + 1)
        prompt = rng.standard_normal((2, max(p.context, 1), info.num_kv_heads, info.head_dim)).astype(dtype)
        chunk = max(1, CHUNK_BYTES // (info.num_kv_heads * info.head_dim * dtype.itemsize))
        sem = asyncio.Semaphore(8)

        async def one(group: Group, sid: str) -> None:
            async with sem:
                if self.progress.stop.is_set():
                    return
                client = self.client_for(group)
                await client.create_sequence(sid)
                self.created.append((group.replica, sid))
                for layer in range(p.layers):
                    if p.context:
                        await client.append_kv(sid, layer, prompt[0, : p.context], prompt[1, : p.context],
                                               position=0, chunk_tokens=chunk)  # fmt: skip

        await asyncio.gather(*(one(g, sid) for g in groups for sid in g.ids))
        for g in groups:
            g.lengths[:] = p.context

    # ---- the measured phase ------------------------------------------------------------------

    def _inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, info = self.plan, self.info
        dtype = codec.dtype_to_numpy(codec.io_dtype_code(info))
        rng = np.random.default_rng(p.seed)
        B, S = p.batch, p.s_active
        q = rng.standard_normal((B, info.num_q_heads, S, info.head_dim)).astype(dtype)
        kv = rng.standard_normal((2, B, info.num_kv_heads, S, info.head_dim)).astype(dtype)
        return q, kv[0], kv[1]

    def _take_ticket(self) -> bool:
        """Claim the right to start one more request (False: the run has enough)."""
        pr, p = self.progress, self.plan
        if pr.stop.is_set():
            return False
        if p.steps is not None and pr.started >= p.warmup + p.steps:
            return False
        pr.started += 1
        return True

    def _finish(self, t_sched: float, result: DecodeResult | None, error: TkgError | None) -> None:
        """Record one completed request (skipped while warming up) and decide whether to stop."""
        now = time.perf_counter()
        pr, p = self.progress, self.plan
        pr.completed += 1
        if self._window_start is not None:  # open loop: warm-up = scheduled before the window
            if t_sched < self._window_start:
                return
            if pr.measure_start is None:
                pr.measure_start = self._window_start
        elif pr.completed <= p.warmup:
            if pr.completed == p.warmup:
                pr.measure_start = now
            return
        if pr.measure_start is None:
            pr.measure_start = t_sched
        if error is not None:
            self.rec.failed(error.code.name, error.details, at_s=now)
        else:
            t = result.timing
            self.rec.ok(now - t_sched, t.queue_us, t.kernel_us, t.total_us, t.batch_size, at_s=now)
        self.end_time = now
        if p.steps is not None and pr.completed >= p.warmup + p.steps:
            pr.stop.set()
        if p.duration is not None and self._window_start is None and now - pr.measure_start >= p.duration:
            pr.stop.set()  # (open loop: the tickets end with the window, then the workers)

    async def _advance(self, group: Group, layer: int) -> None:
        """After a successful step: move the group on; roll back to the prompt past max-new-tokens."""
        p = self.plan
        group.lengths[layer] += p.s_active
        group.next_layer = (layer + 1) % p.layers
        if group.next_layer == 0 and group.lengths[0] + p.s_active > p.context + p.max_new_tokens:
            client = self.client_for(group)
            await asyncio.gather(*(client.truncate(sid, p.context) for sid in group.ids), return_exceptions=True)
            await self._resync(group)

    async def _resync(self, group: Group) -> None:
        """Re-read the group's lengths after an error (a timed-out call may still have appended)."""
        with contextlib.suppress(TkgError):
            info = await self.client_for(group).get_sequence(group.ids[0])
            group.lengths[:] = np.asarray(info.lengths[: self.plan.layers], np.int64)
            group.next_layer = int(np.argmin(group.lengths)) if len(set(group.lengths.tolist())) > 1 else 0

    async def _tickets(self, queue: asyncio.Queue) -> None:
        """Open loop: put scheduled start times on `queue` at `rps`: `warmup` of them, then those of
        the measured window (`steps` of them, or all within `duration` seconds)."""
        p = self.plan
        t0 = time.perf_counter()
        self._window_start = t0 + p.warmup / p.rps  # ticket number `warmup`'s time, computed as below
        end = self._window_start + p.duration if p.duration is not None else math.inf
        i = 0
        while (t := t0 + i / p.rps) < end and self._take_ticket():
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(t)
            i += 1
        for _ in range(self.plan.concurrency):
            queue.put_nowait(None)

    async def _get_or_stop(self, queue: asyncio.Queue) -> Any:
        """The next item of `queue`, or None once the run stops (workers never hang on an empty pool)."""
        if not queue.empty():
            return queue.get_nowait()
        stop_wait = asyncio.ensure_future(self.progress.stop.wait())
        get = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({stop_wait, get}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if get in done:
            return get.result()
        get.cancel()
        return None

    async def _next_start(self, tickets: asyncio.Queue | None) -> float | None:
        """When to start the next request: now (closed loop) or its scheduled time (open loop)."""
        if tickets is None:
            return time.perf_counter() if self._take_ticket() else None
        return await self._get_or_stop(tickets)

    async def unary_worker(self, pool: asyncio.Queue, tickets: asyncio.Queue | None) -> None:
        q, k, v = self._inputs()
        while (t_sched := await self._next_start(tickets)) is not None:
            group = await self._get_or_stop(pool)
            if group is None:
                break
            layer = group.next_layer
            positions = [group.lengths[layer]] * len(group.ids)
            try:
                res = await self.client_for(group).decode(layer, group.ids, positions, q, k, v)
            except TkgError as exc:
                self._finish(t_sched, None, exc)
                await self._resync(group)
            else:
                self._finish(t_sched, res, None)
                await self._advance(group, layer)
            finally:
                pool.put_nowait(group)

    async def stream_worker(self, replica: int, conn: int, pool: asyncio.Queue, tickets: asyncio.Queue | None) -> None:
        """Ping-pong on one DecodeStream. A per-message error is recorded and the stream goes on; a
        broken stream is recorded and reopened for the next request."""
        q, k, v = self._inputs()
        client = self.clients[replica][conn % len(self.clients[replica])]
        outbox: asyncio.Queue[DecodeInput | None] = asyncio.Queue()
        responses: AsyncIterator[DecodeResult] | None = None

        async def messages(box: asyncio.Queue) -> AsyncIterator[DecodeInput]:
            while (d := await box.get()) is not None:
                yield d

        try:
            while (t_sched := await self._next_start(tickets)) is not None:
                group = await self._get_or_stop(pool)
                if group is None:
                    break
                layer = group.next_layer
                try:
                    if responses is None:
                        responses = client.decode_stream(messages(outbox)).__aiter__()
                    outbox.put_nowait(DecodeInput(layer, group.ids, [group.lengths[layer]] * len(group.ids), q, k, v))
                    res = await responses.__anext__()
                except (TkgError, StopAsyncIteration) as exc:
                    err = exc if isinstance(exc, TkgError) else Unknown("DecodeStream: closed by the server early")
                    self._finish(t_sched, None, err)
                    outbox.put_nowait(None)  # end the old stream's request generator
                    responses, outbox = None, asyncio.Queue()
                    await self._resync(group)
                else:
                    if res.error is not None:
                        self._finish(t_sched, None, res.error)
                        await self._resync(group)
                    else:
                        self._finish(t_sched, res, None)
                        await self._advance(group, layer)
                finally:
                    pool.put_nowait(group)
        finally:
            outbox.put_nowait(None)
            if responses is not None:
                with contextlib.suppress(Exception):
                    await responses.aclose()  # type: ignore[attr-defined]

    async def report_progress(self, mode: str) -> None:
        """A bar (TTY) or a line every few seconds on stderr until the run stops."""
        if mode == "off":
            return
        period = 0.2 if mode == "bar" else 5.0
        while not self.progress.stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.progress.stop.wait(), period)
            line = self._progress_line()
            if mode == "bar":
                self.err.write("\r\x1b[2K" + line)
            else:
                self.err.write(line + "\n")
            self.err.flush()
        if mode == "bar":
            self.err.write("\n")

    def _progress_line(self) -> str:
        pr, p, rec = self.progress, self.plan, self.rec
        now = time.perf_counter()
        elapsed = now - pr.measure_start if pr.measure_start is not None else 0.0
        frac = rec.count / p.steps if p.steps is not None else elapsed / (p.duration or 1.0)
        frac = min(max(frac, 0.0), 1.0)
        width = 30
        bar = "=" * int(frac * width)
        bar = (bar + ">" if len(bar) < width else bar).ljust(width)
        lat = sorted(rec.latencies[-2000:])
        p50 = f"{lat[len(lat) // 2] * 1e3:.2f} ms" if lat else "-"
        rate = rec.count / elapsed if elapsed > 0 else 0.0
        errs = rec.count - rec.codes.get("OK", 0)
        phase = "warm-up" if pr.measure_start is None else f"{frac * 100:3.0f}%"
        return f"[{bar}] {phase} {rec.count} req  {rate:.0f} req/s  p50 {p50}  errors {errs}"

    async def run(self, progress_mode: str) -> dict[str, Any]:
        p = self.plan
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self.progress.stop.set)
        try:
            await self.check_servers()
            groups = make_groups(p)
            self.err.write(
                f"{PROG}: {len(p.targets)} replica(s), model {self.info.model or '?'} backend {self.info.backend}; "
                f"ingesting {p.sequences} sequences x {p.context} tokens x {p.layers} layer(s)\n"
            )
            self.err.flush()
            await self.ingest(groups)
            wall = await self._measure(groups, progress_mode)
        finally:
            await self.release()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
        report = summarize(self.rec, wall, p.batch * p.s_active)
        start = self.progress.measure_start
        report["timeline"] = timeline(self.rec, start, wall) if start is not None else []
        if p.rps > 0:  # open loop: did the callers keep up with the schedule?
            report["rate"] = rate_check(p.rps, self.rec.count / wall, p.concurrency)
        report["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        report["options"] = _options(p)
        report["server"] = {
            "model": self.info.model, "backend": self.info.backend, "version": self.info.version,
            "num_q_heads": self.info.num_q_heads, "num_kv_heads": self.info.num_kv_heads,
            "head_dim": self.info.head_dim, "kv_dtype": codec.pb.DType.Name(self.info.kv_dtype),
            "io_dtype": codec.pb.DType.Name(codec.io_dtype_code(self.info)),
            "max_batch": self.info.max_batch, "replicas": len(p.targets),
        }  # fmt: skip
        return report

    async def _measure(self, groups: list[Group], progress_mode: str) -> float:
        p = self.plan
        tickets: asyncio.Queue | None = asyncio.Queue() if p.rps > 0 else None
        n = len(p.targets)
        pools: list[asyncio.Queue] = [asyncio.Queue() for _ in range(n)] if p.stream else [asyncio.Queue()]
        for g in groups:
            pools[g.replica if p.stream else 0].put_nowait(g)
        tasks = []
        if tickets is not None:
            tasks.append(asyncio.ensure_future(self._tickets(tickets)))
        for w in range(p.concurrency):
            if p.stream:
                tasks.append(asyncio.ensure_future(self.stream_worker(w % n, w // n, pools[w % n], tickets)))
            else:
                tasks.append(asyncio.ensure_future(self.unary_worker(pools[0], tickets)))
        reporter = asyncio.ensure_future(self.report_progress(progress_mode))
        # Bound the run even if requests hang: the measured span plus generous slack for deadlines.
        limit = (p.duration if p.duration is not None else MAX_DURATION_S) + 2 * p.timeout + 30
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._workers_done(tasks), timeout=limit)
        except asyncio.TimeoutError:
            self.err.write(f"\n{PROG}: run exceeded {limit:.0f}s; stopping\n")
        finally:
            self.progress.stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await reporter
        start = self.progress.measure_start if self.progress.measure_start is not None else t0
        end = self.end_time if self.end_time is not None else time.perf_counter()
        return max(end - start, 1e-9)

    async def _workers_done(self, tasks: list[asyncio.Task]) -> None:
        """Return once every worker ended, or the run has what it needs and in-flight requests
        (part of the run) had up to two deadlines to finish. A worker's crash is re-raised."""
        stop = asyncio.ensure_future(self.progress.stop.wait())
        pending: set[asyncio.Future] = set(tasks)
        try:
            while pending and not stop.done():
                done, pending = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop)
                for t in done:
                    if t is not stop and not t.cancelled() and t.exception() is not None:
                        raise t.exception()
            if pending:  # workers idling on an empty pool never finish by themselves
                await asyncio.wait(pending, timeout=2 * self.plan.timeout)
        finally:
            stop.cancel()

    async def release(self) -> None:
        """Release what this run created (best effort; a dead replica's sequences expire there)."""
        if not self.created:
            return
        sem = asyncio.Semaphore(16)

        async def one(replica: int, sid: str) -> bool:
            async with sem:
                try:
                    await self.clients[replica][0].release(sid, timeout=min(self.plan.timeout, 5.0))
                    return True
                except TkgError:
                    return False

        done = await asyncio.gather(*(one(r, s) for r, s in self.created))
        failed = done.count(False)
        if failed:
            self.err.write(f"{PROG}: could not release {failed} of {len(done)} sequences (they expire server-side)\n")
        self.created.clear()


def _options(p: Plan) -> dict[str, Any]:
    return {
        "targets": p.targets, "concurrency": p.concurrency, "rps": p.rps or None, "sequences": p.sequences,
        "batch": p.batch, "context": p.context, "s_active": p.s_active, "layers": p.layers,
        "max_new_tokens": p.max_new_tokens, "stream": p.stream, "connections": p.connections,
        "steps": p.steps, "duration_s": p.duration, "warmup": p.warmup, "timeout_s": p.timeout,
        "tls": p.tls, "seed": p.seed,
    }  # fmt: skip


def _progress_mode(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bar" if sys.stderr.isatty() else "lines"


async def _main_async(plan: Plan, progress: str) -> dict[str, Any]:
    runner = Runner(plan)
    try:
        return await runner.run(progress)
    finally:
        await runner.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        plan = plan_from_args(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main_async(plan, _progress_mode(args.progress)))
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except TkgError as exc:
        print(f"{PROG}: error: setup failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if not emit(PROG, render(report, "Summary"), report, args.json):
        return 1
    if args.html and not write_html(PROG, report, args.html):
        return 1
    return 0 if report["statusCodeDistribution"].get("OK", 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
