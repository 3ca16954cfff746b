"""`make serve` and `make test` started together on a fresh clone: the environment is created once.

Two `make .venv/.installed` run at once in a copy of the Makefile whose Python is a fake (a shell
script: `-m venv` makes the folder, `pip install -e` logs its start, waits for the test's gate file,
logs its end). The first install is held at the gate until the second make is seen waiting on the
lock (its `flock` process exists while the first still holds the gate), so the interleaving that
crashed pip is forced, not hoped for; then the log must show one install, never two at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.wait import wait_for

REPO = Path(__file__).resolve().parents[1]

FAKE_PY = r"""#!/bin/sh
# A stand-in for python3 / .venv/bin/python: just enough for the Makefile's venv rule.
log="$FAKE_LOG"; gate="$FAKE_GATE"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    case "$*" in *" -e "*) ;; *) exit 0 ;; esac   # `pip install --upgrade pip`: nothing to fake
    if [ -e "$log.busy" ]; then echo overlap >> "$log"; fi
    touch "$log.busy"; echo "start $$" >> "$log"
    while [ ! -e "$gate" ]; do sleep 0.01; done
    echo "end $$" >> "$log"; rm -f "$log.busy"; exit 0
fi
exit 0
"""


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _runs_flock(pid: int) -> bool:
    for k in _children(pid):
        try:
            if Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")[0].endswith(b"flock"):
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("flock") is None, reason="needs make and flock")
def test_two_makes_create_the_venv_once(tmp_path: Path) -> None:
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copy(REPO / "Makefile", work / "Makefile")
    (work / "pyproject.toml").write_text("")
    (work / "setup.py").write_text("")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    log, gate = tmp_path / "log", tmp_path / "gate"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_GATE=str(gate))
    env.pop("MAKEFLAGS", None)
    cmd = ["make", "--no-print-directory", f"PY={fake}", ".venv/.installed"]
    first = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None
    try:
        wait_for(lambda: log.exists() and "start" in log.read_text(), timeout=30, what="the first install")
        second = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # The second make either waits on the lock (fixed) or starts its own install (the crash).
        wait_for(lambda: _runs_flock(second.pid) or log.read_text().count("start") > 1 or second.poll() is not None,
                 timeout=30, what="the second make to wait or to install")  # fmt: skip
    finally:
        gate.touch()
        outs = [p.communicate(timeout=60)[0] for p in (first, second) if p is not None]
    text = log.read_text()
    assert "overlap" not in text and text.count("start") == 1, (text, outs)
    assert first.returncode == 0 and second is not None and second.returncode == 0, outs
    assert (work / ".venv" / ".installed").exists()


def test_the_stamp_rule_takes_the_lock() -> None:
    """The dry run shows the install inside `flock` (a cheap check of the same rule)."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    res = subprocess.run(["make", "-n", "-B", "--no-print-directory", ".venv/.installed"],  # -n: nothing runs
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"})  # fmt: skip
    assert "flock .venv.lock" in res.stdout, res.stdout + res.stderr
    assert res.stdout.index("flock") < res.stdout.index("pip install -q -e"), res.stdout


