"""`wait_for`: the one polling helper of the tests (a synchronisation helper, never a timing assertion)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T], timeout: float = 20.0, what: str = "condition", proc: subprocess.Popen | None = None,
    interval: float = 0.02,
) -> T:
    """Poll `probe` until it returns something true; return that. Fails (AssertionError naming
    `what`) after `timeout` seconds, or as soon as `proc`, the process being waited on, has exited."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({timeout:.0f} s)")
        time.sleep(interval)
    return value
