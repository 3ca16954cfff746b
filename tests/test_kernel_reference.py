"""The `reference` backend against the naive loops of tests/support/oracle.py.

First the naive oracle itself is pinned to hand-computed values (so the two cannot agree on a
shared mistake); then the reference is compared with it feature by feature, each feature pinned
and everything else drawn. The whole matrix, for every host backend, is in
test_kernel_properties.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.oracle import mask_row_of_token, naive_attention, rope
from support.strategies import RTOL_VS_NAIVE, KernelCase, Result, assert_result, kernel_cases, run

from tkg.kernel import AttnTKGConfig, attention_tkg
from tkg.kernel.backends.reference import unshuffle_block_mask


def _tiny(S: int = 1, Sp: int = 3, d: int = 2, H: int = 1) -> AttnTKGConfig:
    return AttnTKGConfig(bs=1, q_head=H, s_active=S, curr_sprior=Sp, full_sprior=Sp, d_head=d, qk_in_sb=True)


def _tiny_args(cfg: AttnTKGConfig, keys: list[list[float]], values: list[list[float]], q: list[float]) -> dict:
    """One row, one head, one query; `keys`/`values` are all Sp keys (the last one is active)."""
    Sp, d = cfg.curr_sprior, cfg.d_head
    K = np.array(keys, np.float32)
    V = np.array(values, np.float32)
    return {
        "q": np.array(q, np.float32).reshape(d, 1),
        "k_active": K[-1].reshape(d, 1).copy(),
        "v_active": V[-1].reshape(1, 1, 1, d).copy(),
        "k_prior": K.T.reshape(1, 1, d, Sp).copy(),  # tp_k_prior=False: [B+, 1, d, Spf]
        "v_prior": V.reshape(1, 1, Sp, d).copy(),
        "mask": np.ones((Sp, 1, 1, 1), np.uint8),
    }


# --- the oracle, by hand --------------------------------------------------------------------


def test_naive_single_visible_key_returns_its_value() -> None:
    cfg = _tiny()
    args = _tiny_args(cfg, [[9, 9], [5, 5], [1, 0]], [[7, 7], [8, 8], [2.5, -1]], q=[3, 4])
    args["mask"][:2] = 0  # only the active key
    res = naive_attention(cfg, args)
    np.testing.assert_allclose(res["out"].reshape(-1), [2.5, -1])
    assert res["dbg"]["qk"][0, 0, :, 0].tolist() == [-math.inf, -math.inf, 3.0]


def test_naive_softmax_by_hand() -> None:
    cfg = _tiny()
    # scores: 0, ln 2, ln 3 with q=(1, 0): weights 1:2:3
    args = _tiny_args(cfg, [[0, 5], [math.log(2), 1], [math.log(3), -2]], [[6, 0], [0, 6], [1, 1]], q=[1, 0])
    out = naive_attention(cfg, args)["out"].reshape(-1)
    np.testing.assert_allclose(out, [(6 + 0 + 3) / 6, (0 + 12 + 3) / 6], rtol=1e-6)


def test_naive_sink_is_an_extra_logit_without_value() -> None:
    cfg = _tiny(Sp=1)
    args = _tiny_args(cfg, [[1, 0]], [[4, -2]], q=[1, 0])
    args["sink"] = np.array([[math.log(3) + 1]], np.float32)  # e^sink = 3 e^score
    res = naive_attention(cfg, args)
    np.testing.assert_allclose(res["out"].reshape(-1), [1, -0.5], rtol=1e-6)
    # The row max is the sink: the denominator is e^(score - sink) + 1.
    np.testing.assert_allclose(res["dbg"]["qk_max"].reshape(-1), [math.log(3) + 1], rtol=1e-6)
    np.testing.assert_allclose(res["dbg"]["exp_sum"].reshape(-1), [4 / 3], rtol=1e-6)


def test_naive_fully_masked_row_raises() -> None:
    cfg = _tiny()
    args = _tiny_args(cfg, [[1, 0]] * 3, [[1, 1]] * 3, q=[1, 0])
    args["mask"][:] = 0
    with pytest.raises(ValueError, match="every key is masked"):
        naive_attention(cfg, args)


def test_naive_rope_rotates_pairs_of_halves() -> None:
    inv = np.array([[1.0], [0.5]], np.float32)
    x = [1.0, 2.0, 3.0, 4.0]
    pos = 2.0
    # pair (x0, x2) rotated by angle 2, pair (x1, x3) by angle 1, with the angle fp32 or exact
    c2, s2, c1, s1 = math.cos(2), math.sin(2), math.cos(1), math.sin(1)
    want = [1 * c2 - 3 * s2, 2 * c1 - 4 * s1, 3 * c2 + 1 * s2, 4 * c1 + 2 * s1]
    for fp32_angle in (True, False):
        y = rope([x], [pos], inv, fp32_angle=fp32_angle)
        np.testing.assert_allclose(y, [want], rtol=1e-7)
        assert rope([x], [0.0], inv, fp32_angle=fp32_angle).tolist() == [x]
    # Several positions at once: row t turns by its own angle.
    two = rope([x, x], [pos, 0.0], inv)
    np.testing.assert_allclose(two, [want, x], rtol=1e-7)


def test_fold_order_by_hand() -> None:
    # block_len 2: a fold is 128 blocks of 2 keys; mask row = offset*128 + partition.
    assert [mask_row_of_token(t, 2) for t in (0, 1, 2, 3, 255)] == [0, 128, 1, 129, 255]
    assert mask_row_of_token(256, 2) == 256 and mask_row_of_token(257, 2) == 384
    rows = [mask_row_of_token(t, 4) for t in range(1024)]
    assert sorted(rows) == list(range(1024))


@pytest.mark.parametrize("block_len", [1, 2, 4])
def test_reference_unshuffle_inverts_the_fold_order(block_len: int) -> None:
    Sp = 2 * 128 * block_len
    natural = np.random.default_rng(block_len).integers(0, 256, size=(Sp, 2, 3)).astype(np.uint8)
    shuffled = np.empty_like(natural)
    shuffled[[mask_row_of_token(t, block_len) for t in range(Sp)]] = natural
    np.testing.assert_array_equal(unshuffle_block_mask(shuffled, block_len), natural)


def test_reference_visible_non_finite_values_still_propagate() -> None:
    """Masked garbage is ignored, but a NaN the query does see must show (no silent repair)."""
    cfg = _tiny(S=2, Sp=4, H=2)
    rng = np.random.default_rng(0)
    d = cfg.d_head
    args = {
        "q": rng.standard_normal((d, 4)).astype(np.float32),
        "k_active": rng.standard_normal((d, 2)).astype(np.float32),
        "v_active": rng.standard_normal((1, 1, 2, d)).astype(np.float32),
        "k_prior": rng.standard_normal((1, 1, d, 4)).astype(np.float32),
        "v_prior": rng.standard_normal((1, 1, 4, d)).astype(np.float32),
        "mask": np.ones((4, 1, 2, 2), np.uint8),
    }
    args["v_prior"][0, 0, 1, 0] = np.nan  # key 1, element 0
    args["mask"][1, 0, 0, :] = 0  # head 0 never sees key 1; head 1 does
    out, _ = attention_tkg(**args, out=None, cfg=cfg, backend="reference")  # [1, H, d, S]
    assert np.isfinite(out[0, 0]).all()
    assert np.isnan(out[0, 1, 0]).all() and np.isfinite(out[0, 1, 1:]).all()


# --- the reference against the oracle, one feature pinned at a time ---------------------------


def _check_against_naive(case: KernelCase) -> None:
    got = run(case, "reference")
    nv = naive_attention(case.cfg, case.args)
    # Debug tensors are float32 whatever the I/O dtype, computed from the same rounded inputs.
    assert_result(got, Result(nv["out"], nv["k_out"], nv["dbg"]), case, RTOL_VS_NAIVE, dbg_rtol=1e-5)


SLICES = {
    "flat-premask": dict(block=False, use_pos_id=False),
    "flat-pos-id": dict(block=False, use_pos_id=True),
    "block-pos-id": dict(block=True, use_pos_id=True),
    "block-premask-fold-order": dict(block=True, use_pos_id=False),
    "window": dict(window="window"),
    "window-wrap": dict(window="wrap"),
    "fused-rope": dict(fuse_rope=True),
    "sink": dict(sink="random"),
    "sink-some-neg-inf": dict(sink="some-neg-inf"),
    "garbage": dict(garbage=True),
    "bf16": dict(dtypes=("bf16",)),
    "fp16": dict(dtypes=("fp16",)),
}


@pytest.mark.parametrize("name", list(SLICES))
@settings(max_examples=30)
@given(data=st.data())
def test_reference_matches_naive(name: str, data: st.DataObject) -> None:
    _check_against_naive(data.draw(kernel_cases(**SLICES[name]), label="case"))
