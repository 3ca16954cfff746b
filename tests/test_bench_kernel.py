"""The torch CPU path (`tkg.kernel.backends.cpu_torch`) against the numpy reference, and `tkg bench kernel`.

The torch path is what the `cpu` backend runs without its native extension, so it must agree with
the oracle on every flag of docs/design/kernel.md, raise like it on fully masked rows, and the bench
must produce the numbers it promises (in a tiny configuration: benchmarks are not timed tests).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from support.oracle import naive_paged_decode

from tkg.dtypes import BF16
from tkg.kernel.backends import cpu_torch, reference
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.paged import PagedArgs, check_paged_args
from tkg.kernel.validate import debug_shapes, validate_call

F32 = np.dtype(np.float32)
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3, BF16: 2e-2}


def _make_call(cfg: AttnTKGConfig, dtype: np.dtype, seed: int, *, sink: bool = False, window: bool = False,
               wrap: bool = False, dbg: bool = False, k_out: bool = False):  # fmt: skip
    """Random arguments for `cfg`, validated; returns a factory of fresh KernelCalls (own outputs)."""
    rng = np.random.default_rng(seed)
    B, H, S, d, Sp, Spf = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior, cfg.full_sprior

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    q, ka, va = arr(*cfg.q_shape), arr(*cfg.k_active_shape), arr(*cfg.v_active_shape)
    table = None
    if cfg.is_block_kv:
        nb = B * cfg.blocks_per_seq + 3
        kp, vp = arr(nb, cfg.block_len, d), arr(nb, cfg.block_len, d)
        table = rng.permutation(nb)[: B * cfg.blocks_per_seq].reshape(B, -1).astype(np.uint32)
    else:
        kp = arr(B + 1, 1, Spf, d) if cfg.tp_k_prior else arr(B + 1, 1, d, Spf)
        vp = arr(B + 1, 1, Spf, d)
    pos = start = None
    if cfg.use_pos_id:
        cached = rng.integers(0, Sp - S + 1, size=B)
        cached[0] = Sp - S
        if wrap:
            cached[1] = (Sp - S) // 2
        pos = (cached[:, None] + np.arange(S)[None, :]).astype(np.float32)
        mask = np.broadcast_to(np.tril(np.ones((S, S), np.uint8)).T[:, None, None, :], (S, B, H, S)).copy()
        if window:
            start = np.maximum(pos - 3, 0).astype(np.float32)
            if wrap:
                start[1] = cached[1] + 2  # past the cached length: a circular window that wraps
    else:
        mask = (rng.random(cfg.mask_shape) < 0.6).astype(np.uint8)
        mask[Sp - S :] = 1  # every query sees at least its active keys
    inv = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32).reshape(d // 2, 1) if cfg.fuse_rope else None
    if cfg.fuse_rope and pos is None:
        pos = rng.integers(0, 50, size=(B, S)).astype(np.float32)
    sk = rng.standard_normal((H, 1)).astype(np.float32) if sink else None

    def fresh():
        dbgs = {n: np.zeros(s, np.float32) for n, s in debug_shapes(cfg).items()} if dbg else None
        ko = np.empty(cfg.k_out_shape, dtype) if k_out else None
        return validate_call(q, ka, va, kp, vp, mask, None, cfg, inv, pos, sk, table, ko, dbgs, start)

    return fresh


CONFIGS = {
    "flat": dict(tp_k_prior=False, strided_mm1=True, qk_in_sb=True),
    "flat_tp": dict(tp_k_prior=True, strided_mm1=False, qk_in_sb=True),
    "flat_sb": dict(tp_k_prior=True, qk_in_sb=True, out_in_sb=True, k_out_in_sb=True),
    "flat_pos": dict(tp_k_prior=True, use_pos_id=True, qk_in_sb=True),
    "rope": dict(fuse_rope=True, tp_k_prior=True, qk_in_sb=False),
    "rope_sb": dict(fuse_rope=True, qk_in_sb=True, k_out_in_sb=True, out_in_sb=True),
    "block_pos": dict(block_len=16, tp_k_prior=True, strided_mm1=False, qk_in_sb=True, use_pos_id=True),
    "block_mask": dict(block_len=2, tp_k_prior=True, strided_mm1=False, qk_in_sb=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["f32", "bf16"])
def test_torch_run_matches_reference(name: str, dtype: np.dtype) -> None:
    flags = CONFIGS[name]
    Sp = 256 if name == "block_mask" else 64
    cfg = AttnTKGConfig(bs=3, q_head=2, s_active=3, curr_sprior=Sp, full_sprior=Sp + 16, d_head=64, **flags)
    opts = dict(sink=True, dbg=True, k_out=True)
    if cfg.use_pos_id:
        opts["window"] = True
    fresh = _make_call(cfg, dtype, seed=list(CONFIGS).index(name), **opts)
    ref, got = fresh(), fresh()
    reference.run(ref)
    cpu_torch.run(got)
    tol = TOL[dtype]
    np.testing.assert_allclose(got.out.astype(np.float32), ref.out.astype(np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(got.k_out.astype(np.float32), ref.k_out.astype(np.float32), rtol=tol, atol=tol)
    for key in ("qk_max", "exp_sum"):
        np.testing.assert_allclose(got.dbg[key], ref.dbg[key], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isneginf(got.dbg["qk"]), np.isneginf(ref.dbg["qk"]))


def test_torch_run_wrapping_window_without_sink() -> None:
    cfg = AttnTKGConfig(bs=2, q_head=4, s_active=2, curr_sprior=48, full_sprior=48, d_head=32, block_len=8,
                        tp_k_prior=True, strided_mm1=False, qk_in_sb=True, use_pos_id=True)  # fmt: skip
    fresh = _make_call(cfg, np.dtype(np.float32), seed=5, window=True, wrap=True)
    ref, got = fresh(), fresh()
    reference.run(ref)
    cpu_torch.run(got)
    np.testing.assert_allclose(got.out, ref.out, rtol=2e-5, atol=2e-5)


def test_torch_run_fully_masked_row_raises_like_reference() -> None:
    cfg = AttnTKGConfig(bs=2, q_head=2, s_active=1, curr_sprior=32, full_sprior=32, d_head=32, qk_in_sb=True)
    fresh = _make_call(cfg, np.dtype(np.float32), seed=1)
    call = fresh()
    call.mask[:, 1, 0, 0] = 0  # row b=1, head 0 sees nothing
    with pytest.raises(ValueError, match=r"b=1, head h=0, query i=0"):
        cpu_torch.run(call)
    # A sink of -inf is no sink (as in the reference); a finite sink makes the row well defined.
    call.sink = np.array([[-np.inf], [0.5]], np.float32)
    with pytest.raises(ValueError, match=r"b=1, head h=0, query i=0.*finite sink"):
        cpu_torch.run(call)
    call.sink = np.array([[0.25], [0.5]], np.float32)
    cpu_torch.run(call)
    assert np.all(call.out[1, 0] == 0)  # only the sink: zero output
    assert np.all(np.isfinite(call.out))


def _paged_case(dtype: np.dtype, BL: int, S: int, window: int | None, sinks: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    B, Hkv, G, d, NB = 3, 2, 3, 32, 40
    lens = np.array([S, 5 * BL + 1, 2 * BL], dtype=np.int32)  # minimal, ragged across blocks, exact
    maxblk = 8
    table = rng.permutation(NB)[: B * maxblk].reshape(B, maxblk).astype(np.int32)
    kc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32).astype(dtype)
    vc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32).astype(dtype)
    q = rng.standard_normal((B, Hkv * G, S, d)).astype(np.float32).astype(dtype)
    sk = rng.standard_normal(Hkv * G).astype(np.float32) if sinks else None
    return check_paged_args(q, kc, vc, table, lens, d**-0.5, window, sk)


def _paged_oracle(args: PagedArgs) -> np.ndarray:
    """The test oracle on a checked call's arguments."""
    return naive_paged_decode(args.q, args.k_cache, args.v_cache, args.block_tables, args.seq_lens, args.scale,
                              args.window, args.sinks, args.k_scale, args.v_scale)  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "BL", "S", "window", "sinks"),
    [
        (np.dtype(np.float32), 4, 1, None, False),
        (np.dtype(np.float32), 4, 3, 5, True),
        (BF16, 8, 4, None, True),
        (np.dtype(np.float16), 2, 2, 2, False),
    ],
)
def test_torch_paged_decode_matches_loop(dtype: np.dtype, BL: int, S: int, window: int | None, sinks: bool) -> None:
    args = _paged_case(dtype, BL, S, window, sinks)
    cpu_torch.paged_decode(args)
    tol = TOL[dtype]
    np.testing.assert_allclose(args.out.astype(np.float32), _paged_oracle(args), rtol=tol, atol=tol)


def test_torch_paged_decode_writes_strided_out() -> None:
    args = _paged_case(np.dtype(np.float32), 4, 2, None, False)
    big = np.full((*args.out.shape[:-1], 2 * args.out.shape[-1]), 7.0, np.float32)
    view = big[..., ::2]  # a non-contiguous destination
    object.__setattr__(args, "out", view)
    cpu_torch.paged_decode(args)
    np.testing.assert_allclose(view, _paged_oracle(args), rtol=2e-5, atol=2e-5)
    assert np.all(big[..., 1::2] == 7.0)


# --- tkg bench kernel -------------------------------------------------------------------------------------

TINY = ["--batch", "3", "--kv-heads", "2", "--q-per-kv", "2", "--head-dim", "32", "--context", "40",
        "--block-len", "8", "--iters", "2", "--budget", "0.05", "--membw-mib", "8", "--threads", "1"]  # fmt: skip


def _tiny_case(s: int, ragged: bool, dtype: np.dtype = F32):
    from tkg.bench.cases import Case, Shape

    return Case(Shape(batch=3, kv_heads=2, q_per_kv=3, d=32, context=40, s=s, block_len=8, ragged=ragged, dtype=dtype))


@pytest.mark.parametrize(("s", "ragged"), [(1, True), (4, False), (3, True)])
def test_bench_case_views_agree(s: int, ragged: bool) -> None:
    """The folded attention_tkg call and the contiguous sdpa cache describe the same step as the pools."""
    import torch

    from tkg.kernel.arrays import from_numpy
    from tkg.kernel.validate import validate_call

    case = _tiny_case(s, ragged)
    args = case.paged_args()
    want = _paged_oracle(args)
    # Block ids really are shuffled and lengths ragged when asked for.
    used = np.concatenate([case.block_tables[b, : -(-int(n) // 8)] for b, n in enumerate(case.seq_lens)])
    assert not np.array_equal(used, np.sort(used)) and len(set(used.tolist())) == used.size
    assert (len(set(case.seq_lens.tolist())) > 1) == ragged
    fa = case.folded
    call = validate_call(fa["q"], fa["k_active"], fa["v_active"], fa["k_prior"], fa["v_prior"], fa["mask"],
                         fa["out"], fa["cfg"], rope_pos_ids=fa["rope_pos_ids"],
                         active_blocks_table=fa["active_blocks_table"])  # fmt: skip
    reference.run(call)
    np.testing.assert_allclose(case.unfold_out(call.out), want, rtol=1e-5, atol=1e-5)
    k, v, vis = case.contiguous
    got = torch.nn.functional.scaled_dot_product_attention(
        from_numpy(case.q), from_numpy(k), from_numpy(v), attn_mask=None if vis is None else torch.from_numpy(vis),
        scale=case.scale, enable_gqa=True,
    )  # fmt: skip
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_bench_case_kv_bytes_counts_every_cached_element_once() -> None:
    case = _tiny_case(1, True, BF16)
    assert case.kv_bytes == int(case.seq_lens.sum()) * 2 * 32 * 2 * 2  # tokens x Hkv x d x (K, V) x 2 bytes


def test_bench_kernel_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tkg.bench import kernel as bench

    assert bench.main([*TINY, "--s", "1,2", "--lens", "ragged", "--json", "-"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["read_bandwidth_gbs"] > 0
    assert rep["cpu_implementation"]
    assert [c["label"] for c in rep["cases"]] == ["S=1 BL=8 ragged", "S=2 BL=8 ragged"]
    # The schema: the fields of case_figures (whose arithmetic the test below checks on known times)
    # plus each case's shape and each peer's error against cpu.paged_decode.
    known = _known_case_figures(read_gbs=1.5)
    for c in rep["cases"]:
        assert set(c["peers"]) == set(bench.PEERS)
        assert set(c) == set(known) | {"label", "batch", "kv_heads", "q_heads", "head_dim", "s", "block_len",
                                       "ragged", "dtype", "seq_lens", "kv_bytes"}  # fmt: skip
        # torch's probe always; the native one too where the extension is built
        assert "torch" in c["read_probes_gbs"] and all(v > 0 for v in c["read_probes_gbs"].values())
        for name, p in c["peers"].items():
            assert set(p) == set(known["peers"]["cpu.paged_decode"]) | {"max_abs_err_vs_cpu.paged_decode"}, name
            assert p["max_abs_err_vs_cpu.paged_decode"] < 2e-2, name  # bf16 outputs: every peer agrees
            assert 1 <= p["runs"] <= 2  # --iters 2, unless one run alone exceeded the budget
            assert all(p[k] > 0 for k in ("median_ms", "eff_gbs", "x_read_bw", "tokens_per_s", "speedup_vs_sdpa_gqa"))


def _known_case_figures(read_gbs: float) -> dict:
    from tkg.bench import kernel as bench

    runs = {
        "cpu.paged_decode": [0.001, 0.003, 0.002],  # median 2 ms
        "cpu.attention_tkg": [0.002, 0.002, 0.004],  # median 2 ms; same-round ratios 0.5, 1.5, 0.5
        "sdpa_gqa": [0.004],
        bench._PROBE.format("torch"): [0.0005],  # 1 MB in 0.5 ms: 2 GB/s
    }
    return bench.case_figures(2_000_000, 6, runs, {"torch": 1_000_000}, read_gbs)


def test_case_figures_on_known_times() -> None:
    """The arithmetic of a case's figures on times chosen by hand (values worked out on paper)."""
    got = _known_case_figures(read_gbs=1.5)  # the interleaved probe (2 GB/s) is the better denominator
    assert got["read_probes_gbs"] == pytest.approx({"torch": 2.0})
    assert (got["read_gbs_interleaved"], got["read_gbs"]) == pytest.approx((2.0, 2.0))
    assert got["paged_over_api_paired"] == pytest.approx(0.5)  # the paired median, not 2 ms / 2 ms
    assert got["peers"] == {
        "cpu.paged_decode": pytest.approx({"median_ms": 2.0, "runs": 3, "eff_gbs": 1.0, "x_read_bw": 0.5,
                                           "tokens_per_s": 3000, "speedup_vs_sdpa_gqa": 2.0}),
        "cpu.attention_tkg": pytest.approx({"median_ms": 2.0, "runs": 3, "eff_gbs": 1.0, "x_read_bw": 0.5,
                                            "tokens_per_s": 3000, "speedup_vs_sdpa_gqa": 2.0}),
        "sdpa_gqa": pytest.approx({"median_ms": 4.0, "runs": 1, "eff_gbs": 0.5, "x_read_bw": 0.25,
                                   "tokens_per_s": 1500, "speedup_vs_sdpa_gqa": 1.0}),
    }  # fmt: skip
    higher = _known_case_figures(read_gbs=4.0)  # the run-start measure is better: it is the denominator
    assert (higher["read_gbs_interleaved"], higher["read_gbs"]) == pytest.approx((2.0, 4.0))
    assert higher["peers"]["cpu.paged_decode"]["x_read_bw"] == pytest.approx(0.25)


def test_bench_kernel_table_names_implementation(capsys: pytest.CaptureFixture[str]) -> None:
    from tkg.bench import kernel as bench

    assert bench.main([*TINY, "--s", "2", "--lens", "equal", "--peers", "cpu.paged_decode,sdpa_gqa"]) == 0
    text = capsys.readouterr().out
    assert "cpu backend implementation:" in text
    assert "S=2 BL=8 equal" in text and "sdpa_gqa" in text and "reference" not in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--s", "9"], "--s: 9"), (["--head-dim", "256"], "--head-dim: 256"), (["--budget", "0"], "--budget")],
)
def test_bench_kernel_rejects_bad_options(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tkg.bench import kernel as bench

    assert bench.main([*TINY, *argv]) == 2
    assert needle in capsys.readouterr().err


def test_bench_kernel_rejects_unknown_peer() -> None:
    from tkg.bench import kernel as bench

    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--peers", "cpu.paged_decode,flash"])


def test_read_bandwidth_checks_and_restores_threads() -> None:
    import torch

    from tkg.bench.membw import read_bandwidth

    with pytest.raises(ValueError, match="nbytes"):
        read_bandwidth(2**20)
    before = torch.get_num_threads()
    bw = read_bandwidth(8 * 2**20, reps=2, threads=1)
    assert bw.threads == 1 and bw.nbytes == 8 * 2**20
    assert 0 < bw.median_gbs <= bw.best_gbs
    assert torch.get_num_threads() == before


def test_settle_waits_while_a_thread_of_the_process_burns_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """settle() polls the process CPU time: it returns at the first quiet poll, and gives up at max_s."""
    from tkg.bench import membw

    clock = {"wall": 0.0, "cpu": 0.0}
    burn = [0.002, 0.002, 0.0015, 0.0001, 0.002]  # CPU seconds used by the process during each poll

    def sleep(dt: float) -> None:
        clock["wall"] += dt
        clock["cpu"] += burn.pop(0) if burn else 0.0

    monkeypatch.setattr(membw.time, "sleep", sleep)
    monkeypatch.setattr(membw.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(membw.time, "process_time", lambda: clock["cpu"])
    assert membw.settle() == pytest.approx(4 * 0.002)  # three busy polls, then a quiet one
    assert burn == [0.002]
    burn[:] = [0.002] * 100  # never quiet: bounded by max_s
    assert membw.settle(max_s=0.01) == pytest.approx(0.01)


def test_torch_paged_decode_reuses_workspaces_across_shapes_and_threads() -> None:
    """Workspaces are per thread and grow: shrinking, growing and concurrent calls stay exact."""
    import threading

    cases = [
        _paged_case(np.dtype(np.float32), 8, 4, None, True, seed=1),
        _paged_case(np.dtype(np.float32), 2, 1, 3, False, seed=2),  # smaller pools and tokens
        _paged_case(BF16, 8, 4, None, True, seed=3),
    ]
    for args in [*cases, cases[0]]:
        cpu_torch.paged_decode(args)
        np.testing.assert_allclose(args.out.astype(np.float32), _paged_oracle(args), rtol=2e-2, atol=2e-2)

    errors: list[BaseException] = []
    outs: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                args = cases[i]
                cpu_torch.paged_decode(args)
                outs[i].append(args.out.astype(np.float32).copy())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # Separate PagedArgs per thread (each owns its out); the kernel's buffers must not be shared.
    f32 = np.dtype(np.float32)
    cases = [_paged_case(f32, 8, 4, None, True, seed=1), _paged_case(f32, 4, 2, 5, True, seed=4)]
    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        want = _paged_oracle(cases[i])
        for got in outs[i]:
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bench_kernel_times_each_native_variant(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tkg.bench import kernel as bench

    cpu = pytest.importorskip("tkg.kernel.backends.cpu")
    variants = cpu.native_variants()
    if not variants:
        assert bench.main([*TINY, "--variants", "all"]) == 2
        assert "--variants: the native kernel is not built" in capsys.readouterr().err
        return
    argv = [*TINY, "--s", "2", "--lens", "ragged", "--peers", "cpu.paged_decode", "--variants", "all", "--json", "-"]
    assert bench.main(argv) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert set(case["peers"]) == {"cpu.paged_decode", *(f"cpu.paged_decode[{v}]" for v in variants)}
    for name, p in case["peers"].items():
        assert p["max_abs_err_vs_cpu.paged_decode"] < 2e-2, name
    assert bench.main([*TINY, "--variants", "sse9"]) == 2
    assert "--variants: sse9 not supported here" in capsys.readouterr().err


def test_tkg_cli_dispatches_bench_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tkg.cli import main

    argv = ["bench", "kernel", *TINY, "--s", "1", "--lens", "equal", "--peers", "torch.paged_decode", "--json", "-"]
    assert main(argv) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert list(case["peers"]) == ["torch.paged_decode"]
    assert case["kv_bytes"] == 3 * 40 * 2 * 32 * 2 * 2  # B x context x Hkv x d x (K, V) x bf16 bytes


def test_torch_run_fills_a_strided_out_and_leaves_the_rest() -> None:
    cfg = AttnTKGConfig(bs=2, q_head=2, s_active=2, curr_sprior=32, full_sprior=32, d_head=32, block_len=8,
                        tp_k_prior=True, strided_mm1=False, qk_in_sb=True, use_pos_id=True)  # fmt: skip
    fresh = _make_call(cfg, BF16, seed=9, sink=True)
    ref, got = fresh(), fresh()
    reference.run(ref)
    big = np.full((*cfg.out_shape[:-1], 2 * cfg.out_shape[-1]), 3.0, dtype=BF16)
    got.out = big[..., ::2]  # [B, H, d, S] view with a stride of 2 on S
    cpu_torch.run(got)
    np.testing.assert_allclose(got.out.astype(np.float32), ref.out.astype(np.float32), rtol=2e-2, atol=2e-2)
    assert np.all(big[..., 1::2].astype(np.float32) == 3.0)


def test_native_read_probe_reads_on_the_kernel_pool() -> None:
    cpu = pytest.importorskip("tkg.kernel.backends.cpu")
    if not cpu.native_variants():
        with pytest.raises(ValueError, match="not built"):
            cpu.read_probe(np.zeros(1024, np.float32))
        return
    from tkg.bench.membw import native_read_bandwidth

    buf = np.ones(2**20, np.float32)
    assert cpu.read_probe(buf, threads=1) == 1
    assert 1 <= cpu.read_probe(buf, threads=2) <= 2
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu.read_probe(buf.reshape(1024, 1024)[:, ::2])
    with pytest.raises(ValueError, match="nbytes"):
        cpu.read_probe(np.ones(7, np.float32))
    bw = native_read_bandwidth(8 * 2**20, reps=2, threads=1)
    assert bw is not None and bw.nbytes == 8 * 2**20 and 0 < bw.median_gbs <= bw.best_gbs


def test_goal_verdicts_follow_the_figures() -> None:
    from tkg.bench import kernel as bench

    def case(label: str, s: int, x: float, pd_ms: float, api_ms: float | None, dtype: str = "bfloat16") -> dict:
        peers = {"cpu.paged_decode": {"x_read_bw": x, "median_ms": pd_ms}}
        if api_ms is not None:
            peers["cpu.attention_tkg"] = {"x_read_bw": x, "median_ms": api_ms}
        return {"label": label, "s": s, "dtype": dtype, "peers": peers}

    paired = case("d", 1, 0.7, 10.0, 9.0) | {"paged_over_api_paired": 1.01}  # the paired ratio wins
    rep = {
        "cases": [case("a", 1, 0.61, 10.0, 9.6), case("b", 1, 0.59, 10.6, 10.0), case("c", 4, 0.1, 1.0, None),
                  case("a fp8", 1, 0.3, 5.0, None, dtype="float8_e4m3"), paired],
        "fp8_vs_bf16": [{"label": "a", "peers": {"cpu.paged_decode": {"speedup": 1.59}}}],
    }  # fmt: skip
    got = [(g["case"], g["goal"].split()[0], round(g["value"], 3), g["met"]) for g in bench.goal_verdicts(rep)]
    assert got == [
        ("a", "x", 0.61, True), ("a", "paged/attention_tkg", 1.042, True),
        ("b", "x", 0.59, False), ("b", "paged/attention_tkg", 1.06, False),
        ("d", "x", 0.7, True), ("d", "paged/attention_tkg", 1.01, True),
        ("a fp8", "fp8/bf16", 1.59, False),
    ]  # fmt: skip


def test_bench_kernel_prints_both_probes_and_the_goals(capsys: pytest.CaptureFixture[str]) -> None:
    from tkg.bench import kernel as bench

    argv = [*TINY, "--s", "1", "--lens", "equal", "--peers", "cpu.paged_decode,cpu.attention_tkg"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "read probes GB/s torch" in text
    assert "goal  S=1 BL=8 equal" in text and "x read BW >= 0.6" in text and "paged/attention_tkg" in text
