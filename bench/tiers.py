"""`tkg bench tiers`: KV tier restores against the machine's own bandwidths, and a lone caller's
Decode latency while another client forces spills and restores, in one run (issue 19).

Part A, restore bandwidth (in process, `cpu` backend, the `llama-3-8b` geometry: 32 layers, 8 kv
heads, d=128, bf16, block 16; one `--tokens 4096` sequence is 512 MiB):
  host  a service whose device pool holds the sequence plus `MARGIN_BLOCKS` blocks and whose host
        tier holds it; the sequence is filled, pushed down by `Tiers.room` (what every RPC that
        takes blocks runs) and brought back by the PrefetchSequence handler, timed end to end;
        peer: memcpy bandwidth (numpy copy between two pre-touched buffers of the same size).
  disk  the same with no host tier and a disk tier under `--spill-dir`: the sequence goes to a
        spill file; peer: the disk's sequential read bandwidth with O_DIRECT (a file of the same
        size in the same directory, read in `spill_files.CHUNK` reads into page-aligned memory).
  The data-path parts are timed alone too: `spill_files.read_payload` (O_DIRECT reads + crc32) and
  `KVStore.write_sequence` (the copy into the pool, on the blocks a restore is given).
  Bandwidth is the sequence's bytes over the time; every figure is the best of `--reps`.
Part B, latency under spills (`tkg serve` subprocess on loopback, cpu backend, the `tkg bench
serve` geometry: 32 q / 8 kv heads, d=128, bf16, one layer): a device pool small enough that
restoring sequence X spills Y and the reverse, a host tier holding them. A lone caller decodes a
resident sequence Z (S=1) in blocks of `--calls`, alternately with and without a second client
prefetching X then Y every `--period-ms` (each prefetch is a restore and a spill); p50 with /
without, and the spills/s the server counted (`tkg_kv_spills_total`) during the blocks with.

Goals (docs/performance.md), reported, never asserted: restore from host >= 0.5 x memcpy, from
disk >= 0.5 x the disk's O_DIRECT read; Decode p50 with spills <= 1.1 x without.

    tkg bench tiers [--spill-dir DIR] [--tokens 4096] [--reps 3] [--calls 1000] [--rounds 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

PROG = "tkg bench tiers"
MiB = 1 << 20
GOALS = {"host_vs_memcpy": 0.5, "disk_vs_disk_read": 0.5, "decode_p50_under_spills": 1.1}
PRESET = "llama-3-8b"
MARGIN_BLOCKS = 8  # part A's device pool: the sequence plus these (a little room, not a second sequence)
# Part B's geometry: `tkg bench serve`'s (one layer keeps the swapped sequences small enough to move often).
B_GEOMETRY = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_len": 16, "kv_dtype": "bfloat16"}
MEMORY_FS = frozenset({"tmpfs", "ramfs"})  # no O_DIRECT and no disk behind them


# ---- arithmetic (pure: the tests feed it known figures) ----------------------------------------


def bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second (`nbytes` moved in `seconds`)."""
    return nbytes / seconds if seconds > 0 else math.inf


def versus(name: str, nbytes: int, times_s: list[float], peer_s: list[float], goal_min: float | None) -> dict[str, Any]:
    """`nbytes` moved in each of `times_s` against a peer moving the same bytes in each of `peer_s`:
    the best (least) time of each, bandwidths in GiB/s, ratio measured / peer, verdict."""
    best, peer = min(times_s), min(peer_s)
    ratio = peer / best  # = bandwidth(best) / bandwidth(peer): same bytes
    return {
        "name": name, "bytes": nbytes, "best_s": best, "all_s": list(times_s), "gib_s": bandwidth(nbytes, best) / 2**30,
        "peer_best_s": peer, "peer_all_s": list(peer_s), "peer_gib_s": bandwidth(nbytes, peer) / 2**30,
        "ratio": ratio, "goal_min": goal_min,
        "verdict": None if goal_min is None else ("met" if ratio >= goal_min else "MISSED"),
    }  # fmt: skip


def latency_figures(
    with_s: list[float], without_s: list[float], spills: int, restores: int, seconds_with: float, goal_max: float
) -> dict[str, Any]:
    """The lone caller's Decode latencies (seconds) with and without the spilling client, and the
    spills / restores the server counted during `seconds_with` of blocks with it."""
    p50_with, p50_without = statistics.median(with_s), statistics.median(without_s)
    ratio = p50_with / p50_without
    return {
        "calls_with": len(with_s), "calls_without": len(without_s),
        "p50_with_us": p50_with * 1e6, "p50_without_us": p50_without * 1e6,
        "p99_with_us": float(np.percentile(with_s, 99)) * 1e6,
        "p99_without_us": float(np.percentile(without_s, 99)) * 1e6,
        "ratio": ratio, "spills": spills, "restores": restores, "seconds_with": seconds_with,
        "spills_per_s": spills / seconds_with if seconds_with > 0 else 0.0,
        "goal_max": goal_max, "verdict": "met" if ratio <= goal_max else "MISSED",
    }  # fmt: skip


def counter_total(metrics_text: str, name: str) -> float:
    """The sum of every sample of counter `name` (all label sets) in Prometheus text format."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def fs_type(path: Path, mounts: str) -> str:
    """The file system type of `path` from /proc/mounts' text: its longest mount point prefix."""
    best, kind = "", "unknown"
    p = str(path.resolve())
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = p == point or p.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def swap_plan(z_tokens: int, swap_tokens: int, growth: int, block_len: int) -> tuple[int, int]:
    """Part B's device pool and host tier, in blocks. The pool holds Z grown by `growth` tokens
    (rounded up a block), one swapped sequence and 2 blocks; X and Y (`swap_tokens` each) must never
    both fit beside Z at any of its sizes, so restoring one spills the other (ValueError naming
    --swap-tokens otherwise). The host tier holds both: a restore's source stays counted in its tier
    until the restore is done."""
    per = lambda tokens: -(-tokens // block_len)  # noqa: E731
    z_max, swap = per(z_tokens + growth + block_len), per(swap_tokens)
    if swap <= z_max - per(z_tokens) + 2:
        raise ValueError(
            f"--swap-tokens: {swap_tokens}; expected more than {(z_max - per(z_tokens) + 2) * block_len} "
            "(Z's growth in a block plus 2 blocks), so X and Y never fit beside Z together"
        )
    return z_max + swap + 2, 2 * swap


# ---- peers: memcpy and the disk's O_DIRECT read --------------------------------------------------


def memcpy_seconds(nbytes: int, reps: int) -> list[float]:
    """Seconds of `reps` numpy copies of `nbytes` between two buffers touched beforehand."""
    src = np.empty(nbytes, np.uint8)
    src.fill(1)
    dst = np.empty_like(src)
    dst.fill(0)  # every page faulted in first: the copy alone is timed
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t)
    return out


def disk_read_seconds(directory: Path, nbytes: int, reps: int) -> tuple[list[float], bool]:
    """Seconds of `reps` sequential reads of an `nbytes` file written (and fsynced) in `directory`,
    in `spill_files.CHUNK` reads into page-aligned memory with O_DIRECT (the page cache bypassed for
    this file only, as a restore reads); (times, whether O_DIRECT was granted)."""
    from tkg.server import spill_files

    chunk = spill_files.CHUNK
    size = -(-nbytes // chunk) * chunk
    path = directory / "tkg-bench-disk-peer.bin"
    block = np.random.default_rng(0).integers(0, 256, chunk, np.uint8).tobytes()
    try:
        with open(path, "wb") as f:
            for _ in range(size // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        buf = spill_files.aligned_empty(size)
        np.frombuffer(buf, np.uint8).fill(0)  # faulted in first: the disk's reads alone are timed
        direct = True
        out = []
        for _ in range(reps):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):
                fd, direct = os.open(path, os.O_RDONLY), False
            try:
                t = time.perf_counter()
                for a in range(0, size, chunk):
                    os.preadv(fd, [buf[a : a + chunk]], a)
                out.append(time.perf_counter() - t)
            finally:
                os.close(fd)
        return out, direct
    finally:
        path.unlink(missing_ok=True)


# ---- part A: restore bandwidth, in process -------------------------------------------------------


class _Context:
    """What the service's unary handlers use of a gRPC servicer context (in process, no auth)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def _spec(tokens: int) -> Any:
    """The `PRESET` spec whose device pool holds one `tokens` sequence plus `MARGIN_BLOCKS` blocks."""
    from tkg.server.config import build_spec
    from tkg.server.presets import PRESETS

    preset = PRESETS[PRESET]
    blocks = -(-tokens // preset["block_len"])
    return build_spec({**preset, "num_blocks": blocks + MARGIN_BLOCKS, "kv_cache_bytes": None,
                       "max_context": max(tokens, preset["max_context"])})  # fmt: skip


def _service(spec: Any, host_bytes: int, spill_dir: Path | None) -> Any:
    """An in-process `cpu` service of `spec` with the given tiers (wired as `tkg.server.app.start` does)."""
    from tkg.server.app import make_cache, make_tiers
    from tkg.server.metrics import Metrics
    from tkg.server.service import DecodeAttentionService
    from tkg.server.settings import ServeSettings
    from tkg.server.tenants import Ledger

    settings = ServeSettings(
        backend="cpu", metrics_port=None, batch_delay_us=0, host_cache_bytes=host_bytes,
        spill_dir=None if spill_dir is None else str(spill_dir),
    )  # fmt: skip
    ledger = Ledger()
    cache = make_cache(spec, settings, ledger)
    tiers = make_tiers(spec, settings, cache, ledger)
    svc = DecodeAttentionService(spec, cache, settings, Metrics("cpu"), ledger, tiers=tiers)
    svc.mark_ready()  # nothing to warm up for these calls: no decode runs here
    return svc


def _fill(svc: Any, seq_id: str, tokens: int) -> None:
    """`tokens` random tokens at every layer (one random layer reused: contents do not matter here)."""
    from tkg.dtypes import BF16

    cache = svc.cache
    kv = np.random.default_rng(0).standard_normal((tokens, cache.num_kv_heads, cache.head_dim), np.float32)
    kv = kv.astype(BF16)
    cache.create(seq_id)
    for layer in range(cache.num_layers):
        cache.append(seq_id, layer, 0, kv, kv)


async def _spill(svc: Any, seq_id: str, tier: str) -> float:
    """Push `seq_id` (the only idle resident sequence) down by asking for one block more than is free,
    as an RPC taking blocks does; seconds."""
    t = time.perf_counter()
    async with svc.tiers.room(svc.cache.free_blocks + 1):
        pass
    seconds = time.perf_counter() - t
    where = svc.tiers.tier_of(seq_id)
    if where != tier:
        raise RuntimeError(f"spill of {seq_id!r}: it went to {where!r}; expected {tier!r}")
    return seconds


async def _prefetch(svc: Any, seq_id: str) -> float:
    """The PrefetchSequence handler, end to end (restore, adopt, answer); seconds."""
    from tkg.v1 import decode_attention_pb2 as pb

    t = time.perf_counter()
    info = await svc.PrefetchSequence(pb.PrefetchSequenceRequest(sequence_id=seq_id), _Context())
    seconds = time.perf_counter() - t
    if info.tier != "device":
        raise RuntimeError(f"PrefetchSequence({seq_id!r}) answered tier {info.tier!r}; expected 'device'")
    return seconds


def _write_seconds(svc: Any, payload: np.ndarray) -> tuple[float, bool]:
    """`write_sequence` of `payload` into the blocks a restore would be given now (reserved, then
    returned); (seconds, whether they were one ascending run: the slice path)."""
    cache = svc.cache
    ids = cache.reserve("bench", payload.shape[3])
    try:
        t = time.perf_counter()
        cache.store.write_sequence(ids, payload)
        seconds = time.perf_counter() - t
    finally:
        cache.unreserve("bench", ids)
    return seconds, bool(ids.size and (np.diff(ids) == 1).all())


async def restore_times(tier: str, tokens: int, reps: int, spill_dir: Path) -> dict[str, Any]:
    """Part A for `tier` ("host" or "disk"): `reps` spills and restores of one `tokens` sequence,
    with the data-path parts timed alone in between."""
    from tkg.server import spill_files

    spec = _spec(tokens)
    nbytes = -(-tokens // spec.block_len) * spec.bytes_per_block()
    svc = _service(spec, nbytes if tier == "host" else 0, spill_dir if tier == "disk" else None)
    svc.start()
    out: dict[str, list[float]] = {"spill_s": [], "restore_s": [], "read_payload_s": [], "write_sequence_s": []}
    runs: list[bool] = []
    try:
        _fill(svc, "x", tokens)
        for _ in range(reps):
            out["spill_s"].append(await _spill(svc, "x", tier))
            rec = svc.tiers.index.get("x")
            if tier == "host":
                payload = rec.payload
            else:
                t = time.perf_counter()
                payload = spill_files.read_payload(rec.path, spill_files.read_header(rec.path))
                out["read_payload_s"].append(time.perf_counter() - t)
            seconds, run = _write_seconds(svc, payload)
            out["write_sequence_s"].append(seconds)
            runs.append(run)
            del payload, rec
            gc.collect()
            out["restore_s"].append(await _prefetch(svc, "x"))
    finally:
        await svc.close()
    return {"tier": tier, "bytes": nbytes, "tokens": tokens, "contiguous_blocks": runs, **out}


def part_a(tokens: int, reps: int, spill_dir: Path) -> dict[str, Any]:
    """Restores from host and disk, and their peers (memcpy, O_DIRECT read), each of the same bytes."""
    host = asyncio.run(restore_times("host", tokens, reps, spill_dir))
    gc.collect()
    nbytes = host["bytes"]
    copy_s = memcpy_seconds(nbytes, reps + 2)
    gc.collect()
    disk = asyncio.run(restore_times("disk", tokens, reps, spill_dir))
    gc.collect()
    read_s, direct = disk_read_seconds(spill_dir, nbytes, reps)
    rows = [
        versus("restore from host (PrefetchSequence) / memcpy", nbytes, host["restore_s"], copy_s,
               GOALS["host_vs_memcpy"]),
        versus("  its write_sequence alone / memcpy", nbytes, host["write_sequence_s"], copy_s, None),
        versus("restore from disk (PrefetchSequence) / O_DIRECT read", nbytes, disk["restore_s"], read_s,
               GOALS["disk_vs_disk_read"]),
        versus("  its read_payload alone (read + crc32) / O_DIRECT read", nbytes, disk["read_payload_s"], read_s, None),
        versus("  its write_sequence alone / memcpy", nbytes, disk["write_sequence_s"], copy_s, None),
        versus("spill to host / memcpy", nbytes, host["spill_s"], copy_s, None),
        versus("spill to disk (write + fsync) / O_DIRECT read", nbytes, disk["spill_s"], read_s, None),
    ]  # fmt: skip
    return {"host": host, "disk": disk, "memcpy_s": copy_s, "disk_read_s": read_s, "o_direct": direct, "rows": rows}


# ---- part B: a lone caller's Decode latency while another client forces spills ------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(args: argparse.Namespace, num_blocks: int, host_bytes: int, metrics_port: int) -> list[str]:
    """`python -m tkg.server` for part B: `B_GEOMETRY`, one layer, a host tier of `host_bytes`."""
    g = B_GEOMETRY
    return [
        sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--log-level", "WARNING",
        "--backend", "cpu", "--num-layers", "1", "--num-q-heads", str(g["num_q_heads"]),
        "--num-kv-heads", str(g["num_kv_heads"]), "--head-dim", str(g["head_dim"]), "--kv-dtype", g["kv_dtype"],
        "--block-len", str(g["block_len"]), "--num-blocks", str(num_blocks),
        "--max-context", str(max(args.context + args.warmup + args.calls, args.swap_tokens) + 2 * g["block_len"]),
        "--host-cache-bytes", str(host_bytes),
    ]  # fmt: skip


class Spiller:
    """The second client: PrefetchSequence of X, then Y, ... one every `period_s` while `on` is set
    (each restores one and, the pool being full, spills the other). `pause()` returns once no
    prefetch is in flight and none will start."""

    def __init__(self, target: str, ids: tuple[str, str], period_s: float) -> None:
        from tkg.client.client import Client

        self._client = Client(target, timeout=60.0)  # its own channel: not the lone caller's
        self.ids, self.period_s = ids, period_s
        self.on, self.stop = threading.Event(), threading.Event()
        self._busy = threading.Lock()  # held during a prefetch; `on` is checked under it
        self.done = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="tkg-bench-spiller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due, k = time.monotonic(), 0
        while not self.stop.is_set():
            if not self.on.wait(0.05):
                due = time.monotonic()
                continue
            time.sleep(max(0.0, due - time.monotonic()))  # a tick every period (bench pacing, not a test)
            due = max(due + self.period_s, time.monotonic())
            with self._busy:
                if not self.on.is_set():
                    continue
                seq_id = self.ids[k % 2]
                try:
                    self._client.prefetch_sequence(seq_id)
                    self.done += 1
                except Exception as exc:  # reported with the figures: a failed prefetch is not a spill
                    self.errors.append(f"{seq_id}: {exc}")
                k += 1

    def pause(self) -> None:
        self.on.clear()
        with self._busy:
            pass

    def close(self) -> None:
        self.pause()
        self.stop.set()
        self._thread.join(10)
        self._client.close()


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {name: counter_total(text, name) for name in ("tkg_kv_spills_total", "tkg_kv_restores_total")}


def part_b(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Alternating blocks of `args.calls` lone-caller Decodes on Z without and with the spiller."""
    from tkg import codec
    from tkg.bench.serve import start
    from tkg.client.client import Client

    g = B_GEOMETRY
    growth = args.warmup + args.calls
    num_blocks, host_blocks = swap_plan(args.context, args.swap_tokens, growth, g["block_len"])  # checked in main
    block_bytes = 2 * g["num_kv_heads"] * g["block_len"] * g["head_dim"] * 2  # one layer, bf16
    metrics_port = _free_port()
    server = start(server_command(args, num_blocks, host_blocks * block_bytes, metrics_port),
                   folder / "server.json", "tkg serve")  # fmt: skip
    client = Client(server.target, timeout=60.0)
    spiller = None
    try:
        info = client.server_info()
        dtype = codec.dtype_to_numpy(codec.io_dtype_code(info))
        rng = np.random.default_rng(0)
        H, G, D = info.num_q_heads, info.num_kv_heads, info.head_dim
        chunk = max(1, (2 << 20) // (G * D * 2))
        for sid, tokens in (("x", args.swap_tokens), ("y", args.swap_tokens), ("z", args.context)):
            client.create_sequence(sid)  # Y's fill or Z's spills X, the oldest (see swap_plan)
            k, v = rng.standard_normal((2, tokens, G, D)).astype(dtype)
            client.append_kv(sid, 0, k, v, position=0, chunk_tokens=chunk)
        where = {s: client.get_sequence(s).tier for s in ("x", "y", "z")}
        if where != {"x": "host", "y": "device", "z": "device"}:
            raise RuntimeError(f"part B set-up: tiers {where}; expected x on host, y and z on the device")
        q = rng.standard_normal((1, H, 1, D)).astype(dtype)
        k1, v1 = rng.standard_normal((2, 1, G, 1, D)).astype(dtype)
        spiller = Spiller(server.target, ("x", "y"), args.period_ms / 1000)
        samples: dict[str, list[float]] = {"with": [], "without": []}
        spills = restores = 0.0
        seconds_with = 0.0
        for r in range(args.rounds):
            for mode in ("without", "with") if r % 2 == 0 else ("with", "without"):
                client.truncate("z", args.context)  # the same context in every block
                if mode == "with":
                    spiller.on.set()
                pos = args.context
                for _ in range(args.warmup):
                    client.decode(0, ["z"], [pos], q, k1, v1)
                    pos += 1
                before, t0 = _scrape(metrics_port), time.perf_counter()
                for _ in range(args.calls):
                    t = time.perf_counter()
                    client.decode(0, ["z"], [pos], q, k1, v1)
                    samples[mode].append(time.perf_counter() - t)
                    pos += 1
                elapsed, after = time.perf_counter() - t0, _scrape(metrics_port)
                spiller.pause()
                if mode == "with":
                    seconds_with += elapsed
                    spills += after["tkg_kv_spills_total"] - before["tkg_kv_spills_total"]
                    restores += after["tkg_kv_restores_total"] - before["tkg_kv_restores_total"]
        figures = latency_figures(samples["with"], samples["without"], int(spills), int(restores), seconds_with,
                                  GOALS["decode_p50_under_spills"])  # fmt: skip
        figures.update({
            "prefetches": spiller.done, "prefetch_errors": spiller.errors[:5], "period_ms": args.period_ms,
            "num_blocks": num_blocks, "host_tier_bytes": host_blocks * block_bytes,
            "swap_bytes": -(-args.swap_tokens // g["block_len"]) * block_bytes, "context": args.context,
        })  # fmt: skip
        return figures
    finally:
        if spiller is not None:
            spiller.close()
        client.close()
        server.stop()


# ---- the command ---------------------------------------------------------------------------------


def default_spill_parent(cwd: Path, mounts: str) -> Path:
    """Where the disk tier and the disk peer go by default: the current directory, whose file system
    is a disk (ValueError naming the file system when it is memory: O_DIRECT and disk speed need a disk)."""
    kind = fs_type(cwd, mounts)
    if kind in MEMORY_FS:
        raise ValueError(f"--spill-dir: the current directory {cwd} is on {kind}; expected a directory on a disk")
    return cwd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--spill-dir", metavar="DIR", type=Path,
                   help="part A's disk tier and disk peer go in a temporary directory here (default: under the "
                        "current directory, refused on tmpfs)")
    p.add_argument("--tokens", type=int, default=4096, help="part A: tokens of the restored sequence (default 4096)")
    p.add_argument("--reps", type=int, default=3, help="part A: spills and restores per tier (default 3)")
    p.add_argument("--context", type=int, default=1024, help="part B: tokens of the lone caller's sequence Z")
    p.add_argument("--swap-tokens", type=int, default=4096, help="part B: tokens of each of X and Y (default 4096)")
    p.add_argument("--calls", type=int, default=1000, help="part B: measured Decode calls per block (default 1000)")
    p.add_argument("--warmup", type=int, default=20, help="part B: unmeasured calls before each block (default 20)")
    p.add_argument("--rounds", type=int, default=4, help="part B: pairs of blocks with and without (default 4)")
    p.add_argument("--period-ms", type=float, default=100.0, help="part B: ms between prefetches (default 100)")
    p.add_argument("--parts", default="a,b", help="which parts to run: a, b or a,b (default a,b)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' = stdout)")
    return p  # fmt: skip


def _check(a: argparse.Namespace) -> str | None:
    for name in ("tokens", "reps", "context", "swap_tokens", "calls", "rounds"):
        if getattr(a, name) < 1:
            return f"--{name.replace('_', '-')}: {getattr(a, name)}; expected >= 1"
    if a.warmup < 0 or a.period_ms <= 0:
        return "--warmup / --period-ms: expected >= 0 / > 0"
    if not set(a.parts.split(",")) <= {"a", "b"} or not a.parts:
        return f"--parts: {a.parts!r}; expected a, b or a,b"
    try:
        swap_plan(a.context, a.swap_tokens, a.warmup + a.calls, B_GEOMETRY["block_len"])
    except ValueError as exc:
        return str(exc)
    return None


def render(r: dict[str, Any]) -> str:
    """The ratio table: each goal with its verdict, then the figures behind them."""
    lines = [f"{PROG}: {r['machine']}"]
    if "a" in r:
        a = r["a"]
        lines += ["", f"A. restore of one idle sequence ({PRESET}, {a['tokens']} tokens, all layers: "
                      f"{a['bytes'] / MiB:.0f} MiB), best of {a['reps']}; spill dir {a['spill_dir']} "
                      f"({a['fs']}, O_DIRECT {'granted' if a['o_direct'] else 'REFUSED: page cache'})",
                  f"{'':56s} {'GiB/s':>7s} {'peer':>7s} {'ratio':>6s}  goal"]  # fmt: skip
        for row in a["rows"]:
            goal = "" if row["goal_min"] is None else f">= {row['goal_min']} {row['verdict']}"
            lines.append(f"{row['name']:56s} {row['gib_s']:7.2f} {row['peer_gib_s']:7.2f} {row['ratio']:6.2f}  {goal}")
        lines.append(f"(blocks given to the restores one ascending run, the slice path: {a['contiguous']})")
    if "b" in r:
        b = r["b"]
        lines += ["", f"B. lone caller's Decode (1 layer, ctx {b['context']}, S=1) while another client prefetches "
                      f"two {b['swap_bytes'] / MiB:.0f} MiB sequences alternately every {b['period_ms']:.0f} ms",
                  f"   p50 with / without: {b['p50_with_us']:.0f} / {b['p50_without_us']:.0f} us = {b['ratio']:.2f}x"
                  f"  (goal <= {b['goal_max']}x: {b['verdict']})",
                  f"   p99 with / without: {b['p99_with_us']:.0f} / {b['p99_without_us']:.0f} us; calls "
                  f"{b['calls_with']} / {b['calls_without']}",
                  f"   spills {b['spills']} and restores {b['restores']} in {b['seconds_with']:.1f} s with: "
                  f"{b['spills_per_s']:.1f} spills/s (tkg_kv_spills_total)"]  # fmt: skip
        if b["prefetch_errors"]:
            lines.append(f"   prefetch errors: {b['prefetch_errors']}")
    return "\n".join(lines)


def _machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load} at the start"


def main(argv: list[str] | None = None) -> int:
    from tkg.client.stats import emit

    args = build_parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
    try:
        parent = args.spill_dir if args.spill_dir is not None else default_spill_parent(Path.cwd(), mounts)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="tkg-bench-tiers-", dir=parent))
    result: dict[str, Any] = {"machine": _machine(), "goals": GOALS}
    t0 = time.perf_counter()
    try:
        parts = args.parts.split(",")
        if "a" in parts:
            a = part_a(args.tokens, args.reps, folder / "spill")
            a.update({"tokens": args.tokens, "reps": args.reps, "bytes": a["host"]["bytes"],
                      "spill_dir": str(folder), "fs": fs_type(folder, mounts),
                      "contiguous": all(a["host"]["contiguous_blocks"] + a["disk"]["contiguous_blocks"])})  # fmt: skip
            result["a"] = a
        if "b" in parts:
            result["b"] = part_b(args, folder)
    except (RuntimeError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    return 0 if emit(PROG, render(result) + f"\n({result['seconds']:.0f} s)", result, args.json) else 1


if __name__ == "__main__":
    raise SystemExit(main())
