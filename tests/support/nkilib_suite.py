"""nki-library's own `attention_tkg` test suite as data: its cases, its inputs, its golden.

A port from the Neuron kernel library must give the library's answers on the library's tests.
This module reads the library's test configurations (the fast and slow lists of its
`test/integration/nkilib/core/attention/test_attention_tkg.py`, parsed with `ast`, never
imported: that module needs the Neuron toolchain), builds the inputs the way that test builds
them, computes the golden with the library's torch reference (imported at run time), and
compares with the library's tolerance. Nothing of the library is copied here: its location comes
from the environment, and everything is read from it when a test runs.

    TKG_NKILIB_PATH   the library's `src/nkilib_src` (the directory holding the `nkilib` package)
    TKG_NKILIB_TESTS  optional: its test file, if not at `<TKG_NKILIB_PATH>/../../test/...`
    TKG_NKILIB_EMU_ALL=1  every case on the two emulators (nki-emu in test_nkilib_parity.py,
                      nkilib-emu in test_nkilib_emu_suite.py); unset: cases up to EMU_MAX_KEYS
                      keys per row. `.ci/run` sets it (both whole take ~3 min; docs/testing.md).
    CI=true           without the library, those suites fail instead of skipping (`no_library`).

Use (tests, benches):

    for case in cases("fast"):                 # 107 configurations x lnc 1, 2 = 214 cases
        inputs = make_inputs(case)             # numpy arrays, our layouts (the library's)
        gold = golden(case, inputs)            # {"out": ..., "k_out": ...} in the output dtype
        got = run_case(case, inputs, backend="cpu")
        ok, report = compare(got, gold, case)

Input recipe (the library's test, restated): one legacy numpy stream seeded with 0 draws, in this
order, q, k_active, v_active, k_prior, v_prior (uniform [0, 1) rounded to the I/O dtype; with fp8
KV the four K/V tensors are uniform [-240, 240) rounded to float8_e4m3 and q is the bf16 draw
rounded to fp8), inv_freqs (uniform [0, 1), fuse_rope only), the block table (a permutation of
the B*Sp/block_len blocks, entries past each row's ceil((pos+S)/block_len) set to block 0) and
the sink (uniform [0, 1)). The cached length of row b is (3b + 3*(Sp//4)) % (Sp - S). Positions
are that length for every query, or pos+i with a sliding window (whose start is pos+i-W+1,
clamped at 0 for block KV and taken modulo Sp for a flat cache). The library memoises its block
tables across tests of one pytest process; here each case draws its own, so the values differ
from a given library run while the recipe is the same.

Tolerance (the library's maxAllClose, mode "max"): |a - b| <= atol + rtol * max|b| elementwise,
rtol/atol 1e-2/1e-5, or 3e-2/3e-2 with fp8 KV.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from tkg.kernel.config import AttnTKGConfig

ENV = "TKG_NKILIB_PATH"
ENV_TESTS = "TKG_NKILIB_TESTS"
ENV_EMU_ALL = "TKG_NKILIB_EMU_ALL"
EMU_MAX_KEYS = 4096  # without TKG_NKILIB_EMU_ALL=1: emulator cases up to this Sp (112 of the 214 fast ones)
_SUITE_REL = "test/integration/nkilib/core/attention/test_attention_tkg.py"
_LISTS = {"fast": "attention_tkg_fast_configs", "slow": "attention_tkg_slow_configs"}
P_MAX = 128
FP8 = np.dtype(ml_dtypes.float8_e4m3)
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_MAX = 240.0
TOLERANCE = {False: (1e-2, 1e-5), True: (3e-2, 3e-2)}  # fp8_kv -> (rtol, atol)


@dataclass(frozen=True)
class Case:
    """One test of the library's suite at one lnc.

    Attributes:
        id: stable, readable test id (shape, flags, params, lnc).
        suite: "fast" or "slow".
        index: position in the library's list.
        cfg: our `AttnTKGConfig` (same field names and order as the library's).
        lnc: logical cores the library runs it on (1 or 2).
        dtype: I/O dtype name, "bfloat16" or "float32" (output dtype also with fp8 KV).
        sink: a per-head sink is passed.
        fp8_kv: q, k, v and both caches are float8_e4m3.
        sliding_window: W > 0 passes start_pos_ids (per-query windows).
    """

    id: str
    suite: str
    index: int
    cfg: AttnTKGConfig
    lnc: int
    dtype: str = "bfloat16"
    sink: bool = False
    fp8_kv: bool = False
    sliding_window: int = 0

    @property
    def io_dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.dtype == "float32" else BF16

    @property
    def in_dtype(self) -> np.dtype:
        """dtype of q, k_active, v_active, k_prior, v_prior."""
        return FP8 if self.fp8_kv else self.io_dtype

    @property
    def tolerance(self) -> tuple[float, float]:
        return TOLERANCE[self.fp8_kv]


# --------------------------------------------------------------------------- locating the library


def library_path() -> Path | None:
    """The library's `nkilib_src` directory from TKG_NKILIB_PATH, or None when unset."""
    p = os.environ.get(ENV)
    return Path(p) if p else None


def suite_file() -> Path | None:
    explicit = os.environ.get(ENV_TESTS)
    if explicit:
        return Path(explicit)
    lib = library_path()
    return None if lib is None else lib.parent.parent / _SUITE_REL


def skip_reason() -> str | None:
    """None when the library and its test file are usable here, else why not (for pytest.skip)."""
    lib = library_path()
    if lib is None:
        return f"{ENV} is not set (point it at nki-library's src/nkilib_src to run the library's suite)"
    if not (lib / "nkilib" / "core" / "attention" / "attention_tkg_torch.py").is_file():
        return f"{ENV}={lib}: no nkilib/core/attention/attention_tkg_torch.py under it"
    f = suite_file()
    if f is None or not f.is_file():
        return f"the library's test file is not at {f} (set {ENV_TESTS})"
    return None


def no_library(reason: str, arity: int = 1) -> list[Any]:
    """The one parameter set of a suite without the library: skipped with `reason`, or, under
    CI=true (where `.ci/run` provides the library), a test that fails with it (its first value is
    None: the test calls `pytest.fail(reason)`)."""
    import pytest

    values = (None,) * arity
    if os.environ.get("CI") == "true":
        return [pytest.param(*values, id="no-library")]
    return [pytest.param(*values, id="no-library", marks=pytest.mark.skip(reason=reason))]


def emu_skip(case: Case) -> str | None:
    """Why an emulator suite leaves `case` out by default (None: it runs): more keys per row than
    EMU_MAX_KEYS, unless TKG_NKILIB_EMU_ALL=1."""
    if os.environ.get(ENV_EMU_ALL) == "1" or case.cfg.curr_sprior <= EMU_MAX_KEYS:
        return None
    return f"Sp = {case.cfg.curr_sprior} > {EMU_MAX_KEYS} keys ({ENV_EMU_ALL}=1 runs it, as CI does)"


# --------------------------------------------------------------------------- the cases


def _literal(node: ast.expr) -> Any:
    # `nl.float32` / `nl.bfloat16` (attribute of the NKI language module) -> its name.
    if isinstance(node, ast.Attribute):
        return node.attr
    return ast.literal_eval(node)


def _parse_list(source: str, name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """[(config kwargs, test-param kwargs)] of the module-level list `name` in the test file."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            break
    else:
        raise LookupError(f"{name} not found in the library's test file")
    assert isinstance(node.value, ast.List)
    cfg_names = [f.name for f in fields(AttnTKGConfig)]
    rows = []
    for elt in node.value.elts:
        assert isinstance(elt, ast.List) and len(elt.elts) in (1, 2), ast.dump(elt)[:200]
        call = elt.elts[0]
        assert isinstance(call, ast.Call)
        kw = dict(zip(cfg_names, (_literal(a) for a in call.args), strict=False))
        kw.update({k.arg: _literal(k.value) for k in call.keywords})
        params: dict[str, Any] = {}
        if len(elt.elts) == 2:
            p = elt.elts[1]
            assert isinstance(p, ast.Call)
            params = {k.arg: _literal(k.value) for k in p.keywords}
        rows.append((kw, params))
    return rows


def _case_id(cfg: AttnTKGConfig, lnc: int, dtype: str, sink: bool, fp8: bool, sw: int) -> str:
    flags = "".join(
        tag for tag, on in (("T", cfg.tp_k_prior), ("M", cfg.strided_mm1), ("P", cfg.use_pos_id),
                            ("R", cfg.fuse_rope), ("Q", cfg.qk_in_sb), ("K", cfg.k_out_in_sb),
                            ("O", cfg.out_in_sb)) if on
    )  # fmt: skip
    extra = ("-f32" if dtype == "float32" else "") + ("-sink" if sink else "") + ("-fp8" if fp8 else "")
    extra += f"-sw{sw}" if sw else ""
    return (
        f"b{cfg.bs}h{cfg.q_head}s{cfg.s_active}-sp{cfg.curr_sprior}of{cfg.full_sprior}-d{cfg.d_head}"
        f"-bl{cfg.block_len}-{flags or '_'}{extra}-lnc{lnc}"
    )


@cache
def _rows(suite: str) -> tuple[tuple[dict[str, Any], dict[str, Any]], ...]:
    f = suite_file()
    if f is None:
        raise RuntimeError(skip_reason() or "no library")
    return tuple(_parse_list(f.read_text(), _LISTS[suite]))


def cases(suite: str = "fast", lncs: tuple[int, ...] | None = None) -> list[Case]:
    """Every case of the library's `suite` ("fast": each config at lnc 1 and 2, as the library runs
    it; "slow": each config at lnc 2, the library's default on trn2). Needs the library (see
    `skip_reason`)."""
    if lncs is None:
        lncs = (1, 2) if suite == "fast" else (2,)
    out = []
    for index, (kw, params) in enumerate(_rows(suite)):
        cfg = AttnTKGConfig(**kw)
        dtype = str(params.get("dtype", "bfloat16"))
        sink = bool(params.get("test_sink", False))
        fp8 = bool(params.get("fp8_kv", False))
        sw = int(params.get("sliding_window", 0))
        for lnc in lncs:
            out.append(Case(_case_id(cfg, lnc, dtype, sink, fp8, sw), suite, index, cfg, lnc, dtype, sink, fp8, sw))
    return out


# --------------------------------------------------------------------------- the library at run time


@contextlib.contextmanager
def _library_on_path() -> Iterator[None]:
    lib = str(library_path())
    added = lib not in sys.path
    if added:
        sys.path.insert(0, lib)
    try:
        yield
    finally:
        if added:
            sys.path.remove(lib)


@cache
def _library() -> dict[str, Any]:
    """The library's torch reference, mask builder and config class (imports `nki`: the tkg
    emulator stands in when the Neuron SDK is absent; the reference only needs its dtypes)."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    from tkg.kernel.nki_emu.install import install

    install()
    with _library_on_path():
        from nkilib.core.attention.attention_tkg_torch import attention_tkg_torch_ref
        from nkilib.core.attention.attention_tkg_utils import AttnTKGConfig as LibConfig
        from nkilib.core.attention.gen_mask_tkg_torch import build_full_attention_mask
    return {"ref": attention_tkg_torch_ref, "config": LibConfig, "full_mask": build_full_attention_mask}


def library_config(cfg: AttnTKGConfig) -> Any:
    """The library's `AttnTKGConfig` with the same fields as ours."""
    lib_cls = _library()["config"]
    names = {f.name for f in fields(lib_cls)}
    return lib_cls(**{f.name: getattr(cfg, f.name) for f in fields(AttnTKGConfig) if f.name in names})


# --------------------------------------------------------------------------- inputs


def cached_lengths(cfg: AttnTKGConfig) -> np.ndarray:
    """The test's cached length per row, `[B]` int64."""
    return (np.arange(cfg.bs) * 3 + (cfg.curr_sprior // 4) * 3) % (cfg.curr_sprior - cfg.s_active)


def positions(case: Case) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(start_pos_ids, rope_pos_ids), float32 `[B, S]` each, or None where the test passes none."""
    cfg = case.cfg
    if not (cfg.fuse_rope or cfg.use_pos_id):
        return None, None
    pos = cached_lengths(cfg)[:, None].astype(np.float64)
    S = cfg.s_active
    if not case.sliding_window:
        return None, np.broadcast_to(pos, (cfg.bs, S)).astype(np.float32)
    ends = pos + np.arange(S)[None, :]
    starts = ends - case.sliding_window + 1
    starts = np.maximum(starts, 0) if cfg.is_block_kv else np.mod(starts, cfg.curr_sprior)
    return starts.astype(np.float32), ends.astype(np.float32)


def _causal_active(cfg: AttnTKGConfig) -> np.ndarray:
    """uint8 `[S(key), B, H, S(query)]`: key j visible to query i when j <= i."""
    S = cfg.s_active
    tri = (np.arange(S)[:, None] <= np.arange(S)[None, :]).astype(np.uint8)  # [key, query]
    return np.ascontiguousarray(np.broadcast_to(tri[:, None, None, :], (S, cfg.bs, cfg.q_head, S)))


def _pregenerated_mask(case: Case) -> np.ndarray:
    """The library's own full mask builder (its layout, incl. the block-KV order for this lnc)."""
    import torch

    cfg = case.cfg
    lib = _library()
    lens = torch.from_numpy(cached_lengths(cfg).astype(np.float32))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints block-length advice
        m = lib["full_mask"](
            cache_lens=lens, batch=cfg.bs, num_heads=cfg.q_head, s_active=cfg.s_active, s_ctx=cfg.curr_sprior,
            lnc=case.lnc, block_len=cfg.block_len, include_active_mask=True, transposed=True,
            enable_fa_s_prior_tiling=cfg.enable_fa_s_prior_tiling,
        )  # fmt: skip
    return np.ascontiguousarray(m.numpy().astype(bool).astype(np.uint8))


def block_table(cfg: AttnTKGConfig, rng: np.random.RandomState) -> np.ndarray:
    """uint32 `[B, Sp/block_len]`: distinct blocks, entries past each row's live blocks -> 0."""
    n = cfg.bs * cfg.blocks_per_seq
    table = rng.choice(n, size=n, replace=False).reshape(cfg.bs, cfg.blocks_per_seq).astype(np.uint32)
    live = -(-(cached_lengths(cfg) + cfg.s_active) // cfg.block_len)
    for b in range(cfg.bs):
        table[b, live[b] :] = 0
    return table


def make_inputs(case: Case) -> dict[str, Any]:
    """The arguments of `attention_tkg` for `case` (numpy, the library's layouts and dtypes):
    q, k_active, v_active, k_prior, v_prior, mask, inv_freqs, rope_pos_ids, start_pos_ids, sink,
    active_blocks_table (None where the test passes none)."""
    cfg = case.cfg
    B, H, d, Sp, Spf = cfg.bs, cfg.q_head, cfg.d_head, cfg.curr_sprior, cfg.full_sprior
    rng = np.random.RandomState(0)
    io_dt = case.io_dtype

    def uniform(shape: tuple[int, ...]) -> np.ndarray:
        return rng.random_sample(shape).astype(io_dt)

    def kv(shape: tuple[int, ...]) -> np.ndarray:
        if case.fp8_kv:
            return (rng.random_sample(shape) * (2 * FP8_MAX) - FP8_MAX).astype(FP8)
        return uniform(shape)

    if cfg.is_block_kv:
        k_prior_shape = v_prior_shape = (B * Sp // cfg.block_len, cfg.block_len, d)
    else:
        k_prior_shape = (B, 1, Spf, d) if cfg.tp_k_prior else (B, 1, d, Spf)
        v_prior_shape = (B, 1, Spf, d)
    q = uniform(cfg.q_shape).astype(case.in_dtype)
    k_active = kv(cfg.k_active_shape)
    v_active = kv(cfg.v_active_shape)
    k_prior = kv(k_prior_shape)
    v_prior = kv(v_prior_shape)
    mask = _causal_active(cfg) if cfg.use_pos_id else _pregenerated_mask(case)
    inv_freqs = rng.random_sample((d // 2, 1)).astype(np.float32) if cfg.fuse_rope else None
    start_pos_ids, rope_pos_ids = positions(case)
    table = block_table(cfg, rng) if cfg.is_block_kv else None
    sink = rng.random_sample((H, 1)).astype(np.float32) if case.sink else None
    return {
        "q": q, "k_active": k_active, "v_active": v_active, "k_prior": k_prior, "v_prior": v_prior,
        "mask": mask, "inv_freqs": inv_freqs, "rope_pos_ids": rope_pos_ids, "start_pos_ids": start_pos_ids,
        "sink": sink, "active_blocks_table": table,
    }  # fmt: skip


# --------------------------------------------------------------------------- golden, run, compare


def _to_torch(a: np.ndarray | None) -> Any:
    import torch

    if a is None:
        return None
    if a.dtype == np.uint32:
        a = a.astype(np.int32)
    elif a.dtype in (BF16, FP8):
        a = a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a))


def golden(case: Case, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The library's torch reference on `inputs` at the case's lnc: {"out"[, "k_out"]}, rounded
    to the output dtype (bf16, or fp32 for float32 cases), in the call's output layouts."""
    import torch

    cfg = case.cfg
    lib = _library()
    out = torch.zeros(cfg.out_shape, dtype=torch.float32)
    k_out = torch.zeros(cfg.k_out_shape, dtype=torch.float32) if cfg.fuse_rope else None
    with contextlib.redirect_stdout(io.StringIO()):
        res_out, res_k = lib["ref"][case.lnc](
            **{k: _to_torch(v) for k, v in inputs.items()}, out=out, cfg=library_config(cfg), sbm=None, k_out=k_out,
        )  # fmt: skip
    gold = {"out": res_out.numpy().astype(case.io_dtype)}
    if res_k is not None:
        gold["k_out"] = res_k.numpy().astype(case.io_dtype)
    return gold


def run_case(case: Case, inputs: dict[str, Any], backend: str, **options: Any) -> dict[str, np.ndarray]:
    """Our `attention_tkg` on `inputs` with `backend` (lnc passed as the backend option)."""
    from tkg.kernel.api import attention_tkg

    cfg = case.cfg
    args = dict(inputs)
    start = args.pop("start_pos_ids")
    out = np.zeros(cfg.out_shape, dtype=case.io_dtype)
    res_out, res_k = attention_tkg(
        out=out, cfg=cfg, start_pos_ids=start, backend=backend, lnc=case.lnc, **args, **options
    )
    got = {"out": np.asarray(res_out)}
    if res_k is not None and cfg.fuse_rope:
        got["k_out"] = np.asarray(res_k)
    return got


def max_all_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> tuple[bool, float]:
    """The library's "max" criterion: every |a - b| <= atol + rtol * max|b|. Returns (passed, the
    worst excess relative to max|b|, i.e. (max|a-b| - atol) / max|b|). NaN anywhere fails."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return False, float("inf")
    brange = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    rel = (diff - atol) / brange if brange > 0 else (0.0 if diff <= atol else float("inf"))
    return diff <= atol + rtol * brange, rel


def compare(got: dict[str, np.ndarray], gold: dict[str, np.ndarray], case: Case) -> tuple[bool, str]:
    """(passed, one-line report) for every golden output of the case, with the library's tolerance."""
    rtol, atol = case.tolerance
    ok = True
    parts = []
    for name, expected in gold.items():
        if name not in got:
            ok = False
            parts.append(f"{name}: missing")
            continue
        passed, rel = max_all_close(got[name], expected, rtol, atol)
        ok &= passed
        parts.append(f"{name}: {'ok' if passed else 'FAIL'} rel {rel:.2e}")
    return ok, f"{case.id}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`python tests/support/nkilib_suite.py [--suite fast] [--backend reference cpu] [--lnc 1 2] [-k SUBSTR]`:
    pass counts per backend x lnc (and the failing ids) on the library's suite."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--suite", default="fast", choices=sorted(_LISTS))
    ap.add_argument("--backend", nargs="+", default=["reference", "cpu"])
    ap.add_argument("--lnc", nargs="+", type=int, default=None)
    ap.add_argument("-k", default="", help="only cases whose id contains this")
    ap.add_argument("-v", action="store_true", help="print every case")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(reason)
        return 2
    todo = [c for c in cases(args.suite, tuple(args.lnc) if args.lnc else None) if args.k in c.id]
    tally: dict[tuple[str, int], list[int]] = {}
    fails: list[str] = []
    t0 = time.monotonic()
    for case in todo:
        inputs = make_inputs(case)
        gold = golden(case, inputs)
        for be in args.backend:
            try:
                ok, line = compare(run_case(case, inputs, be), gold, case)
            except Exception as exc:  # a refusal counts as a failure, with its message
                ok, line = False, f"{case.id}: {type(exc).__name__}: {exc}"
            t = tally.setdefault((be, case.lnc), [0, 0])
            t[0] += ok
            t[1] += 1
            if args.v or not ok:
                print(f"[{be}] {line}", flush=True)
            if not ok:
                fails.append(f"{be} {case.id}")
    for (be, lnc), (p, n) in sorted(tally.items()):
        print(f"{be:10s} lnc={lnc}: {p}/{n} pass")
    print(f"{len(todo)} cases in {time.monotonic() - t0:.0f} s")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
