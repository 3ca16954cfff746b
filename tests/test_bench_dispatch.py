"""`tkg bench kernel --backend nki-emu` reaches the NKI emulator report; bad backends are refused."""

from __future__ import annotations

import json

import pytest

from tkg import cli


def test_bench_kernel_backend_nki_emu_prints_the_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "kernel", "--backend", "nki-emu", "--json", "-", "--lnc", "1", "--context", "512",
            "--s-active", "1", "--block-len", "16", "--no-ragged"]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert row["step"]["context"] == 512 and row["lnc"] == 1  # the step it ran, not a canned answer
    assert row["compulsory_kv_bytes"] == 2 * 8 * 8 * 512 * 128 * 2  # K+V, bf16
    est = row["estimate"]
    assert "ESTIMATE" in est["label"] and est["estimate_s"] >= est["hbm_floor_s"] > 0


def test_bench_kernel_unknown_backend_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "kernel", "--backend", "tpu"])
    assert info.value.code == 2
    assert "--backend" in capsys.readouterr().err
