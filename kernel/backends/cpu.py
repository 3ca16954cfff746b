"""The `cpu` backend: the native kernel (`tkg.kernel.backends._native`, kernel/backends/native/) when it was built
and covers the call, else the torch implementation (`tkg.kernel.backends.cpu_torch`).

The native kernel walks each sequence's blocks straight out of the pool (no gathered copy),
scores each chunk of keys against all q heads of its kv head at once, keeps an online softmax
in fp32 and runs on a persistent, pinned thread pool with the GIL released. Its ISA variant
(AVX-512-BF16, AVX-512, AVX2+FMA or the baseline) is picked at run time by CPUID.

Native coverage: `paged_decode` and `paged_decode_partial` (lse, attend-only: context parallelism)
always (pools C-contiguous, d <= 256); `run` (attention_tkg)
over block or flat `tp_k_prior` caches, with position-id masks (`use_pos_id`: ranges, the fast
path) or pre-generated masks (checked per key), fused RoPE, sinks and sliding windows. A
transposed flat K and debug tensors go to the torch implementation, which handles every flag.

Environment: TKG_CPU_THREADS (threads, default: the CPUs this process may use),
TKG_CPU_PIN=0 (do not pin the pool's workers), TKG_CPU_NATIVE=0 (always use torch),
TKG_CPU_VARIANT (force a variant name, e.g. "avx2").
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

import numpy as np

from tkg.dtypes import BF16, FP8
from tkg.kernel.arrays import as_f32
from tkg.kernel.backends import reference
from tkg.kernel.backends.host_ops import _MAX_D, NATIVE_ERROR, _addr, _c, _native
from tkg.kernel.backends.reference import unshuffle_block_mask
from tkg.kernel.paged import PagedArgs
from tkg.kernel.validate import KernelCall

NAME = "cpu"

_DTYPE_CODES = {np.dtype(np.float32): 0, BF16: 1, np.dtype(np.float16): 2, FP8: 3}  # FP8: K/V pools only
_MAX_ACTIVE = 16
_CHUNK = 32  # keys per chunk in the kernel (TKG_CHUNK)
_SMALL_KEYS = 8192  # (task, key) pairs below which one thread beats waking the pool (measured ~L=64 x 64 tasks)


def available() -> str | None:
    """Always usable: without the native extension the torch implementation runs."""
    return None


def native_variants() -> list[str]:
    """ISA variants of the native kernel this CPU can run, best first; [] without the extension."""
    return list(_native.variants()) if _native is not None else []


def read_probe(buf: np.ndarray, threads: int | None = None, pin: bool | None = None) -> int:
    """Read `buf` once on the native kernel's own pool (its threads and pinning); returns threads used.

    The read-bandwidth peer of `tkg bench kernel`: the same threads that run the kernel stream a
    C-contiguous buffer (size a multiple of 128 bytes) in 2 MiB pieces, as they claim items.
    """
    if _native is None:
        raise ValueError(f"cpu backend: read_probe: the native kernel is not built ({NATIVE_ERROR})")
    if not buf.flags.c_contiguous:
        raise ValueError("cpu backend: read_probe: buf: must be C-contiguous")
    return int(_native.read_probe(buf=_addr(buf), nbytes=buf.nbytes, threads=int(threads or default_threads()),
                                  pin=_default_pin() if pin is None else bool(pin)))  # fmt: skip


def _native_enabled() -> bool:
    return _native is not None and os.environ.get("TKG_CPU_NATIVE", "1") != "0"


def _variant(name: str | None) -> int:
    """Variant index for `name` (None: TKG_CPU_VARIANT, else the best this CPU supports)."""
    assert _native is not None
    name = name or os.environ.get("TKG_CPU_VARIANT") or None
    supported = native_variants()
    if name is None:
        return list(_native.VARIANT_NAMES).index(supported[0])
    if name not in supported:
        raise ValueError(f"cpu backend: variant: {name!r} is not supported here; expected one of {supported}")
    return list(_native.VARIANT_NAMES).index(name)


def implementation(variant: str | None = None) -> str:
    """What the `cpu` backend runs here: "native-<isa variant>" or "torch" (with the reason)."""
    if _native is None:
        return f"torch (native kernel not built: {NATIVE_ERROR})"
    if not _native_enabled():
        return "torch (TKG_CPU_NATIVE=0)"
    return "native-" + _native.VARIANT_NAMES[_variant(variant)]


def default_threads() -> int:
    env = os.environ.get("TKG_CPU_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"TKG_CPU_THREADS: expected a positive integer, got {env!r}")
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_pin() -> bool:
    return os.environ.get("TKG_CPU_PIN", "1") != "0"


def _auto_nsplit(ntasks: int, threads: int, max_keys: int) -> int:
    """Key splits per task: enough items to keep every thread busy, never below ~4 chunks a split."""
    if ntasks >= 2 * threads:
        return 1
    want = -(-2 * threads // max(ntasks, 1))
    return max(1, min(want, max_keys // (4 * _CHUNK)))


class _Workspace(threading.local):
    """Per-thread reusable host buffers, keyed by name; reallocated only when the size changes."""

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        buf = self.bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != np.dtype(dtype):
            buf = np.empty(shape, dtype=dtype)
            self.bufs[name] = buf
        return buf


_ws = _Workspace()


def _attend(
    *,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    heads_per_row: int,
    head_stride: int,
    block_stride: int,
    bl: int,
    table: np.ndarray,
    nkeys: np.ndarray,
    score_scale: float,
    q_bf16_exact: bool,
    out_scale: float = 1.0,
    causal_s: int = 0,
    window: int = 0,
    ranges: np.ndarray | None = None,
    ka: np.ndarray | None = None,
    va: np.ndarray | None = None,
    act_mask: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    prior_mask: np.ndarray | None = None,
    threads: int | None = None,
    max_threads: int | None = None,
    pin: bool | None = None,
    variant: str | None = None,
    nsplit: int | None = None,
    lse: np.ndarray | None = None,
    q_start: np.ndarray | None = None,
    empty_ok: bool = False,
) -> int:
    """One native call. q fp32 `[T, nq, d]`, out `[T, nq, d]` (pool dtype, or float32); returns the
    first fully masked query as `task * nq + r`, or -1. All arrays must be C-contiguous and stay alive.

    Partial calls: lse float32 `[T, nq]` receives each query's log-sum-exp; q_start int64 `[rows]`
    (with causal_s, not ranges) puts query i of row b at key index `q_start[b] + i` (attend-only);
    empty_ok: a query that sees nothing gets out 0 and lse -inf instead of being reported."""
    assert _native is not None
    T, nq, d = q.shape
    for name, a in (("q", q), ("out", out), ("table", table), ("nkeys", nkeys), ("ranges", ranges),
                    ("ka", ka), ("va", va), ("act_mask", act_mask), ("sinks", sinks),
                    ("prior_mask", prior_mask), ("lse", lse), ("q_start", q_start)):  # fmt: skip
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"cpu backend: {name}: must be C-contiguous")
    if threads is None:
        threads = default_threads() if max_threads is None else max(1, min(default_threads(), int(max_threads)))
        # Waking the pool costs tens of microseconds: small steps run on the calling thread.
        if int(nkeys.sum()) * heads_per_row < _SMALL_KEYS:
            threads = 1
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"cpu backend: threads: expected >= 1, got {threads}")
    if nsplit is None:
        nsplit = _auto_nsplit(T, threads, int(nkeys.max()) if nkeys.size else 0)
    _, err = _native.attend(
        variant=_variant(variant), threads=threads, pin=_default_pin() if pin is None else bool(pin),
        dtype=_DTYPE_CODES[k.dtype], out_dtype=_DTYPE_CODES[out.dtype], d=d, nq=nq, ntasks=T,
        heads_per_row=heads_per_row, q=_addr(q), score_scale=float(score_scale), q_bf16_exact=q_bf16_exact,
        k=_addr(k), v=_addr(v), head_stride=head_stride, block_stride=block_stride, bl=bl,
        table=_addr(table), table_stride=table.shape[1], nkeys=_addr(nkeys), causal_s=causal_s,
        window=window, ranges=_addr(ranges), act_n=0 if ka is None else ka.shape[1], ka=_addr(ka),
        va=_addr(va), act_mask=_addr(act_mask), sinks=_addr(sinks), out=_addr(out), nsplit=int(nsplit),
        prior_mask=_addr(prior_mask), prior_mask_stride=0 if prior_mask is None else prior_mask.shape[-1],
        out_scale=float(out_scale), lse=_addr(lse), q_start=_addr(q_start), empty_ok=bool(empty_ok),
    )  # fmt: skip
    return int(err)


def _torch_impl() -> ModuleType:
    from tkg.kernel.backends import cpu_torch

    return cpu_torch


# --------------------------------------------------------------------------- paged_decode


def paged_native_ok(args: PagedArgs) -> bool:
    """True when the native kernel covers this paged call (else torch runs it)."""
    return (
        _native_enabled()
        and args.q.shape[3] <= _MAX_D
        and args.k_cache.flags.c_contiguous
        and args.v_cache.flags.c_contiguous
    )


def paged_decode(
    args: PagedArgs,
    *,
    threads: int | None = None,
    max_threads: int | None = None,
    pin: bool | None = None,
    variant: str | None = None,
    nsplit: int | None = None,
    native: bool | None = None,
    **_options: object,
) -> None:
    """Fill `args.out` `[B, Hq, S, d]` (see `tkg.kernel.paged.paged_decode`).

    One native task per (sequence, kv head): its G*S queries (q heads of the kv head x new
    tokens) share every key read. Options: threads, max_threads (a cap on the automatic count, which
    runs small steps on one thread), pin (workers to CPUs), variant (ISA name), nsplit (key splits
    per task; default adapts to few long sequences), native (False: torch).
    """
    _paged(args, False, threads, max_threads, pin, variant, nsplit, native)


def paged_decode_partial(
    args: PagedArgs,
    *,
    threads: int | None = None,
    max_threads: int | None = None,
    pin: bool | None = None,
    variant: str | None = None,
    nsplit: int | None = None,
    native: bool | None = None,
    **_options: object,
) -> None:
    """A partial paged step (context parallelism, `tkg.kernel.paged`): fill `args.out` `[B, Hq, S, d]`
    (float32 or q's dtype) and, when given, `args.lse` float32 `[B, Hq, S]` on the native kernel.

    Semantics are the reference's (`reference.paged_decode_partial`): query i of sequence b sits at
    key index `seq_lens[b] - S + i`, or `q_start[b] + i` in an attend-only call (which sees every
    cached key within the window and never has a sink); lse is the natural log of the softmax
    denominator over the scaled logits, sink included; a query that sees nothing gets out 0 and
    lse -inf. The kernel's split-K merge is the exact log-sum-exp rule, so lse does not depend on
    nsplit beyond rounding. Options as `paged_decode`; calls the native kernel does not cover
    (`paged_native_ok`) run on `cpu_torch`.
    """
    _paged(args, True, threads, max_threads, pin, variant, nsplit, native)


def _paged(
    args: PagedArgs, partial: bool, threads: int | None, max_threads: int | None, pin: bool | None,
    variant: str | None, nsplit: int | None, native: bool | None,
) -> None:
    """`paged_decode` (partial False) or `paged_decode_partial` (True: `args.lse`, `args.q_start`,
    empty queries answered 0 / -inf) on the native kernel, or on torch where it does not cover the call."""
    if native is False or not paged_native_ok(args):
        if native:
            raise ValueError("cpu backend: native: the native kernel cannot run this call here")
        torch_impl = _torch_impl()
        (torch_impl.paged_decode_partial if partial else torch_impl.paged_decode)(args)
        return
    q = args.q
    B, Hq, S, d = q.shape
    Hkv, NB, BL, _ = args.k_cache.shape
    G = Hq // Hkv
    if B == 0:
        return
    q32 = _ws.get("paged_q", (B * Hkv, G * S, d), np.float32)
    q32[...] = q.reshape(B * Hkv, G * S, d)
    sinks = None
    if args.sinks is not None:  # (check_paged_args refuses sinks in attend-only calls)
        sinks = _ws.get("paged_sinks", (B * Hkv, G * S), np.float32)
        sinks.reshape(B, Hkv, G, S)[...] = as_f32(args.sinks).reshape(1, Hkv, G, 1)
    # Task (b, g) holds queries (h - g*G, i) in order: [B, Hq, S] is already [B*Hkv, G*S].
    out = args.out if args.out.flags.c_contiguous else np.empty(args.out.shape, dtype=args.out.dtype)
    lse = None
    if partial and args.lse is not None:
        lse = args.lse if args.lse.flags.c_contiguous else np.empty(args.lse.shape, np.float32)
    q_start = None if not partial or args.q_start is None else _c(args.q_start, np.int64)
    _attend(
        q=q32, k=args.k_cache, v=args.v_cache, out=out.reshape(B * Hkv, G * S, d), heads_per_row=Hkv,
        head_stride=NB * BL * d, block_stride=BL * d, bl=BL, table=_c(args.block_tables, np.int32),
        nkeys=_c(args.seq_lens, np.int32), score_scale=args.scale * args.k_scale, out_scale=args.v_scale,
        q_bf16_exact=q.dtype == BF16,
        causal_s=S, window=0 if args.window is None else int(args.window), sinks=sinks,
        threads=threads, max_threads=max_threads, pin=pin, variant=variant, nsplit=nsplit,
        lse=None if lse is None else lse.reshape(B * Hkv, G * S), q_start=q_start, empty_ok=partial,
    )  # fmt: skip
    if out is not args.out:
        args.out[...] = out
    if lse is not None and lse is not args.lse:
        args.lse[...] = lse


# --------------------------------------------------------------------------- attention_tkg


def run_native_ok(call: KernelCall) -> bool:
    """True when the native kernel covers this attention_tkg call (else torch runs it)."""
    cfg = call.cfg
    if not _native_enabled() or call.dbg is not None:
        return False
    if cfg.d_head > _MAX_D or cfg.s_active > _MAX_ACTIVE:
        return False

    if cfg.is_block_kv:
        return call.k_prior.flags.c_contiguous and call.v_prior.flags.c_contiguous
    return (
        cfg.tp_k_prior
        and call.k_prior.shape == call.v_prior.shape
        and call.k_prior.flags.c_contiguous
        and call.v_prior.flags.c_contiguous
    )


def _prior_ranges(call: KernelCall) -> np.ndarray:
    """int32 `[B, S, 4]`: the two visible intervals of cached keys of each query
    (`reference.prior_visibility`: keys are integers, so "k < end" is k < ceil(end))."""
    cfg = call.cfg
    B, S, Sp = cfg.bs, cfg.s_active, cfg.curr_sprior
    n = Sp - S

    def key_bound(x: np.ndarray) -> np.ndarray:
        return np.clip(np.ceil(as_f32(x).astype(np.float64)), 0, n)

    pos = as_f32(call.rope_pos_ids)
    rg = np.zeros((B, S, 4), dtype=np.int64)
    if call.start_pos_ids is None:
        rg[:, :, 1] = key_bound(pos[:, :1])
        return rg.astype(np.int32)
    start, end = as_f32(call.start_pos_ids), pos
    wraps = start > end  # a circular cache whose window wraps around: [0, end) and [start, n)
    lo, hi = key_bound(start), key_bound(end)
    rg[:, :, 0] = np.where(wraps, 0, lo)
    rg[:, :, 1] = hi
    rg[:, :, 2] = np.where(wraps, lo, 0)
    rg[:, :, 3] = np.where(wraps, n, 0)
    return rg.astype(np.int32)


def run(call: KernelCall, native: bool | None = None) -> None:
    """Fill `call.out` (and `call.k_out`) like `reference.run`; torch handles what native does not."""
    if native is None:
        native = call.options.get("native")  # type: ignore[assignment]
    if native is False or not run_native_ok(call):
        if native:
            raise ValueError("cpu backend: native: the native kernel cannot run this call here")
        _torch_impl().run(call)
        return
    opts = {k: call.options.get(k) for k in ("threads", "pin", "variant", "nsplit")}
    cfg = call.cfg
    B, H, S, d, Sp = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head, cfg.curr_sprior
    q, ka = reference.queries(call, fused_rope=True)
    q32 = _c(q.reshape(B, H * S, d), np.float32)
    if cfg.is_block_kv:
        BL = cfg.block_len
        k, v = call.k_prior, call.v_prior
        table = _c(call.active_blocks_table.view(np.int32) if call.active_blocks_table.dtype == np.uint32
                   else call.active_blocks_table, np.int32)  # fmt: skip
        bstride = BL * d
    else:
        k, v = call.k_prior, call.v_prior
        BL = k.shape[2]  # one "block" per row: the row's whole flat cache
        table = np.arange(B, dtype=np.int32).reshape(B, 1)
        bstride = BL * d
    prior_mask = None
    if cfg.use_pos_id:
        ranges = np.ascontiguousarray(np.repeat(_prior_ranges(call)[:, None], H, axis=1).reshape(B, H * S, 4))
        active = call.mask
    else:
        # A pre-generated mask `[Sp, B, H, S]` (block KV: in the kernel's fold order): every cached
        # key is a candidate, the mask decides per query (a slower, per-key path in the kernel).
        m = unshuffle_block_mask(call.mask, call.mask_block_len) if cfg.is_block_kv else call.mask
        ranges = np.zeros((B, H * S, 4), dtype=np.int32)
        ranges[:, :, 1] = Sp - S
        prior_mask = _c(m[: Sp - S].transpose(1, 2, 3, 0).reshape(B, H * S, Sp - S) != 0, np.uint8)
        active = m[Sp - S :]
    act_mask = _c(active.transpose(1, 2, 3, 0).reshape(B, H * S, S) != 0, np.uint8)
    sinks = None
    if call.sink is not None:
        sinks = _c(np.broadcast_to(as_f32(call.sink).reshape(1, H, 1), (B, H, S)).reshape(B, H * S), np.float32)
    o = np.empty((B, H * S, d), dtype=np.float32)
    err = _attend(
        q=q32, k=k, v=v, out=o, heads_per_row=1, head_stride=0, block_stride=bstride, bl=BL, table=table,
        nkeys=np.full(B, Sp - S, dtype=np.int32), score_scale=1.0,
        q_bf16_exact=call.q.dtype in (BF16, FP8) and not cfg.fuse_rope, ranges=ranges, ka=_c(ka, np.float32),
        va=_c(as_f32(call.v_active)[:, 0], np.float32), act_mask=act_mask, sinks=sinks, prior_mask=prior_mask,
        **opts,
    )  # fmt: skip
    if err >= 0:
        b, r = divmod(err, H * S)
        h, i = divmod(r, S)
        raise ValueError(
            f"attention_tkg: mask: every key is masked for row b={b}, head h={h}, query i={i}; "
            "expected at least one visible key (the active diagonal) or a finite sink"
        )
    reference.store_outputs(call, o.reshape(B, H, S, d), ka)
