"""What `tkg serve` tells a person at start: every layer's window, `metrics_port=off` when metrics are
off, and a taken port named with its flag."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support.server_proc import free_port, start_server

from tkg.server.config import load_spec


@pytest.mark.parametrize(("windows", "text"), [
    ([8, None], "sliding_window=[8, none]"),
    ([128, None, 128, None], "sliding_window=[128, none, 128, none]"),
    ([None, None], "sliding_window=none"),
    ([64, 64, 64], "sliding_window=64"),
])  # fmt: skip
def test_summary_lists_every_layers_window(windows: list[int | None], text: str) -> None:
    spec = load_spec(None, "tiny", {"num_layers": len(windows), "sliding_window": windows})
    assert f"{text}," in spec.summary()


def test_start_line_says_metrics_off_and_lists_windows() -> None:
    server = start_server("--metrics-port", "0", "--num-layers", "2", "--sliding-window", "8,none",
                          "--kv-cache-bytes", str(4 * 2**20))  # fmt: skip
    try:
        assert "metrics_port=off " in server.line, server.line
        assert "None" not in server.line
        assert "sliding_window=[8, none]" in server.line
        assert server.ready["metrics_port"] is None  # the ready file keeps JSON null for scripts
    finally:
        assert server.stop() == 0


def test_start_line_says_where_the_kv_tiers_are(tmp_path: Path) -> None:
    server = start_server("--metrics-port", "0", "--host-cache-bytes", "1G", "--spill-dir", str(tmp_path / "spill"),
                          "--spill-bytes", "2G", "--persist", "write-back")  # fmt: skip
    try:
        want = f"tiers=host:1.0GiB,disk:{tmp_path / 'spill'}(2.0GiB),persist=write-back,loaded=0 "
        assert want in server.line, server.line
    finally:
        assert server.stop() == 0
    plain = start_server("--metrics-port", "0")
    try:
        assert "tiers=" not in plain.line, plain.line
    finally:
        assert plain.stop() == 0


def test_taken_metrics_port_names_the_port_and_the_flag() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as info:
            start_server("--metrics-port", str(port), "--kv-cache-bytes", str(4 * 2**20))
    out = str(info.value)
    assert "exited with 1" in out
    line = next(x for x in out.splitlines() if x.startswith("tkg serve: error:"))
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in line
    assert "--metrics-port 0" in line  # says how to run without metrics
    assert "Traceback" not in out


def test_taken_grpc_port_names_the_flag() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        taken.bind(("127.0.0.1", free_port()))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as info:
            start_server("--port", str(port), "--kv-cache-bytes", str(4 * 2**20))
    line = next(x for x in str(info.value).splitlines() if x.startswith("tkg serve: error:"))
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in line
