"""Partial paged decode (context parallelism): lse and attend-only on the backends we own
(`reference`, `cpu` through `cpu_torch`) against the naive oracle, with windows, sinks, fp8 scales,
S = 1 and 4; the backends without a partial decoder refuse. Our NKI kernel's partial mode on the
emulator: tests/test_nki_partial.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from support.oracle import naive_partial_decode

from tkg.dtypes import FP8, to_fp8
from tkg.kernel import backends
from tkg.kernel.kv_store import HostKVStore, KVGeometry
from tkg.kernel.paged import check_paged_args, partial_decoder, run_paged

HQ, HKV, D, BL, NB = 4, 2, 16, 8, 40
OWN = ["reference", "cpu"]


def _case(rng: np.random.Generator, lens: list[int], fp8: bool) -> dict[str, Any]:
    """Pools with random K/V (fp8: stored / scale), shuffled block tables, the true K/V per sequence."""
    ks, vs = (0.5, 2.0) if fp8 else (1.0, 1.0)
    K = rng.standard_normal((HKV, NB, BL, D)).astype(np.float32)
    V = rng.standard_normal((HKV, NB, BL, D)).astype(np.float32)
    if fp8:
        K, V = to_fp8(K / ks), to_fp8(V / vs)
    width = max(1, max(-(-L // BL) for L in lens))
    ids = rng.permutation(NB)[: len(lens) * width].reshape(len(lens), width).astype(np.int32)
    true_k, true_v = [], []
    for b, L in enumerate(lens):
        j = np.arange(L)
        true_k.append(ks * K[:, ids[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
        true_v.append(vs * V[:, ids[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
    return {"K": K, "V": V, "tables": ids, "ks": ks, "vs": vs, "true_k": true_k, "true_v": true_v}


def _run(backend: str, c: dict[str, Any], q: np.ndarray, lens: list[int], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    lse = np.empty(q.shape[:3], np.float32)
    args = check_paged_args(
        q, c["K"], c["V"], c["tables"], np.array(lens, np.int32), 0.3, kw.get("window"), kw.get("sinks"),
        None, c["ks"], c["vs"], lse=lse, q_start=kw.get("q_start"),
    )  # fmt: skip
    run_paged(backends.load(backend), backend, args)
    assert args.out.dtype == np.float32
    return args.out, lse


def _check(out: np.ndarray, lse: np.ndarray, want: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for b, (wo, wl) in enumerate(want):
        np.testing.assert_allclose(out[b], wo, atol=2e-5 * max(1.0, float(np.abs(wo).max())), rtol=0)
        assert np.array_equal(np.isneginf(lse[b]), np.isneginf(wl)), (lse[b], wl)
        fin = np.isfinite(wl)
        np.testing.assert_allclose(lse[b][fin], wl[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", OWN)
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_lse_of_a_normal_step(backend: str, S: int, window: int | None, sinks: bool, fp8: bool) -> None:
    rng = np.random.default_rng(S * 7 + (window or 0) + 3 * sinks + 5 * fp8)
    lens = [S, 13, 30]
    c = _case(rng, lens, fp8)
    q = rng.standard_normal((len(lens), HQ, S, D)).astype(np.float32)
    sk = rng.standard_normal(HQ).astype(np.float32) if sinks else None
    out, lse = _run(backend, c, q, lens, window=window, sinks=sk)
    want = [naive_partial_decode(q[b], c["true_k"][b], c["true_v"][b], 0.3, None, window, sk) for b in range(3)]
    _check(out, lse, want)


@pytest.mark.parametrize("backend", OWN)
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("window", [None, 6, 20])
@pytest.mark.parametrize("fp8", [False, True])
def test_attend_only_sees_every_cached_key_within_the_window(
    backend: str, S: int, window: int | None, fp8: bool
) -> None:
    rng = np.random.default_rng(S + (window or 0) + 11 * fp8)
    lens = [0, 5, 16, 27]
    c = _case(rng, lens, fp8)
    q = rng.standard_normal((len(lens), HQ, S, D)).astype(np.float32)
    q_start = np.array([3, 5, 19, 40], np.int64)  # at the end, a little past it, far past it
    out, lse = _run(backend, c, q, lens, window=window, q_start=q_start)
    want = [
        naive_partial_decode(q[b], c["true_k"][b].reshape(-1, HKV, D), c["true_v"][b].reshape(-1, HKV, D), 0.3,
                             int(q_start[b]), window)
        for b in range(len(lens))
    ]  # fmt: skip
    _check(out, lse, want)
    if window == 6:  # the last sequence's queries sit 13.. past its end: nothing seen
        assert np.all(np.isneginf(lse[3])) and np.all(out[3] == 0)
    assert np.all(np.isneginf(lse[0])) and np.all(out[0] == 0)  # an empty segment


@pytest.mark.parametrize("backend", OWN)
def test_attend_only_with_bf16_queries_answers_float32(backend: str) -> None:
    from tkg.dtypes import BF16

    rng = np.random.default_rng(5)
    lens = [12]
    c = _case(rng, lens, False)
    c["K"], c["V"] = c["K"].astype(BF16), c["V"].astype(BF16)
    q = rng.standard_normal((1, HQ, 2, D)).astype(BF16)
    out, lse = _run(backend, c, q, lens, q_start=np.array([12]))
    tk = c["K"][:, c["tables"][0, np.arange(12) // BL], np.arange(12) % BL].astype(np.float64).transpose(1, 0, 2)
    tv = c["V"][:, c["tables"][0, np.arange(12) // BL], np.arange(12) % BL].astype(np.float64).transpose(1, 0, 2)
    _check(out, lse, [naive_partial_decode(q[0], tk, tv, 0.3, 12)])


def test_attend_only_refuses_sinks_and_queries_before_the_end() -> None:
    rng = np.random.default_rng(0)
    c = _case(rng, [8], False)
    q = np.zeros((1, HQ, 1, D), np.float32)
    with pytest.raises(ValueError, match="sinks"):
        check_paged_args(q, c["K"], c["V"], c["tables"], np.array([8]), 1.0, sinks=np.zeros(HQ), q_start=np.array([8]))
    with pytest.raises(ValueError, match="q_start"):
        check_paged_args(q, c["K"], c["V"], c["tables"], np.array([8]), 1.0, q_start=np.array([7]))


def test_backends_without_a_partial_decoder_refuse() -> None:
    fake = type("Fake", (), {"NAME": "fake", "run": staticmethod(lambda call: None)})()
    assert partial_decoder(fake) is None
    rng = np.random.default_rng(0)
    c = _case(rng, [8], False)
    q = np.zeros((1, HQ, 1, D), np.float32)
    args = check_paged_args(q, c["K"], c["V"], c["tables"], np.array([8]), 1.0, q_start=np.array([8]))
    with pytest.raises(ValueError, match="backend fake does not support"):
        run_paged(fake, "fake", args)


def test_a_partial_call_gets_the_stores_backend_options() -> None:
    """The store's options (the cpu backend's `max_threads`, the server's cap on a launch) reach a
    partial call as they reach a whole one: a partial step must not take every core."""
    got: dict[str, dict[str, object]] = {}
    fake = type("Fake", (), {
        "NAME": "fake",
        "paged_decode": staticmethod(lambda args, **opts: got.update(whole=opts)),
        "paged_decode_partial": staticmethod(lambda args, **opts: got.update(partial=opts)),
    })()  # fmt: skip
    c = _case(np.random.default_rng(0), [8], False)
    q = np.zeros((1, HQ, 1, D), np.float32)
    partial = check_paged_args(q, c["K"], c["V"], c["tables"], np.array([8]), 1.0, q_start=np.array([8]))
    whole = check_paged_args(q, c["K"], c["V"], c["tables"], np.array([8]), 1.0)
    run_paged(fake, "fake", partial, max_threads=1)
    run_paged(fake, "fake", whole, max_threads=1)
    assert got == {"partial": {"max_threads": 1}, "whole": {"max_threads": 1}}


def test_store_reports_and_returns_partials() -> None:
    g = KVGeometry(1, HKV, 4, BL, D, np.dtype(np.float32))
    store = HostKVStore(g, "reference")
    assert store.supports_partial
    store.k[0][...] = 1.0
    store.v[0][...] = 2.0
    q = np.zeros((1, HQ, 1, D), np.float32)
    out, lse = store.decode(0, q, None, None, np.array([[0]], np.int32), np.array([3], np.int32),
                            scale=1.0, return_lse=True, q_start=np.array([3]))  # fmt: skip
    np.testing.assert_allclose(out, 2.0)
    np.testing.assert_allclose(lse, np.log(3.0), rtol=1e-6)  # three logits of 0
    assert HostKVStore(KVGeometry(1, HKV, 4, BL, D, np.dtype(FP8), np.dtype(np.float32)), "cpu").supports_partial


@pytest.mark.parametrize(("module", "has"), [("nki_emu", True), ("nki", True), ("nkilib_emu", False)])
def test_our_nki_kernel_has_a_partial_decoder_and_nki_library_s_has_none(module: str, has: bool) -> None:
    """Our kernel's lse / attend-only (tests/test_nki_partial.py); nki-library's kernel has no lse output."""
    import importlib

    assert (partial_decoder(importlib.import_module(f"tkg.kernel.backends.{module}")) is not None) == has
