"""FP8 (float8_e4m3, Trainium's e4m3: bias 7, inf/NaN, largest finite 240) K/V on every backend.

- `to_fp8`: rounding to nearest, saturation beyond +-240, NaN kept.
- The native cpu kernel decodes every one of the 256 bit patterns exactly, on every ISA variant.
- Hypothesis over the feature matrix (tests/support/strategies.py) with q/K/V (or K/V only) in fp8: the
  reference against the naive float64 loops, the cpu backend (native and torch) against the
  reference; the output comes back in bf16.
- `paged_decode` over fp8 pools with k_scale / v_scale (the pools hold value/scale) against the
  naive per-token loop that multiplies every cached key and value by its scale.
- The NKI kernel on the emulator with fp8 caches (flat and block, lnc 1 and 2) against the reference.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.nki_cases import Case, build_case, cfg
from support.oracle import naive_attention, naive_paged_decode
from support.strategies import RTOL_VS_NAIVE, RTOL_VS_REFERENCE, KernelCase, Result, assert_close, kernel_cases, to_f64

from tkg.dtypes import BF16, FP8, FP8_MAX, to_fp8
from tkg.kernel import attention_tkg, available, paged_decode
from tkg.kernel.backends import cpu

HOST_BACKENDS = [name for name in available() if not name.startswith("nki")]


def test_to_fp8_rounds_and_saturates() -> None:
    x = np.array([0.0, 1.0, 1.0625, 1.1875, 239.0, 240.0, 250.0, 1e6, -1e6, -300.0, np.nan], np.float32)
    got = to_fp8(x)
    assert got.dtype == FP8
    # 1.0625 is a tie between 1.0 and 1.125: to even (1.0); 1.1875 -> 1.25 (nearest).
    want = [0.0, 1.0, 1.0, 1.25, 240.0, 240.0, 240.0, 240.0, -240.0, -240.0, np.nan]
    np.testing.assert_array_equal(got.astype(np.float32), np.array(want, np.float32))
    assert float(FP8_MAX) == float(ml_dtypes.finfo(FP8).max)


@pytest.mark.skipif(not cpu.native_variants(), reason="the native cpu kernel is not built")
@pytest.mark.parametrize("variant", cpu.native_variants() or ["none"])
def test_native_decodes_every_fp8_pattern(variant: str) -> None:
    """One visible key whose value row holds all 256 patterns: out = v_scale * V exactly (p = 1)."""
    patterns = np.arange(256, dtype=np.uint8).view(FP8)
    k = np.zeros((1, 1, 4, 256), FP8)
    v = np.zeros((1, 1, 4, 256), FP8)
    v[0, 0, 0] = patterns
    q = np.ones((1, 1, 1, 256), np.float32)
    out = paged_decode(q, k, v, np.zeros((1, 1), np.int32), np.array([1], np.int32), scale=1.0, v_scale=0.5,
                       backend="cpu", variant=variant)  # fmt: skip
    np.testing.assert_array_equal(out[0, 0, 0], patterns.astype(np.float32) * np.float32(0.5))


@pytest.mark.skipif(not cpu.native_variants(), reason="the native cpu kernel is not built")
@pytest.mark.parametrize("variant", cpu.native_variants() or ["none"])
def test_native_decodes_every_fp8_key(variant: str) -> None:
    """Keys: 256 bf16 q heads, head h one-hot at column h, against key 0 = every finite pattern (the
    16 inf/NaN ones are zeroed: 0 * NaN would poison every head) and key 1 = zeros, values e0 and
    e1: out[h, 0] = sigmoid(K0[h] / 16). (Non-finite decoding is covered through V above.)"""
    patterns = np.arange(256, dtype=np.uint8).view(FP8)
    patterns = np.where(np.isfinite(patterns.astype(np.float32)), patterns, np.zeros(1, FP8))
    k = np.zeros((1, 1, 4, 256), FP8)
    v = np.zeros((1, 1, 4, 256), FP8)
    k[0, 0, 0] = patterns
    v[0, 0, 0, 0] = 1.0
    v[0, 0, 1, 1] = 1.0
    q = np.eye(256, dtype=np.float32).astype(BF16)[None, :, None, :]  # [1, 256, 1, 256]
    out = paged_decode(q, k, v, np.zeros((1, 1), np.int32), np.array([2], np.int32), scale=1 / 16,
                       backend="cpu", variant=variant)  # fmt: skip
    want = 1.0 / (1.0 + np.exp(-patterns.astype(np.float64) / 16))
    np.testing.assert_allclose(out[0, :, 0, 0].astype(np.float64), want, rtol=8e-3, atol=1e-6)


def as_fp8(case: KernelCase, q_too: bool) -> KernelCase:
    """The case with K/V (and q) rounded to fp8; its output dtype stays bf16."""
    names = ["k_active", "v_active", "k_prior", "v_prior"] + (["q"] if q_too else [])
    args = dict(case.args)
    for n in names:
        args[n] = to_fp8(np.asarray(args[n], np.float32) * 4)  # spread over fp8's exponents
    return dataclasses.replace(case, args=args, notes=[*case.notes, "fp8-q" if q_too else "fp8-kv"])


def call(case: KernelCase, backend: str, **options: object) -> Result:
    out, k_out = attention_tkg(**{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in case.args.items()},
                               cfg=case.cfg, out=None, backend=backend, **options)  # fmt: skip
    assert out.dtype == BF16
    return Result(to_f64(out), None if k_out is None else to_f64(k_out), None)


fp8_cases = st.builds(
    as_fp8, kernel_cases(dtypes=("bf16",), call_variants=False, garbage=False), q_too=st.booleans()
)


@settings(max_examples=40)
@given(case=fp8_cases)
def test_reference_matches_naive_fp8(case: KernelCase) -> None:
    nv = naive_attention(case.cfg, case.args)
    got = call(case, "reference")
    assert_close(got.out, nv["out"], RTOL_VS_NAIVE["bf16"], "out")


@pytest.mark.parametrize("native", [None, False], ids=["native-where-covered", "torch"])
@settings(max_examples=40)
@given(case=fp8_cases)
def test_cpu_matches_reference_fp8(native: bool | None, case: KernelCase) -> None:
    want = call(case, "reference")
    got = call(case, "cpu", native=native)
    assert_close(got.out, want.out, RTOL_VS_REFERENCE["bf16"], "out")
    if want.k_out is not None:
        assert_close(got.k_out, want.k_out, RTOL_VS_REFERENCE["bf16"], "k_out")


@st.composite
def fp8_paged(draw: st.DrawFn) -> dict:
    B, S, Hkv, G = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d, BL = draw(st.sampled_from([32, 64])), draw(st.sampled_from([4, 16]))
    lens = np.array(draw(st.lists(st.integers(S, 50), min_size=B, max_size=B)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    used = -(-lens // BL)
    NB = int(used.sum()) + 1
    ids = rng.permutation(NB)
    tables = np.zeros((B, int(used.max())), np.int32)
    at = 0
    for b in range(B):
        tables[b, : used[b]] = ids[at : at + used[b]]
        at += used[b]
    k_scale = draw(st.sampled_from([1.0, 0.05, 3.0]))
    v_scale = draw(st.sampled_from([1.0, 0.02, 2.5]))
    # The pools hold value / scale in fp8 (saturating), as the service appends them.
    kc = to_fp8(rng.standard_normal((Hkv, NB, BL, d)) / k_scale)
    vc = to_fp8(rng.standard_normal((Hkv, NB, BL, d)) / v_scale)
    q = rng.standard_normal((B, Hkv * G, S, d)).astype(np.float32).astype(BF16)
    window = draw(st.one_of(st.none(), st.integers(S, 30)))
    sinks = rng.standard_normal(Hkv * G).astype(np.float32) if draw(st.booleans()) else None
    return dict(q=q, k_cache=kc, v_cache=vc, block_tables=tables, seq_lens=lens, scale=d**-0.5, window=window,
                sinks=sinks, k_scale=k_scale, v_scale=v_scale)  # fmt: skip


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=25)
@given(pc=fp8_paged())
def test_paged_decode_fp8_with_scales(backend: str, pc: dict) -> None:
    got = paged_decode(**pc, backend=backend)
    assert got.dtype == BF16
    want = naive_paged_decode(**pc)
    assert_close(got.astype(np.float64), want, RTOL_VS_REFERENCE["bf16"], "paged out")


def _nki_emu_ready() -> bool:
    return "nki-emu" in available()


@pytest.mark.skipif(not _nki_emu_ready(), reason="the NKI emulator backend is not available")
@pytest.mark.parametrize(
    ("case", "lnc", "q_too"),
    [
        (Case("fp8-flat", cfg(tp_k_prior=True, strided_mm1=False)), 1, True),
        (Case("fp8-block-premask", cfg(block_len=4, curr_sprior=512)), 2, False),
        (Case("fp8-block-pos-window", cfg(block_len=16, use_pos_id=True), window=40, sink=True), 2, True),
    ],
    ids=["flat-lnc1-fp8q", "block-premask-lnc2", "block-pos-id-lnc2-fp8q"],
)
def test_nki_emu_fp8_matches_reference(case: Case, lnc: int, q_too: bool) -> None:
    args = build_case(case)
    for n in ["k_active", "v_active", "k_prior", "v_prior"] + (["q"] if q_too else []):
        args[n] = to_fp8(np.asarray(args[n], np.float32) * 4)
    if not q_too:
        args["q"] = np.asarray(args["q"], np.float32).astype(BF16)  # bf16 q against fp8 tiles
    args["out"] = None
    want, _ = attention_tkg(**args, backend="reference", lnc=lnc)
    got, _ = attention_tkg(**args, backend="nki-emu", lnc=lnc)
    assert got.dtype == BF16
    assert_close(to_f64(got), to_f64(want), RTOL_VS_REFERENCE["bf16"], "out")


@pytest.mark.skipif(not _nki_emu_ready(), reason="the NKI emulator backend is not available")
@pytest.mark.parametrize("lnc", [1, 2])
def test_nki_emu_paged_fp8_with_scales(lnc: int) -> None:
    """The service's NKI path (one folded launch) over fp8 pools holding value / scale."""
    rng = np.random.default_rng(lnc)
    B, Hkv, G, S, d, BL, NB = 2, 2, 2, 2, 64, 16, 12
    lens = np.array([20, 37])
    tables = np.array([[0, 1, 2, 0], [3, 4, 5, 6]], np.int32)
    kc = to_fp8(rng.standard_normal((Hkv, NB, BL, d)) / 0.5)
    vc = to_fp8(rng.standard_normal((Hkv, NB, BL, d)) / 2.0)
    q = rng.standard_normal((B, Hkv * G, S, d)).astype(np.float32).astype(BF16)
    got = paged_decode(q, kc, vc, tables, lens, scale=d**-0.5, window=9, k_scale=0.5, v_scale=2.0,
                       backend="nki-emu", lnc=lnc)  # fmt: skip
    want = naive_paged_decode(q, kc, vc, tables, lens, d**-0.5, 9, None, 0.5, 2.0)
    assert got.dtype == BF16
    assert_close(got.astype(np.float64), want, RTOL_VS_REFERENCE["bf16"], "paged out")
