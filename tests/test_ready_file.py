"""`tkg serve --ready-file`: the machine-readable start-up signal scripts and tests read instead of
parsing the log. Written once SERVING (JSON naming the real ports), removed when the process exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.server_proc import start_server

from tkg.server import cli
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

TINY = ("--backend", "reference", "--preset", "tiny")


def test_ready_file_names_the_serving_ports_and_goes_away_after_sigterm() -> None:
    srv = start_server(*TINY)
    path = srv._dir / "ready.json"
    try:
        on_disk = json.loads(path.read_text())
        assert on_disk == srv.ready
        assert set(on_disk) == {"pid", "port", "metrics_port", "backend", "instance_id", "address", "addresses"}
        assert on_disk["pid"] == srv.proc.pid and on_disk["backend"] == "reference"
        assert on_disk["address"] == f"127.0.0.1:{on_disk['port']}" and on_disk["port"] > 0
        assert on_disk["addresses"] == [on_disk["address"]]
        # The port it names is the server's: SERVING there, with the instance id it wrote.
        with grpc.insecure_channel(f"127.0.0.1:{on_disk['port']}") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            info = pb_grpc.DecodeAttentionStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.instance_id == on_disk["instance_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{on_disk['metrics_port']}/metrics", timeout=10) as r:
            assert b"tkg_" in r.read()
        assert not [p.name for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left
        # The server's own exit removes it (srv.stop() would also delete the folder: not used here).
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert not path.exists()
    finally:
        srv.stop(signal.SIGKILL)


def test_ready_file_says_null_when_metrics_are_off() -> None:
    srv = start_server(*TINY, "--metrics-port", "0")  # the later flag wins: metrics off
    try:
        assert srv.ready["metrics_port"] is None and srv.metrics_port is None
    finally:
        assert srv.stop() == 0


def test_unwritable_ready_file_is_an_error_and_no_server_keeps_running(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "ready.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tkg.server", *TINY, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--ready-file", str(missing)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "--ready-file: cannot write" in proc.stderr and str(missing) in proc.stderr


def test_ready_file_is_documented_in_help() -> None:
    text = " ".join(cli.build_parser().format_help().split())
    assert "--ready-file PATH" in text and "once SERVING" in text and '"instance_id"' in text
