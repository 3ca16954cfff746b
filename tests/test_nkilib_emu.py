"""Backend `nkilib-emu`: where it finds nki-library, and why it says it cannot run.

The library's own suite on the emulator is in `test_nkilib_emu_suite.py` (needs $TKG_NKILIB_PATH).
"""

from __future__ import annotations

import pytest

from tkg.kernel.backends import nkilib_emu, unavailable_reason


def test_without_a_library_the_backend_says_where_to_point_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import sys

    if "nkilib" in sys.modules:
        pytest.skip("nkilib is already imported in this process")
    monkeypatch.delenv(nkilib_emu.ENV, raising=False)
    reason = unavailable_reason("nkilib-emu")
    if reason is None:
        pytest.skip("an installed nkilib package is importable here")
    assert "TKG_NKILIB_PATH" in reason and "nkilib_path=PATH" in reason
    monkeypatch.setenv(nkilib_emu.ENV, str(tmp_path))
    reason = unavailable_reason("nkilib-emu")
    assert reason is not None and f"{str(tmp_path)!r} holds no nkilib package" in reason


def test_the_path_comes_from_the_option_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nkilib_emu.ENV, "/from/env")
    assert nkilib_emu.nkilib_path({"nkilib_path": "/from/option"}) == "/from/option"
    assert nkilib_emu.nkilib_path({}) == "/from/env"
    monkeypatch.delenv(nkilib_emu.ENV)
    assert nkilib_emu.nkilib_path(None) is None


def test_the_option_reaches_the_availability_check(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(nkilib_emu.ENV, raising=False)
    reason = unavailable_reason("nkilib-emu", {"nkilib_path": str(tmp_path)})
    assert reason is not None and f"{str(tmp_path)!r} holds no nkilib package" in reason
