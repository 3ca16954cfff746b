"""Start `tkg serve` as a subprocess on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

LINE = re.compile(r"listening on [^:]+:(\d+) backend=(\S+) metrics_port=(\S+)")


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    backend: str
    line: str = ""  # the server's start-up line

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*args: str, timeout: float = 60.0) -> ServerProc:
    """`python -m tkg.server --host 127.0.0.1 --port 0 --metrics-port <free> ARGS`; waits for the
    ready line. (`--metrics-port 0` turns metrics off, so a free port is picked here.)"""
    cmd = [sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", "0",
           "--metrics-host", "127.0.0.1", "--metrics-port", str(free_port()), "--log-level", "WARNING",
           *args]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        m = LINE.search(line)
        if m:
            mp = None if m.group(3) == "None" else int(m.group(3))
            return ServerProc(proc, int(m.group(1)), mp, m.group(2), line)
    proc.kill()
    raise RuntimeError("tkg serve did not start:\n" + "".join(lines))
