"""`tkg loadtest --html FILE`: the run's report as one self-contained HTML page.

Charts are inline SVG drawn here (no script, no stylesheet or font fetched: the page opens
offline): the latency histogram, the latency percentiles, p50/p99 latency and throughput over the
run (from `stats.timeline`), the status codes, the server's timing split, and the run's options.
Every chart is an `<svg data-chart=NAME>` and every plotted series a `data-series=NAME` element, so
a test (or a person with devtools) can find what was drawn. Input is the report dict of
`stats.summarize` (durations in ns, as in the JSON report).
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any

W, H = 640, 240  # one chart's SVG size, px
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 44, 40  # plot margins, px: axis labels live there
COLORS = {"p50": "#1f77b4", "p99": "#d62728", "ok": "#2ca02c", "failed": "#d62728", "bars": "#1f77b4",
          "queue": "#9467bd", "kernel": "#ff7f0e", "server other": "#8c564b", "rest": "#7f7f7f"}  # fmt: skip


def _ms(ns: float | None) -> float | None:
    return None if ns is None else ns / 1e6


def _nice_max(v: float) -> float:
    """An axis top at or above `v`: 1, 2 or 5 times a power of ten."""
    if v <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(v))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= v)


def _tick(v: float) -> str:
    """An axis label: whole numbers with thousands separators from 100 up, 3 digits below."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _frame(name: str, title: str, y_label: str, y_max: float, x_label: str) -> list[str]:
    """The SVG head, title, y grid with ticks (0..y_max) and axis labels."""
    out = [f'<svg data-chart="{name}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']  # fmt: skip
    ph = H - PAD_T - PAD_B
    for i in range(5):
        y = PAD_T + ph - ph * i / 4
        out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                   f"{_tick(y_max * i / 4)}</text>")  # fmt: skip
    out.append(f'<text x="14" y="{PAD_T + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {PAD_T + ph / 2})">{html.escape(y_label)}</text>')  # fmt: skip
    out.append(f'<text x="{PAD_L + (W - PAD_L - PAD_R) / 2}" y="{H - 6}" font-size="11" '
               f'text-anchor="middle">{html.escape(x_label)}</text>')  # fmt: skip
    return out


def bar_chart(name: str, title: str, labels: list[str], values: list[float], y_label: str, x_label: str,
              series: str = "bars") -> str:  # fmt: skip
    """Vertical bars, one per label, in one `data-series` group."""
    y_max = _nice_max(max(values, default=0.0))
    out = _frame(name, title, y_label, y_max, x_label)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    slot = pw / max(len(values), 1)
    out.append(f'<g data-series="{series}" fill="{COLORS.get(series, COLORS["bars"])}">')
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        h = ph * v / y_max
        x = PAD_L + i * slot + slot * 0.1
        out.append(f'<rect x="{x:.1f}" y="{PAD_T + ph - h:.1f}" width="{slot * 0.8:.1f}" height="{h:.1f}">'
                   f"<title>{html.escape(label)}: {v:.4g}</title></rect>")  # fmt: skip
    out.append("</g>")
    step = max(1, len(labels) // 10)  # at most ~10 x labels
    for i in range(0, len(labels), step):
        x = PAD_L + (i + 0.5) * slot
        out.append(f'<text x="{x:.1f}" y="{H - PAD_B + 14}" font-size="10" text-anchor="middle">'
                   f"{html.escape(labels[i])}</text>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out)


def line_chart(name: str, title: str, xs: list[float], series: dict[str, list[float | None]], y_label: str,
               x_label: str) -> str:  # fmt: skip
    """One polyline per series over shared x values (None = no point: the line breaks there)."""
    finite = [v for vals in series.values() for v in vals if v is not None]
    y_max = _nice_max(max(finite, default=0.0))
    x_max = max(xs, default=1.0) or 1.0
    out = _frame(name, title, y_label, y_max, x_label)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    for j, (label, vals) in enumerate(series.items()):
        color = COLORS.get(label, "#333")
        runs: list[list[str]] = [[]]
        for x, v in zip(xs, vals, strict=True):
            if v is None:
                runs.append([])
                continue
            runs[-1].append(f"{PAD_L + pw * x / x_max:.1f},{PAD_T + ph - ph * v / y_max:.1f}")
        out.append(f'<g data-series="{html.escape(label)}" stroke="{color}" fill="{color}">')
        for pts in runs:
            if len(pts) == 1:  # a lone point still shows
                cx, cy = pts[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3"/>')
            elif pts:
                out.append(f'<polyline fill="none" stroke-width="2" points="{" ".join(pts)}"/>')
        out.append("</g>")
        lx = PAD_L + 10 + 90 * j
        out.append(f'<rect x="{lx}" y="{PAD_T - 14}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{PAD_T - 10}" font-size="11">{html.escape(label)}</text>')  # fmt: skip
    for i in range(5):
        x = PAD_L + pw * i / 4
        out.append(f'<text x="{x:.1f}" y="{H - PAD_B + 14}" font-size="10" text-anchor="middle">'
                   f"{_tick(x_max * i / 4)}</text>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out)


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render_html(report: dict[str, Any], title: str = "tkg loadtest") -> str:
    """The whole page for one report (see the module docstring)."""
    ok = report["statusCodeDistribution"].get("OK", 0)
    charts: list[str] = []
    hist = report.get("histogram") or []
    if hist:
        charts.append(bar_chart("histogram", "Latency histogram (OK requests)",
                                [f"{h['mark'] * 1e3:.3g}" for h in hist], [float(h["count"]) for h in hist],
                                "requests", "latency up to, ms"))  # fmt: skip
    dist = report.get("latencyDistribution") or []
    if dist:
        charts.append(bar_chart("percentiles", "Latency percentiles", [f"p{d['percentage']:g}" for d in dist],
                                [_ms(d["latency"]) or 0.0 for d in dist], "ms", "percentile"))  # fmt: skip
    tl = report.get("timeline") or []
    if tl:
        xs = [row["t"] for row in tl]
        charts.append(line_chart("latency-over-time", "Latency over the run (OK requests)", xs,
                                 {"p50": [_ms(r["p50"]) for r in tl], "p99": [_ms(r["p99"]) for r in tl]},
                                 "ms", "seconds into the measured run"))  # fmt: skip
        charts.append(line_chart("throughput-over-time", "Throughput over the run", xs,
                                 {"ok": [r["okRps"] for r in tl], "failed": [r["failedRps"] for r in tl]},
                                 "requests / s", "seconds into the measured run"))  # fmt: skip
    codes = sorted(report["statusCodeDistribution"].items(), key=lambda kv: -kv[1])
    charts.append(bar_chart("status", "Status codes", [c for c, _ in codes], [float(n) for _, n in codes],
                            "responses", "status"))  # fmt: skip
    st = report.get("serverTiming") or {}
    if st:
        q, k = st["queueUs"]["mean"], st["kernelUs"]["mean"]
        other = max(st["serverTotalUs"]["mean"] - q - k, 0.0)
        rest = max(st["restUs"]["mean"], 0.0)
        charts.append(bar_chart("server-timing", "Where a request's time goes (means)",
                                ["queue", "kernel", "server other", "rest (network, client)"], [q, k, other, rest],
                                "us", "part of the latency"))  # fmt: skip
    ns = lambda v: "-" if v is None else f"{v / 1e6:.3f} ms"  # noqa: E731
    summary = [("requests", str(report["count"])), ("successful", str(ok)),
               ("successful requests/s", f"{report['okRps']:.1f}"), ("tokens/s", f"{report['tokensPerSecond']:.1f}"),
               ("fastest", ns(report["fastest"])), ("average", ns(report["average"])),
               ("slowest", ns(report["slowest"])), ("measured for", ns(report["total"]))]  # fmt: skip
    rate = report.get("rate")
    if rate:
        verdict = "sustained" if rate["sustained"] else f"NOT sustained: about -c {rate['neededConcurrency']} needed"
        summary.append(("rate", f"asked {rate['askedRps']:.1f}/s, reached {rate['reachedRps']:.1f}/s ({verdict})"))
    options = [(k, json.dumps(v)) for k, v in (report.get("options") or {}).items()]
    server = [(k, str(v)) for k, v in (report.get("server") or {}).items()]
    errors = [(str(n), msg) for msg, n in sorted(report.get("errorDistribution", {}).items(), key=lambda kv: -kv[1])]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}svg{border:1px solid #eee;margin:6px}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        ".charts{display:flex;flex-wrap:wrap}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(report.get('date', '')))}</p>",
        "<h2>Summary</h2>", _table(summary), '<div class="charts">', *charts, "</div>",
    ]  # fmt: skip
    if errors:
        parts += ["<h2>Errors</h2>", _table(errors[:20])]
    parts += ["<h2>Options</h2>", _table(options), "<h2>Server</h2>", _table(server), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_html(prog: str, report: dict[str, Any], path: str) -> bool:
    """Write the page to `path`; False (after a one-line error) when it cannot be written."""
    try:
        Path(path).write_text(render_html(report), encoding="utf-8")
    except OSError as exc:
        print(f"{prog}: error: --html: cannot write {path!r} ({exc.strerror})", file=sys.stderr)
        return False
    return True
