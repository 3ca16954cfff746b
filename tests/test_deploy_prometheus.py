"""A real Prometheus scrapes a running `tkg serve`, and PromQL sees the requests this test made.

Both run as subprocesses on free loopback ports: the server with the default small geometry,
Prometheus (Debian's package; `.ci/run` installs it) with a 1 s scrape interval and its TSDB in a
temp dir. Every wait is bounded. The same live pair also checks what the static tests cannot:
the server's exposition carries every metric the dashboard reads, with the contract's types, and
every dashboard query runs without error against the real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from support.deploy import DASHBOARD_METRICS, DEPLOY, ROOT, dashboard_exprs
from support.server_proc import free_port
from support.wait import wait_for

T = TypeVar("T")
SCRAPE_S = 1
STARTUP_TIMEOUT_S = 60.0
QUERY_TIMEOUT_S = 20.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tkg_deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def http_get(url: str, timeout_s: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class Stack:
    """The running pair: server gRPC target and metrics URL, Prometheus base URL."""

    def __init__(self, grpc_target: str, metrics_url: str, prom_url: str, log_dir: Path) -> None:
        self.grpc_target = grpc_target
        self.metrics_url = metrics_url
        self.prom_url = prom_url
        self.log_dir = log_dir

    def query(self, promql: str) -> dict[str, Any]:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:  # bad queries answer 400 with a JSON error body
            return json.loads(err.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    if not prometheus:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    if importlib.util.find_spec("tkg.server.cli") is None:
        pytest.skip("tkg.server.cli (tkg serve) not present")
    tmp = tmp_path_factory.mktemp("deploy-prometheus")
    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    server_log = (tmp / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", str(grpc_port),
         "--metrics-port", str(metrics_port), "--backend", "reference", "--grace-s", "1"],
        cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [{"job_name": "tkg", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = (tmp / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        s = Stack(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                  f"http://127.0.0.1:{prom_port}", tmp)  # fmt: skip
        health = healthcheck_module()
        wait_for(lambda: health.check(s.grpc_target, "", 1.0)[0], STARTUP_TIMEOUT_S, "tkg serve reports SERVING",
                 proc=server, interval=0.2)  # fmt: skip
        wait_for(lambda: http_get(f"{s.prom_url}/-/ready"), STARTUP_TIMEOUT_S, "prometheus ready", proc=prom,
                 interval=0.2)  # fmt: skip
        yield s
    except BaseException:
        for name in ("server.log", "prometheus.log"):
            sys.stderr.write(f"--- {name}\n{(tmp / name).read_text(errors='replace')[-3000:]}\n")
        raise
    finally:
        stop(server)
        stop(prom)
        server_log.close()
        prom_log.close()


def make_requests(target: str) -> dict[tuple[str, str], int]:
    """A known mix of RPCs, some failing on purpose; returns {(method, code): count}."""
    from tkg.v1 import decode_attention_pb2 as pb
    from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

    expected: dict[tuple[str, str], int] = {}
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DecodeAttentionStub(channel)
        for _ in range(3):
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        expected["GetServerInfo", "OK"] = 3
        ids = []
        for _ in range(4):
            ids.append(stub.CreateSequence(pb.CreateSequenceRequest(), timeout=10).sequence_id)
        expected["CreateSequence", "OK"] = 4
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetSequence(pb.GetSequenceRequest(sequence_id="no-such-sequence"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        expected["GetSequence", "NOT_FOUND"] = 2
        for seq in ids:
            stub.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=seq), timeout=10)
        expected["ReleaseSequence", "OK"] = len(ids)
    return expected


def test_promql_counts_the_requests_made(stack: Stack) -> None:
    expected = make_requests(stack.grpc_target)
    promql = 'sum by (method, code) (tkg_request_duration_seconds_count{job="tkg"})'
    last: dict[tuple[str, str], int] = {}

    def scraped() -> dict[tuple[str, str], int] | None:
        nonlocal last
        reply = stack.query(promql)
        assert reply["status"] == "success", reply
        last = {(r["metric"].get("method", ""), r["metric"].get("code", "")): int(float(r["value"][1]))
                for r in reply["data"]["result"]}  # fmt: skip
        mine = {k: v for k, v in last.items() if k[0] in {m for m, _ in expected}}
        return mine if mine == expected else None

    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if scraped() is not None:
            break
        time.sleep(SCRAPE_S / 2)
    else:
        pytest.fail(f"Prometheus never showed the requests made: expected {expected}, last query gave {last}")
    # The same requests in the histogram's buckets, which resolve tens of microseconds (api.md).
    reply = stack.query('tkg_request_duration_seconds_bucket{job="tkg",method="GetServerInfo",code="OK"}')
    assert reply["status"] == "success", reply
    buckets = {float(r["metric"]["le"]): int(float(r["value"][1])) for r in reply["data"]["result"]}
    assert buckets.get(float("inf")) == expected["GetServerInfo", "OK"], buckets
    assert min(buckets) <= 1e-4, f"finest latency bucket is {min(buckets)} s; api.md asks for tens of microseconds"


def test_exposition_matches_the_contract(stack: Stack) -> None:
    body = http_get(stack.metrics_url, timeout_s=5)
    assert body is not None, f"no /metrics at {stack.metrics_url}"
    types: dict[str, str] = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    for name, (kind, _labels) in DASHBOARD_METRICS.items():
        # prometheus-client announces a counter by its name without the _total suffix.
        announced = types.get(name) or types.get(name.removesuffix("_total"))
        assert announced == kind, f"/metrics: {name} is {announced!r}, api.md says {kind}"


def test_every_dashboard_query_runs(stack: Stack) -> None:
    failures = []
    for title, expr in dashboard_exprs({"$__rate_interval": "30s", "$instance": ".*", "$method": ".*"}):
        reply = stack.query(expr)
        if reply.get("status") != "success":
            failures.append(f"{title}: {reply.get('error')}: {expr}")
    assert not failures, "\n".join(failures)


def test_healthcheck_script_exit_codes(stack: Stack) -> None:
    script = str(DEPLOY / "healthcheck.py")
    ok = subprocess.run([sys.executable, script, "--target", stack.grpc_target, "--timeout", "5"],
                        capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    dead = subprocess.run([sys.executable, script, "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert dead.returncode == 1 and "UNAVAILABLE" in dead.stderr, dead.stdout + dead.stderr
