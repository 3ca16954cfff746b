"""`tkg serve` as a subprocess on loopback for end-to-end tests: started with `--ready-file`, ready
when that file appears (its JSON gives the ports), with the process' output kept for failures.

Also `free_port`, for servers that must be told their port in advance (replicas naming each other).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTUP_PREFIX = "tkg serve: listening on "  # the human-readable start-up line (tests read what it says)


@dataclass
class ServerProc:
    proc: subprocess.Popen
    ready: dict[str, Any]  # the --ready-file's JSON: pid, port, metrics_port, backend, instance_id, address
    line: str = ""  # the server's start-up line, for tests of what it tells an operator
    _dir: Path | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def metrics_port(self) -> int | None:
        return self.ready["metrics_port"]

    @property
    def backend(self) -> str:
        return str(self.ready["backend"])

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
        finally:
            if self._dir is not None and self.proc.poll() is not None:
                shutil.rmtree(self._dir, ignore_errors=True)


_HANDED_OUT: set[int] = set()  # every port free_port has returned in this process


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers that cannot bind port 0), never one
    this process was handed before. The kernel may give a just-closed port to the next bind(0): a test
    that picks three replicas' ports first and then starts them (each start picks a metrics port) would
    otherwise see one replica's metrics take another's port (CI saw exactly that: "Address already in
    use" on a pre-picked port)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def read_ready_file(path: Path) -> dict[str, Any] | None:
    """The ready file's JSON, or None while it does not exist (it is written whole, by a rename)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def start_server(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> ServerProc:
    """`python -m tkg.server --host 127.0.0.1 --port 0 --metrics-port <free> --ready-file <tmp> ARGS`;
    returns once the ready file exists. (`--metrics-port 0` turns metrics off, so a free port is
    picked here.) `env`: variables added to this process' environment for the server. Raises
    RuntimeError with the process' output if it exits first or times out."""
    folder = Path(tempfile.mkdtemp(prefix="tkg-serve-"))
    ready_file = folder / "ready.json"
    cmd = [sys.executable, "-m", "tkg.server", "--host", "127.0.0.1", "--port", "0",
           "--metrics-host", "127.0.0.1", "--metrics-port", str(free_port()), "--log-level", "WARNING",
           "--ready-file", str(ready_file), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # fmt: skip
    deadline = time.monotonic() + timeout
    # Polling a file, not reading the pipe: the output (a warning or two at WARNING) stays in the pipe
    # for the tests that read it after stop(); the start-up line is read once the file says ready.
    while (ready := read_ready_file(ready_file)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited with " + str(proc.returncode) if proc.poll() is not None else f"not ready in {timeout:.0f} s"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            out = proc.communicate()[0]
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"tkg serve did not start ({why}):\n{out}")
        time.sleep(0.02)
    line = ""
    while not line.startswith(STARTUP_PREFIX):  # printed (and flushed) before the file was written
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
    return ServerProc(proc, ready, line, folder)
