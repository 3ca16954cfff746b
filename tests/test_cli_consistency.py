"""The `tkg` command line as a newcomer meets it: `--json FILE` on every command that writes JSON,
`tkg bench --help`, every option in `--help`, one line naming the extra when torch is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tkg import cli

TINY = ["--batch", "2", "--kv-heads", "1", "--q-per-kv", "2", "--head-dim", "16", "--context", "24",
        "--block-len", "8", "--s", "1", "--lens", "equal", "--peers", "cpu.paged_decode", "--iters", "1",
        "--budget", "0.02", "--membw-mib", "4", "--threads", "1"]  # fmt: skip


def test_bench_kernel_json_takes_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "kernel.json"
    assert cli.main(["bench", "kernel", *TINY, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "S=1 BL=8 equal" in table  # the table still goes to stdout
    assert [c["label"] for c in json.loads(out.read_text())["cases"]] == ["S=1 BL=8 equal"]


def test_bench_kernel_json_dash_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    assert cli.main(["bench", "kernel", *TINY, "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cases"][0]["label"] == "S=1 BL=8 equal"
    assert "S=1 BL=8 equal" in captured.err  # the table, out of the JSON's way


def test_bench_kernel_json_without_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "kernel", *TINY, "--json"])
    assert info.value.code == 2
    assert "--json" in capsys.readouterr().err


def test_bench_kernel_help_lists_nkilib(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "kernel", "--help"])
    text = capsys.readouterr().out
    assert "--nkilib" in text and "--json FILE" in text and "nki-emu" in text


def test_bench_kernel_nkilib_needs_the_nki_emu_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "kernel", "--nkilib", "/nowhere"]) == 2
    assert "--nkilib" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "-h"], ["bench"]])
def test_bench_help_lists_the_bench_commands(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == (2 if argv == ["bench"] else 0)
    assert "unknown command" not in captured.out + captured.err
    assert "bench kernel" in captured.out and "bench serve" in captured.out
    assert "loadtest" not in captured.out  # only the bench group


def test_unknown_command_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "nothing"]) == 2
    assert "unknown command" in capsys.readouterr().err


# A client-only install: none of the `server` extra's modules (torch, prometheus_client, the grpc
# health/reflection packages, yaml, uvloop) can be imported. `None` in sys.modules makes `import X`
# raise ModuleNotFoundError, as on a machine without X.
_NO_SERVER_EXTRA = (
    "import sys\n"
    "for m in ('torch', 'prometheus_client', 'grpc_health', 'grpc_reflection', 'yaml', 'uvloop'):\n"
    "    sys.modules[m] = None\n"
    "from tkg.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("argv", [["serve", "--port", "0", "--metrics-port", "0"], ["bench", "kernel"]])
def test_client_only_install_names_the_server_extra(argv: list[str]) -> None:
    res = subprocess.run([sys.executable, "-c", _NO_SERVER_EXTRA, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "install the `[server]` extra" in lines[0] and "is not installed" in lines[0]


def test_client_only_install_loadtest_still_runs_its_help() -> None:
    res = subprocess.run([sys.executable, "-c", _NO_SERVER_EXTRA, "loadtest", "--help"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0 and "--html" in res.stdout, res.stderr
