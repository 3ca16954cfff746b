"""nki-library's own attention_tkg, unmodified, passes its own fast suite on our NKI emulator.

The kernel known to run on Trainium is the outside check of the emulator: every configuration of
the library's fast suite (cases up to 64k keys: all of them), at lnc 1 and 2, fp8 included, with
the library's inputs, its torch reference as the golden and its tolerance (tests/support/nkilib_suite.py),
through backend `nkilib-emu`. Needs the library: TKG_NKILIB_PATH=<nki-library>/src/nkilib_src;
skipped with the reason otherwise (failed under CI=true). By default the cases up to
`suite.EMU_MAX_KEYS` keys per row (112 of 214); TKG_NKILIB_EMU_ALL=1 runs all 214 (CI does:
~2.5 min on 2 cores; docs/testing.md).
"""

from __future__ import annotations

from typing import Any

import pytest
from support import nkilib_suite as suite

REASON = suite.skip_reason()


def _params() -> list[Any]:
    if REASON:
        return suite.no_library(REASON)
    return [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=why)] if (why := suite.emu_skip(c)) else [])
            for c in suite.cases("fast")]  # fmt: skip


@pytest.mark.parametrize("case", _params())
def test_library_kernel_on_the_emulator_matches_its_reference(case: suite.Case) -> None:
    if case is None:
        pytest.fail(f"CI=true and the library is missing: {REASON}")
    inputs = suite.make_inputs(case)
    got = suite.run_case(case, inputs, "nkilib-emu", nkilib_path=str(suite.library_path()))
    ok, report = suite.compare(got, suite.golden(case, inputs), case)
    assert ok, report
