"""`tkg bench host`: its arithmetic on known figures, and one tiny end-to-end run (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tkg.bench import host


def test_figures_divide_the_median_host_time_by_the_estimate_and_judge_by_batch() -> None:
    r = host.figures(host.Case(8, 1024), [100.0, 300.0, 200.0], 100.0)
    assert (r["host_p50_us"], r["host_per_sequence_us"], r["ratio"]) == (200.0, 25.0, 2.0)
    assert (r["goal_max"], r["verdict"]) == (2.0, "met")
    r = host.figures(host.Case(64, 1024), [64.0, 128.0], 64.0)
    assert (r["host_p50_us"], r["ratio"], r["goal_max"], r["verdict"]) == (96.0, 1.5, 1.0, "MISSED")
    r = host.figures(host.Case(1, 4096), [10.0], 20.0)
    assert (r["ratio"], r["goal_max"], r["verdict"]) == (0.5, None, None)


def test_cases_parse_and_a_bad_one_is_named() -> None:
    assert host.parse_cases("1x1024, 64x4096") == [host.Case(1, 1024), host.Case(64, 4096)]
    for bad in ("64", "x1024", "0x16", "8x-1", "axb"):
        with pytest.raises(ValueError, match=rf"--cases: '{bad}'"):
            host.parse_cases(bad)
    assert host.main(["--cases", "64"]) == 2


def test_a_tiny_run_writes_rows_whose_ratio_is_host_over_estimate(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    argv = ["--cases", "1x40,2x40", "--steps", "2", "--warmup", "1", "--q-heads", "4", "--kv-heads", "2",
            "--json", str(out)]  # fmt: skip
    assert host.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["lnc"] == 2 and doc["geometry"]["kv_heads"] == 2
    assert [r["case"] for r in doc["rows"]] == [{"batch": 1, "context": 40}, {"batch": 2, "context": 40}]
    for r in doc["rows"]:
        assert r["estimate_us"] > 0 and r["host_p50_us"] > 0
        assert r["ratio"] == pytest.approx(r["host_p50_us"] / r["estimate_us"])
        s = r["server_p50_us"]
        assert s["total"] >= s["kernel"] >= s["attention"] >= 0
        assert r["steps_on_loop"] == [2, 2]  # 40 tokens of K+V: within INLINE_KERNEL_BYTES, on the loop
    assert host.format_rows(doc["rows"], 2).splitlines()[3].split()[-1] == "2/2"
