"""`tkg loadtest`: statistics, flag checking, and runs against real `tkg serve` processes on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.server_proc import ServerProc, start_server

from tkg.client import Client, routing
from tkg.client import loadtest as lt
from tkg.client.stats import Recorder, histogram, percentile, render, summarize

# Small geometry, small pool: the reference backend's cost grows with the pool.
GEOMETRY = ("--num-layers", "2", "--num-q-heads", "4", "--num-kv-heads", "2", "--head-dim", "32",
            "--num-blocks", "256", "--max-context", "512", "--batch-delay-us", "50")  # fmt: skip
TOKEN = "lt-secret-0123456789"


@pytest.fixture(scope="module")
def server() -> ServerProc:
    s = start_server(*GEOMETRY, "--auth-token", TOKEN)
    yield s
    s.stop()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = lt.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def active_sequences(target: str) -> int:
    with Client(target, token=TOKEN) as c:
        return c.server_info().active_sequences


# ---- statistics ------------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    s = np.arange(1, 101, dtype=float)  # 1..100
    assert percentile(s, 50) == 50
    assert percentile(s, 99) == 99
    assert percentile(s, 99.9) == 100
    assert percentile(s, 0) == 1
    assert percentile(np.array([7.0]), 90) == 7
    assert np.isnan(percentile(np.array([]), 50))


def test_histogram_covers_every_sample() -> None:
    s = np.sort(np.random.default_rng(0).exponential(1e-3, 1000))
    h = histogram(s, bins=10)
    assert len(h) == 10
    assert sum(c for _, c in h) == 1000
    assert h[-1][0] == pytest.approx(s[-1])
    assert histogram(np.array([2.0, 2.0])) == [(2.0, 2)]


def test_summary_counts_errors_apart_from_latency() -> None:
    rec = Recorder()
    for ms in (1, 2, 3, 4):
        rec.ok(ms / 1000, queue_us=100, kernel_us=300, total_us=500, batch_size=2)
    rec.failed("NOT_FOUND", "sequence_ids[0]: 'x' not found")
    r = summarize(rec, wall_s=2.0, tokens_per_request=3)
    assert r["count"] == 5
    assert r["rps"] == pytest.approx(2.5)
    assert r["tokensPerSecond"] == pytest.approx(4 * 3 / 2.0)  # OK requests only
    assert r["fastest"] == 1_000_000 and r["slowest"] == 4_000_000  # ns, like ghz
    assert r["statusCodeDistribution"] == {"OK": 4, "NOT_FOUND": 1}
    assert r["serverTiming"]["restUs"]["mean"] == pytest.approx(2500 - 500)
    assert {d["percentage"] for d in r["latencyDistribution"]} >= {50, 90, 95, 99}
    text = render(r)
    assert "[NOT_FOUND] 1 responses" in text and "Requests/sec: 2.0 successful (1 of 5 requests failed)" in text


# ---- flags and failures: one line, exit 2 / 1, no traceback -----------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--batch", "0"], "--batch: 0; expected >= 1"),
        (["--sequences", "3", "--batch", "2"], "--sequences: 3; expected a multiple of --batch (2)"),
        (["--steps", "5", "--duration", "1"], "--steps and --duration"),
        (["--rps", "-1"], "--rps"),
        (["-H", "NoColon"], "expected KEY:VALUE"),
        (["-H", "Upper:x"], "expected lowercase"),
        (["--insecure", "--cacert", "/nonexistent"], "--insecure and --cacert"),
        (["--cacert", "/nonexistent/ca.pem"], "--cacert: cannot read"),
        (["--cert", "/nonexistent/c.pem"], "--cert/--key: expected both"),
        (["--cert", "/nonexistent/c.pem", "--key", "/nonexistent/k.pem"], "--cert: cannot read"),
        (["--target", "dns:///nohost"], "--target"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tkg loadtest: error: ") and needle in err
    assert "Traceback" not in err and out == ""


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run(capsys, "--target", "127.0.0.1:1", "--insecure", "--steps", "1")
    assert rc == 1
    assert "tkg loadtest: error: cannot use 127.0.0.1:1: UNAVAILABLE" in err and "Traceback" not in err


def test_geometry_limits_checked_against_the_server(capsys: pytest.CaptureFixture, server: ServerProc) -> None:
    base = ("--target", server.target, "--insecure", "--token", TOKEN, "--steps", "1")
    rc, _, err = run(capsys, *base, "--layers", "3")
    assert rc == 2 and "--layers: 3; expected <= 2 (the server's num_layers)" in err
    rc, _, err = run(capsys, *base, "--context", "400", "--max-new-tokens", "200")
    assert rc == 2 and "expected <= 512 (the server's max_context)" in err
    rc, _, err = run(capsys, *base, "--sequences", "64", "--context", "200")
    assert rc == 2 and "KV blocks" in err
    assert active_sequences(server.target) == 0


def test_wrong_token_is_a_clear_error(capsys: pytest.CaptureFixture, server: ServerProc) -> None:
    rc, _, err = run(capsys, "--target", server.target, "--insecure", "--token", "nope", "--steps", "1")
    assert rc == 1 and "UNAUTHENTICATED" in err and "Traceback" not in err


# ---- runs ------------------------------------------------------------------------------------


def test_closed_loop_unary_report_and_cleanup(capsys: pytest.CaptureFixture, server: ServerProc, tmp_path) -> None:
    report_path = tmp_path / "r.json"
    rc, out, err = run(
        capsys, "--target", server.target, "--insecure", "--token", TOKEN, "-H", "x-run:test",
        "-c", "3", "--batch", "2", "--context", "20", "--layers", "2", "--steps", "40", "--warmup", "4",
        "--max-new-tokens", "8", "--json", str(report_path), "--progress", "lines",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(report_path.read_text())
    assert r["count"] == 40  # measured requests exactly, warm-up excluded
    assert r["statusCodeDistribution"] == {"OK": 40}
    assert r["tokensPerSecond"] == pytest.approx(r["okRps"] * 2)  # batch 2, S=1
    assert r["options"]["batch"] == 2 and r["server"]["num_kv_heads"] == 2
    st = r["serverTiming"]
    assert st["kernelUs"]["mean"] > 0 and st["serverTotalUs"]["mean"] >= st["kernelUs"]["mean"]
    assert 2 <= st["meanBatchSize"] <= 6  # at least the request's own sequences, at most all three groups
    assert "Latency distribution:" in out and "[OK] 40 responses" in out
    assert "req/s" in err  # the plain progress line (not a TTY)
    # 6 sequences x (20 + 8 tokens) would overflow max_new_tokens without the rollback; none is left behind.
    assert active_sequences(server.target) == 0


def test_stream_open_loop_json_to_stdout(capsys: pytest.CaptureFixture, server: ServerProc) -> None:
    rc, out, err = run(
        capsys, "--target", server.target, "--insecure", "--token", TOKEN, "--stream", "-c", "2",
        "--rps", "200", "--duration", "0.3", "--context", "8", "--s-active", "2", "--warmup", "2",
        "--json", "-", "--progress", "off",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["statusCodeDistribution"].get("OK", 0) == r["count"] > 0
    # The open loop never exceeds its rate: only requests scheduled in the window count, even when a
    # slow warm-up left a backlog of tickets (it did, on a busy machine, before the window existed).
    assert r["count"] <= 200 * 0.3 + 1
    assert r["tokensPerSecond"] == pytest.approx(r["okRps"] * 2)  # S=2
    assert "Summary:" in err
    assert active_sequences(server.target) == 0


def test_two_replicas_each_get_sequences(capsys: pytest.CaptureFixture, server: ServerProc) -> None:
    other = start_server(*GEOMETRY, "--auth-token", TOKEN)
    try:
        runner_targets = f"{server.target},{other.target}"
        plan = lt.plan_from_args(lt.build_parser().parse_args(
            ["--target", runner_targets, "--insecure", "--token", TOKEN, "-c", "4", "--steps", "8", "--context", "4"]
        ))  # fmt: skip
        assert plan.targets == [server.target, other.target]
        groups = lt.make_groups(plan)
        for g in groups:  # each group is pinned to one replica, and its ids really route there
            assert {routing.pick(plan.targets, sid) for sid in g.ids} == {g.replica}
        assert {g.replica for g in groups} == {0, 1}
        rc, _, err = run(capsys, "--target", runner_targets, "--insecure", "--token", TOKEN, "-c", "4",
                         "--steps", "12", "--context", "4", "--progress", "bar", "--json", "-")  # fmt: skip
        assert rc == 0, err
        assert "\r\x1b[2K[" in err  # the redrawn bar
        assert active_sequences(server.target) == 0 and active_sequences(other.target) == 0
    finally:
        other.stop()


def test_tls_with_cacert(capsys: pytest.CaptureFixture, tmp_path) -> None:
    """A TLS server (self-signed for 127.0.0.1): --cacert trusts it; plaintext and system roots do not."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    s = start_server(*GEOMETRY, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        rc, out, err = run(capsys, "--target", s.target, "--cacert", str(cert), "--steps", "5", "--context", "4",
                           "--progress", "off", "--json", "-")  # fmt: skip
        assert rc == 0, err
        assert json.loads(out)["options"]["tls"] is True
        rc, _, err = run(capsys, "--target", s.target, "--steps", "1")  # system roots: untrusted
        assert rc == 1 and "UNAVAILABLE" in err
        rc, _, err = run(capsys, "--target", s.target, "--insecure", "--steps", "1")  # plaintext on a TLS port
        assert rc == 1 and "the server may expect TLS" in err and "drop --insecure" in err, err
    finally:
        s.stop()


def test_tools_import_without_torch_or_server() -> None:
    """loadtest, bench serve and the echo run where only the client is installed."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tkg.server'] = None\n"
        "import tkg.client.loadtest, tkg.bench.serve, tkg.bench.echo\n"
        "loaded = [m for m, mod in sys.modules.items() if mod is not None]\n"
        "assert not any(m == 'torch' or m.startswith(('torch.', 'tkg.server')) for m in loaded), loaded\n"
        "from tkg.cli import main; raise SystemExit(main(['loadtest', '--batch', '0']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "tkg loadtest: error: --batch: 0; expected >= 1"


def test_server_killed_mid_run_is_counted_not_fatal(capsys: pytest.CaptureFixture, tmp_path) -> None:
    import threading

    s = start_server(*GEOMETRY)
    threading.Timer(0.8, s.proc.kill).start()
    try:
        rc, _, err = run(capsys, "--target", s.target, "--insecure", "-c", "2", "--duration", "1.6", "--context", "4",
                         "--progress", "off", "--json", str(tmp_path / "r.json"))  # fmt: skip
    finally:
        s.stop()
    assert rc == 0 and "Traceback" not in err
    codes = json.loads((tmp_path / "r.json").read_text())["statusCodeDistribution"]
    assert codes.get("OK", 0) > 0 and codes.get("UNAVAILABLE", 0) > 0
    assert "could not release 2 of 2 sequences" in err


def test_loadtest_against_an_fp8_kv_server(capsys: pytest.CaptureFixture, tmp_path) -> None:
    """An fp8 (float8_e4m3) cache: the load travels in the server's I/O dtype (bf16), reported."""
    s = start_server(*GEOMETRY, "--kv-dtype", "float8_e4m3")
    try:
        report_path = tmp_path / "r.json"
        rc, _, err = run(capsys, "--target", s.target, "--insecure", "-c", "2", "--batch", "2", "--context", "12",
                         "--layers", "2", "--steps", "8", "--warmup", "2", "--json", str(report_path))  # fmt: skip
        assert rc == 0, err
        r = json.loads(report_path.read_text())
        assert r["statusCodeDistribution"] == {"OK": 8}
        assert r["server"]["kv_dtype"] == "DTYPE_FLOAT8_E4M3" and r["server"]["io_dtype"] == "DTYPE_BFLOAT16"
    finally:
        s.stop()
