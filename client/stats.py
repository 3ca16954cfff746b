"""Latency statistics and ghz-style reports for `tkg loadtest` and `tkg bench serve`.

Durations are seconds in Python and integer nanoseconds in JSON (ghz's field names and units, so
reports can be diffed with ghz's own). Percentiles are nearest-rank over the OK requests only
(ghz counts errors separately unless told otherwise).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 99.9)


def percentile(sorted_s: np.ndarray, p: float) -> float:
    """Nearest-rank percentile `p` (0..100) of an ascending array; NaN when empty."""
    n = len(sorted_s)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_s[min(rank, n) - 1])


def histogram(sorted_s: np.ndarray, bins: int = 10) -> list[tuple[float, int]]:
    """ghz-style histogram: `bins` equal-width buckets from fastest to slowest, as (upper mark s, count)."""
    if len(sorted_s) == 0:
        return []
    lo, hi = float(sorted_s[0]), float(sorted_s[-1])
    if hi <= lo:
        return [(hi, len(sorted_s))]
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(sorted_s, bins=edges)
    return [(float(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


@dataclass
class Recorder:
    """Per-request outcomes of one run: latency (s), status name, server Timing (us) when OK."""

    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    queue_us: list[int] = field(default_factory=list)
    kernel_us: list[int] = field(default_factory=list)
    server_us: list[int] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    # When each request completed (a monotonic clock, s; NaN when the caller did not say), in the
    # order of `latencies` for OK requests and of `failed_at` for the others: the report's timeline.
    ok_at: list[float] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)

    def ok(
        self, latency_s: float, queue_us: int, kernel_us: int, total_us: int, batch_size: int,
        at_s: float = math.nan,
    ) -> None:  # fmt: skip
        self.latencies.append(latency_s)
        self.codes["OK"] += 1
        self.queue_us.append(queue_us)
        self.kernel_us.append(kernel_us)
        self.server_us.append(total_us)
        self.batch_size.append(batch_size)
        self.ok_at.append(at_s)

    def failed(self, code: str, message: str, at_s: float = math.nan) -> None:
        self.codes[code] += 1
        # Messages can carry ids and numbers; keep the distribution small and readable.
        self.errors[f"{code}: {message[:160]}"] += 1
        self.failed_at.append(at_s)

    @property
    def count(self) -> int:
        return sum(self.codes.values())


def timeline(rec: Recorder, start_s: float, wall_s: float, bins: int = 30) -> list[dict[str, Any]]:
    """The run cut into `bins` equal slices of `wall_s` from `start_s` (the clock of `Recorder`'s
    `*_at`): per slice its end `t` (s since the start), OK and failed completions per second, and
    the OK latencies' p50 / p99 (ns; None in a slice without an OK request). Empty when the
    completion times were not recorded."""
    ok_at = np.asarray(rec.ok_at, np.float64) - start_s
    bad_at = np.asarray(rec.failed_at, np.float64) - start_s
    if wall_s <= 0 or not (np.isfinite(ok_at).any() or np.isfinite(bad_at).any()):
        return []
    width = wall_s / bins
    slot = lambda at: np.clip((at[np.isfinite(at)] // width).astype(np.int64), 0, bins - 1)  # noqa: E731
    lat = np.asarray(rec.latencies, np.float64)[np.isfinite(ok_at)]
    ok_slot, bad_slot = slot(ok_at), slot(bad_at)
    rows = []
    for i in range(bins):
        mine = np.sort(lat[ok_slot == i])
        p50, p99 = (round(percentile(mine, q) * 1e9) if len(mine) else None for q in (50, 99))
        rows.append({
            "t": (i + 1) * width, "okRps": len(mine) / width, "failedRps": int((bad_slot == i).sum()) / width,
            "p50": p50, "p99": p99,
        })  # fmt: skip
    return rows


def rate_check(asked_rps: float, reached_rps: float, concurrency: int) -> dict[str, Any]:
    """Whether an open-loop run (`--rps`) reached its rate, and the callers it would need.

    With every one of the `concurrency` callers busy, each request takes about
    concurrency / reached_rps seconds (Little's law), so `asked_rps` needs about
    asked_rps x concurrency / reached_rps callers in flight. A run within 5% of the rate counts
    as sustained (the schedule's own start and end cost a little)."""
    sustained = reached_rps >= 0.95 * asked_rps
    needed = concurrency if sustained or reached_rps <= 0 else math.ceil(asked_rps * concurrency / reached_rps)
    return {"askedRps": asked_rps, "reachedRps": reached_rps, "concurrency": concurrency,
            "sustained": sustained, "neededConcurrency": needed}  # fmt: skip


def summarize(rec: Recorder, wall_s: float, tokens_per_request: int) -> dict[str, Any]:
    """The report as a dict with ghz's JSON field names (durations in ns) plus our own fields."""
    lat = np.sort(np.asarray(rec.latencies, dtype=np.float64))
    ok = len(lat)
    ns = lambda s: round(s * 1e9) if not math.isnan(s) else None  # noqa: E731
    server = {}
    if ok:
        mean_lat_us = float(lat.mean() * 1e6)
        q, k, t = (float(np.mean(x)) for x in (rec.queue_us, rec.kernel_us, rec.server_us))
        server = {
            "queueUs": {"mean": q, "p50": percentile(np.sort(rec.queue_us), 50)},
            "kernelUs": {"mean": k, "p50": percentile(np.sort(rec.kernel_us), 50)},
            "serverTotalUs": {"mean": t, "p50": percentile(np.sort(rec.server_us), 50)},
            # What the server did not account for: network, (de)serialization, client overhead.
            "restUs": {"mean": mean_lat_us - t},
            "meanBatchSize": float(np.mean(rec.batch_size)),
        }
    return {
        "count": rec.count,
        "total": ns(wall_s),
        "average": ns(float(lat.mean())) if ok else None,
        "fastest": ns(float(lat[0])) if ok else None,
        "slowest": ns(float(lat[-1])) if ok else None,
        "rps": rec.count / wall_s if wall_s > 0 else 0.0,
        "okRps": ok / wall_s if wall_s > 0 else 0.0,
        "tokensPerSecond": ok * tokens_per_request / wall_s if wall_s > 0 else 0.0,
        "latencyDistribution": [{"percentage": p, "latency": ns(percentile(lat, p))} for p in PERCENTILES]
        if ok
        else [],
        "histogram": [
            {"mark": mark, "count": c, "frequency": c / ok} for mark, c in histogram(lat)
        ],
        "statusCodeDistribution": dict(rec.codes),
        "errorDistribution": dict(rec.errors),
        "serverTiming": server,
    }


def fmt_us(seconds: float | None) -> str:
    """A duration for humans: us below 10 ms, else ms."""
    if seconds is None or math.isnan(seconds):
        return "-"
    us = seconds * 1e6
    return f"{us:.0f} us" if us < 10_000 else f"{us / 1000:.2f} ms"


def render(report: dict[str, Any], title: str = "Summary") -> str:
    """The human-readable report (ghz's summary layout)."""
    ns = lambda v: None if v is None else v / 1e9  # noqa: E731
    lines = [
        f"{title}:",
        f"  Count:        {report['count']}",
        f"  Total:        {fmt_us(ns(report['total']))}",
        f"  Slowest:      {fmt_us(ns(report['slowest']))}",
        f"  Fastest:      {fmt_us(ns(report['fastest']))}",
        f"  Average:      {fmt_us(ns(report['average']))}",
        f"  Requests/sec: {_rate_text(report)}",
        f"  Tokens/sec:   {report['tokensPerSecond']:.1f}",
        "",
    ]
    hist = report["histogram"]
    if hist:
        lines.append("Response time histogram:")
        top = max(h["count"] for h in hist) or 1
        for h in hist:
            bar = "∎" * max(0, round(40 * h["count"] / top))
            lines.append(f"  {fmt_us(h['mark']):>10} [{h['count']:>7}] |{bar}")
        lines.append("")
        lines.append("Latency distribution:")
        for d in report["latencyDistribution"]:
            lines.append(f"  {d['percentage']:>5}% in {fmt_us(ns(d['latency']))}")
        lines.append(f"  max    in {fmt_us(ns(report['slowest']))}")
        lines.append("")
    st = report["serverTiming"]
    if st:
        lines.append("Server timing (means; rest = network + serialization + client):")
        lines.append(
            f"  queue {st['queueUs']['mean']:.0f} us | kernel {st['kernelUs']['mean']:.0f} us | "
            f"server total {st['serverTotalUs']['mean']:.0f} us | rest {st['restUs']['mean']:.0f} us | "
            f"mean batch {st['meanBatchSize']:.1f} sequences"
        )
        lines.append("")
    rate = report.get("rate")
    if rate and not rate["sustained"]:
        lines.append(
            f"Rate NOT sustained: asked {rate['askedRps']:.1f} requests/sec, reached {rate['reachedRps']:.1f} with "
            f"-c {rate['concurrency']} (every caller was busy); about -c {rate['neededConcurrency']} callers "
            "would be needed (latencies above include the wait for a free caller)"
        )
        lines.append("")
    lines.append("Status code distribution:")
    for code, n in sorted(report["statusCodeDistribution"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  [{code}] {n} responses")
    if report["errorDistribution"]:
        lines.append("")
        lines.append("Error distribution:")
        for msg, n in sorted(report["errorDistribution"].items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"  [{n}] {msg}")
    return "\n".join(lines)


def _rate_text(report: dict[str, Any]) -> str:
    """Requests/sec for people: successful requests only when any failed, and never a rate of
    failures that reads like throughput."""
    ok = report["statusCodeDistribution"].get("OK", 0)
    failed = report["count"] - ok
    if failed == 0:
        return f"{report['rps']:.1f}"
    if ok == 0:
        return f"0 successful (all {failed} requests failed)"
    return f"{report['okRps']:.1f} successful ({failed} of {report['count']} requests failed)"


def emit(prog: str, text: str, data: Any, json_target: str | None) -> bool:
    """Print the table; with `--json -` the JSON goes to stdout (table to stderr), with a path it
    is written there. False (after a one-line error) when the file cannot be written."""
    if json_target == "-":
        print(text, file=sys.stderr)
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return True
    print(text)
    if json_target:
        try:
            Path(json_target).write_text(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            print(f"{prog}: error: --json: cannot write {json_target!r} ({exc.strerror})", file=sys.stderr)
            return False
    return True
