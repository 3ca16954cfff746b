"""`tkg bench host`: the server's host work per decode step against the device kernel's estimated time.

On a Trainium host the attention kernel is fast and the host is not: this measures, on the `cpu`
backend, the server's host time per step (`Timing.total_us - queue_us - attention_us`: prepare,
RoPE, the append into the pools, the tables, finish and the response, everything but the kernel
call) and divides it by the emulator's cost-model estimate of our NKI kernel on the same step
(trn2, LNC 2; `tkg.kernel.nki_emu.estimate`, counted while executing the kernel's own source on
this step's shapes). Goal (issue 24, goal 1): <= 1.0 at batch 64 and <= 2.0 at batch 8; batch 1
is reported. The host time depends on where the launch ran (the scheduling policy,
`tkg.server.batcher.LoneCaller`: on the event loop, or handed to the kernel worker thread and
back): each row says on how many of its steps the kernel ran on the loop. One caller sends one
request of B sequences per step to an in-process service (the RPC layer's `decode()`, no gRPC:
the client and the network are `tkg bench serve`'s subject).

    tkg bench host [--cases 1x1024,8x1024,64x1024,1x4096,8x4096,64x4096] [--steps 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

GOALS = {64: 1.0, 8: 2.0}  # batch -> the most host time per step, in estimated device kernel times
DEFAULT_CASES = "1x1024,8x1024,64x1024,1x4096,8x4096,64x4096"


@dataclass(frozen=True)
class Case:
    """One step shape: `batch` sequences reaching `context` tokens (the new one included) at the last
    measured step: the prompt is `context - warmup - steps` tokens, each step appends one."""

    batch: int
    context: int

    @property
    def name(self) -> str:
        return f"B={self.batch} ctx={self.context}"


@dataclass(frozen=True)
class Geometry:
    """The attention geometry (default: llama-3-8b's: 32 q / 8 kv heads, d=128, bf16, block 16, fused RoPE)."""

    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_len: int = 16


def parse_cases(text: str) -> list[Case]:
    """`BxCTX,BxCTX,...` -> cases; ValueError naming the bad entry."""
    cases = []
    for item in text.split(","):
        b, sep, c = item.strip().partition("x")
        if not sep or not b.isdigit() or not c.isdigit() or int(b) < 1 or int(c) < 1:
            raise ValueError(f"--cases: {item!r}; expected BATCHxCONTEXT, e.g. 64x1024")
        cases.append(Case(int(b), int(c)))
    return cases


def figures(case: Case, host_us: list[float], estimate_us: float) -> dict[str, Any]:
    """The reported figures of one case from its steps' host times (us) and the kernel estimate (us).
    Pure arithmetic: the tests feed it known numbers."""
    host = statistics.median(host_us)
    ratio = host / estimate_us
    goal = GOALS.get(case.batch)
    return {
        "case": asdict(case), "host_p50_us": host, "host_per_sequence_us": host / case.batch,
        "estimate_us": estimate_us, "ratio": ratio, "goal_max": goal,
        "verdict": None if goal is None else ("met" if ratio <= goal else "MISSED"),
    }  # fmt: skip


def kernel_estimate_us(case: Case, g: Geometry, lnc: int = 2) -> float:
    """The emulator's trn2 estimate (us) of our NKI kernel on this step (S=1, equal lengths)."""
    from tkg.bench.nki import Step, _inputs
    from tkg.kernel import nki_emu
    from tkg.kernel.paged import paged_decode

    step = Step(batch=case.batch, q_heads=g.q_heads, kv_heads=g.kv_heads, head_dim=g.head_dim,
                context=case.context, s_active=1, block_len=g.block_len)  # fmt: skip
    paged_decode(**_inputs(step), scale=g.head_dim**-0.5, backend="nki-emu", lnc=lnc)
    stats = nki_emu.last_run_stats()
    return float(nki_emu.estimate(stats, target="trn2", floor_bytes=step.compulsory_bytes()).estimate_s * 1e6)


async def host_times(case: Case, g: Geometry, steps: int, warmup: int) -> list[tuple[int, int, int, int, bool]]:
    """(total, queue, kernel, attention us, kernel on the event loop) of each measured step on an
    in-process `cpu` service."""
    from tkg.client.messages import DecodeInput, decode_request
    from tkg.dtypes import BF16
    from tkg.server.app import make_cache
    from tkg.server.config import build_spec
    from tkg.server.metrics import Metrics
    from tkg.server.service import DecodeAttentionService
    from tkg.server.settings import ServeSettings
    from tkg.server.tenants import Ledger

    B, BL, max_context = case.batch, g.block_len, case.context
    T = max_context - warmup - steps  # prompt tokens: the last measured step reaches `context`
    if T < 1:
        raise ValueError(f"{case.name}: context {case.context} is shorter than warmup + steps + 1")
    spec = build_spec({
        "num_layers": 1, "num_q_heads": g.q_heads, "num_kv_heads": g.kv_heads, "head_dim": g.head_dim,
        "kv_dtype": "bfloat16", "block_len": BL, "num_blocks": B * -(-max_context // BL) + 1,
        "max_context": max_context, "max_batch": B, "fuse_rope": True,
    })  # fmt: skip
    settings = ServeSettings(backend="cpu", metrics_port=None, batch_delay_us=0)
    ledger = Ledger()
    svc = DecodeAttentionService(spec, make_cache(spec, settings, ledger), settings, Metrics("cpu"), ledger)
    svc.mark_ready()
    svc.start()
    lone, on_loop = svc.batcher.lone, [False]
    decide = lone.inline

    def inline(kv_bytes: int) -> bool:  # the policy's answer for the step's launch, unchanged
        on_loop[0] = decide(kv_bytes)
        return on_loop[0]

    lone.inline = inline  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((T, g.kv_heads, g.head_dim)).astype(BF16)  # the same prompt for all: timing only
    ids = [f"s{b}" for b in range(B)]
    for sid in ids:
        svc.cache.create(sid)
        svc.cache.append(sid, 0, 0, prompt, prompt)
    q = rng.standard_normal((B, g.q_heads, 1, g.head_dim)).astype(BF16)
    kv = rng.standard_normal((B, g.kv_heads, 1, g.head_dim)).astype(BF16)
    out = []
    try:
        for i in range(warmup + steps):
            req = decode_request(DecodeInput(0, ids, [T + i] * B, q, kv, kv))
            t = (await svc.decode(req)).timing
            if i >= warmup:
                out.append((t.total_us, t.queue_us, t.kernel_us, t.attention_us, on_loop[0]))
    finally:
        await svc.close()
    return out


def run(cases: list[Case], g: Geometry, steps: int, warmup: int, lnc: int) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        times = asyncio.run(host_times(case, g, steps, warmup))
        host = [total - queue - attention for total, queue, _, attention, _ in times]
        est = kernel_estimate_us(case, g, lnc)
        row = figures(case, host, est)
        row["server_p50_us"] = {k: statistics.median(x[i] for x in times)
                                for i, k in enumerate(("total", "queue", "kernel", "attention"))}  # fmt: skip
        row["steps_on_loop"] = [sum(x[4] for x in times), len(times)]  # kernels run on the event loop / steps
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], lnc: int) -> str:
    head = (f"tkg bench host: server host time per step (total - queue - attention, cpu backend, in process) / "
            f"our NKI kernel's trn2 LNC {lnc} estimate on the same step (emulator cost model, counted "
            f"while executing the kernel's source; an estimate, not a measurement)")  # fmt: skip
    lines = [head, "", f"{'case':18s} {'host p50':>10s} {'per seq':>9s} {'kernel est':>11s} {'ratio':>7s} "
             f"{'on loop':>8s}  goal"]  # fmt: skip
    for r in rows:
        c = r["case"]
        name = f"B={c['batch']} ctx={c['context']}"
        loop = "{}/{}".format(*r["steps_on_loop"])
        goal = "" if r["goal_max"] is None else f"<= {r['goal_max']:.1f}x {r['verdict']}"
        lines.append(
            f"{name:18s} {r['host_p50_us']:8.0f}us {r['host_per_sequence_us']:7.1f}us "
            f"{r['estimate_us']:9.1f}us {r['ratio']:6.2f}x {loop:>8s}  {goal}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tkg bench host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"BATCHxCONTEXT list (default {DEFAULT_CASES})")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per case (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps first (default 5)")
    ap.add_argument("--lnc", type=int, default=2, choices=[1, 2], help="the estimate's logical NeuronCore config")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-len", type=int, default=16)
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE ('-' = stdout)")
    a = ap.parse_args(argv)
    try:
        cases = parse_cases(a.cases)
    except ValueError as exc:
        print(f"tkg bench host: {exc}", file=sys.stderr)
        return 2
    if a.steps < 1 or a.warmup < 0:
        print("tkg bench host: --steps: expected >= 1 (and --warmup >= 0)", file=sys.stderr)
        return 2
    g = Geometry(a.q_heads, a.kv_heads, a.head_dim, a.block_len)
    t0 = time.perf_counter()
    rows = run(cases, g, a.steps, a.warmup, a.lnc)
    print(format_rows(rows, a.lnc))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.json:
        text = json.dumps({"geometry": asdict(g), "lnc": a.lnc, "rows": rows}, indent=1)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
