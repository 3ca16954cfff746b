"""Hypothesis strategies and helpers for `attention_tkg` calls over the whole feature matrix.

`kernel_cases()` draws a `KernelCase`: a config (flat or block KV, every layout flag, use_pos_id,
sliding window incl. a circular-wrap row, fused RoPE, sinks incl. -inf ones, S = 1..8, d in
{32, 64, 128}, ragged cached lengths, curr_sprior < full_sprior, B+ > B), arguments in the
kernel's layouts (numpy, bf16/fp16/fp32), optional garbage (NaN, inf, dtype max) in every slot no
query may read, and how to call (numpy or torch, `out`/`k_out` given or not, DBG_TENSORS).

`run(case, backend)` calls `attention_tkg` and checks the call contract (torch in -> torch out,
given destinations written in place); `assert_close` compares with dtype-aware tolerances.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import torch
from hypothesis import strategies as st

from support.oracle import NaiveCall, mask_row_of_token
from tkg.dtypes import BF16, BY_SHORT
from tkg.kernel import AttnTKGConfig, attention_tkg

DTYPES: dict[str, np.dtype] = {short: BY_SHORT[short].numpy for short in ("fp32", "bf16", "fp16")}
TORCH_DTYPES = {short: BY_SHORT[short].torch for short in DTYPES}
# rtol: |actual - expected| <= rtol * (|expected| + max|expected|), i.e. relative to the element
# and to the tensor's scale (values near zero come from cancellation, not from a large error).
# Reference vs the float64 naive loops: fp32 arithmetic, then one rounding to the I/O dtype.
RTOL_VS_NAIVE = {"fp32": 1e-5, "bf16": 8e-3, "fp16": 1e-3}
# Another backend vs the reference, both from the same rounded inputs: room for a backend that
# keeps intermediates (e.g. the softmax weights) in the I/O dtype, as the NKI kernel does.
RTOL_VS_REFERENCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3}

DEBUG_NAMES = ("qk", "qk_max", "qk_exp", "exp_sum")
# Work bound for the naive oracle (multiply-adds B*H*S*Sp*d): keeps one example under ~0.3 s.
NAIVE_WORK = 250_000


@dataclass
class KernelCase:
    """One drawn `attention_tkg` call; `args` are numpy arrays in the kernel's layouts."""

    cfg: AttnTKGConfig
    dtype: str
    args: dict[str, Any]
    cached: np.ndarray  # [B] cached lengths (keys before the active tokens)
    seed: int
    garbage: bool = False
    torch_io: bool = False
    give_out: bool = False
    give_k_out: bool = False
    dbg: str | None = None  # None, "dict" or "tuple"
    notes: list[str] = field(default_factory=list)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # hypothesis prints failing examples with this: the summary, not every array.
        printer.text(repr(self))

    def __repr__(self) -> str:
        flags = [f for f in ("garbage", "torch_io", "give_out", "give_k_out") if getattr(self, f)]
        sink = self.args.get("sink")
        extra = [
            f"dbg={self.dbg}" if self.dbg else "",
            "window" if self.args.get("start_pos_ids") is not None else "",
            f"sink={np.asarray(sink).reshape(-1).tolist()}" if sink is not None else "",
        ]
        return (
            f"KernelCase({self.cfg}, dtype={self.dtype}, seed={self.seed}, cached={self.cached.tolist()}, "
            f"{' '.join(flags + [e for e in extra if e] + self.notes)})"
        )


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).astype(DTYPES[dtype]))


@st.composite
def kernel_cases(
    draw: st.DrawFn,
    *,
    dtypes: tuple[str, ...] = tuple(DTYPES),
    block: bool | None = None,
    use_pos_id: bool | None = None,
    fuse_rope: bool | None = None,
    sink: str | None = None,
    call_variants: bool = True,
    garbage: bool | None = None,
    window: str | None = None,
) -> KernelCase:
    """A random call over the feature matrix; keyword arguments pin one feature.

    window: "none", "window" (start_pos_ids) or "wrap" (a row whose window wraps around a
    circular cache, when one fits); a window implies use_pos_id.
    """
    block = draw(st.booleans()) if block is None else block
    fuse_rope = draw(st.booleans()) if fuse_rope is None else fuse_rope
    if window is not None and window != "none":
        use_pos_id = True
    use_pos_id = draw(st.booleans()) if use_pos_id is None else use_pos_id
    premask_block = block and not use_pos_id
    S = draw(st.integers(1, 4 if premask_block else 8))
    H = draw(st.integers(1, 2 if premask_block else 4))
    B = draw(st.integers(1, 2 if premask_block else 3))
    d_choices = [64, 128] if fuse_rope else [32, 64, 128]
    if premask_block:
        d_choices = [64] if fuse_rope else [32, 64]
    d = draw(st.sampled_from(d_choices))
    max_sp = max(S, min(64, NAIVE_WORK // (B * H * S * d)))

    bl = 0
    if premask_block:
        # A pre-generated block mask comes in folds of 128 blocks: Sp = folds * 128 * block_len.
        bl, folds = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (4, 1)]))
        Sp = folds * 128 * bl
        Spf = Sp
    elif block:
        bl = draw(st.sampled_from([1, 2, 4, 8, 16]))
        lo = -(-S // bl)
        Sp = bl * draw(st.integers(lo, max(lo, max_sp // bl)))
        Spf = Sp
    else:
        Sp = draw(st.integers(S, max_sp))
        Spf = Sp + draw(st.integers(0, 6))
    cfg = AttnTKGConfig(
        bs=B, q_head=H, s_active=S, curr_sprior=Sp, full_sprior=Spf, d_head=d, block_len=bl,
        tp_k_prior=True if block else draw(st.booleans()),
        strided_mm1=False if block else draw(st.booleans()),
        use_pos_id=use_pos_id, fuse_rope=fuse_rope,
        use_gpsimd_sb2sb=draw(st.booleans()),
        qk_in_sb=True if (block or not fuse_rope) else draw(st.booleans()),
        k_out_in_sb=draw(st.booleans()), out_in_sb=draw(st.booleans()),
    )  # fmt: skip
    dtype = draw(st.sampled_from(dtypes))
    cached = np.array(draw(st.lists(st.integers(0, Sp - S), min_size=B, max_size=B)), dtype=np.int64)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    case = KernelCase(cfg=cfg, dtype=dtype, args={}, cached=cached, seed=seed)
    a = case.args

    # Queries: pre-scaled unless RoPE is fused; a temperature makes some softmaxes peaked.
    temperature = draw(st.sampled_from([1.0, 4.0]))
    q = rng.standard_normal((B, H, S, d)) * temperature * (1.0 if fuse_rope else d**-0.5)
    k = rng.standard_normal((B, S, d))
    if cfg.qk_in_sb:
        a["q"] = _cast(q.transpose(3, 0, 1, 2).reshape(d, B * H * S), dtype)
        a["k_active"] = _cast(k.transpose(2, 0, 1).reshape(d, B * S), dtype)
    else:
        a["q"] = _cast(q, dtype)
        a["k_active"] = _cast(k[:, None], dtype)
    a["v_active"] = _cast(rng.standard_normal((B, 1, S, d)), dtype)

    if block:
        nblk = Sp // bl
        pool = B * nblk + draw(st.integers(0, 3))
        a["k_prior"] = _cast(rng.standard_normal((pool, bl, d)), dtype)
        a["v_prior"] = _cast(rng.standard_normal((pool, bl, d)), dtype)
        a["active_blocks_table"] = rng.permutation(pool)[: B * nblk].reshape(B, nblk).astype(np.uint32)
    else:
        bplus = B + draw(st.integers(0, 2))
        kp = rng.standard_normal((bplus, 1, Spf, d))
        a["k_prior"] = _cast(kp if cfg.tp_k_prior else kp.transpose(0, 1, 3, 2), dtype)
        a["v_prior"] = _cast(rng.standard_normal((bplus, 1, Spf, d)), dtype)

    # Masks: the active part is causal, or an arbitrary predicate with the diagonal set.
    holes = draw(st.booleans())
    eye = np.eye(S, dtype=bool)[:, None, None, :]  # [j, 1, 1, i]
    if holes:
        active = (rng.random((S, B, H, S)) < 0.5) | eye
        case.notes.append("holes")
    else:
        active = np.broadcast_to((np.arange(S)[:, None] <= np.arange(S)[None, :])[:, None, None, :], (S, B, H, S))
    # Any nonzero byte means attend.
    attend = rng.integers(1, 256, size=active.shape, dtype=np.uint8) if holes else np.uint8(1)
    active_u8 = np.where(active, attend, 0).astype(np.uint8)
    pos = cached[:, None] + np.arange(S)[None, :]
    pos_dtype = draw(st.sampled_from([np.float32, np.int32]))
    if use_pos_id:
        a["mask"] = np.ascontiguousarray(active_u8)
        a["rope_pos_ids"] = pos.astype(pos_dtype)
        window = draw(st.sampled_from(["none", "window", "wrap"])) if window is None else window
        if window != "none":
            width = draw(st.integers(S, max(S, Sp)))
            start = np.maximum(pos - width + 1, 0)
            wrap_rows = [b for b in range(B) if cached[b] + 1 < Sp - S]
            if wrap_rows and window == "wrap":
                b = draw(st.sampled_from(wrap_rows))
                start[b] = draw(st.integers(int(cached[b]) + 1, Sp - S - 1))
                case.notes.append(f"wrap-row={b}")
            a["start_pos_ids"] = start.astype(np.float32)
    else:
        prior = np.arange(Sp - S)[:, None, None, None] < cached[None, :, None, None]  # [Sp-S, B, 1, 1]
        prior = np.broadcast_to(prior, (Sp - S, B, H, S))
        if holes:
            prior = prior & (rng.random((Sp - S, B, H, S)) < 0.7)
        prior_attend = rng.integers(1, 256, size=prior.shape, dtype=np.uint8) if holes else np.uint8(1)
        natural = np.concatenate([np.where(prior, prior_attend, 0).astype(np.uint8), active_u8])
        if block:
            rows = [mask_row_of_token(t, bl) for t in range(Sp)]
            shuffled = np.empty_like(natural)
            shuffled[rows] = natural
            natural = shuffled
        a["mask"] = natural
        if fuse_rope:
            a["rope_pos_ids"] = pos.astype(pos_dtype)
    if draw(st.booleans()):
        a["mask"] = a["mask"] != 0  # a bool predicate is accepted as well as uint8
        case.notes.append("bool-mask")
    if fuse_rope:
        base = draw(st.sampled_from([10000.0, 500000.0]))
        a["inv_freqs"] = (1.0 / base ** (np.arange(0, d, 2) / d)).astype(np.float32).reshape(d // 2, 1)

    sink_kind = draw(st.sampled_from(["none", "random", "some-neg-inf"])) if sink is None else sink
    if sink_kind != "none":
        s = rng.standard_normal((H, 1)).astype(np.float32) * 3
        if sink_kind == "some-neg-inf":
            s[rng.integers(0, H)] = -np.inf
        a["sink"] = s if draw(st.booleans()) else s.reshape(H)

    if call_variants:
        case.torch_io = draw(st.booleans())
        case.give_out = draw(st.booleans())
        case.give_k_out = draw(st.booleans())
        case.dbg = draw(st.sampled_from([None, "dict", "tuple"]))
    if garbage if garbage is not None else draw(st.booleans()):
        fill_garbage(case, rng)
    return case


def never_visible(case: KernelCase) -> np.ndarray:
    """Boolean `[B, Sp]`: keys no query of the row may see (from the naive mask semantics)."""
    cfg = case.cfg
    c = NaiveCall(cfg, case.args)
    hidden = np.ones((cfg.bs, cfg.curr_sprior), dtype=bool)
    for b in range(cfg.bs):
        for k in range(cfg.curr_sprior):
            hidden[b, k] = not any(
                c.visible(b, h, i, k) for h in range(cfg.q_head) for i in range(cfg.s_active)
            )
    return hidden


def fill_garbage(case: KernelCase, rng: np.random.Generator) -> None:
    """Overwrite every cache slot the kernel must not read with NaN, +-inf or the dtype's max.

    Those are: the active slots `[Sp-S, Sp)`, keys no query of the row sees, slots past
    `curr_sprior`, the padding rows `B+ > B`, and pool blocks outside the table.
    """
    cfg, a = case.cfg, case.args
    B, S, Sp = cfg.bs, cfg.s_active, cfg.curr_sprior
    dt = DTYPES[case.dtype]
    big = float(ml_dtypes.finfo(dt).max)  # the largest finite value of the I/O dtype
    junk = np.array([np.nan, np.inf, -np.inf, big], dtype=np.float64).astype(dt)
    hidden = never_visible(case)
    hidden[:, Sp - S :] = True
    kp, vp = a["k_prior"].copy(), a["v_prior"].copy()

    def bad(shape: tuple[int, ...]) -> np.ndarray:
        return junk[rng.integers(0, len(junk), size=shape)]

    if cfg.is_block_kv:
        table = a["active_blocks_table"].astype(np.int64)
        unused = np.setdiff1d(np.arange(kp.shape[0]), table.reshape(-1))
        kp[unused], vp[unused] = bad(kp[unused].shape), bad(vp[unused].shape)
        for b in range(B):
            for k in np.nonzero(hidden[b])[0]:
                blk, off = table[b, k // cfg.block_len], k % cfg.block_len
                kp[blk, off], vp[blk, off] = bad((cfg.d_head,)), bad((cfg.d_head,))
    else:
        for b in range(B):
            for k in np.nonzero(hidden[b])[0]:
                vp[b, 0, k] = bad((cfg.d_head,))
                if cfg.tp_k_prior:
                    kp[b, 0, k] = bad((cfg.d_head,))
                else:
                    kp[b, 0, :, k] = bad((cfg.d_head,))
        vp[:, :, Sp:], vp[B:] = bad(vp[:, :, Sp:].shape), bad(vp[B:].shape)
        if cfg.tp_k_prior:
            kp[:, :, Sp:] = bad(kp[:, :, Sp:].shape)
        else:
            kp[:, :, :, Sp:] = bad(kp[:, :, :, Sp:].shape)
        kp[B:] = bad(kp[B:].shape)
    a["k_prior"], a["v_prior"] = kp, vp
    case.garbage = True


# --- calling ---------------------------------------------------------------------------------


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch copy of a numpy array (bf16 through its bits, since torch cannot read ml_dtypes)."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_f64(x: Any) -> np.ndarray:
    """numpy or torch (any float dtype) -> float64 numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


@dataclass
class Result:
    """What one call produced, as float64 in the kernel's layouts (k_out None if not produced)."""

    out: np.ndarray
    k_out: np.ndarray | None
    dbg: dict[str, np.ndarray] | None


def call_kwargs(case: KernelCase) -> dict[str, Any]:
    """Fresh keyword arguments for `attention_tkg` (numpy or torch, destinations as drawn)."""
    cfg = case.cfg
    conv = to_torch if case.torch_io else (lambda x: x.copy())
    kw: dict[str, Any] = {name: conv(v) if isinstance(v, np.ndarray) else v for name, v in case.args.items()}
    kw["cfg"] = cfg
    kw["out"] = None
    if case.give_out:
        # Pre-filled with NaN so a destination that is not fully written shows.
        dst = np.full(cfg.out_shape, np.nan, np.float32).astype(DTYPES[case.dtype])
        kw["out"] = conv(dst)
    if case.give_k_out:
        kw["k_out"] = conv(np.full(cfg.k_out_shape, np.nan, np.float32).astype(DTYPES[case.dtype]))
    if case.dbg is not None:
        shapes = debug_shapes(cfg)
        # The tuple form passes flat arrays (the kernel's own DBG buffers are tiled, not shaped).
        arrays = {n: np.full(shapes[n] if case.dbg == "dict" else int(np.prod(shapes[n])), np.nan, np.float32)
                  for n in DEBUG_NAMES}  # fmt: skip
        conv_dbg = {n: (to_torch(v) if case.torch_io else v) for n, v in arrays.items()}
        kw["DBG_TENSORS"] = conv_dbg if case.dbg == "dict" else tuple(conv_dbg[n] for n in DEBUG_NAMES)
    return kw


def debug_shapes(cfg: AttnTKGConfig) -> dict[str, tuple[int, ...]]:
    B, H, S, Sp = cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior
    return {"qk": (B, H, Sp, S), "qk_max": (B, H, 1, S), "qk_exp": (B, H, Sp, S), "exp_sum": (B, H, 1, S)}


def run(case: KernelCase, backend: str, **options: Any) -> Result:
    """Call `attention_tkg` on `backend` and check the call contract of docs/design/kernel.md.

    torch in -> torch out; a given `out`/`k_out` is returned (the same object) and written in
    place; `k_out` comes back exactly when fuse_rope or a destination was given; outputs have
    the kernel's shapes and q's dtype.
    """
    cfg = case.cfg
    kw = call_kwargs(case)
    out, k_out = attention_tkg(**kw, backend=backend, **options)
    kind = torch.Tensor if case.torch_io else np.ndarray
    assert isinstance(out, kind), f"out is {type(out).__name__}, expected {kind.__name__}"
    if case.give_out:
        assert out is kw["out"], "a given out must be returned itself"
    want_k_out = cfg.fuse_rope or case.give_k_out
    assert (k_out is not None) == want_k_out, f"k_out returned: {k_out is not None}, expected {want_k_out}"
    if k_out is not None:
        assert isinstance(k_out, kind)
        assert tuple(k_out.shape) == cfg.k_out_shape
        if case.give_k_out:
            assert k_out is kw["k_out"], "a given k_out must be returned itself"
    assert tuple(out.shape) == cfg.out_shape
    if case.torch_io:
        assert out.dtype == TORCH_DTYPES[case.dtype]
    else:
        assert out.dtype == DTYPES[case.dtype]
    dbg = None
    if case.dbg is not None:
        given = kw["DBG_TENSORS"]
        items = given.items() if isinstance(given, dict) else zip(DEBUG_NAMES, given, strict=True)
        shapes = debug_shapes(cfg)
        dbg = {n: to_f64(v).reshape(shapes[n]) for n, v in items}
    return Result(out=to_f64(out), k_out=None if k_out is None else to_f64(k_out), dbg=dbg)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    """|a - e| <= rtol * (|e| + max|e|) elementwise; -inf/+inf must match exactly."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf], err_msg=f"{what}: infinities differ")
    fin = ~inf
    a, e = actual[fin], expected[fin]
    assert np.all(np.isfinite(a)), f"{what}: {int((~np.isfinite(a)).sum())} non-finite values where finite expected"
    scale = float(np.abs(e).max()) if e.size else 0.0
    err = np.abs(a - e)
    bound = rtol * (np.abs(e) + scale) + 1e-30
    if not np.all(err <= bound):
        worst = int(np.argmax(err / bound))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())}/{err.size} elements out of tolerance rtol={rtol}; "
            f"worst actual={a[worst]!r} expected={e[worst]!r} (scale {scale:.3g})"
        )


def assert_result(actual: Result, expected: Result, case: KernelCase, rtol: dict[str, float], dbg_rtol: float) -> None:
    """Compare out, k_out (when produced) and the debug tensors (when asked for)."""
    tol = rtol[case.dtype]
    assert_close(actual.out, expected.out, tol, "out")
    if actual.k_out is not None:
        assert expected.k_out is not None
        assert_close(actual.k_out, expected.k_out, tol, "k_out")
    if actual.dbg is not None:
        assert expected.dbg is not None
        for name in DEBUG_NAMES:
            assert_close(actual.dbg[name], expected.dbg[name], dbg_rtol, f"DBG_TENSORS[{name}]")


def with_args(case: KernelCase, **changes: Any) -> KernelCase:
    """A copy of `case` with some arguments replaced (None removes one)."""
    args = {**case.args, **changes}
    return dataclasses.replace(case, args={k: v for k, v in args.items() if v is not None}, notes=list(case.notes))
