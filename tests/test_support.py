"""The test support's own contracts, where a mistake would make other tests pass or hang wrongly."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from support.server_proc import free_port
from support.wait import wait_for


def test_wait_for_returns_the_probes_first_true_value() -> None:
    answers = iter([None, 0, "", "ready"])
    assert wait_for(lambda: next(answers), what="the fourth answer") == "ready"


def test_wait_for_fails_once_the_awaited_process_has_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(AssertionError, match=r"the server: the process exited with 0"):
        wait_for(lambda: False, timeout=600, what="the server", proc=proc)


def test_free_port_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
