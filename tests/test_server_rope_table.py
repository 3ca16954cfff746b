"""`RopeTable`: gathered cos/sin equal the direct evaluation, and the table grows on demand."""

from __future__ import annotations

import numpy as np

from tkg.server.rope import RopeTable, angles, inv_freqs


def test_lookup_equals_angles_and_grows_only_as_far_as_needed() -> None:
    inv = inv_freqs(16, 500000.0, {"type": "llama3", "factor": 8.0})
    table = RopeTable(inv, max_context=100_000, initial=64)
    pos = np.array([[0, 1, 2], [63, 64, 65]])
    for p in (pos, pos + 5000, np.array([[99_999]])):
        cos, sin = table.lookup(p)
        want_cos, want_sin = angles(p, inv)
        np.testing.assert_array_equal(cos, want_cos)
        np.testing.assert_array_equal(sin, want_sin)
    assert len(table.cos) == 100_000  # capped at max_context
    small = RopeTable(inv, max_context=100_000, initial=64)
    small.lookup(np.array([[70]]))
    assert len(small.cos) == 128
