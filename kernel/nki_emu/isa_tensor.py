"""Tensor-engine (PE) instructions: `nc_matmul` and the PE `nc_transpose` (nki-api.md 4.1-4.2)."""

from __future__ import annotations

import numpy as np

from tkg.kernel.nki_emu import context, cost
from tkg.kernel.nki_emu.dtypes import cast
from tkg.kernel.nki_emu.enums import Engine, engine, matmul_perf_mode
from tkg.kernel.nki_emu.errors import NkiValidationError
from tkg.kernel.nki_emu.operands import (
    enum_arg,
    instruction,
    mm_flags,
    operand,
    pf,
    read_f32,
    read_raw,
    record,
    write,
)
from tkg.kernel.nki_emu.tensor import PSUM, SBUF, NkiTensor


# ---- Tensor engine ---------------------------------------------------------------------------
def _psum_bank_check(instr: str, dst: NkiTensor) -> int:
    """The matmul output must fit one PSUM bank per partition; returns the bank index."""
    prog = context.current(f"nisa.{instr}")
    F = dst.part_stride()
    f0 = dst.offset % F
    flo = f0 + sum(min(0, (n - 1) * s) for n, s in zip(dst.shape[1:], dst.strides[1:], strict=True))
    fhi = f0 + sum(max(0, (n - 1) * s) for n, s in zip(dst.shape[1:], dst.strides[1:], strict=True))
    base = dst.storage.address[1] if dst.storage.address is not None else 0
    item = dst.dtype.itemsize
    b0 = (base + flo * item) // prog.target.psum_bank_bytes
    b1 = (base + (fhi + 1) * item - 1) // prog.target.psum_bank_bytes
    if b0 != b1:
        raise NkiValidationError(
            f"nisa.{instr}: dst bytes [{base + flo * item}, {base + (fhi + 1) * item}) per partition cross PSUM banks "
            f"{b0} and {b1}; a Tensor-engine result must fit one {prog.target.psum_bank_bytes}-byte bank"
        )
    prog.psum_banks.add(b0)
    prog.stats.psum_banks_used = len(prog.psum_banks)
    return b0


_MM_DTYPES = ("float8_e4m3", "float8_e5m2", "bfloat16", "float16", "tfloat32", "float32")


@instruction
def nc_matmul(dst: NkiTensor, stationary: NkiTensor, moving: NkiTensor, is_stationary_onezero: bool = False,
              is_moving_onezero: bool = False, is_transpose: bool = False, accumulate: bool | None = None,
              tile_position: tuple = (), tile_size: tuple = (), perf_mode: matmul_perf_mode = matmul_perf_mode.none,
              name: str | None = None) -> None:  # fmt: skip
    """dst[M, N] (+)= stationary[K, M].T @ moving[K, N] on the Tensor engine, fp32 in PSUM."""
    I = "nc_matmul"
    prog = context.current(f"nisa.{I}")
    tgt = prog.target
    dst = operand(dst, I, "dst", (PSUM,))
    stationary = operand(stationary, I, "stationary", (SBUF,))
    moving = operand(moving, I, "moving", (SBUF,))
    enum_arg(perf_mode, matmul_perf_mode, I, "perf_mode")
    if accumulate not in (None, True, False):
        raise NkiValidationError(f"nisa.{I}: accumulate={accumulate!r}: expected None, True or False")
    if bool(tile_position) != bool(tile_size):
        raise NkiValidationError(f"nisa.{I}: tile_position and tile_size must be given together")
    for f, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MM_DTYPES:
            raise NkiValidationError(f"nisa.{I}: {f} dtype {t.dtype}: expected one of {', '.join(_MM_DTYPES)}")
    fp32_in = stationary.dtype in ("float32", "tfloat32") or moving.dtype in ("float32", "tfloat32")
    if fp32_in and not (stationary.dtype in ("float32", "tfloat32") and moving.dtype in ("float32", "tfloat32")):
        raise NkiValidationError(
            f"nisa.{I}: stationary {stationary.dtype} x moving {moving.dtype}: if either operand is "
            "float32/tfloat32 both must be"
        )
    K = stationary.shape[0]
    if moving.shape[0] != K:
        raise NkiValidationError(
            f"nisa.{I}: stationary has {K} partitions but moving has {moving.shape[0]}: the contraction "
            "dim is the partition dim of both"
        )
    if tgt.gemm_contract_max < K:
        raise NkiValidationError(f"nisa.{I}: contraction (partition) size {K} exceeds {tgt.gemm_contract_max}")
    if perf_mode is matmul_perf_mode.double_row:
        if tgt.gen < 3:
            raise NkiValidationError(f"nisa.{I}: perf_mode=double_row needs trn2 (gen3) or later")
        if not (stationary.dtype.startswith("float8") and moving.dtype.startswith("float8")):
            raise NkiValidationError(f"nisa.{I}: perf_mode=double_row is for FP8 operands only")
        if stationary.ndim != 3 or moving.ndim != 3 or stationary.shape[1] != 2 or moving.shape[1] != 2:
            raise NkiValidationError(
                f"nisa.{I}: perf_mode=double_row expects stationary (K, 2, M) and moving (K, 2, N)"
            )
        M, N = stationary.shape[2], moving.shape[2]
    else:
        M, N = stationary.free_size, moving.free_size
    if tgt.gemm_stationary_fmax < M:
        raise NkiValidationError(
            f"nisa.{I}: stationary free size {M} exceeds {tgt.gemm_stationary_fmax} (it becomes dst's partitions)"
        )
    if tgt.gemm_moving_fmax < N:
        raise NkiValidationError(
            f"nisa.{I}: moving free size {N} exceeds {tgt.gemm_moving_fmax} (one PSUM bank of fp32)"
        )
    if dst.shape[0] != M or dst.free_size != N:
        raise NkiValidationError(
            f"nisa.{I}: dst {list(dst.shape)}: expected {M} partitions (stationary free size) x {N} "
            "elements (moving free size)"
        )
    if is_transpose:
        if tgt.gen < 3:
            raise NkiValidationError(f"nisa.{I}: is_transpose=True needs trn2 (gen3) or later")
        if dst.dtype not in ("float32", stationary.dtype):
            raise NkiValidationError(
                f"nisa.{I}: is_transpose: dst dtype {dst.dtype}: expected float32 or {stationary.dtype}"
            )
    elif dst.dtype != "float32":
        raise NkiValidationError(f"nisa.{I}: dst dtype {dst.dtype}: matmul results are float32 in PSUM on trn1/trn2")
    _psum_bank_check(I, dst)

    if is_transpose:
        mov = read_f32(moving, f"nisa.{I}: moving")
        if mov.shape != (K, K) or not np.array_equal(mov, np.eye(K, dtype=np.float32)):
            raise NkiValidationError(f"nisa.{I}: is_transpose=True expects an identity ({K}, {K}) moving operand")
        res = read_raw(stationary, f"nisa.{I}: stationary").T  # bit-exact transpose mode
    elif perf_mode is matmul_perf_mode.double_row:
        s3 = stationary.read(f"nisa.{I}: stationary").astype(np.float32)
        m3 = moving.read(f"nisa.{I}: moving").astype(np.float32)
        res = np.einsum("kjm,kjn->mn", s3, m3, dtype=np.float32)
    else:
        res = read_f32(stationary, f"nisa.{I}: stationary").T @ read_f32(moving, f"nisa.{I}: moving")
    if dst.has_overlapping_elements():
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)} has a stride-0 (broadcast) dim")
    flags = np.array(mm_flags(dst)).reshape(M, N)
    if is_transpose:
        new = res
    else:
        if accumulate is True and not flags.all():
            raise NkiValidationError(
                f"nisa.{I}: accumulate=True onto PSUM elements of {dst.name!r} that no matmul has written "
                "since allocation "
                "(undefined on hardware: the first matmul of a group must use accumulate=False or None)"
            )
        if accumulate is False:
            new = res
        else:
            cur = read_f32(dst, check=False)  # only flagged (matmul-written) elements are used
            new = np.where(flags, cur + res, res) if accumulate is None else cur + res
    dst.write(cast(np.asarray(new), dst.dtype))
    mm_flags(dst)[...] = True
    record(I, "tensor", cost.pe_cycles(N, fp32_in))


@instruction
def nc_transpose(dst: NkiTensor, data: NkiTensor, engine: engine = engine.unknown, name: str | None = None) -> None:
    """dst[F, P] = data[P, F] (Tensor engine into PSUM, or Vector engine within 32x32)."""
    I = "nc_transpose"
    prog = context.current(f"nisa.{I}")
    e = enum_arg(engine, Engine, I, "engine")
    dst = operand(dst, I, "dst")
    if e is Engine.unknown:
        e = Engine.tensor if dst.buffer is PSUM else Engine.vector
    if e.name == "tensor":
        data = operand(data, I, "data", (SBUF,))
        if dst.buffer is not PSUM:
            raise NkiValidationError(f"nisa.{I}: dst is in {dst.buffer!r}; the Tensor-engine transpose writes PSUM")
        lim = prog.target.pe_transpose_max
    elif e.name == "vector":
        data = operand(data, I, "data")
        lim = prog.target.vector_transpose_max
    else:
        raise NkiValidationError(f"nisa.{I}: engine={e}: expected nisa.engine.tensor, vector or unknown")
    P, F = pf(data)
    if lim < P or lim < F:
        raise NkiValidationError(
            f"nisa.{I}: data {list(data.shape)} is {P} x {F}; the {e.name} engine transposes at most {lim} x {lim}"
        )
    if dst.dtype != data.dtype:
        raise NkiValidationError(f"nisa.{I}: dst dtype {dst.dtype} must equal data dtype {data.dtype}")
    if dst.shape[0] != F or dst.free_size != P:
        raise NkiValidationError(
            f"nisa.{I}: dst {list(dst.shape)}: expected {F} partitions x {P} elements (data is {P} x {F})"
        )
    if e.name == "tensor":
        _psum_bank_check(I, dst)
    write(I, dst, read_raw(data, f"nisa.{I}: data").T, converted=False)
    if e.name == "tensor":
        record(I, "tensor", cost.pe_cycles(P, data.dtype == "float32"))
    else:
        record(I, "vector", cost.vector_cycles(P))
