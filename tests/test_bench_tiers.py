"""`tkg bench tiers`: its arithmetic on known figures, and one tiny end-to-end run (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tkg import cli
from tkg.bench import tiers

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
/dev/vdb /data xfs rw 0 0
/dev/vdc /data/my\\040disk ext4 rw 0 0
"""


def test_versus_compares_best_times_of_the_same_bytes_and_judges_by_the_goal() -> None:
    r = tiers.versus("restore", 2**30, [0.5, 0.25, 0.4], [0.2, 0.1], 0.5)
    assert (r["best_s"], r["peer_best_s"], r["gib_s"], r["peer_gib_s"]) == (0.25, 0.1, 4.0, 10.0)
    assert r["ratio"] == pytest.approx(0.4) and (r["goal_min"], r["verdict"]) == (0.5, "MISSED")
    r = tiers.versus("restore", 2**30, [0.2], [0.1], 0.5)
    assert r["ratio"] == pytest.approx(0.5) and r["verdict"] == "met"  # the goal is inclusive
    assert tiers.versus("part", 1, [2.0], [1.0], None)["verdict"] is None


def test_latency_figures_are_p50_ratios_and_spills_per_second() -> None:
    with_s, without_s = [0.003, 0.001, 0.0022, 0.004], [0.002, 0.001, 0.003]
    r = tiers.latency_figures(with_s, without_s, spills=25, restores=26, seconds_with=2.5, goal_max=1.1)
    assert r["p50_with_us"] == pytest.approx(2600.0) and r["p50_without_us"] == pytest.approx(2000.0)
    assert r["ratio"] == pytest.approx(1.3) and r["verdict"] == "MISSED"
    assert (r["spills_per_s"], r["restores"], r["calls_with"], r["calls_without"]) == (10.0, 26, 4, 3)
    r = tiers.latency_figures([0.0011], [0.001], 0, 0, 0.0, 1.1)
    assert r["verdict"] == "met" and r["spills_per_s"] == 0.0


def test_counter_total_sums_every_label_set_of_one_counter_only() -> None:
    text = """\
# HELP tkg_kv_spills_total Sequences moved down a tier
# TYPE tkg_kv_spills_total counter
tkg_kv_spills_total{tier="host"} 7.0
tkg_kv_spills_total{tier="disk"} 2.0
tkg_kv_spills_created{tier="host"} 1.7e9
tkg_kv_restores_total{source="host",result="ok"} 5.0
"""
    assert tiers.counter_total(text, "tkg_kv_spills_total") == 9.0
    assert tiers.counter_total(text, "tkg_kv_restores_total") == 5.0
    assert tiers.counter_total(text, "tkg_kv_persisted_sequences_total") == 0.0


def test_the_file_system_of_a_path_is_its_longest_mount_point() -> None:
    assert tiers.fs_type(Path("/tmp/x"), MOUNTS) == "tmpfs"
    assert tiers.fs_type(Path("/tmpdir"), MOUNTS) == "ext4"  # a prefix of the name is not a mount
    assert tiers.fs_type(Path("/data/a"), MOUNTS) == "xfs"
    assert tiers.fs_type(Path("/data/my disk/a"), MOUNTS) == "ext4"
    assert tiers.default_spill_parent(Path("/data/a"), MOUNTS) == Path("/data/a")
    with pytest.raises(ValueError, match=r"--spill-dir: the current directory /tmp/a is on tmpfs"):
        tiers.default_spill_parent(Path("/tmp/a"), MOUNTS)


def test_swap_plan_makes_room_for_z_and_one_swapped_sequence_only() -> None:
    num_blocks, host_blocks = tiers.swap_plan(z_tokens=1024, swap_tokens=4096, growth=1020, block_len=16)
    z = -(-(1024 + 1020 + 16) // 16)
    assert (num_blocks, host_blocks) == (z + 256 + 2, 512)
    assert num_blocks - z < 2 * 256  # X and Y never both fit next to Z: restoring one spills the other
    assert tiers.swap_plan(32, 80, 6, 16) == (4 + 5 + 2, 10)  # Z grows 2 -> 4 blocks: 5 swapped blocks do
    with pytest.raises(ValueError, match=r"--swap-tokens: 64; expected more than 64 "):
        tiers.swap_plan(32, 64, 6, 16)  # 4 blocks of X and Y fit beside Z at 2 blocks


def test_bad_options_are_refused_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert tiers.main(["--tokens", "0"]) == 2
    assert "--tokens: 0; expected >= 1" in capsys.readouterr().err
    assert tiers.main(["--parts", "c"]) == 2
    assert "--parts: 'c'" in capsys.readouterr().err
    assert tiers.main(["--context", "32", "--swap-tokens", "64", "--calls", "5", "--warmup", "1"]) == 2
    assert "--swap-tokens: 64" in capsys.readouterr().err


def test_a_tiny_run_of_both_parts_reports_ratios_of_its_own_figures(tmp_path: Path) -> None:
    out = tmp_path / "tiers.json"
    argv = ["bench", "tiers", "--spill-dir", str(tmp_path), "--tokens", "64", "--reps", "1", "--context", "32",
            "--swap-tokens", "128", "--calls", "5", "--warmup", "1", "--rounds", "1", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    a, b = doc["a"], doc["b"]
    assert a["bytes"] == 4 * 2 * 32 * 8 * 16 * 128 * 2  # 4 blocks of llama-3-8b, K and V, bf16
    for tier in ("host", "disk"):  # each restore timed came back from that tier (checked inside)
        assert len(a[tier]["restore_s"]) == 1 and len(a[tier]["spill_s"]) == 1
    assert len(a["disk"]["read_payload_s"]) == 1 and a["fs"] != "tmpfs"
    for row in a["rows"]:
        assert row["ratio"] == pytest.approx(min(row["peer_all_s"]) / min(row["all_s"]))
    assert [r["verdict"] is not None for r in a["rows"]] == [True, False, True, False, False, False, False]
    assert (b["calls_with"], b["calls_without"]) == (5, 5) and b["prefetch_errors"] == []
    assert b["ratio"] == pytest.approx(b["p50_with_us"] / b["p50_without_us"])
    assert list(tmp_path.iterdir()) == [out]  # the temporary spill directory is gone
