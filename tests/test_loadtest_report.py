"""`tkg loadtest`'s verdicts and its HTML report: a rate the callers could not keep up with is said
so, a run without one successful request prints no request rate, and `--html FILE` is a page that
opens offline and draws its charts (checked in a real headless Chromium where one is installed)."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support.server_proc import ServerProc, start_server

from tkg.client import loadtest as lt
from tkg.client.html_report import render_html
from tkg.client.stats import Recorder, rate_check, render, summarize, timeline

CHARTS = {  # chart -> the series it must draw
    "histogram": {"bars"}, "percentiles": {"bars"}, "latency-over-time": {"p50", "p99"},
    "throughput-over-time": {"ok", "failed"}, "status": {"bars"}, "server-timing": {"bars"},
}  # fmt: skip


def _recorder() -> Recorder:
    """40 OK requests over 4 s (latency growing with time) and 4 failures in the last second."""
    rec = Recorder()
    for i in range(40):
        rec.ok(0.001 * (1 + i), 10, 200, 300, 2, at_s=100.0 + i * 0.1)
    for i in range(4):
        rec.failed("UNAVAILABLE", "draining", at_s=103.1 + i * 0.2)
    return rec


def test_rate_check_names_the_callers_needed() -> None:
    r = rate_check(200.0, 161.0, 1)
    assert not r["sustained"] and r["neededConcurrency"] == 2  # 200 x 1 / 161 -> 2 callers
    assert rate_check(200.0, 40.0, 3)["neededConcurrency"] == 15
    ok = rate_check(200.0, 199.0, 4)
    assert ok["sustained"] and ok["neededConcurrency"] == 4


def test_summary_says_an_unsustained_rate() -> None:
    report = summarize(_recorder(), 4.0, 1)
    report["rate"] = rate_check(200.0, 11.0, 1)
    text = render(report)
    assert "Rate NOT sustained: asked 200.0 requests/sec, reached 11.0 with -c 1" in text
    assert "about -c 19 callers" in text
    report["rate"] = rate_check(11.0, 11.0, 1)
    assert "Rate NOT sustained" not in render(report)


def test_all_failed_run_prints_no_request_rate() -> None:
    rec = Recorder()
    for _ in range(900):
        rec.failed("UNAVAILABLE", "connection refused")
    text = render(summarize(rec, 1.0, 1))
    assert "Requests/sec: 0 successful (all 900 requests failed)" in text
    assert "900.0" not in text


def test_partly_failed_run_prints_the_successful_rate() -> None:
    report = summarize(_recorder(), 4.0, 1)
    assert "Requests/sec: 10.0 successful (4 of 44 requests failed)" in render(report)


def test_timeline_bins_completions_and_latencies() -> None:
    rows = timeline(_recorder(), 100.0, 4.0, bins=4)
    assert [r["okRps"] for r in rows] == [10.0, 10.0, 10.0, 10.0]
    assert [r["failedRps"] for r in rows] == [0.0, 0.0, 0.0, 4.0]
    assert rows[0]["p50"] < rows[-1]["p50"]  # latency grew over the run
    assert rows[0]["p99"] == pytest.approx(10e6)  # the 10th OK request of the first second: 10 ms, in ns
    assert timeline(Recorder(latencies=[0.1], ok_at=[float("nan")]), 0.0, 1.0) == []  # times not recorded


class _Tags(html.parser.HTMLParser):
    """Counts elements and checks every non-void tag is closed in order."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr", "rect", "line", "circle", "polyline"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.charts: dict[str, set[str]] = {}
        self.errors: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(f"{tag} {key}={a[key]}")
        if "data-chart" in a:
            self.charts[str(a["data-chart"])] = set()
        if "data-series" in a:
            self.charts[list(self.charts)[-1]].add(str(a["data-series"]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _report() -> dict:
    report = summarize(_recorder(), 4.0, 2)
    report["timeline"] = timeline(_recorder(), 100.0, 4.0)
    report["rate"] = rate_check(20.0, 11.0, 1)
    report["options"] = {"targets": ["localhost:50051"], "concurrency": 1, "rps": 20.0}
    report["server"] = {"model": "tiny <test>", "backend": "cpu"}
    return report


def test_html_report_is_self_contained_and_well_formed() -> None:
    page = render_html(_report())
    tags = _Tags()
    tags.feed(page)
    assert not tags.errors and tags.stack == [], (tags.errors, tags.stack)
    assert tags.external == []  # nothing fetched: opens offline
    assert tags.charts == CHARTS
    assert "tiny &lt;test&gt;" in page  # server strings are escaped
    assert "NOT sustained: about -c 2 needed" in page


# Appended to a copy of the page: measures every plotted series as Chromium laid it out.
_MEASURE = """<pre id="measured"></pre><script>
const out = {};
for (const svg of document.querySelectorAll("svg[data-chart]")) {
  const series = {};
  for (const g of svg.querySelectorAll("[data-series]")) {
    const b = g.getBBox();
    series[g.dataset.series] = {w: b.width, h: b.height, shapes: g.children.length};
  }
  const r = svg.getBoundingClientRect();
  out[svg.dataset.chart] = {w: r.width, h: r.height, series: series};
}
document.getElementById("measured").textContent = JSON.stringify(out);
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_its_charts_in_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium)")
    page = render_html(_report()).replace("</body>", _MEASURE + "</body>")
    path = tmp_path / "report.html"
    path.write_text(page)
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.index('<pre id="measured">') + len('<pre id="measured">')
    measured = json.loads(html.unescape(res.stdout[start : res.stdout.index("</pre>", start)]))
    assert set(measured) == set(CHARTS)
    for chart, series in CHARTS.items():
        m = measured[chart]
        assert m["w"] > 100 and m["h"] > 100, (chart, m)
        assert set(m["series"]) == series, (chart, m)
        for name, box in m["series"].items():
            assert box["shapes"] > 0 and box["w"] > 0, (chart, name, box)
    # The throughput chart's "failed" line only rises in the last second: a real polyline, not a dot.
    assert measured["throughput-over-time"]["series"]["failed"]["w"] > 200


@pytest.fixture(scope="module")
def server() -> ServerProc:
    s = start_server("--num-layers", "1", "--kv-cache-bytes", str(8 * 2**20))
    yield s
    s.stop()


def test_loadtest_html_flag_writes_the_report(server: ServerProc, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "lt.html"
    code = lt.main(["--target", server.target, "--insecure", "-n", "30", "--warmup", "2", "--context", "8",
                    "--progress", "off", "--html", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tags = _Tags()
    tags.feed(out.read_text())
    assert not tags.errors and set(tags.charts) == set(CHARTS)
    assert tags.charts["latency-over-time"] == {"p50", "p99"}


def test_loadtest_html_unwritable_is_one_line(server: ServerProc, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code = lt.main(["--target", server.target, "--insecure", "-n", "5", "--warmup", "0", "--context", "4",
                    "--progress", "off", "--html", str(tmp_path / "no" / "such" / "dir.html")])  # fmt: skip
    assert code == 1
    assert "--html: cannot write" in capsys.readouterr().err
