"""`tkg.client.merge.merge_states`: any split of the keys into segments, empty ones included,
merges to the unsplit attention (hypothesis), against a small float64 oracle written here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tkg.client.merge import merge_states


def _partial(q: np.ndarray, K: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention of q `[H, d]` over keys K, V `[n, d]` (n may be 0), float64: out `[H, d]`
    (0 when n = 0) and the natural log of the softmax denominator `[H]` (-inf when n = 0)."""
    H, d = q.shape
    out = np.zeros((H, d))
    lse = np.full(H, -math.inf)
    for h in range(H):
        logits = [float(np.dot(q[h], K[j])) for j in range(len(K))]
        if not logits:
            continue
        m = max(logits)
        w = [math.exp(x - m) for x in logits]
        out[h] = sum(wj * V[j] for j, wj in enumerate(w)) / sum(w)
        lse[h] = m + math.log(sum(w))
    return out, lse


@st.composite
def _splits(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    n = draw(st.integers(1, 40))
    H, d = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))  # 30: logits far apart, exp would overflow unshifted
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((H, d)) * scale
    K, V = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))  # repeated cuts: empty segments
    return q, K, V, [0, *cuts, n]


@given(_splits())
def test_any_split_merges_to_the_unsplit_answer(case: tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]) -> None:
    q, K, V, bounds = case
    whole_o, whole_l = _partial(q, K, V)
    parts = [_partial(q, K[a:b], V[a:b]) for a, b in itertools.pairwise(bounds)]
    outs = [o.astype(np.float32) for o, _ in parts]
    lses = [lse.astype(np.float32) for _, lse in parts]
    o, lse = merge_states(outs, lses)
    assert o.dtype == np.float32 and lse.dtype == np.float32
    tol = 1e-5 * max(1.0, float(np.abs(whole_o).max()))
    np.testing.assert_allclose(o, whole_o, atol=tol, rtol=0)
    np.testing.assert_allclose(lse, whole_l, atol=1e-4 * max(1.0, float(np.abs(whole_l).max())), rtol=1e-5)


def test_no_key_anywhere_gives_zero_and_minus_inf() -> None:
    garbage = np.full((2, 4), np.nan, np.float32)  # an unseen segment's out must not leak
    o, lse = merge_states([garbage, np.zeros((2, 4), np.float32)], [np.full(2, -np.inf)] * 2)
    assert np.all(o == 0) and np.all(np.isneginf(lse))


def test_a_segment_that_saw_nothing_contributes_nothing_even_with_garbage() -> None:
    o1 = np.ones((1, 3), np.float32)
    o, lse = merge_states([o1, np.full((1, 3), np.nan, np.float32)], [np.zeros(1), np.full(1, -np.inf)])
    np.testing.assert_array_equal(o, o1)
    np.testing.assert_array_equal(lse, [0.0])


def test_huge_lses_do_not_overflow() -> None:
    o, lse = merge_states([np.ones((1, 2)), 3 * np.ones((1, 2))], [np.full(1, 1000.0), np.full(1, 1000.0)])
    np.testing.assert_allclose(o, 2.0)
    np.testing.assert_allclose(lse, 1000.0 + math.log(2), rtol=1e-6)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="lse shape"):
        merge_states([np.zeros((2, 4))], [np.zeros(3)])
