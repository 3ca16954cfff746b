"""The `cpu` backend's native fast path: every ISA variant against the test oracle (support.oracle),
threads and key splits, workspace reuse across shapes, paged edge cases, and the torch fallback.

The full backend-vs-reference property matrix lives in test_kernel_properties.py; these tests
target what only the native kernel does (block walking, chunking, splits, the bf16 split layout,
the thread pool).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import replace

import numpy as np
import pytest
from support.nki_cases import TOLERANCE, Case, build_case, cfg
from support.oracle import naive_paged_decode

from tkg.dtypes import BF16, BY_SHORT
from tkg.kernel import attention_tkg
from tkg.kernel.backends import cpu
from tkg.kernel.paged import check_paged_args, paged_decode
from tkg.kernel.validate import validate_call

DT = {short: BY_SHORT[short].numpy for short in ("fp32", "bf16", "fp16")}
VARIANTS = cpu.native_variants()
needs_native = pytest.mark.skipif(cpu.NATIVE_ERROR is not None, reason=f"native kernel not built: {cpu.NATIVE_ERROR}")


def test_native_kernel_is_built() -> None:
    # `make` / `pip install -e .` compile it wherever gcc and the Python headers exist (always in CI).
    assert cpu.NATIVE_ERROR is None, cpu.NATIVE_ERROR
    assert VARIANTS and VARIANTS[-1] == "generic"
    assert cpu.implementation().startswith("native-")
    assert cpu.available() is None


def make_paged(rng, *, B=3, Hkv=2, G=2, S=2, d=64, BL=16, dtype="fp32", lens=None, spare=5):
    dt = DT[dtype]
    lens = np.asarray(lens if lens is not None else rng.integers(S, 6 * BL, size=B), dtype=np.int32)
    maxblk = max(1, -(-int(lens.max()) // BL))
    NB = B * maxblk + spare
    tables = rng.permutation(NB)[: B * maxblk].reshape(B, maxblk).astype(np.int32)
    k = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32).astype(dt)
    v = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32).astype(dt)
    q = rng.standard_normal((len(lens), Hkv * G, S, d)).astype(np.float32).astype(dt)
    return q, k, v, tables, lens


def tol(dtype: str) -> dict[str, float]:
    rtol, atol = TOLERANCE[dtype]
    return {"rtol": rtol, "atol": atol}


@needs_native
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "dtype,d,BL,S,window,sinks",
    [
        ("bf16", 128, 16, 4, None, False),
        ("bf16", 64, 128, 1, 50, True),
        ("fp32", 64, 16, 3, 19, True),
        ("fp16", 128, 32, 2, None, True),
        ("bf16", 48, 8, 2, None, False),  # d not a multiple of 32: natural-order bf16 rows
        ("fp32", 8, 3, 1, 4, False),  # tiny head dim, blocks of 3
    ],
)
def test_paged_variants_match_oracle(variant, dtype, d, BL, S, window, sinks) -> None:
    rng = np.random.default_rng(abs(hash((variant, dtype, d, BL, S))) % 2**32)
    q, k, v, tables, lens = make_paged(rng, S=S, d=d, BL=BL, dtype=dtype)
    lens[0] = S  # a sequence with only its new tokens
    sk = (rng.standard_normal(q.shape[1]) * 2).astype(np.float32) if sinks else None
    out = paged_decode(q, k, v, tables, lens, scale=d**-0.5, window=window, sinks=sk, backend="cpu",
                       variant=variant, native=True)  # fmt: skip
    ref = naive_paged_decode(q, k, v, tables, lens, d**-0.5, window, sk)
    assert out.dtype == q.dtype
    np.testing.assert_allclose(out.astype(np.float32), ref, **tol(dtype))


@needs_native
def test_threads_and_splits_agree() -> None:
    rng = np.random.default_rng(1)
    q, k, v, tables, lens = make_paged(rng, B=5, Hkv=2, G=3, S=2, d=64, BL=16, lens=[300, 2, 129, 64, 17])
    args = check_paged_args(q, k, v, tables, lens, 0.125)
    outs = {}
    for threads in (1, 2, 3):
        for nsplit in (1, 4):
            a = replace(args, out=np.empty_like(q))
            cpu.paged_decode(a, threads=threads, nsplit=nsplit)
            outs[threads, nsplit] = a.out
    # The per-task math does not depend on which thread ran it: bitwise equal.
    np.testing.assert_array_equal(outs[1, 1], outs[2, 1])
    np.testing.assert_array_equal(outs[1, 1], outs[3, 1])
    np.testing.assert_array_equal(outs[1, 4], outs[2, 4])
    # Splitting the keys changes the summation order only.
    np.testing.assert_allclose(outs[1, 4], outs[1, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1, 1], naive_paged_decode(q, k, v, tables, lens, 0.125), rtol=1e-4, atol=2e-5)


@needs_native
def test_one_long_sequence_is_split_across_threads() -> None:
    # One (sequence, kv head) task: the automatic split gives every thread a share of the keys.
    rng = np.random.default_rng(2)
    q, k, v, tables, lens = make_paged(rng, B=1, Hkv=1, G=4, S=1, d=128, BL=128, dtype="bf16", lens=[2000])
    assert cpu._auto_nsplit(1, 2, 2000) > 1
    out = paged_decode(q, k, v, tables, lens, scale=128**-0.5, backend="cpu", threads=2, native=True)
    want = naive_paged_decode(q, k, v, tables, lens, 128**-0.5)
    np.testing.assert_allclose(out.astype(np.float32), want, **tol("bf16"))


@needs_native
def test_workspaces_follow_shape_changes() -> None:
    # Per-thread buffers grow and shrink with the call; stale contents must never leak in.
    rng = np.random.default_rng(3)
    shapes = [dict(B=2, G=8, S=4, d=128), dict(B=4, G=1, S=1, d=16), dict(B=3, G=2, S=3, d=64)]
    for kw in shapes * 2:
        q, k, v, tables, lens = make_paged(rng, **kw)
        out = paged_decode(q, k, v, tables, lens, scale=0.3, backend="cpu", native=True)
        np.testing.assert_allclose(out, naive_paged_decode(q, k, v, tables, lens, 0.3), rtol=1e-4, atol=2e-5)


@needs_native
def test_paged_edge_cases() -> None:
    rng = np.random.default_rng(4)
    BL = 16
    # Lengths at block boundaries, one past, exactly S; window == S; a non-contiguous out.
    q, k, v, tables, lens = make_paged(rng, B=5, S=3, BL=BL, lens=[3, BL, BL + 1, 2 * BL, 3 * BL - 1])
    out = np.empty((q.shape[3], *q.shape[:3]), dtype=q.dtype).transpose(1, 2, 3, 0)
    assert not out.flags.c_contiguous
    paged_decode(q, k, v, tables, lens, scale=0.2, window=3, out=out, backend="cpu", native=True)
    np.testing.assert_allclose(out, naive_paged_decode(q, k, v, tables, lens, 0.2, window=3), rtol=1e-4, atol=2e-5)
    # An empty batch is a no-op.
    q0 = np.zeros((0, 4, 1, 64), np.float32)
    res = paged_decode(q0, k, v, np.zeros((0, 1), np.int32), np.zeros(0, np.int32), scale=1.0, backend="cpu")
    assert res.shape == (0, 4, 1, 64)


@needs_native
def test_concurrent_callers() -> None:
    # The pool runs one call at a time; callers on several Python threads all get their own answer.
    rng = np.random.default_rng(5)
    cases = [make_paged(rng, B=2, S=1 + i % 3, d=64) for i in range(6)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        q, k, v, tables, lens = cases[i]
        for _ in range(5):
            results[i] = paged_decode(q, k, v, tables, lens, scale=0.125, backend="cpu", native=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (q, k, v, tables, lens) in enumerate(cases):
        np.testing.assert_allclose(results[i], naive_paged_decode(q, k, v, tables, lens, 0.125), rtol=1e-4, atol=2e-5)


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(block_len=16, fuse_rope=True, sink=True),
        dict(block_len=32, window=40),  # includes a wrapped (circular) window row
        dict(block_len=0, tp_k_prior=True, out_in_sb=True, k_out_in_sb=True, fuse_rope=True, window=30),
        dict(block_len=0, tp_k_prior=True, qk_in_sb=False, fuse_rope=True, sink=True),
    ],
)
def test_attention_tkg_native_matches_reference(dtype, flags) -> None:
    flags = dict(flags)
    case_kw = {k: flags.pop(k) for k in ("sink", "window") if k in flags}
    c = cfg(use_pos_id=True, bs=3, q_head=3, s_active=3, **flags)
    case = Case("native", c, dtype=dtype, seed=7, **case_kw)
    ref, ref_k = attention_tkg(**build_case(case), backend="reference")
    out, k_out = attention_tkg(**build_case(case), backend="cpu", native=True)
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), **tol(dtype))
    if ref_k is not None:
        np.testing.assert_allclose(k_out.astype(np.float32), ref_k.astype(np.float32), **tol(dtype))


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("block_len", [0, 16])
def test_pregenerated_mask_native_ignores_garbage(dtype: str, block_len: int) -> None:
    # Pre-generated masks run natively key by key; NaN/inf in slots no query sees changes nothing.
    c = cfg(block_len=block_len, curr_sprior=2048, full_sprior=2048, tp_k_prior=True, bs=2, q_head=2, s_active=2)
    case = Case("pregen", c, dtype=dtype, seed=12)
    args = build_case(case)
    call = validate_call(**args)
    assert cpu.run_native_ok(call)
    ref, _ = attention_tkg(**build_case(case), backend="reference")
    # Poison the V (and K) rows of the keys that no query of row 1 sees.
    mask = args["mask"]
    if block_len:
        from tkg.kernel.backends.reference import unshuffle_block_mask

        mask = unshuffle_block_mask(mask, block_len)
    hidden = np.nonzero(~mask[:, 1].any(axis=(1, 2)))[0]
    hidden = hidden[hidden < c.curr_sprior - c.s_active]
    assert hidden.size
    for key in hidden[:50]:
        if block_len:
            blk = args["active_blocks_table"][1, key // block_len]
            args["v_prior"][blk, key % block_len] = np.nan
            args["k_prior"][blk, key % block_len] = np.inf
        else:
            args["v_prior"][1, 0, key] = np.nan
            args["k_prior"][1, 0, key] = np.inf
    out, _ = attention_tkg(**args, backend="cpu", native=True)
    assert np.isfinite(out.astype(np.float32)).all()
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), **tol(dtype))


def test_uncovered_calls_fall_back_to_torch() -> None:
    # A pre-generated mask and debug tensors are torch's: same answer as the reference.
    case = Case("fallback", cfg(block_len=16, curr_sprior=2048), dtype="fp32", dbg=True, seed=8)
    call = validate_call(**{k: v for k, v in build_case(case).items() if k not in ("sbm",)})
    assert not cpu.run_native_ok(call)
    with pytest.raises(ValueError, match="native"):
        cpu.run(call, native=True)
    ref, _ = attention_tkg(**build_case(case), backend="reference")
    out, _ = attention_tkg(**build_case(case), backend="cpu")
    np.testing.assert_allclose(out, ref, **tol("fp32"))


def test_torch_fallback_when_native_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TKG_CPU_NATIVE", "0")
    assert cpu.implementation().startswith("torch")
    rng = np.random.default_rng(9)
    q, k, v, tables, lens = make_paged(rng, S=2, d=32, BL=8)
    sk = rng.standard_normal(q.shape[1]).astype(np.float32)
    out = paged_decode(q, k, v, tables, lens, scale=0.25, window=9, sinks=sk, backend="cpu")
    np.testing.assert_allclose(out, naive_paged_decode(q, k, v, tables, lens, 0.25, 9, sk), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("native", [True, False])
def test_fully_masked_row_raises_like_reference(native: bool) -> None:
    if native and cpu.NATIVE_ERROR is not None:
        pytest.skip("native kernel not built")
    case = Case("masked", cfg(block_len=16, use_pos_id=True, bs=2, q_head=2, s_active=2), seed=10)
    args = build_case(case)
    args["rope_pos_ids"][1] = 0.0  # row 1 has no cached keys ...
    args["mask"][:, 1, 1, 1] = 0  # ... and head 1's query 1 sees no active key either
    with pytest.raises(ValueError, match=r"row b=1, head h=1, query i=1") as ref_err:
        attention_tkg(**build_case(case) | {"rope_pos_ids": args["rope_pos_ids"], "mask": args["mask"]},
                      backend="reference")  # fmt: skip
    with pytest.raises(ValueError) as err:
        attention_tkg(**args, backend="cpu", native=native)
    assert str(err.value) == str(ref_err.value)


@needs_native
def test_bad_options_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    q, k, v, tables, lens = make_paged(rng)
    with pytest.raises(ValueError, match="variant"):
        paged_decode(q, k, v, tables, lens, scale=1.0, backend="cpu", variant="avx9000")
    with pytest.raises(ValueError, match="threads"):
        paged_decode(q, k, v, tables, lens, scale=1.0, backend="cpu", threads=0)
    monkeypatch.setenv("TKG_CPU_THREADS", "two")
    with pytest.raises(ValueError, match="TKG_CPU_THREADS"):
        paged_decode(q, k, v, tables, lens, scale=1.0, backend="cpu")


def test_without_the_extension_torch_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # What an install without a C compiler gets: the import failed, the backend still works.
    monkeypatch.setattr(cpu, "_native", None)
    monkeypatch.setattr(cpu, "NATIVE_ERROR", "No module named 'tkg.kernel.backends._native'")
    assert cpu.implementation().startswith("torch (native kernel not built")
    assert cpu.native_variants() == []
    rng = np.random.default_rng(13)
    q, k, v, tables, lens = make_paged(rng, S=1, d=64)
    out = paged_decode(q, k, v, tables, lens, scale=0.125, backend="cpu")
    np.testing.assert_allclose(out, naive_paged_decode(q, k, v, tables, lens, 0.125), rtol=1e-4, atol=2e-5)


def _child_decodes(conn) -> None:  # runs in a forked child
    rng = np.random.default_rng(14)
    q, k, v, tables, lens = make_paged(rng, B=4, S=1, d=64)
    out = paged_decode(q, k, v, tables, lens, scale=0.125, backend="cpu", threads=2, native=True)
    conn.send(float(np.abs(out - naive_paged_decode(q, k, v, tables, lens, 0.125)).max()))


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork() -> None:
    # The parent's workers do not exist in a forked child: the pool must start afresh, not hang.
    rng = np.random.default_rng(15)
    q, k, v, tables, lens = make_paged(rng, B=4, S=1, d=64)
    paged_decode(q, k, v, tables, lens, scale=0.125, backend="cpu", threads=2, native=True)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_decodes, args=(child,))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung in the kernel's thread pool")
    assert proc.exitcode == 0
    assert parent.recv() < 2e-5


# --- the AVX-512-BF16 fast path (d = 64 or 128, bf16 or fp8 pools; every variant must agree) -------------


def _poison_unseen(k, v, tables, lens, S: int, window: int | None, BL: int) -> None:
    """NaN/inf in every pool slot no query of its sequence sees: past each length in its last
    block, and (with a window) before the earliest query's window. Unwritten cache rows look
    like this; 0 * NaN must not reach the output."""
    for b, L in enumerate(lens.tolist()):
        first = max(0, L - S - window + 1) if window else 0
        nblk = -(-L // BL)
        for j in [*range(first), *range(L, nblk * BL)]:
            blk, off = int(tables[b, j // BL]), j % BL
            k[:, blk, off] = np.inf
            v[:, blk, off] = np.nan


@needs_native
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "dtype,d,BL,G,S,window,lens",
    [
        ("bf16", 128, 16, 4, 1, None, [1, 31, 32, 33, 47, 200]),  # partial chunks, odd pair counts
        ("bf16", 128, 128, 3, 1, 40, [300, 5, 129]),  # 3 q heads: a padded group of 4; windowed chunks
        ("bf16", 64, 16, 4, 2, None, [64, 17, 95]),  # 8 queries: two groups
        ("bf16", 128, 32, 5, 2, 33, [250, 2, 77]),  # 10 queries: groups of 4, 4, 2
        ("fp8", 128, 16, 4, 1, None, [1, 33, 160]),
        ("fp8", 64, 128, 2, 3, 50, [260, 3, 90]),
        # the amx variant's shapes: 16 queries fill a tile; 32 take two groups; 18 fall back to
        # the AVX-512 path; blocks of 8 put a 16-key group across two blocks (a gathered copy)
        ("bf16", 128, 16, 4, 4, None, [40, 16, 300]),
        ("bf16", 128, 16, 8, 4, 70, [200, 33, 5]),
        ("bf16", 64, 16, 6, 3, None, [77, 130]),
        ("bf16", 128, 8, 4, 1, None, [100, 7, 64]),
        ("fp8", 128, 16, 4, 4, 20, [90, 4, 48]),
    ],
)
def test_fast_path_shapes_match_oracle(variant, dtype, d, BL, G, S, window, lens) -> None:
    from tkg.dtypes import FP8, to_fp8

    rng = np.random.default_rng(abs(hash((variant, dtype, d, BL, G, S))) % 2**32)
    q, k, v, tables, lens = make_paged(rng, B=len(lens), Hkv=2, G=G, S=S, d=d, BL=BL,
                                       dtype="fp32" if dtype == "fp8" else dtype, lens=lens)  # fmt: skip
    kw = {}
    if dtype == "fp8":
        k, v = to_fp8(k * 3), to_fp8(v * 3)  # spread over the exponents, subnormals included
        assert (np.abs(k.astype(np.float32)) < 2**-6).any()
        q = q.astype(BF16)
        kw = dict(k_scale=0.5, v_scale=0.25)
    _poison_unseen(k, v, tables, lens, S, window, BL)
    out = paged_decode(q, k, v, tables, lens, scale=d**-0.5, window=window, backend="cpu", variant=variant,
                       native=True, **kw)  # fmt: skip
    ref = naive_paged_decode(q, k, v, tables, lens, d**-0.5, window, **kw)  # reads no poisoned row either
    assert np.isfinite(out.astype(np.float32)).all()
    np.testing.assert_allclose(out.astype(np.float32), ref, **tol("bf16"))
    assert k.dtype == (FP8 if dtype == "fp8" else DT[dtype])


@needs_native
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [64, 128])
def test_fast_path_decodes_every_fp8_pattern(variant: str, d: int) -> None:
    """d = 64/128 (the fast path's widths): V rows holding all 256 fp8 patterns come out exactly
    (one visible key: p = 1), and K rows holding every finite pattern give q.k exactly
    (one-hot bf16 q heads against key 0, key 1 zeros: out = sigmoid(K0[h] / 16))."""
    from tkg.dtypes import FP8

    patterns = np.arange(256, dtype=np.uint8).view(FP8).reshape(-1, d)  # [256 / d, d]
    nrow = patterns.shape[0]
    k = np.zeros((1, nrow, 4, d), FP8)
    v = np.zeros((1, nrow, 4, d), FP8)
    v[0, :, 0] = patterns
    q = np.ones((nrow, 1, 1, d), np.float32)
    tables = np.arange(nrow, dtype=np.int32)[:, None]
    out = paged_decode(q, k, v, tables, np.ones(nrow, np.int32), scale=1.0, v_scale=0.5, backend="cpu",
                       variant=variant)  # fmt: skip
    np.testing.assert_array_equal(out[:, 0, 0], patterns.astype(np.float32) * np.float32(0.5))

    finite = np.where(np.isfinite(patterns.astype(np.float32)), patterns, np.zeros(1, FP8))
    k = np.zeros((1, nrow, 4, d), FP8)
    v = np.zeros((1, nrow, 4, d), FP8)
    k[0, :, 0] = finite
    v[0, :, 0, 0] = 1.0
    v[0, :, 1, 1] = 1.0
    q = np.broadcast_to(np.eye(d, dtype=np.float32).astype(BF16)[None, :, None, :], (nrow, d, 1, d)).copy()
    out = paged_decode(q, k, v, tables, np.full(nrow, 2, np.int32), scale=1 / 16, backend="cpu", variant=variant)
    want = 1.0 / (1.0 + np.exp(-finite.astype(np.float64) / 16))
    np.testing.assert_allclose(out[:, :, 0, 0].astype(np.float64), want, rtol=8e-3, atol=1e-6)


@needs_native
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_path_ignores_garbage_in_a_wrapped_window_gap(variant: str) -> None:
    """attention_tkg with a circular window (row 1 sees [0, end) and [start, n)): the keys of the gap
    sit inside the walked key range but no query sees them; NaN/inf there changes nothing."""
    c = cfg(use_pos_id=True, block_len=16, d_head=128, bs=3, q_head=4, s_active=2, curr_sprior=512)
    case = Case("gap", c, dtype="bf16", seed=21, window=60)
    ref, _ = attention_tkg(**build_case(case), backend="reference")
    args = build_case(case)
    cached = int(args["rope_pos_ids"][1, 0])
    start = int(args["start_pos_ids"][1, 0])
    gap = range(cached + c.s_active, start)
    assert len(gap) >= 4
    for key in gap:
        blk = args["active_blocks_table"][1, key // 16]
        args["k_prior"][blk, key % 16] = np.inf
        args["v_prior"][blk, key % 16] = np.nan
    out, _ = attention_tkg(**args, backend="cpu", native=True, variant=variant)
    assert np.isfinite(out.astype(np.float32)).all()
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), **tol("bf16"))
