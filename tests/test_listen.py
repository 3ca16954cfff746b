"""`tkg serve --listen`: Unix sockets beside (or instead of) TCP, for the clients, the load test and a drain."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.server_proc import start_server

from tkg.client import AsyncClient, Client
from tkg.server import listeners

ARGS = ("--backend", "reference", "--num-layers", "1", "--num-q-heads", "2", "--num-kv-heads", "1",
        "--head-dim", "8", "--kv-dtype", "float32", "--num-blocks", "128")  # fmt: skip


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short folder for socket files (a socket path must fit in ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tkg-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_addresses_are_host_port_or_unix_and_a_bad_one_names_the_flag() -> None:
    for good in ("127.0.0.1:0", "[::1]:50051", "localhost:65535", "unix:///tmp/tkg.sock", "unix:rel.sock"):
        assert listeners.check_address(good) == good
    for bad in ("127.0.0.1", "host:port", "host:70000", ":50051", "unix:", "unix:///"):
        with pytest.raises(ValueError, match=r"--peers: "):
            listeners.check_address(bad, "--peers")
    assert listeners.socket_path("unix:///tmp/a.sock") == "/tmp/a.sock"
    assert listeners.socket_path("unix:a.sock") == "a.sock" and listeners.socket_path("127.0.0.1:1") == ""
    assert listeners.tcp_port(["unix:///tmp/a.sock", "127.0.0.1:4242"]) == 4242
    assert listeners.tcp_port(["unix:///tmp/a.sock"]) == 0


def test_a_leftover_socket_file_is_removed_a_live_one_or_another_file_refuses(sockdir: Path) -> None:
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a crashed server leaves
    listeners.clear_stale_socket(str(stale))
    assert not stale.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sockdir / "live.sock"))
    live.listen()
    try:
        with pytest.raises(OSError, match="another server answers on it"):
            listeners.clear_stale_socket(str(sockdir / "live.sock"))
    finally:
        live.close()
    (sockdir / "file").write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        listeners.clear_stale_socket(str(sockdir / "file"))


def _prompt(client: Client, sid: str, n: int) -> None:
    client.create_sequence(sid)
    kv = np.random.default_rng(0).standard_normal((n, 1, 8)).astype(np.float32)
    client.append_kv(sid, 0, kv, kv)


def _step(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.standard_normal((1, 2, 1, 8)).astype(np.float32), rng.standard_normal((1, 1, 1, 8)).astype(np.float32)


def test_clients_and_the_load_test_over_a_unix_socket_beside_tcp(sockdir: Path) -> None:
    sock = sockdir / "tkg.sock"
    srv = start_server(*ARGS, "--listen", f"unix://{sock}", "--listen", "127.0.0.1:0")
    try:
        unix = f"unix://{sock}"
        assert srv.ready["addresses"][0] == unix and srv.ready["address"] == unix
        assert srv.ready["addresses"][1].startswith("127.0.0.1:") and srv.port > 0
        assert srv.line.split()[4] == unix  # the start-up line names both
        with Client(unix) as uds, Client(srv.target) as tcp:
            _prompt(uds, "a", 5)
            q, kv = _step(5)
            over_uds = uds.decode(0, ["a"], [5], q, kv, kv)
            assert tcp.get_sequence("a").lengths == [6]  # one server behind both addresses
            tcp.truncate("a", 5)
            over_tcp = tcp.decode(0, ["a"], [5], q, kv, kv)
            np.testing.assert_array_equal(over_uds.out, over_tcp.out)

        async def aio() -> list[int]:
            async with AsyncClient(unix) as ac:
                return list((await ac.get_sequence("a")).lengths)

        assert asyncio.run(aio()) == [6]
        load = subprocess.run(
            [sys.executable, "-m", "tkg.client.loadtest", "--target", unix, "--insecure", "-n", "20", "-c", "2",
             "--context", "16"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert load.returncode == 0, load.stdout + load.stderr
        assert "OK" in load.stdout
    finally:
        assert srv.stop() == 0
    assert not sock.exists()  # removed at shutdown


def test_a_drain_pushes_to_a_peer_named_by_its_unix_socket(sockdir: Path) -> None:
    a_sock, b_sock = sockdir / "a.sock", sockdir / "b.sock"
    b = start_server(*ARGS, "--listen", f"unix://{b_sock}")
    a = start_server(*ARGS, "--listen", f"unix://{a_sock}", "--peers", f"unix://{b_sock}")
    try:
        assert a.port == 0  # Unix sockets only: no TCP port
        with Client(f"unix://{a_sock}") as ca:
            _prompt(ca, "moved", 7)
        os.kill(a.proc.pid, signal.SIGTERM)
        assert a.proc.wait(60) == 0
        with Client(f"unix://{b_sock}") as cb:
            assert list(cb.get_sequence("moved").lengths) == [7]
            q, kv = _step(7)
            assert cb.decode(0, ["moved"], [7], q, kv, kv).out.shape == (1, 2, 1, 8)
    finally:
        a.stop()
        b.stop()
