"""Same answers as nki-library on its own attention_tkg test suite (issue 9).

Every configuration of the library's fast suite, at lnc 1 and 2, with the library's inputs, its
torch reference as the golden and its tolerance (see tests/support/nkilib_suite.py). Needs the library:
TKG_NKILIB_PATH=<nki-library>/src/nkilib_src; skipped with the reason otherwise.

Backends: `reference` and `cpu` run every case. `nki-emu` (our NKI kernel on the emulator, a
Python call per instruction) runs the cases up to `suite.EMU_MAX_KEYS` keys per row (112 of 214);
TKG_NKILIB_EMU_ALL=1 runs them all (CI does: ~20 s more on 2 cores; docs/testing.md). Under
CI=true a missing library fails this suite instead of skipping it.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import nkilib_suite as suite

REASON = suite.skip_reason()
CASES = [] if REASON else suite.cases("fast")


def _params() -> list[Any]:
    if REASON:
        return suite.no_library(REASON, arity=2)
    out = []
    for case in CASES:  # backends innermost: the three share one case's inputs and golden
        for be in ("reference", "cpu", "nki-emu"):
            why = suite.emu_skip(case) if be == "nki-emu" else None
            marks = [pytest.mark.skip(reason=f"nki-emu: {why}")] if why else []
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
    if case is None:
        pytest.fail(f"CI=true and the library is missing: {REASON}")
    inputs, gold = _inputs_and_golden(case)
    got = suite.run_case(case, inputs, backend)
    ok, report = suite.compare(got, gold, case)
    assert ok, report
