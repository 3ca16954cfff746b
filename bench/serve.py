"""`tkg bench serve`: the service against a bare gRPC echo carrying the same bytes, in one run.

Both peers run as subprocesses on loopback, started by this command: `python -m tkg.server`
with the bench geometry (default 32 q / 8 kv heads, d=128, bf16, one layer, context 1024) and
`python -m tkg.bench.echo` (generic handlers, identity serializers; it answers a real serialized
`DecodeResponse` to a real serialized `DecodeRequest`). The same decode step is also timed
in this process (`paged_decode` on a pool of the same geometry, same backend): the kernel alone.
Scenarios, each measured against its peer in the same run (the machine is shared and noisy: read
the ratios, not the absolute numbers), and the goals (docs/performance.md):

  overhead    one sequence, S=1, one caller, at each `--latency-contexts` (default 256 and 1024):
              p50 over calls of (Decode latency - the server's `kernel_us`) vs the echo's p50
              (goal <= 1.3x). Also the plain latency p50/p99 against the echo.
  kernel      the server's `kernel_us` (the step as the server reports it: KV prepare and append,
              the attention call, the plans' finish) against the same `paged_decode` call timed
              alone here: the lone caller above (goal <= 1.3x), and `--load-callers` (16) concurrent
              single-sequence callers, each launch against the same batch alone, with the thread
              cap the server gives a launch on its worker thread (goal <= 1.5x). The server's
              `attention_us` (the attention call alone, a part of `kernel_us`) is shown beside it.
  batching    all sequences (default 64) advanced once per round: 64 concurrent single-sequence
              callers (the server coalesces them) vs one caller sending all 64 per request;
              tokens/s ratio concurrent/batched (goal >= 0.6x). Echo peers with the same bytes.
  streaming   one caller, one sequence: `DecodeStream` ping-pong on one connection vs unary
              `Decode` calls; requests/s ratio stream/unary (goal >= 1.3x). Echo peers likewise.
  outside     (issue 24 goal 2, row "2b") one caller, the sync thin client (`tkg.client.Client`),
              Decode of B sequences at each `--outside-batches` (default 8 and 64): p50 over calls of
              (wall time - the response's `Timing.total_us`), i.e. both gRPC stacks, the network and
              the client's encoding and decoding, vs the p50 of the echo (aio server, sync channel as
              the client's) carrying the same B-row request bytes and a real response of B rows
              (goal <= 1.3x).

The goals are reported, never asserted. Echo and service blocks alternate (`--rounds`), so slow
drift of the machine affects both peers alike. `--json FILE|-` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tkg import codec, dtypes
from tkg.bench import echo
from tkg.client.aio import AsyncClient
from tkg.client.client import Client
from tkg.client.errors import TkgError
from tkg.client.messages import DecodeInput, decode_request
from tkg.client.stats import emit, percentile

PROG = "tkg bench serve"
DECODE_METHOD = "/tkg.v1.DecodeAttention/Decode"
MAX_MESSAGE = 256 * 2**20
# Goal ratios: overhead and kernel are upper bounds (service / peer), batching and streaming lower bounds.
GOALS = {"overhead_p50": 1.3, "kernel_lone": 1.3, "kernel_load": 1.5, "batching": 0.6, "streaming": 1.3,
         "outside_p50": 1.3}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Service Decode/DecodeStream vs a bare gRPC echo (same bytes).")
    g = p.add_argument_group("geometry (the server is started with it)")
    g.add_argument("--q-heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--head-dim", type=int, default=128)
    g.add_argument("--kv-dtype", default="bfloat16", choices=sorted(dtypes.BY_NAME))
    g.add_argument("--context", type=int, default=1024,
                   help="prompt tokens per sequence: batching, load and streaming (default 1024)")
    g.add_argument("--latency-contexts", default="256,1024", type=_contexts, metavar="N,N",
                   help="prompt tokens of the lone caller's sequence, one latency block each (default 256,1024)")
    g.add_argument("--sequences", type=int, default=64, help="sequences in the batching scenario (default 64)")
    g.add_argument("--block-len", type=int, default=16)
    g.add_argument("--outside-batches", default=None, type=_contexts, metavar="B,B",
                   help="goal 2b: batch sizes of the lone caller's Decode timed outside the server (at most "
                        "--sequences; default 8,64, each capped at --sequences)")
    r = p.add_argument_group("run")
    r.add_argument("--backend", default="auto", help="server kernel backend (default auto)")
    r.add_argument("--steps", type=int, default=300,
                   help="calls per peer per round: latency and streaming (default 300)")
    r.add_argument("--batch-rounds", type=int, default=12,
                   help="batching: rounds advancing every sequence once, per peer per round (default 12)")
    r.add_argument("--load-callers", type=int, default=16,
                   help="kernel under load: concurrent single-sequence callers (default 16, at most --sequences)")
    r.add_argument("--kernel-reps", type=int, default=50,
                   help="calls per timing of the kernel alone in this process (default 50)")
    r.add_argument("--warmup", type=int, default=20, help="unmeasured calls before each block (default 20)")
    r.add_argument("--rounds", type=int, default=2, help="alternations of echo and service blocks (default 2)")
    r.add_argument("--max-block-s", type=float, default=6.0,
                   help="cut any measured block short after this many seconds (bounds the run on slow backends)")
    r.add_argument("--echo-stack", choices=["aio", "sync"], default="aio",
                   help="the echo server's gRPC stack (default aio, as the service)")
    r.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the server (repeatable), e.g. --server-arg=--batch-delay-us=50")
    r.add_argument("--transport", choices=["tcp", "uds"], default="tcp",
                   help="uds: the server also listens on a Unix socket, and the lone caller's Decode p50 over it is "
                        "reported against TCP, measured in alternating blocks (default tcp: TCP only)")
    r.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' = stdout)")
    return p  # fmt: skip


def _contexts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated integers, e.g. 256,1024") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; expected positive integers")
    return sorted(set(values))


# ---- subprocess peers ------------------------------------------------------------------------


@dataclass
class Proc:
    """A started peer: its process and its ready file's JSON (`port`; the server's also `backend`)."""

    proc: subprocess.Popen
    ready: dict[str, Any]

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(cmd: list[str], ready_file: Path, what: str, timeout: float = 120.0) -> Proc:
    """Start `cmd` (which is given `--ready-file ready_file`), wait for that file to appear, and keep
    draining the output meanwhile and after (a full pipe would stall the peer). If the process exits
    first or `timeout` passes: RuntimeError with the last of its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*cmd, "--ready-file", str(ready_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=20)  # the pump's last lines, for the error
    pump = threading.Thread(target=tail.extend, args=(proc.stdout,), daemon=True, name=f"{what}-output")
    pump.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return Proc(proc, json.loads(ready_file.read_text()))  # written whole by a rename
        except FileNotFoundError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    pump.join(5)  # the pipe is closed: the pump has read everything
    raise RuntimeError(f"{what} did not start ({' '.join(cmd)}):\n{''.join(tail)}")


# ---- measurement helpers ---------------------------------------------------------------------


def _lat_summary(samples: list[float]) -> dict[str, float]:
    s = np.sort(np.asarray(samples))
    return {
        "n": len(s),
        "p50_us": percentile(s, 50) * 1e6,
        "p99_us": percentile(s, 99) * 1e6,
        "mean_us": float(s.mean() * 1e6) if len(s) else math.nan,
        "rps": len(s) / float(s.sum()) if len(s) else 0.0,  # back to back, one caller
    }


class KernelAlone:
    """The server's decode step timed in this process: `paged_decode` on a pool of the same
    geometry and backend, each sequence on its own shuffled blocks (nothing shared in cache)."""

    def __init__(self, info: Any, dtype: np.dtype, backend: str, max_tokens: int, max_batch: int) -> None:
        from tkg.kernel import paged_decode  # the kernel stack only for this bench, not for `tkg.client`

        self._paged_decode = paged_decode
        self.backend = backend
        G, D, BL = info.num_kv_heads, info.head_dim, info.block_len
        self.per_seq = -(-max_tokens // BL)
        nb = self.per_seq * max_batch
        rng = np.random.default_rng(2)
        self.k = rng.standard_normal((G, nb, BL, D), dtype=np.float32).astype(dtype)
        self.v = rng.standard_normal((G, nb, BL, D), dtype=np.float32).astype(dtype)
        self.tables = rng.permutation(nb).astype(np.int32).reshape(max_batch, self.per_seq)
        self.q = rng.standard_normal((max_batch, info.num_q_heads, 1, D)).astype(dtype)
        self.scale = info.softmax_scale

    def median_s(self, batch: int, tokens: int, reps: int, max_threads: int | None) -> float:
        """Median seconds of `reps` calls for `batch` sequences of `tokens` tokens (after one warm-up)."""
        opts = {} if max_threads is None else {"max_threads": max_threads}
        lens = np.full(batch, tokens, dtype=np.int32)
        args = (self.q[:batch], self.k, self.v, self.tables[:batch], lens)
        self._paged_decode(*args, scale=self.scale, backend=self.backend, **opts)
        times = []
        for _ in range(max(1, reps)):
            t = time.perf_counter()
            self._paged_decode(*args, scale=self.scale, backend=self.backend, **opts)
            times.append(time.perf_counter() - t)
        return float(np.median(times))


def load_summary(
    seen: list[tuple[int, int, int, int]], same: dict[int, float], every: dict[int, float], cap: int | None
) -> dict[str, Any]:
    """The kernel-under-load figures: `seen` holds one (batch size, requests in the launch, kernel_us,
    attention_us) per response; `same`/`every`: batch size -> the kernel's median seconds alone here
    with the server's thread cap / with every core. A launch counts once (each of its responses
    weighs 1/requests). Pure arithmetic: tests feed it known figures."""
    kernel = sum(k / r for _, r, k, _ in seen)
    attention = sum(att / r for _, r, _, att in seen)
    weights = [(b, 1 / r) for b, r, *_ in seen]
    alone_same = sum(w * same[b] * 1e6 for b, w in weights)
    alone_every = sum(w * every[b] * 1e6 for b, w in weights)
    launches = sum(w for _, w in weights)
    return {
        "launches": launches, "mean_batch": sum(w * b for b, w in weights) / launches,
        "server_kernel_us": kernel / launches, "server_attention_us": attention / launches,
        "alone_us": alone_same / launches, "alone_all_cores_us": alone_every / launches, "thread_cap": cap,
        "ratio": kernel / alone_same, "ratio_all_cores": kernel / alone_every,
        "attention_ratio": attention / alone_same,
    }  # fmt: skip


class Bench:
    """Holds the two peers, the clients and each sequence's length."""

    def __init__(self, args: argparse.Namespace, server: Proc, echo_proc: Proc) -> None:
        self.args = args
        self.server, self.echo = server, echo_proc
        self.backend = str(server.ready["backend"])
        self.client = Client(server.target, timeout=60.0, max_message_bytes=MAX_MESSAGE)
        unix = [a for a in server.ready.get("addresses", []) if a.startswith("unix:")]
        # The same server over its Unix socket (--transport uds), for the lone caller's A/B blocks.
        self.uds_client = Client(unix[0], timeout=60.0, max_message_bytes=MAX_MESSAGE) if unix else None
        self.info = self.client.server_info()
        self.dtype = codec.dtype_to_numpy(codec.io_dtype_code(self.info))
        self.echo_channel = grpc.insecure_channel(echo_proc.target, options=echo.OPTIONS)
        self.echo_unary = self.echo_channel.unary_unary(echo.UNARY)
        self.echo_stream = self.echo_channel.stream_stream(echo.STREAM)
        self.ids = [f"bench-{i}" for i in range(args.sequences)]
        self.lat_ids = {ctx: f"lat-{ctx}" for ctx in args.latency_contexts}
        self.prompt = {**dict.fromkeys(self.ids, args.context), **{sid: c for c, sid in self.lat_ids.items()}}
        self.lengths = dict.fromkeys(self.prompt, 0)
        # Server Timing of the measured lone calls, per latency context: (queue, kernel, attention, total) us.
        self.server_us: dict[int, list[tuple[int, int, int, int]]] = {c: [] for c in self.lat_ids}
        rng = np.random.default_rng(0)
        H, G, D = self.info.num_q_heads, self.info.num_kv_heads, self.info.head_dim
        self.q1 = rng.standard_normal((1, H, 1, D)).astype(self.dtype)
        self.k1, self.v1 = rng.standard_normal((2, 1, G, 1, D)).astype(self.dtype)
        B = args.sequences
        self.qB = rng.standard_normal((B, H, 1, D)).astype(self.dtype)
        self.kB, self.vB = rng.standard_normal((2, B, G, 1, D)).astype(self.dtype)
        from tkg.server.cores import available_cores  # here: the bench's import must not pull the server

        self.cores = available_cores()  # the server's default kernel cores (`tkg serve --kernel-cores`)
        self.alone = KernelAlone(
            self.info, self.dtype, self.backend, max(self.prompt.values()) + _growth(args), self.load_callers
        )

    @property
    def load_callers(self) -> int:
        return max(1, min(self.args.load_callers, self.args.sequences))

    def close(self) -> None:
        self.client.close()
        if self.uds_client is not None:
            self.uds_client.close()
        self.echo_channel.close()

    # ---- setup ---------------------------------------------------------------------------

    def ingest(self) -> None:
        """Create the sequences and load distinct random prompts (distinct, so the kernel really
        reads `sequences x context` tokens: shared blocks would sit in cache and flatter it)."""
        G, D = self.info.num_kv_heads, self.info.head_dim
        rng = np.random.default_rng(1)
        for sid, tokens in self.prompt.items():
            self.client.create_sequence(sid)
            if tokens:
                k, v = rng.standard_normal((2, tokens, G, D)).astype(self.dtype)
                self.client.append_kv(sid, 0, k, v, position=0, chunk_tokens=max(1, (2 << 20) // (G * D * 2)))
            self.lengths[sid] = tokens

    def reset(self) -> None:
        """Roll every sequence back to its prompt, so phases never run out of blocks."""
        for sid, tokens in self.prompt.items():
            if self.lengths[sid] != tokens:
                self.client.truncate(sid, tokens)
                self.lengths[sid] = tokens

    def register_echo(self, request: bytes, response: bytes) -> None:
        self.echo_channel.unary_unary(echo.REGISTER)(echo.register_payload(len(request), response))

    def capture_bytes(self, ids: list[str], q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[bytes, bytes]:
        """A real DecodeRequest's bytes and the server's real DecodeResponse bytes for it (one step)."""
        req = decode_request(DecodeInput(0, ids, [self.lengths[s] for s in ids], q, k, v, "bench")).SerializeToString()
        # No (de)serializers: the exact bytes on the wire both ways.
        with grpc.insecure_channel(self.server.target, options=echo.OPTIONS) as ch:
            resp = ch.unary_unary(DECODE_METHOD)(req, timeout=60.0)
        for s in ids:
            self.lengths[s] += 1
        return req, resp

    # ---- latency and streaming (one caller, sync stack) ----------------------------------

    def _deadline(self) -> float:
        return time.perf_counter() + self.args.max_block_s

    def service_unary(self, n: int, ctx: int, record: bool, client: Client | None = None) -> list[float]:
        """`n` back-to-back Decode calls of the lone caller on its `ctx`-token sequence (over `client`'s
        transport; default the TCP one)."""
        sid, out, end = self.lat_ids[ctx], [], self._deadline()
        client = client or self.client
        for _ in range(n):
            if time.perf_counter() > end:
                break
            t = time.perf_counter()
            res = client.decode(0, [sid], [self.lengths[sid]], self.q1, self.k1, self.v1)
            out.append(time.perf_counter() - t)
            self.lengths[sid] += 1
            if record:
                tm = res.timing
                self.server_us[ctx].append((tm.queue_us, tm.kernel_us, tm.attention_us, tm.total_us))
        return out

    def service_stream(self, n: int, sid: str) -> float:
        """Requests/s of `n` ping-pong messages on one DecodeStream (after its own warm-up)."""
        inbox: queue.Queue[DecodeInput | None] = queue.Queue()

        def requests() -> Iterator[DecodeInput]:
            while (d := inbox.get()) is not None:
                yield d

        results = self.client.decode_stream(requests())
        t0, done, end = 0.0, 0, self._deadline()
        try:
            for i in range(self.args.warmup + n):
                if i == self.args.warmup:
                    t0 = time.perf_counter()
                elif time.perf_counter() > end and i > self.args.warmup:
                    break
                inbox.put(DecodeInput(0, [sid], [self.lengths[sid]], self.q1, self.k1, self.v1))
                res = next(results)
                if res.error is not None:
                    raise res.error
                self.lengths[sid] += 1
                done += i >= self.args.warmup
            return done / (time.perf_counter() - t0)
        finally:
            inbox.put(None)
            with contextlib.suppress(StopIteration):
                next(results)

    def echo_unary_lat(self, payload: bytes, n: int) -> list[float]:
        call, out = self.echo_unary, []
        for _ in range(n):
            t = time.perf_counter()
            call(payload)
            out.append(time.perf_counter() - t)
        return out

    def service_outside(self, batch: int, n: int) -> tuple[list[float], list[int]]:
        """`n` back-to-back Decode calls of the first `batch` sequences by the sync thin client
        (`Client.decode`: its encoding and decoding included): each call's wall seconds and its
        response's `Timing.total_us` (the server's share, arrival to the answer encoded)."""
        ids, wall, total, end = self.ids[:batch], [], [], self._deadline()
        q, k, v = self.qB[:batch], self.kB[:batch], self.vB[:batch]
        for _ in range(n):
            if time.perf_counter() > end:
                break
            t = time.perf_counter()
            res = self.client.decode(0, ids, [self.lengths[s] for s in ids], q, k, v)
            wall.append(time.perf_counter() - t)
            total.append(res.timing.total_us)
            for s in ids:
                self.lengths[s] += 1
        return wall, total

    def echo_stream_rps(self, payload: bytes, n: int) -> float:
        inbox: queue.Queue[bytes | None] = queue.Queue()
        results = self.echo_stream(iter(inbox.get, None))
        t0 = 0.0
        for i in range(self.args.warmup + n):
            if i == self.args.warmup:
                t0 = time.perf_counter()
            inbox.put(payload)
            next(results)
        rps = n / (time.perf_counter() - t0)
        inbox.put(None)
        with contextlib.suppress(StopIteration):
            next(results)
        return rps

    # ---- the kernel under load (asyncio: `--load-callers` callers in one event loop) --------

    async def service_load(self, rounds: int) -> list[tuple[int, int, int, int]]:
        """`--load-callers` concurrent single-sequence callers (as `tkg loadtest -c N`), `rounds`
        calls each; returns (batch_size, batch_requests, kernel_us, attention_us) of every measured
        response."""
        n, seen = self.load_callers, []
        end = [math.inf]

        def record(res: Any) -> None:
            t = res.timing
            seen.append((t.batch_size, t.batch_requests, t.kernel_us, t.attention_us))

        async with AsyncClient(self.server.target, timeout=120.0, max_message_bytes=MAX_MESSAGE) as ac:
            await self._single_callers(ac, n, max(1, self.args.warmup // 10), end, None)
            end[0] = self._deadline()
            await self._single_callers(ac, n, rounds, end, record)
        return seen

    async def _single_callers(
        self, ac: AsyncClient, n: int, steps: int, end: list[float], on_reply: Callable[[Any], None] | None
    ) -> None:
        """Callers 0..n-1 at once, each `steps` single-token Decodes of its own sequence (stopping once
        `end[0]` has passed); `on_reply(response)` for every reply when given (None: a warm-up)."""

        async def caller(i: int) -> None:
            sid = self.ids[i]
            q, k, v = self.qB[i : i + 1], self.kB[i : i + 1], self.vB[i : i + 1]
            for _ in range(steps):
                if time.perf_counter() > end[0]:
                    return
                res = await ac.decode(0, [sid], [self.lengths[sid]], q, k, v)
                self.lengths[sid] += 1
                if on_reply is not None:
                    on_reply(res)

        await asyncio.gather(*(caller(i) for i in range(n)))

    def load_alone(self, seen: list[tuple[int, int, int, int]], tokens: int) -> dict[str, Any]:
        """Each launch of `seen` against the same batch alone: per batch size, the kernel's median
        here with the server's worker-thread cap (`kernel_threads(cores, inline=False)`) and with
        every core. A launch counts once (each of its `batch_requests` responses weighs 1/requests).
        The goal's figure is the server's `kernel_us`; its `attention_us` is reported beside it."""
        from tkg.server.cores import kernel_threads

        cap = kernel_threads(self.cores, inline=False) if self.backend == "cpu" else None
        sizes = sorted({b for b, *_ in seen})
        reps = max(3, self.args.kernel_reps // 5)
        same = {b: self.alone.median_s(b, tokens, reps, cap) for b in sizes}
        every = {b: self.alone.median_s(b, tokens, reps, None) for b in sizes}
        return load_summary(seen, same, every, cap)

    # ---- batching (asyncio: 64 callers in one event loop) ----------------------------------

    async def service_batching(self, rounds: int) -> tuple[float, float, float, dict[str, float]]:
        """(tokens/s with one caller per sequence, tokens/s with one caller x all, tokens/s of all
        pipelined on one stream, mean batch sizes)."""
        a = self.args
        async with AsyncClient(self.server.target, timeout=120.0, max_message_bytes=MAX_MESSAGE) as ac:
            batch_sizes: dict[str, list[int]] = {"concurrent": [], "batched": []}

            tokens = [0]
            end = [math.inf]

            def record(res: Any) -> None:
                tokens[0] += 1
                batch_sizes["concurrent"].append(res.timing.batch_size)

            async def batched(steps: int, record: bool) -> None:
                for _ in range(steps):
                    if time.perf_counter() > end[0]:
                        return
                    res = await ac.decode(0, self.ids, [self.lengths[s] for s in self.ids], self.qB, self.kB, self.vB)
                    for s in self.ids:
                        self.lengths[s] += 1
                    if record:
                        tokens[0] += len(self.ids)
                        batch_sizes["batched"].append(res.timing.batch_size)

            warm = max(1, a.warmup // 10)
            await self._single_callers(ac, a.sequences, warm, end, None)
            t, tokens[0], end[0] = time.perf_counter(), 0, self._deadline()
            await self._single_callers(ac, a.sequences, rounds, end, record)
            concurrent = tokens[0] / (time.perf_counter() - t)
            end[0] = math.inf
            await batched(warm, False)
            t, tokens[0], end[0] = time.perf_counter(), 0, self._deadline()
            await batched(rounds, True)
            one = tokens[0] / (time.perf_counter() - t)
            end[0] = math.inf
            await self._pipelined(ac, 1)
            end[0] = self._deadline()
            t = time.perf_counter()
            streamed = await self._pipelined(ac, rounds, end)
            streamed /= time.perf_counter() - t
        means = {k: float(np.mean(v)) if v else math.nan for k, v in batch_sizes.items()}
        return concurrent, one, streamed, means

    async def _pipelined(self, ac: AsyncClient, rounds: int, end: list[float] | None = None) -> int:
        """One DecodeStream carrying one single-sequence message per sequence, all in flight at once:
        each response releases the next message of its sequence. Returns the tokens decoded."""
        n = len(self.ids)
        outbox: asyncio.Queue[DecodeInput | None] = asyncio.Queue()

        async def messages() -> Any:
            while (d := await outbox.get()) is not None:
                yield d

        def message(i: int) -> DecodeInput:
            sid = self.ids[i]
            q, k, v = self.qB[i : i + 1], self.kB[i : i + 1], self.vB[i : i + 1]
            return DecodeInput(0, [sid], [self.lengths[sid]], q, k, v, str(i))

        for i in range(n):
            outbox.put_nowait(message(i))
        sent, done, in_flight = n, 0, n
        stream = ac.decode_stream(messages())
        try:
            async for res in stream:
                if res.error is not None:
                    raise res.error
                i = int(res.request_id)
                self.lengths[self.ids[i]] += 1
                done, in_flight = done + 1, in_flight - 1
                if sent < n * rounds and (end is None or time.perf_counter() <= end[0]):
                    outbox.put_nowait(message(i))
                    sent, in_flight = sent + 1, in_flight + 1
                if in_flight == 0:
                    break
        finally:
            outbox.put_nowait(None)
            await stream.aclose()
        return done

    async def echo_batching(self, single: bytes, allseq: bytes, rounds: int) -> tuple[float, float, float]:
        a = self.args
        async with grpc.aio.insecure_channel(self.echo.target, options=echo.OPTIONS) as ch:
            call = ch.unary_unary(echo.UNARY)

            async def caller(steps: int) -> None:
                for _ in range(steps):
                    await call(single)

            await asyncio.gather(*(caller(1) for _ in range(a.sequences)))
            t = time.perf_counter()
            await asyncio.gather(*(caller(rounds) for _ in range(a.sequences)))
            concurrent = a.sequences * rounds / (time.perf_counter() - t)
            await call(allseq)
            t = time.perf_counter()
            for _ in range(rounds):
                await call(allseq)
            one = a.sequences * rounds / (time.perf_counter() - t)
            # Pipelined stream: all sequences' messages in flight on one stream, like the service's.
            total = a.sequences * rounds
            t = time.perf_counter()
            outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
            for _ in range(a.sequences):
                outbox.put_nowait(single)

            async def messages() -> Any:
                while (m := await outbox.get()) is not None:
                    yield m

            call_s = ch.stream_stream(echo.STREAM)(messages())
            sent, done = a.sequences, 0
            async for _ in call_s:
                done += 1
                if sent < total:
                    outbox.put_nowait(single)
                    sent += 1
                if done == total:
                    break
            outbox.put_nowait(None)
            call_s.cancel()
            streamed = total / (time.perf_counter() - t)
        return concurrent, one, streamed

    # ---- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        self.ingest()
        req1, resp1 = self.capture_bytes(self.ids[:1], self.q1, self.k1, self.v1)
        reqB, respB = self.capture_bytes(self.ids, self.qB, self.kB, self.vB)
        self.register_echo(req1, resp1)
        self.register_echo(reqB, respB)
        # Goal 2b: each batch's real request and response bytes for the echo (registered by request
        # length; a batch of `--sequences` is reqB/respB again).
        outside_bytes = {b: self.capture_bytes(self.ids[:b], self.qB[:b], self.kB[:b], self.vB[:b])
                         for b in a.outside_batches}  # fmt: skip
        for req, resp in outside_bytes.values():
            self.register_echo(req, resp)
        self.reset()

        ctxs = a.latency_contexts
        stream_ctx = ctxs[-1]  # streaming: the lone caller's sequence at the largest latency context
        echo_lat: list[float] = []
        lat: dict[int, list[float]] = {c: [] for c in ctxs}
        alone: dict[int, list[float]] = {c: [] for c in ctxs}
        rps = {"service_unary": [], "service_stream": [], "echo_unary": [], "echo_stream": []}
        bat: dict[str, list[float]] = {
            k: [] for k in ("service_concurrent", "service_batched", "service_pipelined",
                            "echo_concurrent", "echo_batched", "echo_pipelined")
        }  # fmt: skip
        batch_means: list[dict[str, float]] = []
        load_seen: list[tuple[int, int, int, int]] = []
        transport: dict[str, list[float]] | None = None if self.uds_client is None else {"tcp": [], "uds": []}
        lone_cap = self.cores if self.backend == "cpu" else None  # an inline launch: every core
        # Goal 2b per batch: (wall seconds, total_us) of each service call, the echo's seconds.
        outside: dict[int, dict[str, list[float]]] = {b: {"wall": [], "total_us": [], "echo": []}
                                                      for b in a.outside_batches}  # fmt: skip
        for _ in range(a.rounds):
            self.echo_unary_lat(req1, a.warmup)
            e = self.echo_unary_lat(req1, a.steps)
            echo_lat += e
            rps["echo_unary"].append(len(e) / sum(e))
            rps["echo_stream"].append(self.echo_stream_rps(req1, a.steps))
            for ctx in ctxs:
                self.service_unary(a.warmup, ctx, record=False)
                s = self.service_unary(a.steps, ctx, record=True)
                lat[ctx] += s
                # The kernel alone at the block's middle length, right after it (the server idles).
                middle = ctx + a.warmup + len(s) // 2
                alone[ctx].append(self.alone.median_s(1, middle, a.kernel_reps, lone_cap))
                if ctx == stream_ctx:
                    rps["service_unary"].append(len(s) / sum(s))
                    rps["service_stream"].append(self.service_stream(a.steps, self.lat_ids[ctx]))
            if transport is not None:  # the same lone calls over TCP then the Unix socket, alternated per round
                for name, client in (("tcp", self.client), ("uds", self.uds_client)):
                    self.service_unary(a.warmup, ctxs[0], record=False, client=client)
                    transport[name] += self.service_unary(a.steps, ctxs[0], record=False, client=client)
            self.reset()
            for b in a.outside_batches:  # echo then service, each round, as the latency blocks
                req = outside_bytes[b][0]
                self.echo_unary_lat(req, a.warmup)
                outside[b]["echo"] += self.echo_unary_lat(req, a.steps)
                self.service_outside(b, a.warmup)
                wall, total = self.service_outside(b, a.steps)
                outside[b]["wall"] += wall
                outside[b]["total_us"] += total
                self.reset()
            ec, eb, es = asyncio.run(self.echo_batching(req1, reqB, a.batch_rounds))
            sc, sb, ss, means = asyncio.run(self.service_batching(a.batch_rounds))
            self.reset()
            load_seen += asyncio.run(self.service_load(a.batch_rounds))
            self.reset()
            bat["echo_concurrent"].append(ec)
            bat["echo_batched"].append(eb)
            bat["echo_pipelined"].append(es)
            bat["service_concurrent"].append(sc)
            bat["service_batched"].append(sb)
            bat["service_pipelined"].append(ss)
            batch_means.append(means)
        load = self.load_alone(load_seen, a.context + max(1, a.warmup // 10) + a.batch_rounds // 2)
        sizes = {"request_1": len(req1), "response_1": len(resp1), f"request_{a.sequences}": len(reqB),
                 f"response_{a.sequences}": len(respB)}  # fmt: skip
        for b, (req, resp) in outside_bytes.items():
            sizes.update({f"request_{b}": len(req), f"response_{b}": len(resp)})
        return report(self.args, self.info, self.backend, self.cores, self.load_callers, self.server_us, echo_lat,
                      lat, alone, load, rps, bat, batch_means, sizes, transport, outside)  # fmt: skip


def report(
    a: argparse.Namespace, info: Any, backend: str, cores: int, load_callers: int,
    server_us: dict[int, list[tuple[int, int, int, int]]], echo_lat: list[float], lat: dict[int, list[float]],
    alone: dict[int, list[float]], load: dict[str, Any], rps: dict[str, list[float]], bat: dict[str, list[float]],
    batch_means: list[dict[str, float]], sizes: dict[str, int], transport: dict[str, list[float]] | None = None,
    outside: dict[int, dict[str, list[float]]] | None = None,
) -> dict[str, Any]:
    """The JSON report from a run's raw figures (latencies and alone times in seconds; `server_us`:
    each lone call's (queue, kernel, attention, total) us; `load`: `load_summary`'s; `rps` and `bat`:
    per round; `outside`: batch -> {"wall": seconds, "total_us": us, "echo": seconds}, per call), with
    the ratios and the goals' verdicts. Pure arithmetic: tests feed it known figures."""
    med = lambda xs: float(np.median(xs))  # noqa: E731
    le = _lat_summary(echo_lat)
    contexts: dict[str, Any] = {}
    for ctx, samples in lat.items():
        us = np.asarray(server_us[ctx], dtype=np.float64)  # [calls, (queue, kernel, attention, total)]
        ls = _lat_summary(samples)
        overhead = np.asarray(samples) * 1e6 - us[:, 1]  # each call's latency minus its kernel time
        queue_us, kernel_us, attention_us, total_us = us.mean(axis=0).tolist()
        server_kernel, server_attention = float(np.median(us[:, 1])), float(np.median(us[:, 2]))
        alone_us = med(alone[ctx]) * 1e6
        contexts[str(ctx)] = {
            "service": ls, "ratio_p50": ls["p50_us"] / le["p50_us"], "ratio_p99": ls["p99_us"] / le["p99_us"],
            "overhead_p50_us": float(np.median(overhead)),
            "overhead_ratio": float(np.median(overhead)) / le["p50_us"],
            # Where the lone Decode's time goes (means, us); the rest is network + serialization + client.
            "server_split_us": {"queue": queue_us, "kernel": kernel_us, "attention": attention_us,
                                "total": total_us, "rest": ls["mean_us"] - total_us},
            # Goal 2: the server's kernel_us against the same call alone; attention_us beside it.
            "kernel": {"server_kernel_p50_us": server_kernel, "server_attention_p50_us": server_attention,
                       "alone_p50_us": alone_us, "ratio": server_kernel / alone_us,
                       "attention_ratio": server_attention / alone_us},
        }  # fmt: skip
    sc, sb = med(bat["service_concurrent"]), med(bat["service_batched"])
    su, ss = med(rps["service_unary"]), med(rps["service_stream"])
    results = {
        "config": {
            "backend": backend, "model_geometry": {
                "num_q_heads": info.num_q_heads, "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim,
                "kv_dtype": dtypes.BY_CODE[info.kv_dtype].name,
                "block_len": info.block_len,
            },
            "context": a.context, "latency_contexts": a.latency_contexts, "sequences": a.sequences,
            "load_callers": load_callers, "steps": a.steps, "batch_rounds": a.batch_rounds,
            "rounds": a.rounds, "warmup": a.warmup, "kernel_reps": a.kernel_reps, "max_block_s": a.max_block_s,
            "echo_stack": a.echo_stack, "cpus": os.cpu_count(), "kernel_cores": cores, "bytes": sizes,
        },
        "latency": {"echo": le, "contexts": contexts, "goal_overhead_ratio_max": GOALS["overhead_p50"]},
        "kernel_load": {**load, "goal_ratio_max": GOALS["kernel_load"]},
        "batching": {
            "service_concurrent_tokens_s": sc, "service_batched_tokens_s": sb,
            "echo_concurrent_tokens_s": med(bat["echo_concurrent"]),
            "echo_batched_tokens_s": med(bat["echo_batched"]),
            # One DecodeStream with every sequence's message in flight (not a goal; for comparison).
            "service_stream_pipelined_tokens_s": med(bat["service_pipelined"]),
            "echo_stream_pipelined_tokens_s": med(bat["echo_pipelined"]),
            "mean_batch_size_concurrent": float(np.mean([m["concurrent"] for m in batch_means])),
            "mean_batch_size_batched": float(np.mean([m["batched"] for m in batch_means])),
            "ratio": sc / sb, "goal_ratio_min": GOALS["batching"],
        },
        "streaming": {
            "context": a.latency_contexts[-1],
            "service_stream_rps": ss, "service_unary_rps": su,
            "echo_stream_rps": med(rps["echo_stream"]), "echo_unary_rps": med(rps["echo_unary"]),
            "ratio": ss / su, "echo_ratio": med(rps["echo_stream"]) / med(rps["echo_unary"]),
            "goal_ratio_min": GOALS["streaming"],
        },
    }  # fmt: skip
    goals = {}
    for ctx, c in contexts.items():
        goals[f"overhead_ctx{ctx}"] = c["overhead_ratio"] <= GOALS["overhead_p50"]
        goals[f"kernel_lone_ctx{ctx}"] = c["kernel"]["ratio"] <= GOALS["kernel_lone"]
    goals["kernel_load"] = load["ratio"] <= GOALS["kernel_load"]
    goals["batching"] = results["batching"]["ratio"] >= GOALS["batching"]
    goals["streaming"] = results["streaming"]["ratio"] >= GOALS["streaming"]
    results["outside"] = {str(b): outside_summary(o["wall"], o["total_us"], o["echo"])
                          for b, o in (outside or {}).items()}  # fmt: skip
    for b, o in results["outside"].items():
        goals[f"outside_b{b}"] = o["ratio"] <= GOALS["outside_p50"]
    results["goals_met"] = goals
    if transport is not None:
        results["transport"] = transport_summary(transport["tcp"], transport["uds"], a.latency_contexts[0])
    return results


def outside_summary(wall: list[float], total_us: list[float], echo_s: list[float]) -> dict[str, Any]:
    """Goal 2b for one batch: the time a Decode spends outside the server, each call's wall seconds
    minus its response's `Timing.total_us` (paired by index), p50 and p99 in us, against the p50
    and p99 of the echo's calls (seconds) carrying the same bytes; `ratio`: the p50s'. Pure arithmetic."""
    if len(wall) != len(total_us):
        raise ValueError(f"total_us: {len(total_us)} figures; expected one per call ({len(wall)})")
    out = np.sort(np.asarray(wall, dtype=np.float64) * 1e6 - np.asarray(total_us, dtype=np.float64))
    e = _lat_summary(echo_s)
    p50 = percentile(out, 50)
    return {
        "n": len(out), "outside_p50_us": p50, "outside_p99_us": percentile(out, 99),
        "wall_p50_us": percentile(np.sort(np.asarray(wall)), 50) * 1e6,
        "server_total_p50_us": percentile(np.sort(np.asarray(total_us, dtype=np.float64)), 50),
        "echo_p50_us": e["p50_us"], "echo_p99_us": e["p99_us"], "echo_n": e["n"],
        "ratio": p50 / e["p50_us"], "goal_ratio_max": GOALS["outside_p50"],
    }  # fmt: skip


def transport_summary(tcp: list[float], uds: list[float], context: int) -> dict[str, Any]:
    """The lone caller's Decode over a Unix socket against TCP (seconds per call, same server, same
    sequence, alternating blocks): p50s in us and their ratio (< 1: the socket is faster)."""
    t, u = _lat_summary(tcp), _lat_summary(uds)
    return {"context": context, "tcp": t, "uds": u, "ratio_p50": u["p50_us"] / t["p50_us"]}


def render(r: dict[str, Any]) -> str:
    """The ratio table: goals 1-4 of docs/performance.md, then the figures behind them."""
    c, L, K, B, S = r["config"], r["latency"], r["kernel_load"], r["batching"], r["streaming"]
    g, met = c["model_geometry"], r["goals_met"]
    ok = lambda key: "met" if met[key] else "MISSED"  # noqa: E731
    n, echo_p50 = c["sequences"], L["echo"]["p50_us"]
    rows = []
    for ctx, x in L["contexts"].items():
        rows.append((f"1. overhead p50 (Decode - kernel_us), ctx {ctx}", f"{x['overhead_p50_us']:.0f} us",
                     f"{echo_p50:.0f} us", f"{x['overhead_ratio']:.2f}x",
                     f"<= {GOALS['overhead_p50']}x {ok(f'overhead_ctx{ctx}')}"))  # fmt: skip
    for ctx, x in L["contexts"].items():
        k = x["kernel"]
        rows += [
            (f"2. kernel inside (kernel_us) / alone, lone caller, ctx {ctx}", f"{k['server_kernel_p50_us']:.0f} us",
             f"{k['alone_p50_us']:.0f} us", f"{k['ratio']:.2f}x",
             f"<= {GOALS['kernel_lone']}x {ok(f'kernel_lone_ctx{ctx}')}"),
            ("   of it the attention call (attention_us)", f"{k['server_attention_p50_us']:.0f} us",
             f"{k['alone_p50_us']:.0f} us", f"{k['attention_ratio']:.2f}x", ""),
        ]  # fmt: skip
    cap = "" if K["thread_cap"] is None else f", {K['thread_cap']} thr"
    rows += [
        (f"2. kernel inside (kernel_us) / alone, {c['load_callers']} callers (batch {K['mean_batch']:.1f}{cap})",
         f"{K['server_kernel_us']:.0f} us", f"{K['alone_us']:.0f} us", f"{K['ratio']:.2f}x",
         f"<= {GOALS['kernel_load']}x {ok('kernel_load')}"),
        ("   of it the attention call (attention_us)", f"{K['server_attention_us']:.0f} us", f"{K['alone_us']:.0f} us",
         f"{K['attention_ratio']:.2f}x", ""),
        ("   kernel_us vs alone on every core", "", f"{K['alone_all_cores_us']:.0f} us",
         f"{K['ratio_all_cores']:.2f}x", ""),
    ]  # fmt: skip
    for b, o in r["outside"].items():  # issue 24 goal 2: vs the echo of the same bytes
        rows.append((f"2b. outside the server p50, batch {b} (wall - total_us)", f"{o['outside_p50_us']:.0f} us",
                     f"{o['echo_p50_us']:.0f} us (echo)", f"{o['ratio']:.2f}x",
                     f"<= {GOALS['outside_p50']}x {ok(f'outside_b{b}')}"))  # fmt: skip
    rows += [
        (f"3. batching: {n} callers / 1 x {n} (tokens/s)", f"{B['service_concurrent_tokens_s']:.0f}",
         f"{B['service_batched_tokens_s']:.0f}", f"{B['ratio']:.2f}x", f">= {GOALS['batching']}x {ok('batching')}"),
        ("4. streaming: DecodeStream / unary (req/s)", f"{S['service_stream_rps']:.0f}",
         f"{S['service_unary_rps']:.0f}", f"{S['ratio']:.2f}x", f">= {GOALS['streaming']}x {ok('streaming')}"),
    ]  # fmt: skip
    info = []
    for ctx, x in L["contexts"].items():
        info.append((f"latency p50 / p99, ctx {ctx} (Decode)", f"{x['service']['p50_us']:.0f} / "
                     f"{x['service']['p99_us']:.0f} us", f"{echo_p50:.0f} / {L['echo']['p99_us']:.0f} us",
                     f"{x['ratio_p50']:.2f}x / {x['ratio_p99']:.2f}x", ""))  # fmt: skip
    vs_echo = lambda key: f"{B[f'service_{key}_tokens_s'] / B[f'echo_{key}_tokens_s']:.2f}x"  # noqa: E731
    info += [
        (f"{n} callers x 1 seq (tokens/s)", f"{B['service_concurrent_tokens_s']:.0f}",
         f"{B['echo_concurrent_tokens_s']:.0f}", vs_echo("concurrent"), ""),
        (f"1 caller x {n} seqs (tokens/s)", f"{B['service_batched_tokens_s']:.0f}",
         f"{B['echo_batched_tokens_s']:.0f}", vs_echo("batched"), ""),
        (f"1 caller, {n} seqs pipelined on 1 stream", f"{B['service_stream_pipelined_tokens_s']:.0f}",
         f"{B['echo_stream_pipelined_tokens_s']:.0f}",
         f"{B['service_stream_pipelined_tokens_s'] / B['echo_stream_pipelined_tokens_s']:.2f}x", ""),
        ("DecodeStream (req/s, 1 caller)", f"{S['service_stream_rps']:.0f}", f"{S['echo_stream_rps']:.0f}",
         f"{S['service_stream_rps'] / S['echo_stream_rps']:.2f}x", ""),
        ("unary Decode (req/s, 1 caller)", f"{S['service_unary_rps']:.0f}", f"{S['echo_unary_rps']:.0f}",
         f"{S['service_unary_rps'] / S['echo_unary_rps']:.2f}x", ""),
        ("stream / unary, echo", "", f"{S['echo_ratio']:.2f}x", "", ""),
    ]  # fmt: skip
    if "transport" in r:
        T = r["transport"]
        info.append((f"lone Decode p50 over a Unix socket / TCP, ctx {T['context']}", f"{T['uds']['p50_us']:.0f} us",
                     f"{T['tcp']['p50_us']:.0f} us (TCP)", f"{T['ratio_p50']:.2f}x", ""))  # fmt: skip
    head = ("goal", "service", "peer", "ratio", "verdict")
    info_head = ("figure", "service", "echo (same bytes)", "service/echo", "")
    widths = [max(len(str(x[i])) for x in [head, info_head, *rows, *info]) for i in range(5)]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    splits = [
        f"  ctx {ctx}: queue {x['server_split_us']['queue']:.0f} us, kernel {x['server_split_us']['kernel']:.0f} us "
        f"(attention {x['server_split_us']['attention']:.0f}), server total {x['server_split_us']['total']:.0f} us, "
        f"rest (network + serialization + client) {x['server_split_us']['rest']:.0f} us"
        for ctx, x in L["contexts"].items()
    ]
    out = [
        f"{PROG}: backend {c['backend']}, {g['num_q_heads']} q / {g['num_kv_heads']} kv heads, d={g['head_dim']}, "
        f"{g['kv_dtype']}, context {c['context']}; echo stack {c['echo_stack']}; {c['cpus']} CPUs; "
        f"{c['rounds']} round(s), medians/pooled",
        f"mean server batch size: {B['mean_batch_size_concurrent']:.1f} sequences with {n} callers, "
        f"{B['mean_batch_size_batched']:.1f} with one caller, {K['mean_batch']:.1f} with {c['load_callers']} callers",
        "lone 1-sequence Decode split (server Timing means):",
        *splits,
        "",
        line(head),
        line(["-" * w for w in widths]),
        *(line(r_) for r_ in rows),
        "",
        line(info_head),
        line(["-" * w for w in widths]),
        *(line(r_) for r_ in info),
    ]
    return "\n".join(out)


DEFAULT_OUTSIDE = (8, 64)


def _growth(args: argparse.Namespace) -> int:
    """Tokens a sequence may gain before the next reset."""
    steps_seq0 = args.warmup * 2 + args.steps * 2 + 4  # a latency sequence: unary + stream of one round
    # batching: concurrent, batched, then pipelined on a stream (its warm-up is one round); load likewise
    steps_all = 2 * (max(1, args.warmup // 10) + args.batch_rounds) + 1 + args.batch_rounds + 2
    return max(steps_seq0, steps_all)


def _check(args: argparse.Namespace) -> str | None:
    for name in ("q_heads", "kv_heads", "head_dim", "sequences", "steps", "batch_rounds", "rounds", "block_len",
                 "load_callers", "kernel_reps"):  # fmt: skip
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: {getattr(args, name)}; expected >= 1"
    if args.max_block_s <= 0:
        return f"--max-block-s: {args.max_block_s}; expected > 0"
    if args.context < 0 or args.warmup < 0:
        return "--context/--warmup: negative; expected >= 0"
    if max(args.outside_batches) > args.sequences:
        return f"--outside-batches: {max(args.outside_batches)}; expected at most --sequences ({args.sequences})"
    if args.q_heads % args.kv_heads:
        return f"--q-heads: {args.q_heads}; expected a multiple of --kv-heads ({args.kv_heads})"
    return None


def server_command(args: argparse.Namespace, uds: Path | None = None) -> list[str]:
    """`python -m tkg.server` with the bench geometry and room for every phase's tokens; with `uds`,
    listening on that Unix socket besides TCP (`--listen`)."""
    growth = _growth(args)
    per = lambda tokens: math.ceil((tokens + growth) / args.block_len)  # noqa: E731
    blocks = args.sequences * per(args.context) + sum(per(c) for c in args.latency_contexts) + 8
    max_context = max(args.context, *args.latency_contexts) + growth + args.block_len
    return [
        sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--log-level", "WARNING", "--backend", args.backend,
        "--num-layers", "1", "--num-q-heads", str(args.q_heads), "--num-kv-heads", str(args.kv_heads),
        "--head-dim", str(args.head_dim), "--kv-dtype", args.kv_dtype, "--block-len", str(args.block_len),
        "--num-blocks", str(blocks), "--max-context", str(max(max_context, 2 * args.block_len)),
        "--max-batch", str(max(args.sequences, 1)), *args.server_arg,
        *(() if uds is None else ("--listen", "127.0.0.1:0", "--listen", f"unix://{uds}")),
    ]  # fmt: skip


def outside_batches(given: tuple[int, ...] | None, sequences: int) -> tuple[int, ...]:
    """Goal 2b's batch sizes: those given, or 8 and 64 capped at `sequences` (a small run keeps its
    other flags valid without naming this one)."""
    if given is not None:
        return given
    return tuple(sorted({min(b, sequences) for b in DEFAULT_OUTSIDE}))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.outside_batches = outside_batches(args.outside_batches, args.sequences)
    problem = _check(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    procs: list[Proc] = []
    folder = Path(tempfile.mkdtemp(prefix="tkg-bench-serve-"))  # the peers' ready files
    try:
        echo_cmd = [sys.executable, "-m", "tkg.bench.echo", "--port", "0", "--stack", args.echo_stack]
        procs.append(start(echo_cmd, folder / "echo.json", "echo"))
        uds = folder / "tkg.sock" if args.transport == "uds" else None
        procs.append(start(server_command(args, uds), folder / "server.json", "tkg serve"))
        bench = Bench(args, procs[1], procs[0])
        try:
            results = bench.run()
        finally:
            bench.close()
    except (RuntimeError, TkgError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if emit(PROG, render(results), results, args.json) else 1


if __name__ == "__main__":
    raise SystemExit(main())
