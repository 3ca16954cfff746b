"""nki-library's own attention_tkg, unmodified, passes its own fast suite on our NKI emulator.

The kernel known to run on Trainium is the outside check of the emulator: every configuration of
the library's fast suite (cases up to 64k keys: all of them), at lnc 1 and 2, fp8 included, with
the library's inputs, its torch reference as the golden and its tolerance (tests/support/nkilib_suite.py),
through backend `nkilib-emu`. Needs the library: TKG_NKILIB_PATH=<nki-library>/src/nkilib_src;
skipped with the reason otherwise. About 6 minutes on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import nkilib_suite as suite

REASON = suite.skip_reason()
MAX_KEYS = 65536


def _params() -> list[Any]:
    if REASON:
        return [pytest.param(None, id="no-library", marks=pytest.mark.skip(reason=REASON))]
    return [pytest.param(c, id=c.id) for c in suite.cases("fast") if c.cfg.full_sprior <= MAX_KEYS]


@pytest.mark.parametrize("case", _params())
def test_library_kernel_on_the_emulator_matches_its_reference(case: suite.Case) -> None:
    inputs = suite.make_inputs(case)
    got = suite.run_case(case, inputs, "nkilib-emu", nkilib_path=str(suite.library_path()))
    ok, report = suite.compare(got, suite.golden(case, inputs), case)
    assert ok, report
