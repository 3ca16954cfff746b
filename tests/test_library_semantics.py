"""nki-library's conventions, pinned by hand-made cases whose answers are worked out here by hand.

Every case has q = 0, so each query's output is the plain mean of the values it sees; values are
small integers (the same in every column), so the expected outputs are exact arithmetic below.
The prior keys are 0 .. Sp-S-1 with value k (key k holds k), the active tokens hold 1000, 2000.

1. Sliding window per query: query i sees prior keys [start[b, i], rope_pos_ids[b, i]) (even past
   the cached length rope_pos_ids[b, 0]), or when start > end the wrapped set k >= start or k < end;
   without a window every query sees k < rope_pos_ids[b, 0].
2. A pre-generated block-KV mask is ordered by the library's reduced block length, which depends
   on lnc: folds of 128 blocks of R tokens, row offset*128 + partition = token partition*R + offset.
3. curr_sprior need not be a multiple of block_len*128 (R shrinks to fit); a bucket that cannot
   be split into 128-key folds per core is refused with a ValueError naming the limit.
4. fp8 e4m3 values: saturated at 240 when made with `to_fp8`, and the output comes back in bf16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tkg.dtypes import BF16, FP8, to_fp8
from tkg.kernel import AttnTKGConfig, attention_tkg, available

BACKENDS = [b for b in ("reference", "cpu", "nki-emu") if b in available()]
D = 32
SP = 128
ACTIVE = (1000.0, 2000.0)


def flat_window_call(rope_pos: list[float], start: list[float] | None) -> dict[str, Any]:
    """B=1, H=1, S=2, Sp=128 flat cache (keys on rows), use_pos_id, q = 0."""
    S = 2
    cfg = AttnTKGConfig(bs=1, q_head=1, s_active=S, curr_sprior=SP, full_sprior=SP, d_head=D, tp_k_prior=True,
                        strided_mm1=False, use_pos_id=True, qk_in_sb=True)  # fmt: skip
    v_prior = np.repeat(np.arange(SP, dtype=np.float32)[:, None], D, axis=1)[None, None]  # [1, 1, Sp, d]
    causal = np.array([[1, 1], [0, 1]], np.uint8)[:, None, None, :]  # [key j, b, h, query i]: j <= i
    return dict(
        q=np.zeros((D, S), np.float32), k_active=np.zeros((D, S), np.float32),
        v_active=np.repeat(np.array(ACTIVE, np.float32)[:, None], D, axis=1)[None, None],
        k_prior=np.zeros((1, 1, SP, D), np.float32), v_prior=v_prior, mask=np.ascontiguousarray(causal), cfg=cfg,
        out=None, rope_pos_ids=np.array([rope_pos], np.float32),
        start_pos_ids=None if start is None else np.array([start], np.float32),
    )  # fmt: skip


def outputs(kw: dict[str, Any], backend: str, **opts: Any) -> np.ndarray:
    """Per query i, the output's first column (every column is the same)."""
    out, _ = attention_tkg(**kw, backend=backend, **opts)
    o = np.asarray(out, np.float32)  # [B, H, d, S]
    np.testing.assert_array_equal(o, np.broadcast_to(o[:, :, :1], o.shape))
    return o[0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_ends_at_each_querys_position(backend: str) -> None:
    # Cached length 3; query 0 at position 3 with window start 1, query 1 at 4 with start 2.
    got = outputs(flat_window_call([3, 4], [1, 2]), backend)
    # Query 0: keys {1, 2} and active 0. Query 1: keys {2, 3} (3 is past the cached length, inside
    # its window) and active 0, 1.
    np.testing.assert_allclose(got, [(1 + 2 + 1000) / 3, (2 + 3 + 1000 + 2000) / 4], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_wraps_when_start_passes_end(backend: str) -> None:
    got = outputs(flat_window_call([3, 4], [120, 120]), backend)
    tail = sum(range(120, 126))  # keys 120..125 (the last prior key is Sp - S - 1 = 125)
    # Query 0: k >= 120 or k < 3. Query 1: k >= 120 or k < 4.
    want = [(tail + 0 + 1 + 2 + 1000) / (6 + 3 + 1), (tail + 0 + 1 + 2 + 3 + 1000 + 2000) / (6 + 4 + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_window_every_query_ends_at_the_cached_length(backend: str) -> None:
    got = outputs(flat_window_call([3, 4], None), backend)
    np.testing.assert_allclose(got, [(0 + 1 + 2 + 1000) / 4, (0 + 1 + 2 + 1000 + 2000) / 5], rtol=1e-6)


def block_premask_call(sp: int, block_len: int, visible_row: int) -> dict[str, Any]:
    """B=1, H=1, S=1 block cache (identity table, token t holds t), a pre-generated mask whose only
    prior row set is `visible_row`, plus the active key (the last row)."""
    nblk = sp // block_len
    cfg = AttnTKGConfig(bs=1, q_head=1, s_active=1, curr_sprior=sp, full_sprior=sp, d_head=D, block_len=block_len,
                        tp_k_prior=True, strided_mm1=False, qk_in_sb=True)  # fmt: skip
    tokens = np.arange(sp, dtype=np.float32).reshape(nblk, block_len)
    mask = np.zeros((sp, 1, 1, 1), np.uint8)
    mask[visible_row] = 1
    mask[sp - 1] = 1  # the active token: the last natural token is the last row in every order
    return dict(
        q=np.zeros((D, 1), np.float32), k_active=np.zeros((D, 1), np.float32),
        v_active=np.full((1, 1, 1, D), ACTIVE[0], np.float32), k_prior=np.zeros((nblk, block_len, D), np.float32),
        v_prior=np.repeat(tokens[:, :, None], D, axis=2), mask=mask, cfg=cfg, out=None,
        active_blocks_table=np.arange(nblk, dtype=np.uint32)[None],
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_order_depends_on_lnc(backend: str) -> None:
    # Sp = 256, block_len 2. lnc 1: one core, R = gcd(2, 256/128) = 2: row 1 = offset 0 of
    # partition 1 = token 2. lnc 2: the keys split over two cores (B=1 is odd, Sp >= 256), each
    # core's 128 keys allow R = 1: natural order, row 1 = token 1.
    kw = block_premask_call(256, 2, visible_row=1)
    np.testing.assert_allclose(outputs(kw, backend, lnc=1), [(2 + 1000) / 2], rtol=1e-6)
    np.testing.assert_allclose(outputs(kw, backend, lnc=2), [(1 + 1000) / 2], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_with_a_partial_caller_fold(backend: str) -> None:
    # Sp = 384 is not a multiple of block_len*128 = 2048: at lnc 1, R = gcd(16, 384/128 = 3) = 1,
    # natural order: row 5 = token 5.
    kw = block_premask_call(384, 16, visible_row=5)
    np.testing.assert_allclose(outputs(kw, backend, lnc=1), [(5 + 1000) / 2], rtol=1e-6)


def test_block_mask_without_whole_folds_per_core_is_refused() -> None:
    # At lnc 2 the 384 keys split over two cores: 192 each, not a multiple of 128.
    with pytest.raises(ValueError, match=r"cfg\.curr_sprior: 384 must be a multiple of 256 .* at lnc=2"):
        attention_tkg(**block_premask_call(384, 16, visible_row=5), backend="reference", lnc=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_values_and_bf16_output(backend: str) -> None:
    kw = flat_window_call([2, 2], None)
    vp = np.zeros((1, 1, SP, D), np.float32)
    vp[0, 0, 0], vp[0, 0, 1] = 1.0625, 300.0  # fp8: 1.0625 is a tie -> 1.0 (even); 300 saturates to 240
    kw["v_prior"] = to_fp8(vp)
    kw["k_prior"] = kw["k_prior"].astype(FP8)
    kw["k_active"], kw["v_active"] = kw["k_active"].astype(FP8), to_fp8(np.full((1, 1, 2, D), 2.0, np.float32))
    kw["q"] = kw["q"].astype(BF16)
    out, _ = attention_tkg(**kw, backend=backend)
    assert out.dtype == BF16
    got = np.asarray(out, np.float32)[0, 0, 0]
    # Query 0: keys {0, 1} and active 0: (1 + 240 + 2) / 3 = 81 exactly; query 1 adds active 1:
    # (1 + 240 + 2 + 2) / 4 = 61.25 (both exact in bf16).
    np.testing.assert_array_equal(got, [81.0, 61.25])
