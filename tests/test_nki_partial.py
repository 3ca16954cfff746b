"""Context parallelism on our NKI kernel (issue #20): its lse output and attend-only mode, run on
the NumPy NKI emulator (backend `nki-emu`) against the naive oracle (`naive_partial_decode`).

- the kernel through `paged_decode_partial` (host pools): S = 1 and 4, windows, sinks, bf16, fp8
  KV, an empty segment (-inf / 0), attend-only, LNC 1 and 2 (both sharding modes: rows split,
  keys split with a query that sees nothing on either core);
- the host-side decisions as pure functions (`partial_kind`, `query_windows`, `launch_kinds`,
  `core_holds_active`);
- the device store (`DeviceKVStore` on the emulator's HBM): partial launches against the host
  store, warm-up covering them, and a device whose kernel has no partial mode refusing them;
- the service over nki-emu: a sequence split into segments (tail: return_lse, others:
  attend_only), merged, equals the unsplit sequence's Decode.

Shapes are tiny (the emulator runs a Python call per instruction); one sequence past 8192 keys
per core checks lse over several flash tiles (under a second each: nothing here needs a
TKG_*_ALL switch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.oracle import naive_partial_decode
from support.service import FakeContext, make_service

from tkg import codec
from tkg.dtypes import BF16, to_fp8
from tkg.kernel import backends
from tkg.kernel.backends import nki_host
from tkg.kernel.kv_store import HostKVStore, KVGeometry, LayerVariant, create_kv_store
from tkg.kernel.paged import check_paged_args, partial_decoder, run_paged

EMU_REASON = backends.unavailable_reason("nki-emu")
needs_emu = pytest.mark.skipif(EMU_REASON is not None, reason=f"nki-emu unavailable: {EMU_REASON}")

HQ, D, BL, NB = 4, 16, 8, 72


# ---- the kernel on the emulator against the oracle ------------------------------------------------


def _case(rng: np.random.Generator, lens: list[int], hkv: int, kv: str, nb: int = NB) -> dict[str, Any]:
    """Pools (`kv`: float32, bfloat16, or fp8 holding value / scale), shuffled block tables, and the
    true K/V `[T, Hkv, d]` of each sequence in float64."""
    ks, vs = (0.5, 2.0) if kv == "fp8" else (1.0, 1.0)
    K = rng.standard_normal((hkv, nb, BL, D)).astype(np.float32)
    V = rng.standard_normal((hkv, nb, BL, D)).astype(np.float32)
    if kv == "fp8":
        K, V = to_fp8(K / ks), to_fp8(V / vs)
    elif kv == "bf16":
        K, V = K.astype(BF16), V.astype(BF16)
    width = max(1, max(-(-L // BL) for L in lens))
    ids = rng.permutation(nb)[: len(lens) * width].reshape(len(lens), width).astype(np.int32)
    true_k, true_v = [], []
    for b, L in enumerate(lens):
        j = np.arange(L)
        true_k.append(ks * K[:, ids[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
        true_v.append(vs * V[:, ids[b, j // BL], j % BL].astype(np.float64).transpose(1, 0, 2))
    return {"K": K, "V": V, "tables": ids, "ks": ks, "vs": vs, "true_k": true_k, "true_v": true_v}


def _run(c: dict[str, Any], q: np.ndarray, lens: list[int], lnc: int = 1, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    lse = np.empty(q.shape[:3], np.float32)
    args = check_paged_args(
        q, c["K"], c["V"], c["tables"], np.array(lens, np.int32), 0.3, kw.get("window"), kw.get("sinks"),
        None, c["ks"], c["vs"], lse=lse, q_start=kw.get("q_start"),
    )  # fmt: skip
    backends.load("nki-emu").paged_decode_partial(args, lnc=lnc)
    assert args.out.dtype == np.float32
    return args.out, lse


def _want(c: dict[str, Any], q: np.ndarray, lens: list[int], **kw: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    starts = kw.get("q_start")
    return [
        naive_partial_decode(q[b], c["true_k"][b], c["true_v"][b], 0.3, None if starts is None else int(starts[b]),
                             kw.get("window"), kw.get("sinks"))
        for b in range(len(lens))
    ]  # fmt: skip


def _check(out: np.ndarray, lse: np.ndarray, want: list[tuple[np.ndarray, np.ndarray]], tol: float = 2e-5) -> None:
    for b, (wo, wl) in enumerate(want):
        np.testing.assert_allclose(out[b], wo, atol=tol * max(1.0, float(np.abs(wo).max())), rtol=0, err_msg=f"b={b}")
        assert np.array_equal(np.isneginf(lse[b]), np.isneginf(wl)), (b, lse[b], wl)
        fin = np.isfinite(wl)
        np.testing.assert_allclose(lse[b][fin], wl[fin], rtol=tol, atol=tol, err_msg=f"lse b={b}")


@needs_emu
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize(("window", "sinks"), [(None, False), (6, False), (None, True), (6, True)])
def test_lse_of_a_decode_step_matches_the_oracle(S: int, window: int | None, sinks: bool) -> None:
    rng = np.random.default_rng(S * 7 + (window or 0) + 3 * sinks)
    lens = [S, 13, 30]
    c = _case(rng, lens, 2, "f32")
    q = rng.standard_normal((len(lens), HQ, S, D)).astype(np.float32)
    sk = rng.standard_normal(HQ).astype(np.float32) if sinks else None
    out, lse = _run(c, q, lens, window=window, sinks=sk)
    _check(out, lse, _want(c, q, lens, window=window, sinks=sk))


@needs_emu
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("window", [None, 6, 20])
def test_attend_only_sees_every_cached_key_within_the_window(S: int, window: int | None) -> None:
    rng = np.random.default_rng(S + (window or 0))
    lens = [0, 5, 16, 27]
    c = _case(rng, lens, 2, "f32")
    q = rng.standard_normal((len(lens), HQ, S, D)).astype(np.float32)
    q_start = np.array([3, 5, 19, 40], np.int64)  # at the end, a little past it, far past it
    out, lse = _run(c, q, lens, window=window, q_start=q_start)
    _check(out, lse, _want(c, q, lens, window=window, q_start=q_start))
    assert np.all(np.isneginf(lse[0])) and np.all(out[0] == 0)  # an empty segment
    if window == 6:  # the last sequence's queries sit 13.. past its end: nothing seen
        assert np.all(np.isneginf(lse[3])) and np.all(out[3] == 0)


@needs_emu
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("attend", [False, True])
def test_bf16_queries_and_bf16_or_fp8_caches(kv: str, attend: bool) -> None:
    """bf16 I/O: P goes to MM2 in bf16 (the tolerance is bf16's), out and lse stay float32."""
    rng = np.random.default_rng(11 + attend)
    lens = [9, 22]
    c = _case(rng, lens, 2, kv)
    q = rng.standard_normal((len(lens), HQ, 2, D)).astype(BF16)
    kw: dict[str, Any] = {"q_start": np.array([9, 25])} if attend else {"window": 12}
    out, lse = _run(c, q, lens, **kw)
    _check(out, lse, _want(c, q, lens, **kw), tol=2e-2)


@needs_emu
@pytest.mark.parametrize("attend", [False, True])
def test_lnc2_rows_split_and_keys_split(attend: bool) -> None:
    """LNC 2: four rows (2 sequences x 2 kv heads) split by rows; one kv head and a context of
    256 keys split the keys across the cores (merged with sendrecv; the sink in the lse once),
    where one attend-only query sees nothing on either core and must come out 0 / -inf, not 0 * inf."""
    rng = np.random.default_rng(4)
    lens = [40, 150]
    sinks = rng.standard_normal(HQ).astype(np.float32)  # counted once, on the first core
    kw: dict[str, Any] = {"q_start": np.array([41, 200]), "window": 50} if attend else {"window": 100, "sinks": sinks}
    for hkv in (2, 1):
        c = _case(rng, lens, hkv, "f32")
        q = rng.standard_normal((len(lens) if hkv == 2 else 1, HQ, 2, D)).astype(np.float32)
        ls = lens if hkv == 2 else lens[1:]
        if hkv == 1:
            c["tables"], c["true_k"], c["true_v"] = c["tables"][1:], c["true_k"][1:], c["true_v"][1:]
        args = {k: (v if k != "q_start" or hkv == 2 else v[1:]) for k, v in kw.items()}
        out, lse = _run(c, q, ls, lnc=2, **args)
        want = _want(c, q, ls, **args)
        _check(out, lse, want)
        if attend and hkv == 1:  # key index 200 and 201, window 50: keys 151.. of a 150-key segment
            assert np.all(np.isneginf(lse)) and np.all(out == 0)


@needs_emu
def test_per_kv_head_sinks_launch_once_per_kv_head() -> None:
    rng = np.random.default_rng(9)
    lens = [4, 17]
    c = _case(rng, lens, 2, "f32")
    q = rng.standard_normal((2, HQ, 4, D)).astype(np.float32)
    sk = rng.standard_normal(HQ).astype(np.float32)  # the kv groups' sinks differ
    out, lse = _run(c, q, lens, sinks=sk)
    _check(out, lse, _want(c, q, lens, sinks=sk))


@needs_emu
@pytest.mark.parametrize("attend", [False, True])
@pytest.mark.parametrize("lnc", [1, 2])
def test_flash_tiles_carry_the_running_max_into_lse(attend: bool, lnc: int) -> None:
    """Past 8192 keys per core the keys go in several flash tiles: lse must take the running max
    and the rescaled sum of all of them (and, at LNC 2, of both cores' halves)."""
    rng = np.random.default_rng(21)
    lens = [9000 * lnc]
    c = _case(rng, lens, 1, "f32", nb=9216 * lnc // BL)
    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
    kw: dict[str, Any] = {"q_start": np.array(lens)} if attend else {}
    out, lse = _run(c, q, lens, lnc=lnc, **kw)
    _check(out, lse, _want(c, q, lens, **kw))


@needs_emu
def test_the_backends_have_a_partial_decoder_and_paged_decode_runs_it() -> None:
    """`paged_decode`'s dispatch (`run_paged`) finds nki-emu's partial decoder; nki's exists too."""
    from tkg.kernel.backends import nki

    assert partial_decoder(backends.load("nki-emu")) is not None
    assert nki.paged_decode_partial is not None
    rng = np.random.default_rng(1)
    c = _case(rng, [12], 2, "f32")
    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
    args = check_paged_args(q, c["K"], c["V"], c["tables"], np.array([12]), 0.3, q_start=np.array([12]))
    run_paged(backends.load("nki-emu"), "nki-emu", args)
    (want, _), = _want(c, q, [12], q_start=np.array([12]))
    np.testing.assert_allclose(args.out[0], want, atol=2e-5)


@needs_emu
def test_float32_queries_over_an_fp8_cache_are_refused_naming_q() -> None:
    rng = np.random.default_rng(0)
    c = _case(rng, [8], 2, "fp8")
    q = np.zeros((1, HQ, 1, D), np.float32)
    with pytest.raises(ValueError, match=r"paged_decode: q: float32 queries with a float8_e4m3 cache"):
        _run(c, q, [8], q_start=np.array([8]))


# ---- host-side decisions -------------------------------------------------------------------------


def test_partial_kind_gives_three_specialisations() -> None:
    assert nki_host.partial_kind(False, False) == (False, False)
    assert nki_host.partial_kind(True, False) == (True, False)
    # attend-only always computes lse (one specialisation serves callers with and without it)
    assert nki_host.partial_kind(False, True) == (True, True)
    assert nki_host.partial_kind(True, True) == (True, True)


def test_query_windows_end_at_the_cached_keys_and_never_wrap() -> None:
    cached, first = np.array([10, 10, 0]), np.array([8, 30, 0])  # a decode of S=2, attend-only far past, empty
    ends, starts = nki_host.query_windows(cached, first, 2, None)
    assert ends.dtype == np.float32 and ends.tolist() == [[10, 10], [10, 10], [0, 0]]
    assert starts is None
    _, starts = nki_host.query_windows(cached, first, 2, 4)
    # query at key index t sees keys (t - 4, t]: starts t - 3, floored at 0, capped at the end
    # (a start past the end would read as a wrap-around window to the kernel)
    assert starts.tolist() == [[5, 6], [10, 10], [0, 0]]
    _, starts = nki_host.query_windows(np.array([10]), np.array([11]), 2, 4)
    assert starts.tolist() == [[8, 9]]


def test_fold_inputs_of_an_attend_only_step_sends_no_active_tokens() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, HQ, 2, D)).astype(np.float32)
    tables = np.array([[3, 4, 0], [5, 6, 7]], np.int32)
    st = nki_host.fold_inputs(
        q, None, None, tables, np.array([9, 20]), scale=1.0, window=5, heads=range(2), num_blocks=NB, block_len=BL,
        context=128, batch=2, s_active=2, q_start=np.array([12, 20]), num_kv_heads=2,
    )  # fmt: skip
    assert st.k_active is None and st.v_active is None and st.mask is None
    assert (st.return_lse, st.attend_only) == (True, True)
    assert st.positions[:, 0].tolist() == [9, 9, 20, 20]  # rows (b, kv head): each ends at its cached keys
    assert st.starts.tolist() == [[8, 9], [8, 9], [16, 17], [16, 17]]
    assert st.table[1, :2].tolist() == [3 + NB, 4 + NB]  # kv head 1 reads its half of the folded pool
    with pytest.raises(ValueError, match="num_kv_heads"):
        nki_host.fold_inputs(
            q, None, None, tables, np.array([9, 20]), scale=1.0, window=None, heads=range(2), num_blocks=NB,
            block_len=BL, context=128, batch=2, s_active=2, q_start=np.array([12, 20]),
        )  # fmt: skip


def test_launch_kinds_cover_each_variant_and_its_partial_launches() -> None:
    from tkg.kernel.backends.nki_store import launch_kinds

    plain, windowed = LayerVariant(), LayerVariant(window=True, sinks=True)
    assert launch_kinds({plain}, False) == [(False, False, "decode")]
    kinds = launch_kinds({plain, windowed}, True)
    assert kinds == [
        (False, False, "decode"), (False, False, "lse"), (False, False, "attend"),
        (True, True, "decode"), (True, True, "lse"), (True, False, "attend"),  # attend-only never has sinks
    ]  # fmt: skip
    # a layer with sinks and one without, same window: one attend-only family between them
    assert len(launch_kinds({LayerVariant(window=True), windowed}, True)) == 5


@needs_emu
def test_no_core_holds_active_tokens_in_an_attend_only_call() -> None:
    from tkg.kernel.nki_tkg import plan

    assert plan.core_holds_active(1, 2, False) and not plan.core_holds_active(0, 2, False)
    assert not plan.core_holds_active(0, 1, True) and not plan.core_holds_active(1, 2, True)
    kcfg = plan.TKGConfig(bs=1, s_active=2, curr_sprior=256, use_pos_id=True, attend_only=True)
    pl = plan.make_plan(kcfg, 1, 0)
    assert pl.partial and plan.active_runs(pl, 0, 256) == ()
    with pytest.raises(AssertionError, match="attend_only: needs use_pos_id=True"):
        plan.make_plan(plan.TKGConfig(curr_sprior=256, attend_only=True), 1, 0)


# ---- the device store ------------------------------------------------------------------------------

HKV_S = 2


def _stores(lnc: int = 1) -> tuple[Any, HostKVStore]:
    geo = KVGeometry(1, HKV_S, 40, 16, 32, np.dtype(np.float32))
    dev = create_kv_store("nki-emu", geo, max_context=256 * lnc, max_batch=2, max_s_active=2, lnc=lnc)
    return dev, HostKVStore(geo, "reference")


def _fill(stores: tuple[Any, ...], rng: np.random.Generator, tables: np.ndarray, length: int) -> None:
    for b in range(tables.shape[0]):
        k, v = (rng.standard_normal((HKV_S, length, 32)).astype(np.float32) for _ in range(2))
        for st in stores:
            st.write(0, tables[b, np.arange(length) // 16], np.arange(length) % 16, k, v)


@needs_emu
def test_device_store_partial_launches_match_the_host_store_and_were_warmed_up() -> None:
    rng = np.random.default_rng(5)
    dev, host = _stores()
    assert dev.supports_partial
    report = dev.warm_up({LayerVariant(window=True, sinks=True)}, HQ)
    # decode, decode with lse, attend-only: x 2 batch buckets x 2 s_active buckets x 1 context
    assert report.launches == report.compiled == 3 * 2 * 2
    tables = rng.permutation(40)[:2 * 16].reshape(2, 16).astype(np.int32)
    _fill((dev, host), rng, tables, 200)
    dev.sync()
    lens = np.array([150, 200], np.int32)
    q = rng.standard_normal((2, HQ, 2, 32)).astype(np.float32)
    sinks = rng.standard_normal(HQ).astype(np.float32)
    k_new = np.stack([host.k[0][:, tables[b, (lens[b] - 2 + np.arange(2)) // 16], (lens[b] - 2 + np.arange(2)) % 16]
                      for b in range(2)])  # fmt: skip
    v_new = np.stack([host.v[0][:, tables[b, (lens[b] - 2 + np.arange(2)) // 16], (lens[b] - 2 + np.arange(2)) % 16]
                      for b in range(2)])  # fmt: skip
    kw = {"scale": 0.2, "window": 30}
    got = dev.decode(0, q, k_new, v_new, tables, lens, sinks=sinks, return_lse=True, **kw)
    want = host.decode(0, q, None, None, tables, lens, sinks=sinks, return_lse=True, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    starts = np.array([150, 215])  # the second's queries at 215, 216 see keys 186.. < 200
    got = dev.decode(0, q, None, None, tables, lens, q_start=starts, return_lse=True, **kw)
    want = host.decode(0, q, None, None, tables, lens, q_start=starts, return_lse=True, **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    plain = dev.decode(0, q, None, None, tables, lens, q_start=starts, out=np.empty(q.shape, q.dtype), **kw)
    np.testing.assert_allclose(plain, want[0], rtol=1e-5, atol=1e-5)
    assert dev.compilations == report.compiled  # nothing built after warm-up
    dev.close()


@needs_emu
def test_device_store_empty_segment_and_lnc2() -> None:
    rng = np.random.default_rng(6)
    dev, host = _stores(lnc=2)
    tables = np.stack([rng.permutation(40)[:32] for _ in range(2)]).astype(np.int32)
    _fill((dev, host), rng, tables[:1], 300)
    dev.sync()
    lens = np.array([300, 0], np.int32)  # the second segment holds nothing yet
    q = rng.standard_normal((2, HQ, 1, 32)).astype(np.float32)
    got = dev.decode(0, q, None, None, tables, lens, scale=0.2, q_start=np.array([300, 7]), return_lse=True)
    want = host.decode(0, q, None, None, tables, lens, scale=0.2, q_start=np.array([300, 7]), return_lse=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-5)
    assert np.all(np.isneginf(got[1][1])) and np.all(got[0][1] == 0)
    dev.close()


def test_a_device_whose_kernel_has_no_partial_mode_refuses_partial_launches() -> None:
    pytest.importorskip("torch")
    from tkg.kernel.backends.nki_device import NeuronDevice
    from tkg.kernel.backends.nki_store import make_store

    dev = NeuronDevice("nki", lambda: dict, device="cpu", kernel=lambda lnc, args: ())  # a stand-in kernel
    assert not dev.partial and NeuronDevice("nki", lambda: dict, device="cpu").partial  # ours has the mode
    store = make_store(KVGeometry(1, 2, 8, 16, 32, np.dtype(np.float32)), dev, max_context=256, max_batch=1)
    assert not store.supports_partial
    q = np.zeros((1, HQ, 1, 32), np.float32)
    with pytest.raises(ValueError, match=r"takes no partial launches .*expected return_lse=False, q_start=None"):
        store.decode(0, q, None, None, np.zeros((1, 1), np.int32), np.array([4]), scale=1.0, q_start=np.array([4]))
    store.close()


@needs_emu
def test_a_store_made_without_partial_launches_warms_up_decodes_only_and_refuses_them() -> None:
    """`partial=False` (what a NeuronCore's store defaults to: 3x the compiles): one launch kind."""
    geo = KVGeometry(1, HKV_S, 40, 16, 32, np.dtype(np.float32))
    store = create_kv_store("nki-emu", geo, max_context=256, max_batch=1, partial=False)
    assert not store.supports_partial
    assert store.warm_up({LayerVariant()}, HQ).launches == 1  # batch 1 x s_active 1 x context 256
    q = np.zeros((1, HQ, 1, 32), np.float32)
    with pytest.raises(ValueError, match="made with partial=False"):
        store.decode(0, q, None, None, np.zeros((1, 16), np.int32), np.array([4]), scale=1.0, return_lse=True,
                     q_start=np.array([4]))  # fmt: skip
    store.close()


# ---- the service over nki-emu ----------------------------------------------------------------------

SVC_HKV, N = 2, 8  # N: tokens per segment


def _spec(tmp_path: Path) -> dict[str, Any]:
    sinks = np.random.default_rng(3).standard_normal((2, HQ)).astype(np.float32)
    np.save(tmp_path / "sinks.npy", sinks)
    return {"num_layers": 2, "num_q_heads": HQ, "num_kv_heads": SVC_HKV, "head_dim": D, "num_blocks": 64,
            "block_len": 4, "kv_dtype": "float32", "fuse_rope": True, "max_s_active": 2, "max_context": 256,
            "max_batch": 1, "sliding_window": [6, None], "sinks": str(tmp_path / "sinks.npy")}  # fmt: skip


def _t(a: np.ndarray) -> Any:
    return codec.encode(np.ascontiguousarray(a, np.float32))


@needs_emu
def test_service_on_nki_emu_serves_segments_that_merge_to_the_unsplit_sequence(tmp_path: Path) -> None:
    """The tail segment decodes with return_lse, the earlier ones attend_only (no k/v, no sink);
    the log-sum-exp merge equals the unsplit sequence's Decode on the same nki-emu service (RoPE,
    a window crossing segment boundaries on layer 0, sinks on both layers)."""
    from tkg.client.merge import merge_states
    from tkg.v1 import decode_attention_pb2 as pb

    async def body() -> None:
        svc = make_service(_spec(tmp_path), backend="nki-emu")
        svc.start()
        assert svc.cache.store.supports_partial
        ctx = FakeContext()
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="whole"), ctx)
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s#0"), ctx)
        bases, rng, S = [0], np.random.default_rng(7), 2
        for _ in range(10):
            for layer in range(2):
                q, k, v = (rng.standard_normal((1, h, S, D)).astype(np.float32) for h in (HQ, SVC_HKV, SVC_HKV))
                pos = (await svc.GetSequence(pb.GetSequenceRequest(sequence_id="whole"), ctx)).lengths[layer]
                whole = pb.DecodeRequest(layer=layer, sequence_ids=["whole"], positions=[pos], q=_t(q), k=_t(k),
                                         v=_t(v))  # fmt: skip
                want = codec.decode(pb.DecodeResponse.FromString(await svc.Decode(whole, ctx)).out)
                if layer == 0 and pos - bases[-1] >= N:  # the tail is full: a new segment starts here
                    bases.append(pos)
                    await svc.CreateSequence(
                        pb.CreateSequenceRequest(sequence_id=f"s#{len(bases) - 1}", base_position=pos), ctx
                    )
                outs, lses = [], []
                for j in range(len(bases)):
                    tail = j == len(bases) - 1
                    req = pb.DecodeRequest(layer=layer, sequence_ids=[f"s#{j}"], positions=[pos], q=_t(q),
                                           return_lse=True, attend_only=not tail)  # fmt: skip
                    if tail:
                        req.k.CopyFrom(_t(k))
                        req.v.CopyFrom(_t(v))
                    resp = pb.DecodeResponse.FromString(await svc.Decode(req, ctx))
                    outs.append(codec.decode(resp.out))
                    lses.append(codec.decode(resp.lse))
                    assert outs[-1].dtype == np.float32 and lses[-1].shape == (1, HQ, S)
                got = merge_states(outs, lses)[0]
                np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
        assert len(bases) >= 3  # the window (6) crossed segment boundaries on layer 0
        await svc.close()

    asyncio.run(body())
