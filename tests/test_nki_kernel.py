"""The NKI `attention_tkg` kernel (kernel/nki_tkg) against the numpy reference.

The kernel's own source runs through the NumPy NKI emulator here (backend `nki-emu`); the same
cases are marked to run through the real `nki.simulate` (`neuron`) and on Trainium (`trn`):

    pytest tests/test_nki_kernel.py -m "neuron or trn"      # on a Trn host with the neuron extra
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from support.nki_cases import TOLERANCE, Case, build_case, cfg

from tkg.kernel import attention_tkg, decisions, paged_decode
from tkg.kernel.backends import unavailable_reason

EMU_REASON = unavailable_reason("nki-emu")
needs_emu = pytest.mark.skipif(EMU_REASON is not None, reason=f"nki-emu unavailable: {EMU_REASON}")

# Small cases cover the feature matrix; a few large ones cover flash tiling, block resize with
# flash tiles, and batch tiling.
CASES = [
    Case("flat-strided-kT-fp32", cfg()),
    Case("flat-contig-tpk-bf16-sink", cfg(strided_mm1=False, tp_k_prior=True), "bf16", sink=True),
    Case("flat-strided-tpk-fp16-outsb", cfg(tp_k_prior=True, out_in_sb=True, s_active=3), "fp16"),
    Case("flat-d128-S1-H8-bf16", cfg(d_head=128, q_head=8, s_active=1, curr_sprior=384, full_sprior=512), "bf16"),
    Case("pos-id-window-wrap", cfg(use_pos_id=True, strided_mm1=False), window=40),
    Case("pos-id-strided-sink-bf16", cfg(use_pos_id=True, s_active=4), "bf16", sink=True),
    Case("rope-hbm-qk", cfg(fuse_rope=True, qk_in_sb=False, tp_k_prior=True)),
    Case("rope-sb-all-bf16", cfg(fuse_rope=True, k_out_in_sb=True, out_in_sb=True, use_pos_id=True), "bf16"),
    Case("block-pos-id-resize", cfg(block_len=16, use_pos_id=True), sink=True),
    Case("block-premask", cfg(block_len=2)),
    Case("block-premask-d128-bf16", cfg(block_len=4, curr_sprior=512, d_head=128, q_head=4), "bf16"),
    Case("wide-stats-S8", cfg(bs=8, q_head=16, s_active=8, strided_mm1=False), "bf16", sink=True),
    Case("dbg-flat", cfg(tp_k_prior=True), sink=True, dbg=True),
    Case("dbg-block", cfg(block_len=8, use_pos_id=True, curr_sprior=1024), dbg=True),
    # LNC2: every sharding mode.
    Case("lnc2-batch-outsb", cfg(bs=4, q_head=8, s_active=8, out_in_sb=True), lnc=2, sink=True),
    Case("lnc2-batch-short", cfg(bs=2, curr_sprior=128, full_sprior=128, tp_k_prior=True), "bf16", lnc=2),
    Case("lnc2-seq-sink-dbg", cfg(bs=1, curr_sprior=512, full_sprior=512), lnc=2, sink=True, dbg=True),
    Case("lnc2-seq-outsb-gpsimd", cfg(bs=3, curr_sprior=256, out_in_sb=True, use_pos_id=True), lnc=2, window=70),
    Case(
        "lnc2-seq-dma-bf16",
        cfg(bs=1, curr_sprior=512, full_sprior=512, use_gpsimd_sb2sb=False, tp_k_prior=True),
        "bf16",
        lnc=2,
    ),
    Case("lnc2-seq-rope", cfg(bs=1, curr_sprior=512, full_sprior=640, fuse_rope=True, qk_in_sb=False), lnc=2),
    Case("lnc2-seq-block-premask-resize", cfg(bs=1, block_len=4, curr_sprior=512), lnc=2, sink=True),
    Case("lnc2-none", cfg(bs=1, curr_sprior=128, full_sprior=256), lnc=2),
    Case("k-out-without-rope", cfg(k_out_in_sb=True), extra={"k_out": np.zeros((64, 4), np.float32)}),
    # Large: flash tiling past 8192 keys per core, with block resize, with LNC2; batch tiling.
    Case("flash-flat", cfg(bs=1, q_head=1, s_active=2, curr_sprior=9216, full_sprior=9216), sink=True, dbg=True),
    Case("flash-block-resize-bf16", cfg(bs=1, q_head=2, block_len=16, use_pos_id=True, curr_sprior=9216), "bf16"),
    Case("flash-contig-tpk-d128", cfg(bs=1, q_head=1, s_active=1, curr_sprior=9216, full_sprior=9216, d_head=128,
                                      strided_mm1=False, tp_k_prior=True), "bf16"),
    Case("flash-lnc2-seq", cfg(bs=1, q_head=1, s_active=1, curr_sprior=16640, full_sprior=16640), lnc=2, sink=True),
    Case("batch-tiles", cfg(bs=2, q_head=64, s_active=8, curr_sprior=4096, full_sprior=4096, d_head=64)),
]


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def check_case(case: Case, backend: str) -> None:
    """Run `case` through `backend` and the reference; compare out, k_out and debug tensors."""
    args = build_case(case)
    ref_args = build_case(case)
    out, k_out = attention_tkg(**args, backend=backend, lnc=case.lnc)
    ref_out, ref_k = attention_tkg(**ref_args, backend="reference")
    rtol, atol = TOLERANCE[case.dtype]
    np.testing.assert_allclose(_f32(out), _f32(ref_out), rtol=rtol, atol=atol, err_msg=f"{case}: out")
    if case.cfg.fuse_rope or "k_out" in case.extra:
        np.testing.assert_allclose(_f32(k_out), _f32(ref_k), rtol=rtol, atol=atol, err_msg=f"{case}: k_out")
    if case.dbg:
        got, want = args["DBG_TENSORS"], ref_args["DBG_TENSORS"]
        names = ["qk", "qk_max", "exp_sum"]
        # qk_exp is exp(qk - running max): the global max only with one flash tile per core on unsplit keys.
        one_tile = case.cfg.curr_sprior <= decisions.FA_TILE and (case.lnc == 1 or "seq" not in case.name)
        if one_tile:
            names.append("qk_exp")
        for name in names:
            msg = f"{case}: {name}"
            np.testing.assert_allclose(got[name], want[name], rtol=max(rtol, 1e-5), atol=atol, err_msg=msg)


@needs_emu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_kernel_matches_reference(case: Case) -> None:
    check_case(case, "nki-emu")


@pytest.mark.neuron
@pytest.mark.parametrize("case", CASES, ids=str)
def test_nki_simulate_matches_reference(case: Case) -> None:
    check_case(case, "nki")


@pytest.mark.trn
@pytest.mark.parametrize("case", CASES, ids=str)
def test_trainium_matches_reference(case: Case) -> None:
    check_case(case, "nki")


@needs_emu
def test_emulated_kernel_torch_in_torch_out() -> None:
    torch = pytest.importorskip("torch")
    case = Case("torch", cfg(tp_k_prior=True), sink=True)
    args = build_case(case)
    ref, _ = attention_tkg(**build_case(case), backend="reference")
    targs = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    targs["out"] = torch.zeros(case.cfg.out_shape, dtype=torch.float32)
    out, _ = attention_tkg(**targs, backend="nki-emu")
    assert out is targs["out"]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=2e-5)


@needs_emu
@pytest.mark.parametrize(
    ("sinks", "lnc", "window"), [("shared", 1, 64), ("per-head", 1, None), ("none", 2, None), ("shared", 2, 40)]
)
def test_paged_decode_through_emulated_kernel(sinks: str, lnc: int, window: int | None) -> None:
    """The service path: paged_decode over a head-major pool, one folded launch (or one per kv head
    when the kv groups have different sinks)."""
    rng = np.random.default_rng(3)
    B, Hq, Hkv, S, d, BL, NB = 3, 4, 2, 2, 64, 16, 40
    lens = np.array([5, 130, 17])
    q = rng.standard_normal((B, Hq, S, d)).astype(np.float32)
    kc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    vc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    bt = rng.permutation(NB)[: B * 9].reshape(B, 9).astype(np.int32)
    group = rng.standard_normal(Hq // Hkv).astype(np.float32)
    sink_values = {
        "shared": np.tile(group, Hkv), "per-head": rng.standard_normal(Hq).astype(np.float32), "none": None,
    }[sinks]
    kw = dict(scale=d**-0.5, window=window, sinks=sink_values)
    want = paged_decode(q, kc, vc, bt, lens, backend="reference", **kw)
    got = paged_decode(q, kc, vc, bt, lens, backend="nki-emu", lnc=lnc, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


# --- errors specific to the NKI kernel ---------------------------------------------------------
@needs_emu
def test_bucket_not_multiple_of_128_per_core_is_rejected() -> None:
    case = Case("bad-bucket", cfg(curr_sprior=192, full_sprior=192))
    with pytest.raises(ValueError, match=r"curr_sprior: 192 / 1 core\(s\) must be a multiple of 128"):
        attention_tkg(**build_case(case), backend="nki-emu")
    seq = Case("bad-bucket-seq", cfg(bs=1, curr_sprior=384, full_sprior=384))
    with pytest.raises(ValueError, match=r"curr_sprior: 384 / 2 core\(s\) .*align=256"):
        attention_tkg(**build_case(seq), backend="nki-emu", lnc=2)


@needs_emu
def test_bad_lnc_is_rejected() -> None:
    with pytest.raises(ValueError, match="lnc: 3 must be 1 or 2"):
        attention_tkg(**build_case(Case("lnc3", cfg())), backend="nki-emu", lnc=3)


@needs_emu
@pytest.mark.parametrize("lnc", [1, 2])
def test_block_premask_partial_caller_fold(lnc: int) -> None:
    """Sp = 256 is not a multiple of block_len*128 = 2048: the mask is ordered by nki-library's
    reduced block length (2 at lnc 1, 1 at lnc 2: the keys split across cores), and a random
    predicate gives the reference's answer."""
    args = build_case(Case("block-partial-fold", cfg(block_len=16, curr_sprior=256, use_pos_id=True)))
    c = args["cfg"] = dataclasses.replace(args["cfg"], use_pos_id=False)
    rng = np.random.default_rng(lnc)
    mask = (rng.random((c.curr_sprior, c.bs, c.q_head, c.s_active)) < 0.5).astype(np.uint8)
    mask[c.curr_sprior - c.s_active :] = np.eye(c.s_active, dtype=np.uint8)[:, None, None, :]
    args["mask"] = mask
    del args["rope_pos_ids"]
    want, _ = attention_tkg(**args, backend="reference", lnc=lnc)
    got, _ = attention_tkg(**args, backend="nki-emu", lnc=lnc)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-5, atol=2e-6)


@needs_emu
def test_fully_masked_row_is_rejected() -> None:
    case = Case("dead-row", cfg())
    args = build_case(case)
    args["mask"][:, 1, 0, 0] = 0
    with pytest.raises(ValueError, match=r"mask: every key is masked for row b=1, head h=0, query i=0"):
        attention_tkg(**args, backend="nki-emu")


@needs_emu
def test_no_flash_tiling_past_the_sbuf_budget_is_a_clear_error() -> None:
    c = cfg(bs=1, q_head=1, s_active=1, curr_sprior=65536, full_sprior=65536, enable_fa_s_prior_tiling=False)
    with pytest.raises(AssertionError, match="SBUF budget exceeded allocating kT"):
        attention_tkg(**build_case(Case("no-fa", c)), backend="nki-emu")


# --- the kernel's trace-time plan: every row and key on exactly one core, tiles within budget ------
@needs_emu
def test_plan_splits_the_work_exactly_and_within_budget() -> None:
    """Properties of `make_plan`, not its rules restated: the cores' (rows x keys) shares tile the
    call exactly once, flash tiles partition each core's keys without exceeding the SBUF budget,
    and a block split fills whole folds of 128 sub-blocks on every core."""
    from tkg.kernel.nki_tkg import plan

    shapes = itertools.product((1, 2, 3, 8, 64), (1, 2, 8, 32), (1, 4, 8), (128, 256, 512, 8192, 9216, 20480), (1, 2))
    for B, H, S, Sp, lnc in shapes:
        if H * S > 512:
            continue
        kcfg = plan.TKGConfig(bs=B, q_head=H, s_active=S, curr_sprior=Sp, full_sprior=Sp, d_head=64)
        try:
            plans = [plan.make_plan(kcfg, lnc, prg) for prg in range(lnc)]
        except AssertionError:  # keys cannot split into 128-multiples per core: refused, not mis-split
            assert Sp % 256
            continue
        covered = np.zeros((B, Sp), dtype=np.int64)
        for pl in plans:
            if not pl.works:
                continue
            covered[pl.b0 : pl.b0 + pl.bs_core, pl.k0 : pl.k0 + pl.sp_core] += 1
            assert pl.fa_starts[0] == 0 and sum(pl.fa_sizes) == pl.sp_core
            assert all(a + n == b for a, n, b in zip(pl.fa_starts, pl.fa_sizes, pl.fa_starts[1:], strict=False))
            assert max(pl.fa_sizes) <= 8192 and (pl.n_fa == 1 or 8 * H * S * pl.fa_sizes[0] <= 16 * 2**20)
            assert pl.bt == 1 or 8 * pl.bt * H * S * pl.fa_sizes[0] <= 16 * 2**20
            assert 1 <= pl.bt <= pl.bs_core and 1 <= pl.mm1_group <= 32 and pl.mm1_group * H * S <= 512
        assert (covered == 1).all(), (B, H, S, Sp, lnc)
        # Both cores work unless neither the rows (odd B) nor the keys (fewer than 2 x 128) split.
        assert sum(pl.works for pl in plans) == lnc or (B % 2 and Sp < 256)
    for nblk, bl, n_sp in itertools.product((1, 2, 16, 64, 128, 256, 384), (1, 2, 4, 16, 32, 48, 128), (1, 2)):
        if (nblk * bl) % (128 * n_sp):
            continue
        factor = plan.block_resize_factor(nblk, bl, n_sp)
        assert bl % factor == 0 and (nblk * factor) % (128 * n_sp) == 0
        assert all(bl % f or (nblk * f) % (128 * n_sp) for f in range(1, factor))  # the smallest split


@needs_emu
def test_fa_tile_respects_the_sbuf_budget() -> None:
    from tkg.kernel.nki_tkg import plan

    assert plan.fa_tile_keys(64, 0) == 8192
    assert plan.fa_tile_keys(512, 0) == 4096  # 8 * 512 * 4096 = 16 MiB
    assert plan.fa_tile_keys(512, 128 * 128) == 128 * 128  # never below one fold of 128 blocks
    assert plan.fa_tile_keys(1, 16 * 128) == 8192


@needs_emu
def test_active_runs_follow_the_layouts() -> None:
    from tkg.kernel.nki_tkg import plan

    def runs(**kw: object) -> tuple:
        pl = plan.make_plan(plan.TKGConfig(**kw), 1, 0)
        return plan.active_runs(pl, pl.fa_starts[-1], pl.fa_sizes[-1])

    # contig: last S keys = last partitions of the last key tile.
    assert runs(curr_sprior=256, s_active=3, strided_mm1=False) == ((0, 3, 1, 125, 0, 1),)
    # strided: partition 127 holds the last n_kt keys, one per key tile.
    assert runs(curr_sprior=512, s_active=3, strided_mm1=True) == ((0, 3, 1, 127, 1, 0),)
    # strided with fewer key tiles than active tokens: spread over two partitions.
    assert runs(curr_sprior=256, s_active=3, strided_mm1=True) == ((0, 1, 1, 126, 1, 0), (1, 2, 0, 127, 1, 0))
    # block (factor 1, blr 2): last block = partition 127, offsets 0..1 of the fold.
    assert runs(curr_sprior=256, s_active=2, block_len=2, tp_k_prior=True, strided_mm1=False) == ((0, 2, 0, 127, 1, 0),)


def test_case_builder_is_deterministic() -> None:
    a = build_case(Case("x", cfg(), seed=5))
    b = build_case(Case("x", cfg(), seed=5))
    np.testing.assert_array_equal(a["q"], b["q"])
    c = build_case(dataclasses.replace(Case("x", cfg(), seed=6)))
    assert not np.array_equal(a["q"], c["q"])


# --- backend `nki` service hooks (host-side; run everywhere) -------------------------------------
def test_nki_backend_says_why_it_cannot_run_here() -> None:
    from tkg.kernel.backends import nki as nki_backend

    reason = unavailable_reason("nki")
    if reason is None:
        pytest.skip("the real Neuron nki is installed here")
    assert "nki" in reason
    missing = r"backend 'nki' needs the Neuron runtime: .*--backend cpu"
    with pytest.raises(nki_backend.NeuronRuntimeMissing, match=missing):
        nki_backend.require_runtime()
    assert unavailable_reason("nkilib") is not None


@needs_emu
def test_kernel_source_keeps_the_nki_language_rules() -> None:
    """Every kernel-side file passes the emulator's lint (no `is`, no `*` in kernel signatures, ...)."""
    from pathlib import Path

    from tkg.kernel.nki_emu import lint
    from tkg.kernel.nki_tkg import wrapper

    issues = lint.check_paths([Path(wrapper.__file__).parent])
    assert issues == []
    # The check can fail: a forbidden construct is reported.
    assert lint.check_source("def f(x):\n    return x is None\n")


@needs_emu
def test_bench_report_counts_the_kernel() -> None:
    from tkg.bench import nki as nki_bench

    step = nki_bench.Step(batch=2, q_heads=4, kv_heads=2, head_dim=64, context=256, block_len=16)
    (row,) = nki_bench.emulator_report([step], (2,))
    assert row["compulsory_kv_bytes"] == 2 * 2 * 2 * 256 * 64 * 2
    progs = row["counters"]["programs"]
    assert len(progs) == 2 and all(p["instructions"]["tensor"] > 0 for p in progs)
    assert sum(p["hbm_read_bytes"] for p in progs) >= row["compulsory_kv_bytes"]
    assert row["estimate"]["floor_bytes"] == row["compulsory_kv_bytes"]
    assert "ESTIMATE" in nki_bench.format_report([row])


@needs_emu
def test_block_kernel_moves_no_small_runs_but_the_active_tokens() -> None:
    """The paged (block KV, generated mask) launch loads each batch tile's block ids once, in
    contiguous runs, shared by the K and V gathers; broadcasts the positions on chip; stores the
    output one contiguous (row, head) at a time. Left in runs under 256 B (each charged as 256 B
    by the cost model): only the caller's active mask rows, the strided positions row, and q and
    k_active (`[d, rows*H*S]` and `[d, rows*S]` from the host: short rows at this small batch)."""
    from tkg.bench import nki as nki_bench

    step = nki_bench.Step(batch=2, q_heads=4, kv_heads=2, head_dim=64, context=2048, block_len=16, s_active=2)
    (row,) = nki_bench.emulator_report([step], (1,))
    (prog,) = row["counters"]["programs"]
    rows, S, H = step.batch * step.kv_heads, step.s_active, step.q_heads // step.kv_heads
    active_mask_bytes = S * rows * H * S  # uint8 [S, rows, H, S]
    q_ka_bytes = step.head_dim * (rows * H * S + rows * S) * 2  # bf16
    assert prog["dma_small_run_bytes"] <= active_mask_bytes + rows * S * 4 + q_ka_bytes
    folds = step.context // (16 * 128)  # 128 blocks of 16 keys per fold (no block split here)
    # K and V gathers per fold and row, the active mask and values per row, a few per launch.
    assert prog["dma_transfers"] <= 2 * folds * rows + 2 * rows + 8
