"""The `cpu` backend's native partial calls (context parallelism): lse and attend-only (`q_start`)
on every ISA variant this CPU runs, against the naive oracle (`support.oracle.naive_partial_decode`).

Cases cover S = 1 and 4, sliding windows, sinks (a dominant one and a -inf one), fp8 pools with
scales, bf16 queries answered in float32, the AVX-512-BF16 fast path (d = 64/128, bf16 and fp8
pools) and the natural-order rows (d = 48), ragged lengths, empty segments and windows that end
before a segment (lse -inf, out 0), and forced key splits (nsplit) whose merge must give the exact
lse. The `native_only` fixture makes `cpu_torch` refuse, so a silent fallback fails the test, and
counts the native launches.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from support.nki_cases import TOLERANCE
from support.oracle import naive_partial_decode

from tkg.dtypes import BF16, FP8, to_fp8
from tkg.kernel.backends import cpu, cpu_torch
from tkg.kernel.kv_store import HostKVStore, KVGeometry
from tkg.kernel.paged import PagedArgs, check_paged_args, partial_decoder

pytestmark = pytest.mark.skipif(cpu.NATIVE_ERROR is not None, reason=f"native kernel not built: {cpu.NATIVE_ERROR}")

VARIANTS = cpu.native_variants()
DT = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": BF16, "fp8": FP8}
LSE_ATOL = 1e-4  # lse is a sum of fp32 exponentials then one log: well inside this for O(1..30) values


@pytest.fixture
def native_only(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`cpu_torch` raises when called; returns the list the native launches append to."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the partial call fell back to cpu_torch")

    monkeypatch.setattr(cpu_torch, "paged_decode_partial", refuse)
    monkeypatch.setattr(cpu_torch, "paged_decode", refuse)
    launches: list[int] = []
    real = cpu._attend

    def counted(**kw: Any) -> int:
        launches.append(1)
        return real(**kw)

    monkeypatch.setattr(cpu, "_attend", counted)
    return launches


# (kv pool, q dtype, d, block len, G, S, window, sinks on the step, lengths). The first length of a
# step is S (only its new tokens); the attend-only form of a case empties it (an empty segment).
CASES = {
    "fp32-d64": ("fp32", "fp32", 64, 16, 2, 1, None, True, [1, 70, 200]),
    "bf16-fast-d128": ("bf16", "bf16", 128, 16, 4, 4, 50, True, [4, 129, 300]),
    "fp8-fast-d64": ("fp8", "bf16", 64, 32, 2, 4, None, False, [4, 95, 260]),
    "fp8-f32q-d48": ("fp8", "fp32", 48, 8, 2, 1, 20, True, [1, 33, 150]),
    "bf16-d48": ("bf16", "bf16", 48, 8, 3, 2, None, False, [2, 64, 97]),
    "fp16-d32": ("fp16", "fp16", 32, 16, 2, 4, 10, True, [4, 31, 180]),
}
HKV, SCALE = 2, 0.25


def _pools(rng: np.random.Generator, kv: str, lens: list[int], d: int, BL: int) -> dict[str, Any]:
    """K/V pools (fp8: value / scale) with shuffled tables; every slot no sequence owns holds NaN
    (never read: a leak shows in the output), and the true fp64 K/V `[L, Hkv, d]` per sequence."""
    ks, vs = (0.5, 2.0) if kv == "fp8" else (1.0, 1.0)
    width = max(1, max(-(-L // BL) for L in lens))
    NB = len(lens) * width + 3
    pools = []
    for s in (ks, vs):
        x = rng.standard_normal((HKV, NB, BL, d)).astype(np.float32)
        pools.append(to_fp8(x / s) if kv == "fp8" else x.astype(DT[kv]))
    tables = rng.permutation(NB)[: len(lens) * width].reshape(len(lens), width).astype(np.int32)
    owned = np.zeros((NB, BL), bool)
    true_k, true_v = [], []
    for b, L in enumerate(lens):
        j = np.arange(L)
        owned[tables[b, j // BL], j % BL] = True
        true_k.append(ks * pools[0][:, tables[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
        true_v.append(vs * pools[1][:, tables[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
    for pool in pools:
        if kv == "fp8":
            pool.view(np.uint8)[:, ~owned] = 0x7F  # e4m3 NaN
        else:
            pool[:, ~owned] = np.nan
    return {"K": pools[0], "V": pools[1], "tables": tables, "ks": ks, "vs": vs, "true_k": true_k, "true_v": true_v}


@functools.cache
def _case(name: str, attend_only: bool) -> dict[str, Any]:
    """A case's inputs and the oracle's answers (built once, shared by every variant and nsplit)."""
    kv, qd, d, BL, G, S, window, with_sinks, lens = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name) * 2 + attend_only)
    lens = list(lens)
    q_start = None
    sinks = None
    if attend_only:
        lens[0] = 0
        # an empty segment; queries just past the end; queries a window (or 7) past the end
        q_start = np.array([5, lens[1] + 2, lens[2] + (window or 7)], np.int64)
    elif with_sinks:
        sinks = (rng.standard_normal(HKV * G) * 2).astype(np.float32)
        sinks[0], sinks[-1] = 30.0, -np.inf  # a sink that dominates every logit, and no sink
    c = _pools(rng, kv, lens, d, BL)
    q = rng.standard_normal((len(lens), HKV * G, S, d)).astype(np.float32).astype(DT[qd])
    want = [
        naive_partial_decode(q[b], c["true_k"][b], c["true_v"][b], SCALE,
                             None if q_start is None else int(q_start[b]), window, sinks)
        for b in range(len(lens))
    ]  # fmt: skip
    return {**c, "q": q, "lens": np.array(lens, np.int32), "window": window, "sinks": sinks, "q_start": q_start,
            "want": want, "tol": TOLERANCE["fp32" if qd == "fp32" else "bf16"]}  # fmt: skip


def _args(c: dict[str, Any], out_dtype: Any = np.float32) -> PagedArgs:
    q = c["q"]
    lse = np.full(q.shape[:3], np.nan, np.float32)
    out = np.full(q.shape, np.nan, out_dtype)
    return check_paged_args(q, c["K"], c["V"], c["tables"], c["lens"], SCALE, c["window"], c["sinks"], out,
                            c["ks"], c["vs"], lse=lse, q_start=c["q_start"])  # fmt: skip


def _check(args: PagedArgs, c: dict[str, Any]) -> None:
    assert args.lse is not None
    rtol, atol = c["tol"]
    for b, (wo, wl) in enumerate(c["want"]):
        lse, out = args.lse[b], args.out[b].astype(np.float32)
        assert np.array_equal(np.isneginf(lse), np.isneginf(wl)), (b, lse, wl)
        fin = np.isfinite(wl)
        np.testing.assert_allclose(lse[fin], wl[fin], rtol=0, atol=LSE_ATOL, err_msg=f"lse of sequence {b}")
        assert np.all(out[~fin] == 0), f"sequence {b}: a query that saw nothing must answer 0"
        np.testing.assert_allclose(out, wo, rtol=rtol, atol=atol * max(1.0, float(np.abs(wo).max())),
                                   err_msg=f"out of sequence {b}")  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("attend_only", [False, True], ids=["step", "attend-only"])
@pytest.mark.parametrize("nsplit", [None, 1, 3, 8])
def test_variants_match_the_oracle(
    native_only: list[int], variant: str, name: str, attend_only: bool, nsplit: int | None
) -> None:
    c = _case(name, attend_only)
    args = _args(c)
    cpu.paged_decode_partial(args, variant=variant, nsplit=nsplit, native=True)
    assert native_only == [1]
    _check(args, c)
    if attend_only:  # the empty segment, and (with a window) queries a window past the end
        assert np.all(np.isneginf(args.lse[0])) and np.all(args.out[0] == 0)
        if c["window"] is not None:
            assert np.all(np.isneginf(args.lse[2])) and np.all(args.out[2] == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_splits_and_threads_give_the_same_lse(native_only: list[int], variant: str) -> None:
    c = _case("bf16-fast-d128", True)
    got = {}
    for threads in (1, 2):
        for nsplit in (1, 2, 5):
            args = _args(c)
            cpu.paged_decode_partial(args, variant=variant, threads=threads, nsplit=nsplit, native=True)
            got[threads, nsplit] = args
    for nsplit in (1, 2, 5):  # which thread ran an item does not change its math: bitwise equal
        assert np.array_equal(got[1, nsplit].lse, got[2, nsplit].lse)
        assert np.array_equal(got[1, nsplit].out, got[2, nsplit].out)
    one = got[1, 1]
    for nsplit in (2, 5):  # the split-K merge is the exact log-sum-exp rule: only the rounding moves
        np.testing.assert_allclose(got[1, nsplit].lse, one.lse, rtol=1e-6, atol=1e-6)
        # (out: the bf16 path rounds each split's weights against that split's own max)
        np.testing.assert_allclose(got[1, nsplit].out, one.out, rtol=c["tol"][0], atol=c["tol"][1])
        _check(got[1, nsplit], c)
    assert len(native_only) == 6


def test_q_dtype_out_and_strided_destinations(native_only: list[int]) -> None:
    c = _case("bf16-d48", False)
    args = _args(c, out_dtype=BF16)  # a partial call may also answer in q's dtype
    cpu.paged_decode_partial(args, native=True)
    assert args.out.dtype == BF16
    _check(args, c)
    q = c["q"]
    out = np.full((*q.shape[:3], 2 * q.shape[3]), np.nan, np.float32)[..., ::2]  # not C-contiguous
    lse = np.full((*q.shape[:3], 2), np.nan, np.float32)[..., 0]
    strided = replace(_args(c), out=out, lse=lse)
    cpu.paged_decode_partial(strided, native=True)
    _check(strided, c)
    assert len(native_only) == 2


def test_partial_decoder_and_store_reach_the_native_kernel(native_only: list[int]) -> None:
    from tkg.kernel.backends import cpu as cpu_module

    assert partial_decoder(cpu_module) is cpu_module.paged_decode_partial
    c = _case("fp32-d64", True)
    q, d = c["q"], c["q"].shape[3]
    geometry = KVGeometry(1, HKV, c["K"].shape[1], c["K"].shape[2], d, np.dtype(np.float32))
    store = HostKVStore(geometry, "cpu")
    store.k[0][...], store.v[0][...] = c["K"], c["V"]
    out, lse = store.decode(0, q, None, None, c["tables"], c["lens"], scale=SCALE, return_lse=True,
                            q_start=c["q_start"])  # fmt: skip
    assert native_only == [1]
    _check(replace(_args(c), out=out, lse=lse), c)


def test_calls_the_native_kernel_does_not_cover_run_on_cpu_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _case("fp32-d64", True)
    ran: list[str] = []
    real = cpu_torch.paged_decode_partial
    monkeypatch.setattr(cpu_torch, "paged_decode_partial", lambda a: (ran.append("torch"), real(a))[1])
    wide = np.zeros((*c["K"].shape[:3], 2 * c["K"].shape[3]), np.float32)
    wide[..., ::2], wide[..., 1::2] = c["K"], c["V"]
    args = replace(_args(c), k_cache=wide[..., ::2], v_cache=wide[..., 1::2])  # strided pools
    assert not cpu.paged_native_ok(args)
    with pytest.raises(ValueError, match="native"):
        cpu.paged_decode_partial(args, native=True)
    cpu.paged_decode_partial(args)
    assert ran == ["torch"]
    _check(args, c)
