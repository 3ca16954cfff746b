"""The README and docs/ run as pasted: every Python block of README.md, and every block of README.md
or docs/*.md marked `<!-- test: ... -->`, runs here against a live `tkg serve` this test starts.

Markers, on the line right above a fenced block:
    <!-- test: run -->                 run it, no server
    <!-- test: server [ARGS] -->       start `tkg serve ARGS` (no ARGS: as `make serve` does) and run it
                                       with TKG_TARGET=host:port of that server
    <!-- not tested: REASON -->        cannot run here (Docker, kubectl, Trainium, a foreground server)
A README Python block without a marker is `server`. `python` blocks run with the project's Python,
`sh` blocks with bash -eu (.venv/bin first on PATH); blocks of one file run in order (a block may
use a file an earlier one wrote), from the repository root. Snippets name `localhost:50051` as a
user would, reading TKG_TARGET first, so the test never needs (or collides with) `make serve`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.server_proc import ServerProc, start_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
# Docs other engineers add in parallel; the README links them before they land on this branch.
LINKED_ELSEWHERE = {"docs/trainium.md", "docs/trainium-store.md", "docs/security.md", "docs/testing.md"}

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(test|not tested):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("test", "run" | "server ARGS") or ("not tested", reason)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker on the line above it (if any)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or not m.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARKER.match(lines[i - 1]) if i > 0 else None
        out.append(Block(path, i + 1, m.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                         (mark.group(1), mark.group(2)) if mark else None))  # fmt: skip
        i = end + 1
    return out


def to_run(path: Path) -> list[Block]:
    """The blocks of `path` this test runs, in file order."""
    chosen = []
    for b in blocks(path):
        if b.marker is None and path == README and b.lang == "python":
            b.marker = ("test", "server")
        if b.marker is not None and b.marker[0] == "test":
            chosen.append(b)
    return chosen


def _files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


_servers: dict[str, ServerProc] = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> None:
    yield
    for s in _servers.values():
        s.stop()
    _servers.clear()


def _server(args: str) -> ServerProc:
    if args not in _servers:
        _servers[args] = start_server(*args.split())
    return _servers[args]


def _run(block: Block) -> subprocess.CompletedProcess[str]:
    kind, _, args = block.marker[1].partition(" ")  # type: ignore[index]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TKG_TARGET", None)
    if kind == "server":
        env["TKG_TARGET"] = _server(args.strip()).target
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    elif block.lang in ("sh", "bash"):
        cmd = ["bash", "-eu", "-c", block.code]
    else:
        raise AssertionError(f"{block.where}: marked to run but a {block.lang!r} block; expected python or sh")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("path", [p for p in _files() if to_run(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run_as_pasted(path: Path) -> None:
    for block in to_run(path):
        res = _run(block)
        assert res.returncode == 0, (
            f"{block.where} failed ({res.returncode}):\n{block.code}\n{res.stdout}\n{res.stderr}"
        )


def test_readme_first_decode_prints_what_it_says() -> None:
    """The README says what its first example prints; hold it to that."""
    (first,) = [b for b in to_run(README) if "c.decode(" in b.code]
    res = _run(first)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("(1, 8, 1, 64) bfloat16 Timing(queue_us="), res.stdout
    assert "It prints `(1, 8, 1, 64) bfloat16 Timing(queue_us=..." in README.read_text()


def test_readme_is_short_and_every_block_is_run_or_says_why() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"
    for b in blocks(README):
        if b.lang in ("python", "sh", "bash"):
            why = f"{b.where}: mark it <!-- test: ... --> or <!-- not tested: why -->"
            assert b.marker is not None or b.lang == "python", why
        if b.marker is not None and b.marker[0] == "not tested":
            assert b.marker[1], f"{b.where}: <!-- not tested: --> needs a reason"


def test_markers_are_well_formed() -> None:
    """A typo in a marker would silently drop a block from the run."""
    for path in _files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("<!--") and "test" in line.split("-->")[0]:
                m = MARKER.match(line)
                assert m, f"{path.relative_to(ROOT)}:{i}: malformed marker {line!r}"
                if m.group(1) == "test":
                    assert m.group(2).split(" ")[0] in ("run", "server"), f"{path.relative_to(ROOT)}:{i}: {line!r}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve() -> None:
    missing = []
    for path in _files():
        prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # links in code are code
        for target in LINK.findall(prose):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            if not resolved.exists() and rel not in LINKED_ELSEWHERE:
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert not missing, "broken links:\n" + "\n".join(missing)


def test_no_design_files_cited_that_the_repository_lacks() -> None:
    """Code and docs point into docs/, not at design notes outside the repository."""
    cited = re.compile(r"(?<![\w/])(?:\.\./shared/)?design/[\w.-]+\.md")  # docs/design/... is ours
    found = []
    folders = ("server", "client", "kernel", "bench", "tkg", "integrations", "tests")
    code = [p for d in folders for p in (ROOT / d).rglob("*.py")]
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *code]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in cited.finditer(line):
                if not (ROOT / m.group(0)).exists() and not (ROOT / "docs" / m.group(0)).exists():
                    found.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert not found, "cites design files not in the repository:\n" + "\n".join(found)
