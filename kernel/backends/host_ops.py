"""The native extension (`tkg.kernel.backends._native`, built from kernel/backends/native/) and the
decode step's host passes in it (`host_ops.c`), each with the numpy path its caller falls back to:
RoPE of q and k (`native_rope_qk`), RoPE fused with the store write (`native_rope_store`), the
K/V scatter into the pools (`native_scatter`), block reference counts (`native_refcount_add`), the
append's prepare and commit (`native_append_prepare` / `native_append_commit`) and the wire's
bound check (`native_top_bytes_below`). The attention kernel itself is `tkg.kernel.backends.cpu`.

Every function returns None/False (nothing done) when the module is absent or the call is not one
it covers, so the caller's numpy path decides; ValueError means a bad index, nothing written.
Threading: they run on whichever thread calls them; `native_scatter` releases the GIL for bulk
writes (see `_BULK_WRITE_BYTES`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from tkg.dtypes import BF16

_native: ModuleType | None
try:
    from tkg.kernel.backends import _native  # type: ignore[attr-defined,no-redef]

    NATIVE_ERROR: str | None = None
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _native = None
    NATIVE_ERROR = str(exc)

_MAX_D = 256  # the widest head the native passes (and the kernel) take


def _addr(a: np.ndarray | None) -> int:
    return 0 if a is None else int(a.__array_interface__["data"][0])


def _c(a: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def host_ops_available() -> bool:
    """True when the native module is built (its host ops: `native_rope_qk`, `native_rope_store`,
    `native_scatter`, `native_top_bytes_below`)."""
    return _native is not None


_ROPE_CODES = {np.dtype(np.float32): 0, BF16: 1, np.dtype(np.float16): 2}


def _rope_codes(q: np.ndarray, k: np.ndarray) -> tuple[int, int] | None:
    """The dtype codes of q `[B, Hq, T, d]` and k `[B, Hkv, T, d]` for the native RoPE passes, or
    None when the module is absent or the pair is not covered (dtype, odd or too wide d, shapes)."""
    if _native is None or q.ndim != 4 or k.ndim != 4:
        return None
    qc, kc = _ROPE_CODES.get(q.dtype), _ROPE_CODES.get(k.dtype)
    B, _, T, d = q.shape
    if qc is None or kc is None or d % 2 or d > _MAX_D or k.shape[0] != B or k.shape[2:] != (T, d):
        return None
    return qc, kc


def native_rope_qk(
    q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos2: np.ndarray, sin2: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """A decode step's rotate-half RoPE of q `[B, Hq, T, d]` and k `[B, Hkv, T, d]` at positions
    `[B, T]` with the `[n, d]` float32 rows cos2 = [cos, cos] and sin2 = [-sin, sin], in one native
    pass; new arrays in q's and k's dtypes. Bit-identical to `tkg.server.rope.RopeTable.rotate_qk`'s
    numpy path (float32 products and sum, no FMA, rounded to nearest even). None when the native
    module is absent or does not cover the call (dtype other than float32/bfloat16/float16, odd or
    > 256 head dim, mismatched shapes): the caller then runs numpy. ValueError when a position is
    outside the table."""
    codes = _rope_codes(q, k)
    if codes is None:
        return None
    qc, kc = codes
    B, hq, T, d = q.shape
    if positions.shape != (B, T) or cos2.shape[1:] != (d,) or sin2.shape != cos2.shape:
        return None
    q, k = np.ascontiguousarray(q), np.ascontiguousarray(k)
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    cos2, sin2 = _c(cos2, np.float32), _c(sin2, np.float32)
    q_out, k_out = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype)
    _native.rope_qk(q=_addr(q), k=_addr(k), q_out=_addr(q_out), k_out=_addr(k_out), q_dtype=qc, k_dtype=kc, d=d,
                    batch=B, hq=hq, hkv=k.shape[1], tokens=T, positions=_addr(pos), cos2=_addr(cos2),
                    sin2=_addr(sin2), table_rows=cos2.shape[0])  # fmt: skip
    return q_out, k_out


def native_rope_store(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, cos2: np.ndarray, sin2: np.ndarray,
    k_pool: np.ndarray, v_pool: np.ndarray, blocks: np.ndarray, offsets: np.ndarray,
) -> np.ndarray | None:
    """`native_rope_qk` of q `[B, Hq, T, d]` and k `[B, Hkv, T, d]` with the rotated k and v
    `[B, Hkv, T, d]` stored straight into pools `[Hkv, NB, BL, d]` at slots (blocks, offsets)
    (int `[B, T]`, distinct), in one native pass: k is never materialised rotated, and the next
    sequence's slot lines are prefetched while this one's rows are rotated. Returns the rotated q,
    bit-identical to `native_rope_qk`'s (and the pools get what `native_scatter` of its k and v would
    write). None (nothing written) when the module is absent or the call is not covered: dtypes
    other than float32/bfloat16/float16, k, v and the pools not all of one dtype, pools not
    C-contiguous, odd or > 256 head dim, mismatched shapes. ValueError (nothing written) for a
    position outside the table or a slot outside the pools."""  # fmt: skip
    codes = _rope_codes(q, k)
    if codes is None:
        return None
    qc, kc = codes
    B, hq, T, d = q.shape
    if v.shape != k.shape or v.dtype != k.dtype or k_pool.dtype != k.dtype or v_pool.dtype != k.dtype:
        return None
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape or k_pool.shape[0] != k.shape[1] or k_pool.shape[3] != d:
        return None
    if not (k_pool.flags.c_contiguous and v_pool.flags.c_contiguous):
        return None
    if positions.shape != (B, T) or blocks.shape != (B, T) or offsets.shape != (B, T):
        return None
    if cos2.shape[1:] != (d,) or sin2.shape != cos2.shape:
        return None
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)
    pos, blk, off = _c(positions, np.int64), _c(blocks, np.int64), _c(offsets, np.int64)
    cos2, sin2 = _c(cos2, np.float32), _c(sin2, np.float32)
    q_out = np.empty(q.shape, q.dtype)
    # Arrays go as buffers (the module reads and checks their sizes): reading eleven addresses here
    # costs more than a small step's whole pass.
    _native.rope_store(q, k, v, q_out, pos, cos2, sin2, k_pool, v_pool, blk, off, qc, kc, d, B, hq, k.shape[1], T,
                       cos2.shape[0], k_pool.shape[1], k_pool.shape[2])  # fmt: skip
    return q_out


def native_top_bytes_below(data: bytes, itemsize: int, mask: int, limit: int) -> bool:
    """True when every little-endian value of `itemsize` bytes in `data` (any buffer) has
    `top byte & mask < limit`: `tkg.codec.bounded_bytes`'s check in one native pass. Only bound
    when the extension is built (`tkg.codec` looks it up once)."""
    assert _native is not None
    return bool(_native.top_bytes_below(data, itemsize, mask, limit))


def native_refcount_add(ref: np.ndarray, ids: np.ndarray, delta: int) -> tuple[np.ndarray, int] | None:
    """`ref[ids] += delta` (+1 or -1) for distinct `ids` (int32/int64 `[n]`), every one held (> 0), in
    one native pass: ref int32 `[nref]` C-contiguous. Returns (the ids that reached 0, in ids order;
    how many reached 2 for +1, 1 for -1), or None when the extension is absent or the arrays are
    of other types. ValueError (a block not held) or IndexError (an id out of range): nothing changed."""
    if _native is None or ref.dtype != np.int32 or not ref.flags.c_contiguous or ids.ndim != 1:
        return None
    if ids.dtype not in (np.int32, np.int64) or not ids.flags.c_contiguous:
        return None
    freed = np.empty(ids.size if delta < 0 else 0, np.int32)
    k, crossed = _native.refcount_add(_addr(ref), ref.size, _addr(ids), ids.itemsize, ids.size, delta, _addr(freed))
    return freed[:k], int(crossed)


def native_append_prepare(
    slots: np.ndarray, positions: np.ndarray, base: np.ndarray, lengths: np.ndarray, pending: np.ndarray,
    num_blocks: np.ndarray, last_used: np.ndarray, generation: np.ndarray, layer: int, num_tokens: int,
    max_context: int, block_len: int, free_count: int, now: float,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """The common decode append's prepare over a sequence table's rows (`tkg.server.appends`), one
    native pass: `batch` distinct `slots` (int64 `[B]`) at absolute `positions` (int64 `[B]`), each
    at its length at `layer` (`positions - base`), none `pending` there, within `max_context`, the
    new blocks within `free_count`. Returns (new blocks, lengths before int64 `[B]`, lengths after
    int32 `[B]`, the slots' generations int64 `[B]`) with pending set and `last_used` = now; None
    (nothing changed) when anything is otherwise or the module is absent. The rows: lengths and
    pending `[capacity, layers]` int64 and bool, base, num_blocks and generation int64 and
    last_used float64 `[capacity]`, all C-contiguous (ValueError otherwise)."""  # fmt: skip
    if _native is None:
        return None
    B = slots.shape[0]
    rel, ends, gens = np.empty(B, np.int64), np.empty(B, np.int32), np.empty(B, np.int64)
    fresh = _native.append_prepare(slots, positions, base, lengths, pending, num_blocks, last_used, generation, rel,
                                   ends, gens, layer, lengths.shape[1], num_tokens, max_context, block_len, free_count,
                                   now)  # fmt: skip
    return None if fresh < 0 else (fresh, rel, ends, gens)


def native_append_commit(
    slots: np.ndarray, generations: np.ndarray, ends: np.ndarray, tables: np.ndarray, num_blocks: np.ndarray,
    lengths: np.ndarray, pending: np.ndarray, generation: np.ndarray, reserved: np.ndarray, layer: int,
    num_tokens: int, block_len: int, hold: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int, int] | None:
    """The common decode append's commit over a sequence table's rows (`tkg.server.appends`), one
    native pass, for a plan whose `slots` (int64 `[B]`) all still have their `generations`: new
    blocks from `reserved` (int32, in order) at the tables' ends, lengths after `ends` (int32 `[B]`)
    set at `layer`, pending cleared unless `hold`. Returns (blocks, offsets int64 `[B, num_tokens]`
    of the written slots, the tables int32 `[B, width]`, with `hold` the blocks each row uses row by
    row (int32) else None, reserved blocks used, tokens added to the rows' longest layers); None
    (nothing changed) when a slot was released since or the module is absent."""  # fmt: skip
    if _native is None:
        return None
    B = slots.shape[0]
    width = max(1, -(-int(ends.max()) // block_len))
    blocks, offsets = np.empty((B, num_tokens), np.int64), np.empty((B, num_tokens), np.int64)
    tables_out = np.empty((B, width), np.int32)
    held = np.empty(B * width if hold else 0, np.int32)
    got = _native.append_commit(slots, generations, ends, tables, num_blocks, lengths, pending, generation, reserved,
                                blocks, offsets, tables_out, held, layer, lengths.shape[1], num_tokens, block_len,
                                int(hold), tables.shape[1], width)  # fmt: skip
    if got is None:
        return None
    used, grown, nheld = got
    return blocks, offsets, tables_out, (held[:nheld] if hold else None), used, grown


# A scatter this large releases the GIL while it copies, as numpy's fancy assignment does: bulk
# writes (server/writes.py) run on the kernel worker thread, and the event loop goes on meanwhile.
# Lock-free assumption: the slots written are ones the loop reserved for this write and holds until
# it commits or rolls back, so nothing the loop runs meanwhile reads or writes them.
_BULK_WRITE_BYTES = 1 << 20


def native_scatter(pool: np.ndarray, blocks: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> bool:
    """`pool[:, blocks, offsets] = rows` in one native pass: pool `[H, NB, BL, d]` C-contiguous,
    blocks and offsets int arrays of one shape I (1 or 2 dims), rows `[H, *I, d]` of the pool's dtype
    (any strides, last axis contiguous). False (nothing written) when the native module is absent
    or does not cover the call; ValueError (nothing written) when a block or offset is out of range."""
    if _native is None or rows.dtype != pool.dtype or not pool.flags.c_contiguous or pool.ndim != 4:
        return False
    H, NB, BL, d = pool.shape
    if blocks.shape != offsets.shape or blocks.ndim not in (1, 2) or rows.shape != (H, *blocks.shape, d):
        return False
    if not rows.size:
        return True
    if d > 1 and rows.strides[-1] != rows.itemsize:  # (a length-1 axis may have any stride)
        return False
    r = rows if rows.ndim == 4 else rows[:, :, None]
    n0, n1 = r.shape[1], r.shape[2]
    blk, off = _c(blocks, np.int64), _c(offsets, np.int64)
    _native.scatter_rows(dst=_addr(pool), dst_head_stride=NB * BL * d, num_blocks=NB, bl=BL, src=_addr(r),
                         src_strides=r.strides[:3], heads=H, n0=n0, n1=n1, d=d, itemsize=pool.itemsize,
                         blocks=_addr(blk), offsets=_addr(off),
                         release_gil=rows.nbytes >= _BULK_WRITE_BYTES)  # fmt: skip
    return True
