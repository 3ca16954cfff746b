"""Every ValueError of kernel/validate.py and kernel/paged.py, each message naming its argument.

Each case breaks ONE thing in a call that is otherwise valid (the valid calls are tested too)
and checks the message: `attention_tkg: <argument>: ...` / `paged_decode: <argument>: ...`, plus
the limit or expected value it must state. `test_every_raise_site_is_covered` reads the two
modules' source and fails when a check is added without a case here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tkg.dtypes import BF16, FP8
from tkg.kernel import AttnTKGConfig, BackendUnavailable, attention_tkg, paged_decode
from tkg.kernel.paged import check_paged_args

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernel"

# Valid bases: a flat call with fused RoPE in the HBM layouts, a flat pre-scaled call with a
# generated mask, and a block-KV call with a pre-generated (fold-ordered) mask.
ROPE = AttnTKGConfig(bs=2, q_head=2, s_active=2, curr_sprior=8, full_sprior=10, d_head=64, fuse_rope=True)
POS = AttnTKGConfig(bs=2, q_head=2, s_active=2, curr_sprior=8, full_sprior=8, d_head=32, qk_in_sb=True,
                    use_pos_id=True, tp_k_prior=True)  # fmt: skip
BLOCK = AttnTKGConfig(bs=1, q_head=2, s_active=2, curr_sprior=128, full_sprior=128, d_head=32, block_len=1,
                      tp_k_prior=True, strided_mm1=False, qk_in_sb=True)  # fmt: skip


def valid(cfg: AttnTKGConfig) -> dict[str, Any]:
    """A valid call for one of the bases above (zeros, the active diagonal visible)."""
    B, H, S, d, Sp, Spf = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior, cfg.full_sprior
    f32 = np.float32
    kw: dict[str, Any] = {"cfg": cfg, "out": None}
    if cfg.qk_in_sb:
        kw["q"], kw["k_active"] = np.zeros((d, B * H * S), f32), np.zeros((d, B * S), f32)
    else:
        kw["q"], kw["k_active"] = np.zeros((B, H, S, d), f32), np.zeros((B, 1, S, d), f32)
    kw["v_active"] = np.zeros((B, 1, S, d), f32)
    if cfg.block_len:
        nblk = Sp // cfg.block_len
        kw["k_prior"] = np.zeros((B * nblk, cfg.block_len, d), f32)
        kw["v_prior"] = np.zeros((B * nblk, cfg.block_len, d), f32)
        kw["active_blocks_table"] = np.arange(B * nblk, dtype=np.uint32).reshape(B, nblk)
    else:
        kw["k_prior"] = np.zeros((B + 1, 1, Spf, d) if cfg.tp_k_prior else (B + 1, 1, d, Spf), f32)
        kw["v_prior"] = np.zeros((B + 1, 1, Spf, d), f32)
    keys = S if cfg.use_pos_id else Sp
    kw["mask"] = np.ones((keys, B, H, S), np.uint8)
    if cfg.fuse_rope or cfg.use_pos_id:
        kw["rope_pos_ids"] = np.tile(np.arange(S, dtype=np.float32), (B, 1))
    if cfg.fuse_rope:
        kw["inv_freqs"] = np.ones((d // 2, 1), f32)
    return kw


@pytest.mark.parametrize("cfg", [ROPE, POS, BLOCK], ids=["rope", "pos-id", "block"])
def test_base_calls_are_valid(cfg: AttnTKGConfig) -> None:
    out, _ = attention_tkg(**valid(cfg), backend="reference")
    assert np.isfinite(out).all()


def cfg_case(base: AttnTKGConfig, **changes: Any) -> Callable[[], dict[str, Any]]:
    """A call whose config breaks a rule; arrays are built for the valid base config."""

    def build() -> dict[str, Any]:
        kw = valid(base)
        kw["cfg"] = dataclasses.replace(base, **changes)
        return kw

    return build


def arg_case(base: AttnTKGConfig, **changes: Any) -> Callable[[], dict[str, Any]]:
    """A valid call with some arguments replaced (callables get the valid call's kwargs)."""

    def build() -> dict[str, Any]:
        kw = valid(base)
        for name, value in changes.items():
            kw[name] = value(kw) if callable(value) else value
        return kw

    return build


def readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def dbg(shapes: dict[str, tuple[int, ...]], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {k: np.zeros(v, dtype) for k, v in shapes.items()}


B2H2S2SP8 = {"qk": (2, 2, 8, 2), "qk_max": (2, 2, 1, 2), "qk_exp": (2, 2, 8, 2), "exp_sum": (2, 2, 1, 2)}

# id -> (call builder, argument named in the message, text the message must also contain)
KERNEL_CASES: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    # the config alone
    "cfg-type": (arg_case(ROPE, cfg={"bs": 2}), "cfg", "expected AttnTKGConfig, got dict"),
    "bs-zero": (cfg_case(ROPE, bs=0), "cfg.bs", "0 must be a positive integer"),
    "q_head-float": (cfg_case(ROPE, q_head=2.0), "cfg.q_head", "must be a positive integer"),
    "s_active-zero": (cfg_case(ROPE, s_active=0), "cfg.s_active", "positive integer"),
    "curr_sprior-neg": (cfg_case(ROPE, curr_sprior=-1), "cfg.curr_sprior", "positive integer"),
    "full_sprior-zero": (cfg_case(ROPE, full_sprior=0), "cfg.full_sprior", "positive integer"),
    "d_head-zero": (cfg_case(ROPE, d_head=0), "cfg.d_head", "positive integer"),
    "block_len-neg": (cfg_case(ROPE, block_len=-2), "cfg.block_len", "must be 0 (flat cache) or a positive"),
    "d_head-129": (cfg_case(POS, d_head=129), "cfg.d_head", "129 exceeds the limit 128"),
    "curr>full": (cfg_case(ROPE, curr_sprior=11), "cfg.curr_sprior", "11 exceeds cfg.full_sprior=10"),
    "s_active-9": (cfg_case(POS, s_active=9, curr_sprior=16, full_sprior=16), "cfg.s_active",
                   "9 exceeds the limit 8"),
    "s_active>curr": (cfg_case(POS, s_active=4, curr_sprior=3), "cfg.s_active", "4 exceeds cfg.curr_sprior=3"),
    "hs-520": (cfg_case(POS, q_head=65, s_active=8), "cfg.q_head*cfg.s_active", "520 exceeds the limit 512"),
    "block-qk_in_sb": (cfg_case(BLOCK, qk_in_sb=False, fuse_rope=True), "cfg.qk_in_sb", "requires qk_in_sb=True"),
    "block-tp_k_prior": (cfg_case(BLOCK, tp_k_prior=False), "cfg.tp_k_prior", "requires tp_k_prior=True"),
    "block-strided": (cfg_case(BLOCK, strided_mm1=True), "cfg.strided_mm1", "requires strided_mm1=False"),
    "block-bucket": (cfg_case(BLOCK, block_len=3), "cfg.curr_sprior", "128 must be a multiple of cfg.block_len=3"),
    "prescaled-needs-sb": (cfg_case(POS, qk_in_sb=False), "cfg.qk_in_sb", "fuse_rope=False requires qk_in_sb=True"),
    "rope-d96": (cfg_case(ROPE, d_head=96), "cfg.d_head", "96 must be a multiple of 64 with fuse_rope"),
    "rope-rows": (cfg_case(ROPE, bs=9, q_head=8), "cfg.bs*cfg.q_head*cfg.s_active", "144 exceeds 128"),
    "rope-sprior": (cfg_case(ROPE, curr_sprior=2**17 + 2, full_sprior=2**17 + 2), "cfg.curr_sprior",
                    "131074 exceeds 131072 with fuse_rope"),
    # the arrays
    "q-dtype": (arg_case(ROPE, q=lambda kw: kw["q"].astype(np.float64)), "q", "float64 is not one of"),
    "q-vs-out-dtype": (arg_case(ROPE, out=np.zeros((2, 2, 64, 2), np.float16)), "q",
                       "float32: expected the I/O dtype float16 or float8_e4m3"),
    "lnc": (arg_case(ROPE, lnc=3), "lnc", "3 must be 1 or 2"),
    "q-shape": (arg_case(ROPE, q=np.zeros((2, 2, 64, 2), np.float32)), "q", "!= expected (2, 2, 2, 64)"),
    "q-shape-sb": (arg_case(POS, q=np.zeros((32, 7), np.float32)), "q", "[d, B*H*S] with qk_in_sb"),
    "k_active-shape": (arg_case(ROPE, k_active=np.zeros((2, 2, 64), np.float32)), "k_active", "[B,1,S,d]"),
    "k_active-dtype": (arg_case(ROPE, k_active=lambda kw: kw["k_active"].astype(np.float16)), "k_active",
                       "float16: expected the I/O dtype float32 or float8_e4m3"),
    "v_active-shape": (arg_case(ROPE, v_active=np.zeros((2, 2, 64), np.float32)), "v_active", "[B, 1, S, d]"),
    "v_active-dtype": (arg_case(ROPE, v_active=lambda kw: kw["v_active"].astype(BF16)), "v_active",
                       "bfloat16: expected the I/O dtype float32 or float8_e4m3"),
    "k_prior-dtype": (arg_case(ROPE, k_prior=lambda kw: kw["k_prior"].astype(np.float16)), "k_prior",
                      "float16: expected the I/O dtype float32 or float8_e4m3"),
    "v_prior-dtype": (arg_case(ROPE, v_prior=lambda kw: kw["v_prior"].astype(FP8)), "v_prior",
                      "float8_e4m3 != k_prior's float32 (one cache dtype)"),
    "k_prior-flat-tp": (arg_case(POS, k_prior=np.zeros((3, 1, 32, 8), np.float32)), "k_prior",
                        "[B+, 1, Spf, d] = [>=2, 1, 8, 32] (tp_k_prior=True)"),
    "k_prior-flat-notp": (arg_case(ROPE, k_prior=np.zeros((3, 1, 10, 64), np.float32)), "k_prior",
                          "[B+, 1, d, Spf] = [>=2, 1, 64, 10] (tp_k_prior=False)"),
    "k_prior-too-few-rows": (arg_case(ROPE, k_prior=np.zeros((1, 1, 64, 10), np.float32)), "k_prior", ">=2"),
    "v_prior-flat": (arg_case(ROPE, v_prior=np.zeros((3, 1, 9, 64), np.float32)), "v_prior",
                     "[B+, 1, Spf, d] = [>=2, 1, 10, 64]"),
    "table-given-flat": (arg_case(ROPE, active_blocks_table=np.zeros((2, 1), np.uint32)), "active_blocks_table",
                         "given but cfg.block_len == 0"),
    "table-missing": (arg_case(BLOCK, active_blocks_table=None), "active_blocks_table", "required with block KV"),
    "block-k_prior-shape": (arg_case(BLOCK, k_prior=np.zeros((128, 2, 32), np.float32)), "k_prior",
                            "expected [num_blocks, 1, 32]"),
    "block-v_prior-shape": (arg_case(BLOCK, v_prior=np.zeros((127, 1, 32), np.float32)), "v_prior",
                            "the same shape as k_prior"),
    "table-dtype": (arg_case(BLOCK, active_blocks_table=lambda kw: kw["active_blocks_table"].astype(np.int32)),
                    "active_blocks_table", "int32 != expected uint32"),
    "table-shape": (arg_case(BLOCK, active_blocks_table=np.zeros((1, 64), np.uint32)), "active_blocks_table",
                    "[B, curr_sprior/block_len]"),
    "table-range": (arg_case(BLOCK, active_blocks_table=lambda kw: kw["active_blocks_table"] + 1),
                    "active_blocks_table", "block id 128 out of range [0, 128)"),
    "mask-dtype": (arg_case(ROPE, mask=lambda kw: kw["mask"].astype(np.float32)), "mask",
                   "float32 != expected uint8"),
    "mask-shape": (arg_case(ROPE, mask=np.ones((6, 2, 2, 2), np.uint8)), "mask", "[Sp, B, H, S]"),
    "mask-shape-pos-id": (arg_case(POS, mask=np.ones((8, 2, 2, 2), np.uint8)), "mask",
                          "[S, B, H, S] active part with use_pos_id"),
    "block-mask-no-fold": (
        lambda: {**valid(dataclasses.replace(BLOCK, curr_sprior=64, full_sprior=64)),
                 "k_prior": np.zeros((64, 1, 32), np.float32), "v_prior": np.zeros((64, 1, 32), np.float32),
                 "active_blocks_table": np.arange(64, dtype=np.uint32).reshape(1, 64),
                 "mask": np.ones((64, 1, 2, 2), np.uint8)},
        "cfg.curr_sprior", "64 must be a multiple of 128 (128 keys x 1 core(s) at lnc=1)",
    ),
    "out-shape": (arg_case(ROPE, out=np.zeros((2, 2, 2, 64), np.float32)), "out", "[B,H,d,S]"),
    "out-shape-sb": (arg_case(dataclasses.replace(ROPE, out_in_sb=True), out=np.zeros((64, 4), np.float32)),
                     "out", "[d, B*H*S] with out_in_sb"),
    "out-dtype": (arg_case(ROPE, out=np.zeros((2, 2, 64, 2), np.float64)), "out", "float64 is not one of"),
    "out-readonly": (arg_case(ROPE, out=readonly(np.zeros((2, 2, 64, 2), np.float32))), "out", "is read-only"),
    "inv_freqs-missing": (arg_case(ROPE, inv_freqs=None), "inv_freqs", "required with fuse_rope"),
    "inv_freqs-shape": (arg_case(ROPE, inv_freqs=np.ones((64, 1), np.float32)), "inv_freqs", "[d/2, 1]"),
    "pos-missing-rope": (arg_case(ROPE, rope_pos_ids=None), "rope_pos_ids", "required with fuse_rope or use_pos_id"),
    "pos-missing-pos-id": (arg_case(POS, rope_pos_ids=None), "rope_pos_ids", "required"),
    "pos-shape": (arg_case(ROPE, rope_pos_ids=np.zeros((2, 3), np.float32)), "rope_pos_ids", "[B, S]"),
    "pos-nan": (arg_case(ROPE, rope_pos_ids=np.array([[0, np.nan], [0, 1]], np.float32)), "rope_pos_ids",
                "must be finite"),
    "cached-too-long": (arg_case(POS, rope_pos_ids=np.array([[7, 8], [0, 1]], np.float32)), "rope_pos_ids[:, 0]",
                        "cached lengths [7.0, 0.0] must lie in [0, curr_sprior - s_active = 6]"),
    "cached-negative": (arg_case(POS, rope_pos_ids=np.array([[-1, 0], [0, 1]], np.float32)), "rope_pos_ids[:, 0]",
                        "must lie in [0,"),
    "start-without-pos-id": (arg_case(ROPE, start_pos_ids=np.zeros((2, 2), np.float32)), "start_pos_ids",
                             "needs use_pos_id=True"),
    "start-shape": (arg_case(POS, start_pos_ids=np.zeros((2, 1), np.float32)), "start_pos_ids", "[B, S]"),
    "start-nan": (arg_case(POS, start_pos_ids=np.array([[0, 0], [np.nan, 0]], np.float32)), "start_pos_ids",
                  "must be finite"),
    "sink-shape": (arg_case(ROPE, sink=np.zeros((3, 1), np.float32)), "sink", "expected [H, 1] = [2, 1]"),
    "k_out-shape": (arg_case(ROPE, k_out=np.zeros((2, 1, 2, 64), np.float32)), "k_out", "[B, 1, d, S]"),
    "k_out-shape-sb": (arg_case(dataclasses.replace(ROPE, k_out_in_sb=True), k_out=np.zeros((64, 2), np.float32)),
                       "k_out", "[d, B*S] with k_out_in_sb"),
    "k_out-dtype": (arg_case(ROPE, k_out=np.zeros((2, 1, 64, 2), BF16)), "k_out", "bfloat16 != expected float32"),
    "k_out-readonly": (arg_case(ROPE, k_out=readonly(np.zeros((2, 1, 64, 2), np.float32))), "k_out",
                       "is read-only"),
    "dbg-type": (arg_case(ROPE, DBG_TENSORS=np.zeros(4, np.float32)), "DBG_TENSORS",
                 "expected a tuple of 4 arrays or a dict, got ndarray"),
    "dbg-count": (arg_case(ROPE, DBG_TENSORS=(np.zeros(4, np.float32),) * 3), "DBG_TENSORS",
                  "3 tensors given; expected 4 (qk, qk_max, qk_exp, exp_sum)"),
    "dbg-unknown": (arg_case(ROPE, DBG_TENSORS={**dbg(B2H2S2SP8), "scores": np.zeros(1, np.float32)}),
                    "DBG_TENSORS", "unknown keys ['scores']"),
    "dbg-size": (arg_case(ROPE, DBG_TENSORS={**dbg(B2H2S2SP8), "qk": np.zeros((2, 2, 7, 2), np.float32)}),
                 "DBG_TENSORS[qk]", "float32 with (2, 2, 8, 2) elements"),
    "dbg-dtype": (arg_case(ROPE, DBG_TENSORS={**dbg(B2H2S2SP8), "exp_sum": np.zeros((2, 2, 1, 2), np.float16)}),
                  "DBG_TENSORS[exp_sum]", "got float16"),
    "dbg-strided": (arg_case(ROPE, DBG_TENSORS={**dbg(B2H2S2SP8), "qk_max": np.zeros((2, 2, 2, 2), np.float32)[:, :, :1]}),  # noqa: E501
                    "DBG_TENSORS[qk_max]", "expected contiguous float32"),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_attention_tkg_rejects(case: str) -> None:
    build, arg, detail = KERNEL_CASES[case]
    with pytest.raises(ValueError, match=re.escape(f"attention_tkg: {arg}: ")) as info:
        attention_tkg(**build(), backend="reference")
    assert detail in str(info.value), f"message {str(info.value)!r} does not state {detail!r}"


def test_torch_inputs_are_validated_too() -> None:
    kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in valid(ROPE).items()}
    kw["mask"] = torch.ones((8, 2, 2, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match=re.escape("attention_tkg: mask: shape (8, 2, 2, 3) != expected (8, 2, 2, 2)")):
        attention_tkg(**kw, backend="reference")


def test_unknown_backend_is_named() -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'no-such'; expected one of auto, "):
        attention_tkg(**valid(ROPE), backend="no-such")


# --- paged_decode -----------------------------------------------------------------------------


def paged_valid() -> dict[str, Any]:
    """B=2, Hq=4, Hkv=2, S=2, d=32, block_len 4, 6 blocks; lengths 5 and 8."""
    f32 = np.float32
    return {
        "q": np.zeros((2, 4, 2, 32), f32),
        "k_cache": np.zeros((2, 6, 4, 32), f32),
        "v_cache": np.zeros((2, 6, 4, 32), f32),
        "block_tables": np.array([[0, 1, -1], [2, 3, 4]], np.int32),
        "seq_lens": np.array([5, 8], np.int32),
        "scale": 0.125,
    }


def test_paged_base_call_is_valid() -> None:
    assert np.isfinite(paged_decode(**paged_valid(), backend="reference")).all()


def paged(**changes: Any) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        kw = paged_valid()
        for name, value in changes.items():
            kw[name] = value(kw) if callable(value) else value
        return kw

    return build


PAGED_CASES: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    "q-ndim": (paged(q=np.zeros((2, 4, 32), np.float32)), "q", "expected [B, Hq, S, d]"),
    "q-dtype": (paged(q=np.zeros((2, 4, 2, 32), np.float64)), "q", "float32/float16/bfloat16, got float64"),
    "k_cache-d": (paged(k_cache=np.zeros((2, 6, 4, 16), np.float32)), "k_cache", "expected [Hkv, NB, BL, 32] float32"),
    "k_cache-dtype": (paged(k_cache=lambda kw: kw["k_cache"].astype(np.float16)), "k_cache", "got float16"),
    "v_cache-shape": (paged(v_cache=np.zeros((2, 5, 4, 32), np.float32)), "v_cache", "expected (2, 6, 4, 32)"),
    "v_cache-dtype": (paged(v_cache=lambda kw: kw["v_cache"].astype(BF16)), "v_cache", "got bfloat16"),
    "gqa": (paged(q=np.zeros((2, 3, 2, 32), np.float32)), "q", "3 q heads is not a multiple of 2 kv heads"),
    "tables-rows": (paged(block_tables=np.zeros((3, 3), np.int32)), "block_tables", "expected [2, max_blocks]"),
    "tables-ndim": (paged(block_tables=np.zeros(2, np.int32)), "block_tables", "expected [2, max_blocks]"),
    "seq_lens-shape": (paged(seq_lens=np.array([5], np.int32)), "seq_lens", "expected [2]"),
    "seq_lens-short": (paged(seq_lens=np.array([1, 8], np.int32)), "seq_lens", "each must lie in [S=2, 12]"),
    "seq_lens-long": (paged(seq_lens=np.array([5, 13], np.int32)), "seq_lens", "got [5, 13]"),
    "tables-range": (paged(block_tables=np.array([[0, 6, -1], [2, 3, 4]], np.int32)), "block_tables[0]",
                     "ids must lie in [0, 6), got [0, 6]"),
    "tables-negative": (paged(block_tables=np.array([[0, 1, -1], [2, -1, 4]], np.int32)), "block_tables[1]",
                        "got [2, -1]"),
    "window": (paged(window=1), "window", "1 must be >= S=2"),
    "k_scale": (paged(k_scale=0.0), "k_scale", "0.0 must be a finite number > 0"),
    "v_scale": (paged(v_scale=float("nan")), "v_scale", "nan must be a finite number > 0"),
    "sinks": (paged(sinks=np.zeros(2, np.float32)), "sinks", "expected [4], got (2,)"),
    "out-shape": (paged(out=np.zeros((2, 4, 2, 16), np.float32)), "out", "expected (2, 4, 2, 32) float32"),
    "out-dtype": (paged(out=np.zeros((2, 4, 2, 32), np.float16)), "out", "got float16"),
    "lse-shape": (paged(lse=np.zeros((2, 4), np.float32)), "lse", "expected [2, 4, 2] float32"),
    "lse-dtype": (paged(lse=np.zeros((2, 4, 2), np.float64)), "lse", "got float64"),
    "q_start-behind": (paged(q_start=np.array([0, 0])), "q_start", "expected [2] key indices at or past seq_lens"),
}


@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_paged_decode_rejects(case: str) -> None:
    build, arg, detail = PAGED_CASES[case]
    kw = build()
    with pytest.raises(ValueError, match=re.escape(f"paged_decode: {arg}: ")) as info:
        if "lse" in kw or "q_start" in kw:  # partial calls come through a KV store, which checks with this
            check_paged_args(**kw)
        else:
            paged_decode(**kw, backend="reference")
    assert detail in str(info.value), f"message {str(info.value)!r} does not state {detail!r}"


# --- coverage of the raise sites ----------------------------------------------------------------


def _kernel_sites() -> list[str]:
    """Regexes of the argument names validate.py can blame (`_fail`/`_check_*` first arguments)."""
    tree = ast.parse((KERNEL_DIR / "validate.py").read_text())
    sites = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        if node.func.id not in ("_fail", "_check_shape", "_check_dtype"):
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            sites.append(re.escape(first.value))
        elif isinstance(first, ast.JoinedStr):
            parts = [re.escape(p.value) if isinstance(p, ast.Constant) else ".+" for p in first.values]
            sites.append("".join(parts))
    return sorted(set(sites) - {"arg", "name"})  # the helpers' own pass-through parameters


def _paged_sites() -> list[str]:
    src = (KERNEL_DIR / "paged.py").read_text()
    names = re.findall(r"paged_decode: ([\w\[\]{}]+): ", src)
    return sorted({re.escape(n).replace(re.escape("{b}"), r"\d+") for n in names})


def test_every_raise_site_is_covered() -> None:
    kernel_args = {arg for _, arg, _ in KERNEL_CASES.values()}
    paged_args = {arg for _, arg, _ in PAGED_CASES.values()}
    kernel_sites, paged_sites = _kernel_sites(), _paged_sites()
    assert len(kernel_sites) >= 20 and len(paged_sites) >= 8  # the parse found the checks
    missing = [s for s in kernel_sites if not any(re.fullmatch(s, a) for a in kernel_args)]
    missing += [s for s in paged_sites if not any(re.fullmatch(s, a) for a in paged_args)]
    assert not missing, f"raise sites without a test case: {missing}"
