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


def test_bench_with_a_folder_without_nkilib_says_so(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from tkg import cli

    assert cli.main(["bench", "kernel", "--backend", "nki-emu", "--nkilib", str(tmp_path)]) == 2
    assert "holds no nkilib package" in capsys.readouterr().err


def test_bench_side_by_side_writes_rows(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    import json
    import os

    path = os.environ.get(nkilib_emu.ENV)
    if not path:
        pytest.skip(f"{nkilib_emu.ENV} is not set (point it at nki-library's src/nkilib_src)")
    from tkg import cli

    out = tmp_path / "peer.json"
    args = ["bench", "kernel", "--backend", "nki-emu", "--nkilib", path, "--json", str(out), "--lnc", "2",
            "--context", "256", "--s-active", "1"]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"].split()[-2:] for r in rows] == [["block16", "lnc2"], ["flat", "lnc2"]]
    for r in rows:
        assert r["ours_us"] >= r["floor_us"] > 0 and r["nkilib_us"] >= r["floor_us"]
        assert r["ours_instructions"]["tensor"] > 0 and r["nkilib_instructions"]["tensor"] > 0
        assert r["max_abs_diff"] < 2e-2  # both kernels computed the same attention
    assert "nkilib us" in capsys.readouterr().out
