"""Property tests of `attention_tkg` and `paged_decode` for every host backend.

Each backend in `tkg.kernel.available()` except the Neuron ones is compared over the whole
feature matrix (tests/support/strategies.py) with an oracle: the naive loops for `reference` itself,
the reference for every other backend (so a new backend is picked up here automatically).
Invariants that hold whatever the numbers: a -inf sink is no sink, the block pool's physical
order does not matter, garbage in slots no query sees changes nothing, a row with nothing to
attend to is an error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.oracle import naive_attention, naive_paged_decode
from support.strategies import (
    DTYPES,
    RTOL_VS_NAIVE,
    RTOL_VS_REFERENCE,
    KernelCase,
    Result,
    assert_close,
    assert_result,
    fill_garbage,
    kernel_cases,
    run,
    with_args,
)

from tkg.kernel import AttnTKGConfig, available, paged_decode

HOST_BACKENDS = [name for name in available() if not name.startswith("nki")]
# One output-dtype rounding apart: what two evaluations of the same math may differ by.
RTOL_SAME = {"fp32": 1e-6, "bf16": 8e-3, "fp16": 1e-3}


def oracle(case: KernelCase, backend: str) -> tuple[Result, dict[str, float], float]:
    """Expected result, the tolerance table and the debug-tensor tolerance for `backend`."""
    if backend == "reference":
        nv = naive_attention(case.cfg, case.args)
        return Result(nv["out"], nv["k_out"], nv["dbg"]), RTOL_VS_NAIVE, 1e-5
    plain = dataclasses.replace(case, torch_io=False)
    return run(plain, "reference"), RTOL_VS_REFERENCE, RTOL_VS_REFERENCE[case.dtype]


def test_host_backends_include_the_reference() -> None:
    assert "reference" in HOST_BACKENDS


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=150)  # the main matrix: more draws than the profile's 60, still ~2 s a backend
@given(case=kernel_cases())
def test_backend_matches_oracle(backend: str, case: KernelCase) -> None:
    expected, rtol, dbg_rtol = oracle(case, backend)
    assert_result(run(case, backend), expected, case, rtol, dbg_rtol)


# --- invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=25)
@given(case=kernel_cases(sink="none", garbage=False))
def test_neg_inf_sink_is_no_sink(backend: str, case: KernelCase) -> None:
    H = case.cfg.q_head
    with_sink = with_args(case, sink=np.full((H, 1), -np.inf, np.float32))
    assert_close(run(with_sink, backend).out, run(case, backend).out, RTOL_SAME[case.dtype], "out")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=25)
@given(case=kernel_cases(block=True, garbage=False), data=st.data())
def test_block_pool_order_does_not_matter(backend: str, case: KernelCase, data: st.DataObject) -> None:
    kp, vp, table = case.args["k_prior"], case.args["v_prior"], case.args["active_blocks_table"]
    perm = np.array(data.draw(st.permutations(range(kp.shape[0])), label="perm"))
    # Block i moves to slot perm[i]; the table follows it.
    k2, v2 = np.empty_like(kp), np.empty_like(vp)
    k2[perm], v2[perm] = kp, vp
    moved = with_args(case, k_prior=k2, v_prior=v2, active_blocks_table=perm[table.astype(np.int64)].astype(np.uint32))
    assert_close(run(moved, backend).out, run(case, backend).out, RTOL_SAME[case.dtype], "out")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=25)
@given(case=kernel_cases(garbage=False), seed=st.integers(0, 2**32 - 1))
def test_garbage_in_unread_slots_changes_nothing(backend: str, case: KernelCase, seed: int) -> None:
    dirty = with_args(case)
    fill_garbage(dirty, np.random.default_rng(seed))
    clean = run(case, backend)
    got = run(dirty, backend)
    assert_close(got.out, clean.out, RTOL_SAME[case.dtype], "out")
    if got.dbg is not None:
        for name in ("qk", "qk_max", "exp_sum"):
            assert_close(got.dbg[name], clean.dbg[name], 1e-6, f"DBG_TENSORS[{name}]")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=20)
@given(case=kernel_cases(sink="none", garbage=False), data=st.data())
def test_fully_masked_row_raises(backend: str, case: KernelCase, data: st.DataObject) -> None:
    cfg = case.cfg
    b = data.draw(st.integers(0, cfg.bs - 1), label="b")
    h = data.draw(st.integers(0, cfg.q_head - 1), label="h")
    i = data.draw(st.integers(0, cfg.s_active - 1), label="i")
    mask = case.args["mask"].copy()
    mask[:, b, h, i] = 0
    changes: dict = {"mask": mask}
    if cfg.use_pos_id:
        # Nothing cached for row b, so its generated prior part is empty too.
        pos = case.args["rope_pos_ids"].copy()
        pos[b] = np.arange(cfg.s_active)
        changes.update(rope_pos_ids=pos, start_pos_ids=None)
    dead = with_args(case, **changes)
    with pytest.raises(ValueError, match=rf"mask: every key is masked for row b={b}, head h={h}, query i={i}"):
        run(dead, backend)
    # A -inf sink is no sink: still an error. A finite sink gives the row something to attend.
    with pytest.raises(ValueError, match="every key is masked"):
        run(with_args(dead, sink=np.full((cfg.q_head, 1), -np.inf, np.float32)), backend)
    res = run(with_args(dead, sink=np.zeros((cfg.q_head, 1), np.float32)), backend)
    np.testing.assert_array_equal(_out_bhsd(res.out, cfg)[b, h, i], 0.0)


def _out_bhsd(out: np.ndarray, cfg: AttnTKGConfig) -> np.ndarray:
    """out in either layout -> `[B, H, S, d]`."""
    B, H, S, d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
    if cfg.out_in_sb:
        return out.reshape(d, B, H, S).transpose(1, 2, 3, 0)
    return out.transpose(0, 1, 3, 2)


# --- paged_decode (the service's path) --------------------------------------------------------


@st.composite
def paged_cases(draw: st.DrawFn) -> dict:
    """A paged step: ragged lengths across block boundaries, S >= 1, GQA, window, sinks, dtype."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    S = draw(st.integers(1, 4))
    d = draw(st.sampled_from([32, 64]))
    BL = draw(st.sampled_from([1, 4, 8, 16]))
    dtype = draw(st.sampled_from(list(DTYPES)))
    lens = np.array(draw(st.lists(st.integers(S, 48), min_size=B, max_size=B)), dtype=np.int32)
    used = -(-lens // BL)
    max_blocks = int(used.max()) + draw(st.integers(0, 2))
    NB = int(used.sum()) + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ids = rng.permutation(NB)
    tables = np.full((B, max_blocks), -1, dtype=np.int32)  # entries past a sequence's blocks: never read
    at = 0
    for b in range(B):
        tables[b, : used[b]] = ids[at : at + used[b]]
        at += used[b]

    def arr(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(DTYPES[dtype])

    k_cache, v_cache = arr(Hkv, NB, BL, d), arr(Hkv, NB, BL, d)
    # Slots past each sequence's length and unused blocks hold garbage the kernel must not read.
    written = np.zeros((NB, BL), dtype=bool)
    for b in range(B):
        for j in range(int(lens[b])):
            written[tables[b, j // BL], j % BL] = True
    k_cache[:, ~written] = np.nan
    v_cache[:, ~written] = np.inf
    window = draw(st.one_of(st.none(), st.integers(S, 40)))
    sinks = None
    if draw(st.booleans()):
        sinks = (rng.standard_normal(Hkv * G) * 2).astype(np.float32)
    return dict(
        q=arr(B, Hkv * G, S, d, scale=2.0), k_cache=k_cache, v_cache=v_cache, block_tables=tables,
        seq_lens=lens, scale=d**-0.5, window=window, sinks=sinks, dtype=dtype,
    )  # fmt: skip


# paged_via_attention_tkg hands attention_tkg a q pre-scaled in the I/O dtype (its API), one more
# rounding than the naive loop's float64 scaling: bf16/fp16 get the cross-backend tolerance.
RTOL_PAGED = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3}


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=30)
@given(pc=paged_cases(), give_out=st.booleans())
def test_paged_decode_matches_per_token_loop(backend: str, pc: dict, give_out: bool) -> None:
    dtype = pc.pop("dtype")
    out = np.full(pc["q"].shape, np.nan, np.float32).astype(DTYPES[dtype]) if give_out else None
    kw = {k: pc[k] for k in ("scale", "window", "sinks")}
    got = paged_decode(pc["q"], pc["k_cache"], pc["v_cache"], pc["block_tables"], pc["seq_lens"], out=out,
                       backend=backend, **kw)  # fmt: skip
    assert got.dtype == DTYPES[dtype] and got.shape == pc["q"].shape
    if give_out:
        assert got is out
    want = naive_paged_decode(pc["q"], pc["k_cache"], pc["v_cache"], pc["block_tables"], pc["seq_lens"], **kw)
    assert_close(got.astype(np.float64), want, RTOL_PAGED[dtype], "paged out")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_paged_decode_example(backend: str) -> None:
    """A fixed, readable case: 3 sequences across 16-token blocks, S=2, GQA 4:1, window 7, sinks."""
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, d, BL, NB = 3, 8, 2, 2, 64, 16, 40
    lens = np.array([5, 33, 17])
    q = rng.standard_normal((B, Hq, S, d)).astype(np.float32)
    kc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    vc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    bt = rng.permutation(NB)[: B * 4].reshape(B, 4).astype(np.int32)
    sinks = rng.standard_normal(Hq).astype(np.float32)
    for window in (None, 7):
        got = paged_decode(q, kc, vc, bt, lens, scale=d**-0.5, backend=backend, window=window, sinks=sinks)
        want = naive_paged_decode(q, kc, vc, bt, lens, d**-0.5, window, sinks)
        assert_close(got, want, 1e-5, f"window={window}")
