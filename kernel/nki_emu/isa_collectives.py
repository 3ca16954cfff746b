"""LNC2 collectives: `sendrecv` and `core_barrier` between the two programs (nki-api.md 4.17-4.18)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context
from tkg.kernel.nki_emu.enums import DmaEngine, Engine, dma_engine, engine
from tkg.kernel.nki_emu.errors import NkiValidationError
from tkg.kernel.nki_emu.operands import (
    enum_arg,
    instruction,
    match_pf,
    operand,
    pf,
    read_raw,
    record,
    run_elems,
    write,
)
from tkg.kernel.nki_emu.tensor import SBUF, SHARED_HBM, NkiTensor


# ---- LNC2 collectives ------------------------------------------------------------------------
def _lnc2(instr: str) -> context.Program:
    prog = context.current(f"nisa.{instr}")
    if prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{instr}: needs trn2 (gen3) or later (target is {prog.target.name})")
    if prog.nprog != 2:
        raise NkiValidationError(
            f"nisa.{instr}: needs an LNC=2 launch (kernel[2](...)); this launch has {prog.nprog} program(s)"
        )
    return prog


def _rank(v: Any, prog: context.Program, instr: str, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < prog.nprog:
        raise NkiValidationError(f"nisa.{instr}: {field}={v!r}: expected a program rank 0 or 1")
    if int(v) == prog.pid:
        raise NkiValidationError(
            f"nisa.{instr}: {field}={int(v)} is this program itself; expected the partner {1 - prog.pid}"
        )
    return int(v)


_GPSIMD_DMA_LIMIT = {4: 1024, 2: 512, 1: 256}  # bytes per partition (nki-api.md 4.17)


@instruction
def sendrecv(src: NkiTensor, dst: NkiTensor, send_to_rank: int, recv_from_rank: int, pipe_id: int,
             dma_engine: dma_engine = dma_engine.dma, name: str | None = None) -> None:  # fmt: skip
    """Send `src` to program `send_to_rank`'s `dst`; receive `recv_from_rank`'s `src` into `dst` (SBUF)."""
    I = "sendrecv"
    prog = _lnc2(I)
    src = operand(src, I, "src", (SBUF,), compute=False)
    dst = operand(dst, I, "dst", (SBUF,), compute=False)
    to = _rank(send_to_rank, prog, I, "send_to_rank")
    frm = _rank(recv_from_rank, prog, I, "recv_from_rank")
    if isinstance(pipe_id, bool) or not isinstance(pipe_id, (int, np.integer)) or pipe_id < 0:
        raise NkiValidationError(f"nisa.{I}: pipe_id={pipe_id!r}: expected a non-negative int")
    de = enum_arg(dma_engine, DmaEngine, I, "dma_engine")
    if src.dtype != dst.dtype:
        raise NkiValidationError(f"nisa.{I}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
    match_pf(I, "src", src, "dst", dst)
    if de.name == "gpsimd_dma":
        lim = _GPSIMD_DMA_LIMIT[src.dtype.itemsize]
        nb = src.free_size * src.dtype.itemsize
        if nb > lim:
            raise NkiValidationError(
                f"nisa.{I}: dma_engine=gpsimd_dma moves at most {lim} bytes per partition of {src.dtype}, src has {nb}"
            )
    payload = (read_raw(src, f"nisa.{I}: src"), src.dtype, list(src.shape))  # snapshot before anyone writes dst
    channel = ("sendrecv", int(pipe_id))
    prog.launch.send(prog.pid, channel, to, payload)
    vals, dt, shape = prog.launch.recv(
        prog.pid, channel, frm, f"nisa.sendrecv(pipe_id={pipe_id}) in program {prog.pid}"
    )
    if dt != dst.dtype or vals.shape != pf(dst):
        raise NkiValidationError(
            f"nisa.{I}: program {frm} sent {shape} {dt} ({vals.shape[0]} x {vals.shape[1]}) on pipe_id "
            f"{pipe_id} but this "
            f"program's dst is {list(dst.shape)} {dst.dtype}"
        )
    write(I, dst, vals, converted=False)
    nb = src.size * src.dtype.itemsize
    prog.stats.record_dma(I, de.name, nb, 0, 0, run_bytes=run_elems(src) * src.dtype.itemsize)
    prog.stats.sendrecv_bytes += nb


@instruction
def core_barrier(data: NkiTensor, cores: Any, engine: engine = engine.gpsimd, name: str | None = None) -> None:
    """Both programs reach the barrier before either continues (after writing halves of a shared_hbm `data`)."""
    I = "core_barrier"
    prog = _lnc2(I)
    data = operand(data, I, "data", (SHARED_HBM,), compute=False)
    eng = enum_arg(engine, Engine, I, "engine")
    if tuple(cores) != (0, 1):
        raise NkiValidationError(f"nisa.{I}: cores={cores!r}: expected (0, 1)")
    other = 1 - prog.pid
    prog.launch.send(prog.pid, ("barrier",), other, None)
    prog.launch.recv(prog.pid, ("barrier",), other, f"nisa.core_barrier in program {prog.pid}")
    eng_name = eng.name if eng.name in ("tensor", "vector", "scalar", "gpsimd") else "gpsimd"
    record(I, eng_name, 0.0)
