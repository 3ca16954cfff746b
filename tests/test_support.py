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


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may give the same just-closed port to consecutive bind(0) calls; free_port must then
    ask again, or replicas told their ports in advance collide with a later start's metrics port."""
    given = iter([40001, 40001, 40001, 40002])

    class FakeSocket:
        def __init__(self, *args: object) -> None:
            self.port = 0

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(given)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr("support.server_proc._HANDED_OUT", set())
    monkeypatch.setattr("support.server_proc.socket.socket", FakeSocket)
    assert [free_port(), free_port()] == [40001, 40002]
