"""Same answers as nki-library on its own attention_tkg test suite (issue 9).

Every configuration of the library's fast suite, at lnc 1 and 2, with the library's inputs, its
torch reference as the golden and its tolerance (see tests/support/nkilib_suite.py). Needs the library:
TKG_NKILIB_PATH=<nki-library>/src/nkilib_src; skipped with the reason otherwise.

Backends: `reference` and `cpu` run every case. `nki-emu` (our NKI kernel on the emulator, a
Python call per instruction) runs every case whose keys per row are at most NKI_EMU_MAX_KEYS
(all lnc), so the suite stays within minutes; set TKG_NKILIB_EMU_ALL=1 to run them all.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from support import nkilib_suite as suite

REASON = suite.skip_reason()
CASES = [] if REASON else suite.cases("fast")
NKI_EMU_MAX_KEYS = 4096
_EMU_ALL = os.environ.get("TKG_NKILIB_EMU_ALL") == "1"


def _params() -> list[Any]:
    if REASON:
        return [pytest.param(None, None, id="no-library", marks=pytest.mark.skip(reason=REASON))]
    out = []
    for case in CASES:  # backends innermost: the three share one case's inputs and golden
        for be in ("reference", "cpu", "nki-emu"):
            marks = []
            if be == "nki-emu" and not _EMU_ALL and case.cfg.curr_sprior > NKI_EMU_MAX_KEYS:
                why = f"nki-emu: Sp > {NKI_EMU_MAX_KEYS} (TKG_NKILIB_EMU_ALL=1 runs it)"
                marks.append(pytest.mark.skip(reason=why))
            out.append(pytest.param(case, be, id=f"{be}-{case.id}", marks=marks))
    return out


_last: dict[str, Any] = {}


def _inputs_and_golden(case: suite.Case) -> tuple[dict[str, Any], dict[str, Any]]:
    """One case's inputs and golden, kept while its backends run (one case in memory at a time)."""
    if _last.get("id") != case.id:
        _last.clear()
        inputs = suite.make_inputs(case)
        _last.update(id=case.id, inputs=inputs, gold=suite.golden(case, inputs))
    return _last["inputs"], _last["gold"]


@pytest.mark.parametrize(("case", "backend"), _params())
def test_library_suite(case: suite.Case, backend: str) -> None:
    inputs, gold = _inputs_and_golden(case)
    got = suite.run_case(case, inputs, backend)
    ok, report = suite.compare(got, gold, case)
    assert ok, report
