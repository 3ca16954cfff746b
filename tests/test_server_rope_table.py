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


def test_rotate_qk_equals_rotate_bit_for_bit() -> None:
    """The decode step's one-pass rotation of q and k gives exactly `rotate`'s values (every
    dtype the wire carries; batches, several new tokens, positions past the table's first size)."""
    from tkg.dtypes import BF16
    from tkg.server.rope import rotate

    inv = inv_freqs(16, 10000.0)
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, BF16):
        table = RopeTable(inv, max_context=10_000, initial=64)
        for B, T, top in ((1, 1, 10), (3, 1, 200), (2, 4, 9_000)):
            q = rng.standard_normal((B, 4, T, 16)).astype(dtype)
            k = rng.standard_normal((B, 2, T, 16)).astype(dtype)
            pos = rng.integers(0, top - T, (B, 1)) + np.arange(T)[None, :]
            got_q, got_k = table.rotate_qk(q, k, pos)
            cos, sin = angles(pos, inv)
            for got, x in ((got_q, q), (got_k, k)):
                want = rotate(x, cos, sin)
                assert got.dtype == x.dtype and got.shape == x.shape
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
