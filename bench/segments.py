"""`tkg bench segments`: a context-parallel decode over 3 replicas against its slowest segment alone.

Starts `--replicas` `tkg serve` processes (one layer, the given geometry), loads one sequence of
`--context` tokens through `Client(targets, segment_tokens=N)` (N = the context split evenly, with
room for the measured steps so the tail never fills), then measures in one run:

- `segmented`: p50 of `Client.decode` of one new token (the tail appends with return_lse, every
  other segment answers attend_only, concurrently; the client merges);
- `alone[j]`: p50 of segment j's attend_only request by itself (the same work that segment does in
  a segmented step, with nothing else in flight).

The figure is `ratio = p50(segmented) / max_j p50(alone[j])`: what splitting costs over the
slowest segment (the goal is <= 1.5 on a machine with >= 4 cores: segments run in parallel only
when the replicas have cores of their own). The arithmetic is `summary`, a pure function.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tkg import codec, dtypes
from tkg.bench.serve import Proc, start
from tkg.client.client import Client
from tkg.client.errors import TkgError
from tkg.client.segments import segment_id
from tkg.client.stats import emit, percentile
from tkg.v1 import decode_attention_pb2 as pb

PROG = "tkg bench segments"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3, help="replicas, one segment each (default 3)")
    p.add_argument("--context", type=int, default=6144, help="tokens of the sequence (default 6144)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-dtype", default="bfloat16", choices=sorted(dtypes.BY_NAME))
    p.add_argument("--block-len", type=int, default=16)
    p.add_argument("--backend", default="cpu", help="server kernel backend (default cpu)")
    p.add_argument("--steps", type=int, default=100, help="measured calls per figure (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured calls before each figure (default 10)")
    p.add_argument("--replica-threads", type=int, default=0,
                   help="torch threads of each replica (OMP_NUM_THREADS; default 0 = the CPUs this process may "
                   "use split between the replicas, at least 1): replicas sharing a machine must not oversubscribe it")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' = stdout)")
    return p


def summary(segmented_s: list[float], alone_s: list[list[float]]) -> dict[str, Any]:
    """p50s in microseconds and the ratio of the segmented p50 to the slowest segment's p50 alone."""
    if not segmented_s or not alone_s or not all(alone_s):
        raise ValueError("summary: expected samples for the segmented decode and for every segment")
    seg = percentile(sorted(segmented_s), 50) * 1e6
    alone = [percentile(sorted(s), 50) * 1e6 for s in alone_s]
    return {"segmented_p50_us": seg, "alone_p50_us": alone, "slowest_alone_p50_us": max(alone),
            "ratio": seg / max(alone)}  # fmt: skip


def server_command(args: argparse.Namespace, tokens: int) -> list[str]:
    """One replica with room for `tokens` tokens of one layer (plus a block)."""
    blocks = math.ceil(tokens / args.block_len) + 2
    return [
        sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--log-level", "WARNING", "--backend", args.backend, "--num-layers", "1",
        "--num-q-heads", str(args.q_heads), "--num-kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
        "--kv-dtype", args.kv_dtype, "--block-len", str(args.block_len), "--num-blocks", str(blocks),
        "--max-context", str(args.context + 2 * (args.steps + args.warmup) + args.block_len),
    ]  # fmt: skip


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args: argparse.Namespace, targets: list[str]) -> dict[str, Any]:
    """Load the sequence, then measure the segmented decode and each segment alone."""
    rng = np.random.default_rng(0)
    io = dtypes.BY_NAME[args.kv_dtype]
    io_np = io.numpy if io.io else dtypes.BY_NAME["bfloat16"].numpy
    grow = args.steps + args.warmup
    N = math.ceil((args.context + grow) / args.replicas)
    with Client(targets, segment_tokens=N) as c:
        sid = c.create_sequence().sequence_id
        k = rng.standard_normal((args.context, args.kv_heads, args.head_dim)).astype(np.float32).astype(io_np)
        c.append_kv(sid, 0, k, k, position=0, chunk_tokens=1024)

        def qkv(h: int) -> np.ndarray:
            return rng.standard_normal((1, h, 1, args.head_dim)).astype(np.float32).astype(io_np)

        segmented = []
        for i in range(grow):
            pos = args.context + i
            dt = _timed(lambda pos=pos: c.decode(0, [sid], [pos], qkv(args.q_heads), qkv(args.kv_heads),
                                                 qkv(args.kv_heads)))  # fmt: skip
            if i >= args.warmup:
                segmented.append(dt)
        bases = c._segments.bases[sid]
        end = args.context + grow
        alone = []
        for j in range(len(bases)):
            replica = c._core.router.home(segment_id(sid, j))
            stub = c._stubs[replica]
            req = pb.DecodeRequest(layer=0, sequence_ids=[segment_id(sid, j)], positions=[end], return_lse=True,
                                   attend_only=True)  # fmt: skip
            codec.encode(qkv(args.q_heads), req.q)
            samples = []
            for i in range(grow):
                dt = _timed(lambda req=req, stub=stub: stub.Decode(req, timeout=60))
                if i >= args.warmup:
                    samples.append(dt)
            alone.append(samples)
        c.release(sid)
    return {"segments": len(bases), "segment_tokens": N, "context": args.context, "replicas": args.replicas,
            **summary(segmented, alone)}  # fmt: skip


def render(r: dict[str, Any]) -> str:
    alone = ", ".join(f"{x:.0f}" for x in r["alone_p50_us"])
    return (
        f"{PROG}: {r['context']} tokens in {r['segments']} segments of <= {r['segment_tokens']} over "
        f"{r['replicas']} replicas\n"
        f"  segmented decode p50       {r['segmented_p50_us']:.0f} us\n"
        f"  each segment alone p50     {alone} us\n"
        f"  ratio to the slowest alone {r['ratio']:.2f}x (goal <= 1.5x with >= 4 cores; here {r['cores']} cores, "
        f"{r['replica_threads']} torch thread(s) per replica)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("replicas", "context", "steps", "q_heads", "kv_heads", "head_dim", "block_len"):
        if getattr(args, name) < 1:
            print(f"{PROG}: error: --{name.replace('_', '-')}: {getattr(args, name)}; expected >= 1", file=sys.stderr)
            return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.replica_threads or max(1, cores // args.replicas)
    # The replicas inherit this process' environment (`tkg.bench.serve.start`): torch reads it at import.
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    procs: list[Proc] = []
    folder = Path(tempfile.mkdtemp(prefix="tkg-bench-segments-"))
    try:
        per = math.ceil((args.context + args.steps + args.warmup) / args.replicas) + args.block_len
        for i in range(args.replicas):
            procs.append(start(server_command(args, 2 * per), folder / f"r{i}.json", f"tkg serve {i}"))
        results = {**run(args, [p.target for p in procs]), "replica_threads": threads, "cores": cores}
    except (RuntimeError, TkgError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:  # a caller in the same process (a test) keeps its environment
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return 0 if emit(PROG, render(results), results, args.json) else 1


if __name__ == "__main__":
    raise SystemExit(main())
