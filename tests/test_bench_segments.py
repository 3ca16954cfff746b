"""`tkg bench segments`: the ratio arithmetic on known figures, and one tiny run end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tkg.bench import segments


def test_summary_on_known_figures() -> None:
    r = segments.summary([0.003, 0.001, 0.002], [[0.001, 0.001], [0.002, 0.002, 0.004]])
    assert r["segmented_p50_us"] == pytest.approx(2000)
    assert r["alone_p50_us"] == pytest.approx([1000, 2000])
    assert r["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="every segment"):
        segments.summary([0.001], [[0.001], []])


def test_a_tiny_run_reports_every_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    before = os.environ.get("OMP_NUM_THREADS")
    argv = ["--context", "90", "--steps", "4", "--warmup", "1", "--q-heads", "2", "--kv-heads", "1",
            "--head-dim", "8", "--kv-dtype", "float32", "--block-len", "8", "--json", str(out)]  # fmt: skip
    assert segments.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["segments"] == 3 and len(r["alone_p50_us"]) == 3 and r["ratio"] > 0
    assert "ratio to the slowest alone" in capsys.readouterr().out
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == before
