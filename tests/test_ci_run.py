"""`.ci/run`'s nki-library block: with `../shared/nkilib` beside the clone it points the parity
suites at it (and runs both emulator suites whole); under CI=true a missing folder fails the run
before any test instead of letting the suites skip. `make`, `prometheus` and `promtool` are fakes
here: `make` records the environment it was given."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_ci(tmp_path: Path, ci: bool) -> tuple[subprocess.CompletedProcess, dict[str, str] | None]:
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / ".ci" / "run", clone / ".ci" / "run")
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    seen = tmp_path / "make-env"
    scripts = {"make": f'#!/bin/sh\nenv > "{seen}"\n', "prometheus": "#!/bin/sh\n", "promtool": "#!/bin/sh\n"}
    for name, body in scripts.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TKG_NKILIB") and k != "CI"}
    env["PATH"] = f"{fake}:/usr/bin:/bin"
    if ci:
        env["CI"] = "true"
    seen.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(clone / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    made = None
    if seen.exists():
        made = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    return proc, made


def test_without_the_library_ci_fails_and_a_developer_run_goes_on(tmp_path: Path) -> None:
    proc, made = run_ci(tmp_path, ci=True)
    assert proc.returncode == 1 and made is None, proc
    assert "shared/nkilib/src/nkilib_src is missing" in proc.stderr and "CI=true" in proc.stderr
    proc, made = run_ci(tmp_path, ci=False)  # outside CI the suites skip, with their reason
    assert proc.returncode == 0 and made is not None, proc
    assert "TKG_NKILIB_PATH" not in made and "TKG_NKILIB_EMU_ALL" not in made


def test_with_the_library_beside_the_clone_make_test_gets_it(tmp_path: Path) -> None:
    src = tmp_path / "shared" / "nkilib" / "src" / "nkilib_src"
    src.mkdir(parents=True)
    proc, made = run_ci(tmp_path, ci=True)
    assert proc.returncode == 0 and made is not None, proc
    assert made["TKG_NKILIB_PATH"] == str(src) and made["TKG_NKILIB_EMU_ALL"] == "1"
