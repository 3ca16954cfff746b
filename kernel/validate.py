"""Validation of one `attention_tkg` call, before any work (docs/design/kernel.md "Constraints").

Every failure is a `ValueError` naming the argument, the value and the limit. A call that
passes becomes a `KernelCall`: numpy views of every argument, which the backends consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tkg import dtypes
from tkg.dtypes import BF16, FP8, IO_NUMPY, KV_NUMPY
from tkg.kernel.arrays import to_numpy
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.decisions import mask_block_len

MAX_D_HEAD = 128
MAX_HS = 512  # H*S: one PSUM bank of fp32 per partition holds the moving free size of MM1
MAX_ROPE_ROWS = 128  # fuse_rope: B*H*S rows on the partition axis
MAX_ROPE_SPRIOR = 2**17  # fp32 range reduction of sin/cos loses accuracy past this
MAX_S_ACTIVE = 8
DBG_NAMES = ("qk", "qk_max", "qk_exp", "exp_sum")


@dataclass
class KernelCall:
    """A validated call: numpy views of the arguments in the kernel's layouts."""

    cfg: AttnTKGConfig
    q: np.ndarray
    k_active: np.ndarray
    v_active: np.ndarray
    k_prior: np.ndarray
    v_prior: np.ndarray
    mask: np.ndarray
    out: np.ndarray  # destination, cfg.out_shape, io dtype
    inv_freqs: np.ndarray | None = None
    rope_pos_ids: np.ndarray | None = None
    start_pos_ids: np.ndarray | None = None
    sink: np.ndarray | None = None  # [H, 1]
    active_blocks_table: np.ndarray | None = None
    k_out: np.ndarray | None = None  # destination when fuse_rope or given
    dbg: dict[str, np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    lnc: int = 1  # logical cores the call is for (orders a pre-generated block-KV mask)
    mask_block_len: int = 0  # block length of a pre-generated block-KV mask's fold order (else 0)

    @property
    def dtype(self) -> np.dtype:
        """The I/O dtype: out's (and k_out's); q, K and V are this or float8_e4m3."""
        return self.out.dtype


def _fail(arg: str, msg: str) -> ValueError:
    return ValueError(f"attention_tkg: {arg}: {msg}")


def _check_shape(name: str, a: np.ndarray, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(a.shape) != tuple(expected):
        hint = f" ({why})" if why else ""
        raise _fail(name, f"shape {tuple(a.shape)} != expected {tuple(expected)}{hint}")


def _check_dtype(name: str, a: np.ndarray, dtype: np.dtype) -> None:
    if a.dtype != dtype:
        raise _fail(name, f"dtype {a.dtype} != expected {dtype} (the I/O dtype: out's, else q's, bf16 for fp8 q)")


def _check_in_dtype(name: str, a: np.ndarray, io: np.dtype) -> None:
    """q, k_active, v_active and the caches are the I/O dtype or float8_e4m3."""
    if a.dtype != io and a.dtype != FP8:
        raise _fail(name, f"dtype {a.dtype}: expected the I/O dtype {io} or float8_e4m3")


def validate_config(cfg: AttnTKGConfig) -> None:
    """Static constraints of docs/design/kernel.md that depend on the config alone."""
    if not isinstance(cfg, AttnTKGConfig):
        raise _fail("cfg", f"expected AttnTKGConfig, got {type(cfg).__name__}")
    for name in ("bs", "q_head", "s_active", "curr_sprior", "full_sprior", "d_head"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise _fail(f"cfg.{name}", f"{v!r} must be a positive integer")
    if not isinstance(cfg.block_len, (int, np.integer)) or cfg.block_len < 0:
        raise _fail("cfg.block_len", f"{cfg.block_len!r} must be 0 (flat cache) or a positive integer")
    if cfg.d_head > MAX_D_HEAD:
        raise _fail("cfg.d_head", f"{cfg.d_head} exceeds the limit {MAX_D_HEAD}")
    if cfg.curr_sprior > cfg.full_sprior:
        raise _fail("cfg.curr_sprior", f"{cfg.curr_sprior} exceeds cfg.full_sprior={cfg.full_sprior}")
    if cfg.s_active > MAX_S_ACTIVE:
        raise _fail("cfg.s_active", f"{cfg.s_active} exceeds the limit {MAX_S_ACTIVE}")
    if cfg.s_active > cfg.curr_sprior:
        raise _fail(
            "cfg.s_active",
            f"{cfg.s_active} exceeds cfg.curr_sprior={cfg.curr_sprior} (the active tokens occupy the "
            "last s_active slots of the curr_sprior window)",
        )
    hs = cfg.q_head * cfg.s_active
    if hs > MAX_HS:
        raise _fail("cfg.q_head*cfg.s_active", f"{hs} exceeds the limit {MAX_HS}")
    if cfg.is_block_kv:
        if not cfg.qk_in_sb:
            raise _fail("cfg.qk_in_sb", "block KV (block_len > 0) requires qk_in_sb=True")
        if not cfg.tp_k_prior:
            raise _fail("cfg.tp_k_prior", "block KV (block_len > 0) requires tp_k_prior=True")
        if cfg.strided_mm1:
            raise _fail("cfg.strided_mm1", "block KV (block_len > 0) requires strided_mm1=False")
        if cfg.curr_sprior % cfg.block_len:
            raise _fail(
                "cfg.curr_sprior",
                f"{cfg.curr_sprior} must be a multiple of cfg.block_len={cfg.block_len} for block KV",
            )
    if not cfg.fuse_rope and not cfg.qk_in_sb:
        raise _fail("cfg.qk_in_sb", "fuse_rope=False requires qk_in_sb=True (q arrives pre-scaled in SBUF)")
    if cfg.fuse_rope:
        if cfg.d_head % 64:
            raise _fail("cfg.d_head", f"{cfg.d_head} must be a multiple of 64 with fuse_rope")
        rows = cfg.bs * cfg.q_head * cfg.s_active
        if rows > MAX_ROPE_ROWS:
            raise _fail("cfg.bs*cfg.q_head*cfg.s_active", f"{rows} exceeds {MAX_ROPE_ROWS} with fuse_rope")
        if cfg.curr_sprior > MAX_ROPE_SPRIOR:
            raise _fail("cfg.curr_sprior", f"{cfg.curr_sprior} exceeds {MAX_ROPE_SPRIOR} with fuse_rope")


def _opt(name: str, x: Any) -> np.ndarray | None:
    return None if x is None else to_numpy(x)


def validate_call(
    q: Any,
    k_active: Any,
    v_active: Any,
    k_prior: Any,
    v_prior: Any,
    mask: Any,
    out: Any,
    cfg: AttnTKGConfig,
    inv_freqs: Any = None,
    rope_pos_ids: Any = None,
    sink: Any = None,
    active_blocks_table: Any = None,
    k_out: Any = None,
    DBG_TENSORS: Any = None,
    start_pos_ids: Any = None,
    lnc: int = 1,
) -> KernelCall:
    """Check every argument against `cfg` and the kernel's limits; return numpy views.

    `lnc` (1 or 2, the backend option) matters to the result in one place: the row order of a
    pre-generated block-KV mask (`decisions.mask_block_len`).
    """
    validate_config(cfg)
    if lnc not in (1, 2):
        raise _fail("lnc", f"{lnc!r} must be 1 or 2 (NeuronCores per logical core)")
    B, H, S, d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
    Sp, Spf = cfg.curr_sprior, cfg.full_sprior

    qn = to_numpy(q)
    if qn.dtype not in KV_NUMPY:  # q, like K/V, may be fp8: the output is then bf16 unless `out` says
        raise _fail("q", f"dtype {qn.dtype} is not one of {dtypes.names()}")
    # The I/O dtype (out, k_out): out's when given, else q's; fp8 is storage only, so bf16 then.
    on = None if out is None else to_numpy(out)
    if on is not None:
        if on.dtype not in IO_NUMPY:
            raise _fail("out", f"dtype {on.dtype} is not one of {dtypes.names(dtypes.IO)}")
        dt = on.dtype
    else:
        dt = qn.dtype if qn.dtype in IO_NUMPY else BF16
    _check_in_dtype("q", qn, dt)
    _check_shape("q", qn, cfg.q_shape, "[d, B*H*S] with qk_in_sb" if cfg.qk_in_sb else "[B, H, S, d]")
    ka = to_numpy(k_active)
    _check_shape("k_active", ka, cfg.k_active_shape, "[d, B*S] with qk_in_sb" if cfg.qk_in_sb else "[B,1,S,d]")
    _check_in_dtype("k_active", ka, dt)
    va = to_numpy(v_active)
    _check_shape("v_active", va, cfg.v_active_shape, "[B, 1, S, d]")
    _check_in_dtype("v_active", va, dt)

    kp, vp = to_numpy(k_prior), to_numpy(v_prior)
    _check_in_dtype("k_prior", kp, dt)
    if vp.dtype != kp.dtype:
        raise _fail("v_prior", f"dtype {vp.dtype} != k_prior's {kp.dtype} (one cache dtype)")
    table = _opt("active_blocks_table", active_blocks_table)
    if cfg.is_block_kv:
        if table is None:
            raise _fail("active_blocks_table", "required with block KV (cfg.block_len > 0)")
        if kp.ndim != 3 or kp.shape[1:] != (cfg.block_len, d):
            raise _fail("k_prior", f"shape {kp.shape} != expected [num_blocks, {cfg.block_len}, {d}]")
        _check_shape("v_prior", vp, kp.shape, "block KV: the same shape as k_prior")
        if table.dtype != np.uint32:
            raise _fail("active_blocks_table", f"dtype {table.dtype} != expected uint32")
        _check_shape("active_blocks_table", table, (B, cfg.blocks_per_seq), "[B, curr_sprior/block_len]")
        if table.size and int(table.max()) >= kp.shape[0]:
            bad = int(table.max())
            raise _fail("active_blocks_table", f"block id {bad} out of range [0, {kp.shape[0]})")
    else:
        if table is not None:
            raise _fail("active_blocks_table", "given but cfg.block_len == 0 (flat cache)")
        k_expect = "[B+, 1, Spf, d]" if cfg.tp_k_prior else "[B+, 1, d, Spf]"
        k_tail = (1, Spf, d) if cfg.tp_k_prior else (1, d, Spf)
        if kp.ndim != 4 or kp.shape[1:] != k_tail or kp.shape[0] < B:
            raise _fail(
                "k_prior",
                f"shape {kp.shape} != expected {k_expect} = [>={B}, {', '.join(map(str, k_tail))}]"
                f" (tp_k_prior={cfg.tp_k_prior})",
            )
        if vp.ndim != 4 or vp.shape[1:] != (1, Spf, d) or vp.shape[0] < B:
            raise _fail("v_prior", f"shape {vp.shape} != expected [B+, 1, Spf, d] = [>={B}, 1, {Spf}, {d}]")

    m = to_numpy(mask)
    if m.dtype not in (np.dtype(np.uint8), np.dtype(np.bool_)):
        raise _fail("mask", f"dtype {m.dtype} != expected uint8 (nonzero = attend)")
    m = m.view(np.uint8)
    why = "[S, B, H, S] active part with use_pos_id" if cfg.use_pos_id else "[Sp, B, H, S]"
    _check_shape("mask", m, cfg.mask_shape, why)
    mblk = 0
    if cfg.is_block_kv and not cfg.use_pos_id:
        # The library's order: folds of 128 blocks of its reduced block length, which depends on lnc.
        try:
            mblk = mask_block_len(B, H, S, Sp, cfg.block_len, lnc, cfg.enable_fa_s_prior_tiling)
        except ValueError as exc:
            raise ValueError(f"attention_tkg: {exc}; pass use_pos_id=True to have the mask generated") from None

    if on is None:
        on = np.empty(cfg.out_shape, dtype=dt)
    else:
        _check_shape("out", on, cfg.out_shape, "[d, B*H*S] with out_in_sb" if cfg.out_in_sb else "[B,H,d,S]")
        if not on.flags.writeable:
            raise _fail("out", "is read-only")

    inv = _opt("inv_freqs", inv_freqs)
    pos = _opt("rope_pos_ids", rope_pos_ids)
    start = _opt("start_pos_ids", start_pos_ids)
    if cfg.fuse_rope:
        if inv is None:
            raise _fail("inv_freqs", "required with fuse_rope")
        _check_shape("inv_freqs", inv, (d // 2, 1), "[d/2, 1]")
    if (cfg.fuse_rope or cfg.use_pos_id) and pos is None:
        raise _fail("rope_pos_ids", "required with fuse_rope or use_pos_id")
    if pos is not None:
        _check_shape("rope_pos_ids", pos, (B, S), "[B, S]")
        if not np.all(np.isfinite(pos)):
            raise _fail("rope_pos_ids", "must be finite")
    if cfg.use_pos_id:
        cached = pos[:, 0]
        if np.any(cached < 0) or np.any(cached > Sp - S):
            raise _fail(
                "rope_pos_ids[:, 0]",
                f"cached lengths {cached.tolist()} must lie in [0, curr_sprior - s_active = {Sp - S}]",
            )
    if start is not None:
        if not cfg.use_pos_id:
            raise _fail("start_pos_ids", "sliding window needs use_pos_id=True (the mask is generated)")
        _check_shape("start_pos_ids", start, (B, S), "[B, S]")
        if not np.all(np.isfinite(start)):
            raise _fail("start_pos_ids", "must be finite")

    sk = _opt("sink", sink)
    if sk is not None:
        if sk.shape not in ((H, 1), (H,)):
            raise _fail("sink", f"shape {sk.shape} != expected [H, 1] = [{H}, 1]")
        sk = sk.reshape(H, 1)

    ko = _opt("k_out", k_out)
    if ko is None and cfg.fuse_rope:
        ko = np.empty(cfg.k_out_shape, dtype=dt)
    elif ko is not None:
        why = "[d, B*S] with k_out_in_sb" if cfg.k_out_in_sb else "[B, 1, d, S]"
        _check_shape("k_out", ko, cfg.k_out_shape, why)
        _check_dtype("k_out", ko, dt)
        if not ko.flags.writeable:
            raise _fail("k_out", "is read-only")

    dbg = None
    if DBG_TENSORS is not None:
        dbg = _debug_destinations(DBG_TENSORS, cfg)

    return KernelCall(
        cfg=cfg, q=qn, k_active=ka, v_active=va, k_prior=kp, v_prior=vp, mask=m, out=on,
        inv_freqs=inv, rope_pos_ids=pos, start_pos_ids=start, sink=sk,
        active_blocks_table=table, k_out=ko, dbg=dbg, lnc=int(lnc), mask_block_len=mblk,
    )  # fmt: skip


def debug_shapes(cfg: AttnTKGConfig) -> dict[str, tuple[int, ...]]:
    """Host-backend DBG_TENSORS, in natural order (not the NKI kernel's tiled order).

    qk: masked scores before the softmax `[B, H, Sp, S]` (-inf where masked);
    qk_max: row max incl. the sink `[B, H, 1, S]`; qk_exp: exp(qk - max) `[B, H, Sp, S]`;
    exp_sum: softmax denominator incl. the sink `[B, H, 1, S]`. All float32.
    """
    B, H, S, Sp = cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior
    return {"qk": (B, H, Sp, S), "qk_max": (B, H, 1, S), "qk_exp": (B, H, Sp, S), "exp_sum": (B, H, 1, S)}


def _debug_destinations(dbg: Any, cfg: AttnTKGConfig) -> dict[str, np.ndarray]:
    shapes = debug_shapes(cfg)
    if isinstance(dbg, dict):
        unknown = set(dbg) - set(shapes)
        if unknown:
            raise _fail("DBG_TENSORS", f"unknown keys {sorted(unknown)}; expected {list(shapes)}")
        items = list(dbg.items())
    elif isinstance(dbg, (tuple, list)):
        if len(dbg) not in (4, 5):
            raise _fail("DBG_TENSORS", f"{len(dbg)} tensors given; expected 4 ({', '.join(DBG_NAMES)})")
        items = list(zip(DBG_NAMES, dbg[:4], strict=True))
    else:
        raise _fail("DBG_TENSORS", f"expected a tuple of 4 arrays or a dict, got {type(dbg).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, arr in items:
        a = to_numpy(arr)
        if a.size != int(np.prod(shapes[name])) or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise _fail(
                f"DBG_TENSORS[{name}]",
                f"expected contiguous float32 with {shapes[name]} elements, got {a.dtype} {a.shape}"
            )
        out[name] = a.reshape(shapes[name])
    return out
