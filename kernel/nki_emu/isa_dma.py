"""DMA instructions: `dma_copy` (incl. indirect gather / scatter) and `dma_transpose` (nki-api.md 4.15-4.16)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context
from tkg.kernel.nki_emu.dtypes import cast
from tkg.kernel.nki_emu.enums import Engine, dge_mode, engine, oob_mode
from tkg.kernel.nki_emu.errors import NkiValidationError, OutOfBoundsError
from tkg.kernel.nki_emu.operands import (
    HBM,
    enum_arg,
    instruction,
    operand,
    read_raw,
    run_elems,
)
from tkg.kernel.nki_emu.tensor import SBUF, UNINIT_MODE, NkiTensor, poisoned_read


# ---- DMA ---------------------------------------------------------------------------------
def _addresses(view: NkiTensor, instr: str, field: str, oob: oob_mode) -> tuple[np.ndarray, np.ndarray]:
    """Flat storage indices (view shape) of an indirect view, and a per-element 'transfer' mask."""
    ind = view.indirect
    assert ind is not None
    idx = read_raw(ind.index, f"nisa.{instr}: {field} offset tensor").reshape(-1).astype(np.int64)
    free = np.zeros(view.shape[1:], dtype=np.int64)
    for d, (n, s) in enumerate(zip(view.shape[1:], view.strides[1:], strict=True)):
        sh = [1] * (view.ndim - 1)
        sh[d] = n
        free = free + (np.arange(n, dtype=np.int64) * s).reshape(sh)
    P = view.shape[0]
    if ind.kind == "vector":
        starts = view.offset + idx * ind.multiplier
        idx_per_row = idx
    else:
        base = np.arange(P, dtype=np.int64) * view.strides[0]
        starts = view.offset + int(idx[0]) * ind.multiplier + base
        idx_per_row = np.full(P, int(idx[0]), dtype=np.int64)
    addr = starts.reshape((P,) + (1,) * (view.ndim - 1)) + free
    flat_size = view.storage.data.nbytes // view.dtype.itemsize
    row_bad = (idx_per_row < 0) | (idx_per_row >= ind.dim_size)
    addr_bad = ((addr < 0) | (addr >= flat_size)).reshape(P, -1).any(axis=1)
    bad = row_bad | addr_bad
    if bad.any() and oob is oob_mode.error:
        w = int(np.flatnonzero(bad)[0])
        raise OutOfBoundsError(
            f"nisa.{instr}: {field}: indirect index {int(idx_per_row[w])} at partition {w} is out of "
            "bounds for dim of size "
            f"{ind.dim_size} of {view.storage.describe()} (oob_mode=error)"
        )
    ok = np.broadcast_to(~bad.reshape((P,) + (1,) * (view.ndim - 1)), view.shape)
    return np.where(ok, addr, 0), ok


def _dma_read(src: NkiTensor, instr: str, oob: oob_mode) -> tuple[np.ndarray, np.ndarray | None]:
    """Row-major flat values of src (native dtype) and a validity mask (None = all valid)."""
    if src.indirect is None:
        return src.read(f"nisa.{instr}: src").reshape(-1), None
    addr, ok = _addresses(src, instr, "src", oob)
    flat = src.storage.flat(src.dtype)
    init = src.storage.init
    if (
        UNINIT_MODE != "off"
        and init is not None
        and src.dtype.itemsize == src.storage.dtype.itemsize
        and not init[addr[ok]].all()
    ):
        poisoned_read(f"nisa.{instr}: src: the gather reads elements of {src.storage.describe()} never written")
    return flat[addr].reshape(-1), ok.reshape(-1)


def _dma_write(dst: NkiTensor, vals: np.ndarray, valid: np.ndarray | None, instr: str, oob: oob_mode) -> None:
    if dst.indirect is not None:
        addr, ok = _addresses(dst, instr, "dst", oob)
        keep = ok.reshape(-1) if valid is None else (ok.reshape(-1) & valid)
        where = addr.reshape(-1)[keep]
        dst.storage.flat(dst.dtype)[where] = vals[keep]
        if dst.storage.init is not None and dst.dtype.itemsize == dst.storage.dtype.itemsize:
            dst.storage.init[where] = True
    else:
        if dst.has_overlapping_elements():
            raise NkiValidationError(
                f"nisa.{instr}: dst {list(dst.shape)} has a stride-0 dim; several elements would land on one"
            )
        if valid is None:
            dst.write(vals)
        else:
            cur = np.array(dst.array()).reshape(-1)
            cur[valid] = vals[valid]
            dst.array()[...] = cur.reshape(dst.shape)
            if valid.all():
                dst.mark_written()
    dst.storage.written = True


def _dma_common(
    instr: str, dst: Any, src: Any, priority: Any, oob: Any, dge: Any
) -> tuple[NkiTensor, NkiTensor, oob_mode, dge_mode]:
    prog = context.current(f"nisa.{instr}")
    oob = enum_arg(oob, oob_mode, instr, "oob_mode")
    dge = enum_arg(dge, dge_mode, instr, "dge_mode")
    dst = operand(dst, instr, "dst", (SBUF, *HBM), indirect=True, compute=False)
    src = operand(src, instr, "src", (SBUF, *HBM), indirect=True, compute=False)
    if priority is not None and prog.target.gen < 4:
        raise NkiValidationError(f"nisa.{instr}: priority= is available on trn3 (gen4) only")
    indirect = src.indirect is not None or dst.indirect is not None
    if src.indirect is not None and dst.indirect is not None:
        raise NkiValidationError(f"nisa.{instr}: src and dst cannot both be indirect views")
    if dge is dge_mode.hwdge:
        if prog.target.gen < 3:
            raise NkiValidationError(f"nisa.{instr}: dge_mode=hwdge needs trn2 (gen3) or later")
        if indirect:
            raise NkiValidationError(
                f"nisa.{instr}: dge_mode=hwdge cannot do indirect (vector/scalar offset) transfers; use swdge"
            )
        if src.dtype != dst.dtype:
            raise NkiValidationError(
                f"nisa.{instr}: dge_mode=hwdge needs equal dtypes (src {src.dtype}, dst {dst.dtype}); use .view()"
            )
    if indirect and dge is dge_mode.none:
        raise NkiValidationError(
            f"nisa.{instr}: dge_mode=none precomputes descriptors and cannot use runtime offsets; use "
            "dge_mode=swdge (or unknown)"
        )
    return dst, src, oob, dge


@instruction
def dma_copy(
    dst: NkiTensor,
    src: NkiTensor,
    priority: Any = None,
    oob_mode: oob_mode = oob_mode.error,
    dge_mode: dge_mode = dge_mode.unknown,
    engine: engine = engine.unknown,
    name: str | None = None,
) -> None:
    """dst = src element by element (row-major traversal of each view; equal element counts).

    HBM <-> SBUF, SBUF <-> SBUF, HBM <-> HBM; never from PSUM. Different dtypes convert through fp32.
    An indirect `.ap(vector_offset=...)` view on either side gathers / scatters rows, bounds checked.
    """
    I = "dma_copy"
    prog = context.current(f"nisa.{I}")
    dst, src, oob, dge = _dma_common(I, dst, src, priority, oob_mode, dge_mode)
    E = Engine
    eng = enum_arg(engine, E, I, "engine")
    if eng is not E.unknown and (dge.name != "hwdge" or eng not in (E.sync, E.scalar)):
        raise NkiValidationError(
            f"nisa.{I}: engine={eng} is only valid with dge_mode=hwdge and must be engine.sync or engine.scalar"
        )
    if src.size != dst.size:
        raise NkiValidationError(
            f"nisa.{I}: src {list(src.shape)} has {src.size} elements but dst {list(dst.shape)} has "
            f"{dst.size}; expected equal counts"
        )
    vals, valid = _dma_read(src, I, oob)
    if src.dtype != dst.dtype:
        vals = cast(vals.astype(np.float32), dst.dtype)
    _dma_write(dst, vals, valid, I, oob)
    n = src.size if valid is None else int(valid.sum())
    rd = n * src.dtype.itemsize if src.buffer.is_hbm else 0
    wr = n * dst.dtype.itemsize if dst.buffer.is_hbm else 0
    item = max(src.dtype.itemsize, dst.dtype.itemsize)
    run = math.gcd(run_elems(src), run_elems(dst)) * item
    prog.stats.record_dma(I, dge.name, n * item, rd, wr, run_bytes=run)


_TRANSPOSE_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


@instruction
def dma_transpose(dst: NkiTensor, src: NkiTensor, axes: Any = None, priority: Any = None,
                  dge_mode: dge_mode = dge_mode.unknown, oob_mode: oob_mode = oob_mode.error,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = transpose(src, axes) during the DMA (into SBUF). 2-byte dtypes; 4-byte ones too when the
    compiler picks the DGE (dge_mode=unknown) for a direct src: trn2's DMA transpose handles 2- and
    4-byte types (nki-api.md 4.16, ARCH2), the stub's hwdge / indirect rules name 2-byte only."""
    I = "dma_transpose"
    prog = context.current(f"nisa.{I}")
    dst, src, oob, dge = _dma_common(I, dst, src, priority, oob_mode, dge_mode)
    if prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{I}: DMA transpose is a trn2 (gen3) feature")
    if dst.buffer is not SBUF or dst.indirect is not None:
        raise NkiValidationError(f"nisa.{I}: dst must be a direct SBUF view")
    sizes = (2, 4) if dge.name == "unknown" and src.indirect is None else (2,)
    if src.dtype != dst.dtype or src.dtype.itemsize not in sizes:
        want = "2- or 4-byte" if len(sizes) == 2 else "2-byte (4-byte only with dge_mode=unknown and a direct src)"
        raise NkiValidationError(f"nisa.{I}: src {src.dtype} / dst {dst.dtype}: expected equal {want} dtypes")
    default = _TRANSPOSE_AXES.get(src.ndim)
    ax = default if axes is None else tuple(int(a) for a in axes)
    if default is None or ax != default:
        raise NkiValidationError(f"nisa.{I}: axes={axes!r} for a {src.ndim}-D src: supported is {default}")
    want = tuple(src.shape[a] for a in ax)
    if dst.shape != want:
        raise NkiValidationError(
            f"nisa.{I}: dst shape {list(dst.shape)} must equal the permuted src shape {list(want)}"
        )
    vals, valid = _dma_read(src, I, oob)
    out = vals.reshape(src.shape).transpose(ax).reshape(-1)
    ok = None if valid is None else valid.reshape(src.shape).transpose(ax).reshape(-1)
    _dma_write(dst, out, ok, I, oob)
    n = src.size if valid is None else int(valid.sum())
    item = src.dtype.itemsize
    # A transposing DMA moves elements to scattered places: charge per element run of the dst rows.
    prog.stats.record_dma(I, dge.name, n * item, n * item if src.buffer.is_hbm else 0, 0,
                          run_bytes=run_elems(src) * item)  # fmt: skip
