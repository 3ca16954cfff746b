"""`nki.isa` (`nisa`): the instructions, in NumPy, with the documented signatures and checks.

Every instruction here follows research/nki-api.md section 4 (the NKI 0.3-0.6 stubs): destination
first (except `sendrecv` / `core_barrier`), no `dtype=` / `mask=`, enum members for enum
parameters, fp32 internal math with a cast to `dst.dtype` on write. Each call validates buffers,
shapes, dtypes and the target's limits, raising `NkiValidationError` naming the instruction and
the argument, then executes on the tensors' storage and is counted on its engine.

Operand rule (nki-api.md 1.3): unless stated otherwise, operands have the same partition count
and the same number of elements per partition; free dims are flattened in each view's row-major
order, so ranks may differ.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from tkg.kernel.nki_emu import context, cost
from tkg.kernel.nki_emu import ops as _ops
from tkg.kernel.nki_emu.dtypes import cast
from tkg.kernel.nki_emu.errors import NkiValidationError, OutOfBoundsError, RemovedApiError
from tkg.kernel.nki_emu.limits import target_from_env
from tkg.kernel.nki_emu.ops import Op
from tkg.kernel.nki_emu.tensor import PRIVATE_HBM, PSUM, SBUF, SHARED_HBM, UNINIT_CHECK, MemoryRegion, NkiTensor


# ---- enums (nki-api.md 4.0) ------------------------------------------------------------------
class engine(enum.Enum):
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


class reduce_cmd(enum.Enum):
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class dge_mode(enum.Enum):
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class oob_mode(enum.Enum):
    error = 0
    skip = 1


class matmul_perf_mode(enum.Enum):
    none = "none"
    double_row = "double_row"


class nc_version(enum.IntEnum):
    gen2 = 2
    gen3 = 3
    gen4 = 4


class dma_engine(enum.Enum):
    dma = 1
    gpsimd_dma = 2


# Aliases: inside instructions the parameters of the same names shadow the enum classes.
_E = engine
_RC = reduce_cmd
_DE = dma_engine


# Deprecated module-level engine constants still used by nki-library.
tensor_engine = engine.tensor
vector_engine = engine.vector
scalar_engine = engine.scalar
gpsimd_engine = engine.gpsimd
unknown_engine = engine.unknown


class NkiInstruction:
    """Opaque handle returned by every instruction (scheduling hints only; no data)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def depends_on(self, *producers: Any) -> NkiInstruction:
        return self


def get_nc_version() -> nc_version:
    prog = context.current_or_none()
    return nc_version(prog.target.gen if prog is not None else target_from_env().gen)


def get_nc_sub_version() -> int:
    return 0


ONCHIP = (SBUF, PSUM)
HBM = (PRIVATE_HBM, SHARED_HBM)

# Keywords of the legacy API (neuronxcc.nki / NKI 0.1-0.2) with what replaced them (nki-api.md 4.21, 6.2).
LEGACY_KWARGS = {
    "mask": "masking was removed in NKI 0.2: slice the operands instead",
    "dtype": "ISA calls take no dtype= since NKI 0.2: the dst tensor's dtype decides",
    "psumAccumulateFlag": "removed in NKI 0.2: use accumulate=",
    "is_moving_zero": "removed in NKI 0.2",
    "dst_rmw_op": "removed in NKI 0.3: use nisa.dma_compute",
    "unique_indices": "removed from dma_copy in NKI 0.3: use nisa.dma_compute",
    "use_gpsimd_dma": "replaced in NKI 0.3 by dma_engine=nisa.dma_engine.gpsimd_dma",
}


def instruction(fn: Callable[..., None]) -> Callable[..., NkiInstruction]:
    """Wrap an instruction: legacy keywords get a migration error; the call returns a handle."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> NkiInstruction:
        for k in kwargs:
            if k in LEGACY_KWARGS:
                raise RemovedApiError(f"nisa.{fn.__name__}({k}=...): {LEGACY_KWARGS[k]}")
        fn(*args, **kwargs)
        return NkiInstruction(fn.__name__)

    return call


# ---- operand helpers -------------------------------------------------------------------------
def _where(regions: tuple[MemoryRegion, ...]) -> str:
    return " or ".join(repr(r) for r in regions)


def _operand(t: Any, instr: str, field: str, where: tuple[MemoryRegion, ...] = ONCHIP, *,
             indirect: bool = False, compute: bool = True) -> NkiTensor:  # fmt: skip
    """Check one tensor operand: type, alive, buffer, owner program, partitions, start partition."""
    what = f"nisa.{instr}: {field}"
    if not isinstance(t, NkiTensor):
        raise NkiValidationError(f"{what}: expected a tensor, got {type(t).__name__} {t!r}")
    t.check_alive(what)
    if t.buffer not in where:
        hint = ""
        if t.buffer is PSUM and instr in ("dma_copy", "dma_transpose"):
            hint = " (DMA cannot read PSUM since NKI 0.3: evacuate it with nisa.tensor_copy first)"
        elif t.buffer.is_hbm and compute:
            hint = " (compute engines never touch HBM: move it with nisa.dma_copy)"
        raise NkiValidationError(f"{what}: tensor {t.name!r} is in {t.buffer!r}; expected {_where(where)}{hint}")
    if t.ndim > 5:
        raise NkiValidationError(f"{what}: {t.ndim}-D view; access patterns have at most 5 dims (partition + 4 free)")
    if t.indirect is not None and not indirect:
        raise NkiValidationError(f"{what}: an indirect .ap(vector_offset/scalar_offset) view is only accepted by DMA")
    if t.on_chip:
        prog = context.current(f"nisa.{instr}")
        if t.storage.program != prog.pid:
            raise NkiValidationError(
                f"{what}: tensor {t.name!r} belongs to program {t.storage.program}, this is program {prog.pid}: "
                "SBUF and PSUM are private to each program (exchange data with nisa.sendrecv)"
            )
        tgt = prog.target
        if t.shape[0] > tgt.pmax:
            raise NkiValidationError(f"{what}: {t.shape[0]} partitions; at most {tgt.pmax}")
        if t.ndim - 1 > tgt.max_free_dims:
            raise NkiValidationError(f"{what}: {t.ndim - 1} free dims; at most {tgt.max_free_dims}")
        if compute and tgt.gen == 2:
            _check_start_partition(t, what)
    return t


def _check_start_partition(t: NkiTensor, what: str) -> None:
    """gen2 start-partition rule for compute-engine operands (ARCH1; nki-api.md 1.2)."""
    n, p0 = t.shape[0], t.start_partition
    ok = p0 == 0 if n > 64 else (p0 in (0, 64) if n > 32 else p0 % 32 == 0)
    if not ok:
        raise NkiValidationError(
            f"{what}: {n} partitions starting at partition {p0}: on trn1 an operand of >64 partitions starts at 0, "
            "of 33-64 at 0 or 64, of <=32 at a multiple of 32"
        )


def _pf(t: NkiTensor) -> tuple[int, int]:
    return t.shape[0], t.free_size


def _match(instr: str, ref_field: str, ref: NkiTensor, field: str, t: NkiTensor) -> None:
    if _pf(ref) != _pf(t):
        raise NkiValidationError(
            f"nisa.{instr}: {field} {list(t.shape)} has {t.shape[0]} partitions x {t.free_size} elements "
            f"but {ref_field} "
            f"{list(ref.shape)} has {ref.shape[0]} x {ref.free_size}; expected equal partition counts and "
            "elements per partition"
        )


def _not_both_psum(instr: str, a_field: str, a: Any, b_field: str, b: Any) -> None:
    if isinstance(a, NkiTensor) and isinstance(b, NkiTensor) and a.buffer is PSUM and b.buffer is PSUM:
        raise NkiValidationError(f"nisa.{instr}: {a_field} and {b_field} are both in PSUM; at most one input may be")


def _raw(t: NkiTensor, what: str = "operand", check: bool = True) -> np.ndarray:
    """A copy of the elements, native dtype, shape (P, F); `check`: raise on never-written elements."""
    if check:
        t.check_initialised(what)
    return np.array(t.array()).reshape(t.shape[0], -1)


def _f32(t: NkiTensor, what: str = "operand", check: bool = True) -> np.ndarray:
    """The elements converted to fp32, shape (P, F) (a copy)."""
    if check:
        t.check_initialised(what)
    return t.array().astype(np.float32).reshape(t.shape[0], -1)


def _mm_flags(t: NkiTensor) -> np.ndarray:
    """Writable view of the PSUM 'written by matmul' flags of `t`'s elements."""
    st = t.storage
    assert st.mm_written is not None
    if t.dtype.itemsize != st.dtype.itemsize:
        raise NkiValidationError(f"tensor {t.name!r}: a dtype-reinterpreted PSUM view cannot be a matmul operand here")
    return as_strided(st.mm_written[t.offset :], shape=t.shape, strides=t.strides)


def _write(instr: str, dst: NkiTensor, values: np.ndarray, *, converted: bool = True) -> None:
    """Write (P, F) values into dst (cast to dst.dtype unless `converted`=False means raw bits)."""
    if dst.has_overlapping_elements():
        raise NkiValidationError(
            f"nisa.{instr}: dst {list(dst.shape)} strides {list(dst.strides)} has a stride-0 (broadcast) dim; "
            "several results would land on one element"
        )
    out = cast(values, dst.dtype) if converted else values.astype(dst.dtype.np, copy=False)
    dst.write(out)
    st = dst.storage
    if st.mm_written is not None:
        _mm_flags(dst)[...] = False


def _enum(value: Any, cls: type[enum.Enum], instr: str, field: str) -> Any:
    if not isinstance(value, cls):
        members = ", ".join(f"nisa.{cls.__name__}.{m.name}" for m in cls)
        raise NkiValidationError(
            f"nisa.{instr}: {field}={value!r}: expected an enum member ({members}); ints are not accepted since NKI 0.3"
        )
    return value


def _op(op: Any, instr: str, field: str) -> Op:
    if not isinstance(op, Op):
        raise NkiValidationError(
            f"nisa.{instr}: {field}={op!r}: expected an nl.* operator such as nl.add or nl.maximum"
        )
    prog = context.current(f"nisa.{instr}")
    if op.gen4_only and prog.target.gen < 4:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is available on trn3 (gen4) only")
    return op


def _alu(op: Op, instr: str, field: str, *, unary_ok: bool = False) -> Op:
    if op.alu is None:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is not an ALU operator (nki-api.md 3.9 table)")
    if op.unary and not unary_ok:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is unary; expected a binary ALU operator")
    return op


def _scalar_or_column(v: Any, instr: str, field: str, data: NkiTensor, *, bitvec: bool) -> np.ndarray | float | int:
    """An operand that is a compile-time scalar or a (P, 1) tile broadcast along the free dims."""
    if isinstance(v, NkiTensor):
        _operand(v, instr, field)
        if v.shape[0] != data.shape[0] or v.free_size != 1:
            raise NkiValidationError(
                f"nisa.{instr}: {field} {list(v.shape)}: expected a ({data.shape[0]}, 1) tile (one value "
                "per partition of data)"
            )
        if bitvec:
            if not v.dtype.is_int:
                raise NkiValidationError(
                    f"nisa.{instr}: {field} dtype {v.dtype}: bit-vector operators need an integer tile"
                )
            return _raw(v, f"nisa.{instr}: {field}")
        if v.dtype != "float32":
            raise NkiValidationError(f"nisa.{instr}: {field} dtype {v.dtype}: tile operands must be float32")
        return _f32(v, f"nisa.{instr}: {field}")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise NkiValidationError(f"nisa.{instr}: {field}={v!r}: expected a number or a (P, 1) tile")
    if bitvec:
        if not isinstance(v, (int, np.integer)):
            raise NkiValidationError(f"nisa.{instr}: {field}={v!r}: bit-vector operators need an integer scalar")
        return int(v)
    return np.float32(v)


def _record(instr: str, eng: str, cycles: float) -> None:
    context.current(f"nisa.{instr}").stats.record(eng, instr, cycles)


def _compute_engine(eng: engine, instr: str, allowed: tuple[engine, ...], default: engine, psum: bool) -> str:
    e = _enum(eng, engine, instr, "engine")
    if e is engine.unknown:
        e = default
    if e not in allowed:
        raise NkiValidationError(f"nisa.{instr}: engine={e}: expected one of {', '.join(str(a) for a in allowed)}")
    if e is engine.gpsimd and psum:
        raise NkiValidationError(f"nisa.{instr}: engine=gpsimd cannot access PSUM (GpSimd reads and writes SBUF only)")
    return e.name


def _cycles(eng: str, n: int, inputs: int = 1) -> float:
    if eng == "scalar":
        return cost.scalar_cycles(n)
    if eng == "gpsimd":
        return cost.gpsimd_cycles(n, inputs)
    return cost.vector_cycles(n, inputs)


def _binary(op: Op, a: np.ndarray, b: Any, reverse: bool = False) -> np.ndarray:
    if reverse:
        a, b = b, a
    with np.errstate(all="ignore"):
        return np.asarray(op.alu(a, b))  # type: ignore[misc]


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
    dst = _operand(dst, I, "dst", (PSUM,))
    stationary = _operand(stationary, I, "stationary", (SBUF,))
    moving = _operand(moving, I, "moving", (SBUF,))
    _enum(perf_mode, matmul_perf_mode, I, "perf_mode")
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
        mov = _f32(moving, f"nisa.{I}: moving")
        if mov.shape != (K, K) or not np.array_equal(mov, np.eye(K, dtype=np.float32)):
            raise NkiValidationError(f"nisa.{I}: is_transpose=True expects an identity ({K}, {K}) moving operand")
        res = _raw(stationary, f"nisa.{I}: stationary").T  # bit-exact transpose mode
    elif perf_mode is matmul_perf_mode.double_row:
        s3 = stationary.read(f"nisa.{I}: stationary").astype(np.float32)
        m3 = moving.read(f"nisa.{I}: moving").astype(np.float32)
        res = np.einsum("kjm,kjn->mn", s3, m3, dtype=np.float32)
    else:
        res = _f32(stationary, f"nisa.{I}: stationary").T @ _f32(moving, f"nisa.{I}: moving")
    if dst.has_overlapping_elements():
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)} has a stride-0 (broadcast) dim")
    flags = np.array(_mm_flags(dst)).reshape(M, N)
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
            cur = _f32(dst, check=False)  # only flagged (matmul-written) elements are used
            new = np.where(flags, cur + res, res) if accumulate is None else cur + res
    dst.write(cast(np.asarray(new), dst.dtype))
    _mm_flags(dst)[...] = True
    _record(I, "tensor", cost.pe_cycles(N, fp32_in))


@instruction
def nc_transpose(dst: NkiTensor, data: NkiTensor, engine: engine = engine.unknown, name: str | None = None) -> None:
    """dst[F, P] = data[P, F] (Tensor engine into PSUM, or Vector engine within 32x32)."""
    I = "nc_transpose"
    prog = context.current(f"nisa.{I}")
    e = _enum(engine, _E, I, "engine")
    dst = _operand(dst, I, "dst")
    if e is _E.unknown:
        e = _E.tensor if dst.buffer is PSUM else _E.vector
    if e.name == "tensor":
        data = _operand(data, I, "data", (SBUF,))
        if dst.buffer is not PSUM:
            raise NkiValidationError(f"nisa.{I}: dst is in {dst.buffer!r}; the Tensor-engine transpose writes PSUM")
        lim = prog.target.pe_transpose_max
    elif e.name == "vector":
        data = _operand(data, I, "data")
        lim = prog.target.vector_transpose_max
    else:
        raise NkiValidationError(f"nisa.{I}: engine={e}: expected nisa.engine.tensor, vector or unknown")
    P, F = _pf(data)
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
    _write(I, dst, _raw(data, f"nisa.{I}: data").T, converted=False)
    if e.name == "tensor":
        _record(I, "tensor", cost.pe_cycles(P, data.dtype == "float32"))
    else:
        _record(I, "vector", cost.vector_cycles(P))


# ---- Scalar engine ---------------------------------------------------------------------------
@instruction
def activation(dst: NkiTensor, op: Op, data: NkiTensor, bias: Any = None, scale: Any = 1.0, reduce_op: Op | None = None,
               reduce_res: NkiTensor | None = None, reduce_cmd: reduce_cmd = reduce_cmd.idle,
               name: str | None = None) -> None:  # fmt: skip
    """dst = op(data * scale + bias) on the Scalar engine, with the optional add-reduction registers."""
    I = "activation"
    prog = context.current(f"nisa.{I}")
    op = _op(op, I, "op")
    if op.act is None:
        raise NkiValidationError(f"nisa.{I}: op={op!r} is not an activation function (e.g. nl.exp, nl.copy, nl.sin)")
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    _match(I, "dst", dst, "data", data)
    cmd = _enum(reduce_cmd, _RC, I, "reduce_cmd")
    P = data.shape[0]
    x = _f32(data, f"nisa.{I}: data")
    x = x * _scalar_or_column(scale, I, "scale", data, bitvec=False)
    if bias is not None:
        if isinstance(bias, NkiTensor):
            _operand(bias, I, "bias")
            if bias.shape[0] != P or bias.free_size != 1:
                raise NkiValidationError(f"nisa.{I}: bias {list(bias.shape)}: expected a ({P}, 1) tile (free size 1)")
            if bias.dtype == "tfloat32":
                raise NkiValidationError(f"nisa.{I}: bias dtype tfloat32 is not supported")
            x = x + _f32(bias, f"nisa.{I}: bias")
        else:
            if prog.target.gen < 3:
                raise NkiValidationError(f"nisa.{I}: a scalar bias needs trn2 (gen3); on trn1 pass a ({P}, 1) tile")
            x = x + _scalar_or_column(bias, I, "bias", data, bitvec=False)
    if op.act_range is not None and op.name in ("sin", "arctan"):
        lo, hi = op.act_range
        bad = np.isfinite(x) & ((x < lo - 1e-6) | (x > hi + 1e-6))
        if bad.any():
            v = float(x[bad][0])
            raise NkiValidationError(
                f"nisa.{I}: op={op!r} input {v:g} is outside its valid range [{lo:g}, {hi:g}]; the Scalar engine does "
                "no range reduction (reduce the argument first)"
            )
    with np.errstate(all="ignore"):
        out = np.asarray(op.act(x), dtype=np.float32)
    if reduce_op is not None and _op(reduce_op, I, "reduce_op").name != "add":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: activation reduces with nl.add only")
    if cmd is _RC.load_reduce:
        raise NkiValidationError(f"nisa.{I}: reduce_cmd=load_reduce is not an activation reduce command")
    if (cmd is not _RC.idle or reduce_res is not None) and reduce_op is None:
        raise NkiValidationError(f"nisa.{I}: reduce_cmd / reduce_res need reduce_op=nl.add")
    acc = prog.act_acc
    if cmd.name == "reset":
        acc[:P] = 0.0
    elif cmd.name == "reduce":
        acc[:P] += out.sum(axis=1, dtype=np.float32)
    elif cmd.name == "reset_reduce":
        acc[:P] = out.sum(axis=1, dtype=np.float32)
    _write(I, dst, out)
    _record(I, "scalar", cost.scalar_cycles(data.free_size))
    if reduce_res is not None:
        reduce_res = _operand(reduce_res, I, "reduce_res")
        if reduce_res.shape[0] != P or reduce_res.free_size != 1:
            raise NkiValidationError(f"nisa.{I}: reduce_res {list(reduce_res.shape)}: expected ({P}, 1)")
        _write(I, reduce_res, acc[:P].reshape(P, 1).copy())
        _record(I, "scalar", cost.scalar_cycles(1))


@instruction
def activation_reduce(dst: NkiTensor, op: Op, data: NkiTensor, reduce_op: Op, reduce_res: NkiTensor, bias: Any = None,
                      scale: Any = 1.0, name: str | None = None) -> None:  # fmt: skip
    """`activation(..., reduce_cmd=reset_reduce, reduce_res=...)` (kept for backward compatibility)."""
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=reduce_cmd.reset_reduce)  # fmt: skip


# ---- Vector / GpSimd engines -----------------------------------------------------------------
def _norm_axis(axis: Any, ndim: int, instr: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) + ndim if int(a) < 0 else int(a) for a in axes))
    if not axes or axes[0] < 1 or axes[-1] != ndim - 1 or axes != tuple(range(axes[0], ndim)):
        raise NkiValidationError(
            f"nisa.{instr}: axis={axis!r} for a {ndim}-D tile: expected trailing free axes ending at the last dim "
            f"(e.g. {ndim - 1}, or ({max(1, ndim - 2)}, {ndim - 1})); the partition axis 0 cannot be reduced"
        )
    return axes


@instruction
def tensor_reduce(dst: NkiTensor, op: Op, data: NkiTensor, axis: Any, negate: bool = False, keepdims: bool = False,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = reduce(op, data, trailing free axes) (Vector engine); `negate` multiplies by -1."""
    I = "tensor_reduce"
    op = _op(op, I, "op")
    if not op.reducible:
        raise NkiValidationError(
            f"nisa.{I}: op={op!r} is not a reduction operator; use nl.add, nl.maximum, nl.minimum, ..."
        )
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    axes = _norm_axis(axis, data.ndim, I)
    if dst.shape[0] != data.shape[0]:
        raise NkiValidationError(f"nisa.{I}: dst has {dst.shape[0]} partitions, data {data.shape[0]}; expected equal")
    keep = math.prod(data.shape[1 : axes[0]])
    if dst.free_size != keep:
        raise NkiValidationError(
            f"nisa.{I}: dst {list(dst.shape)} has {dst.free_size} elements per partition; reducing axes {axes} of "
            f"{list(data.shape)} leaves {keep}"
        )
    if op.bitvec:
        if negate:
            raise NkiValidationError(f"nisa.{I}: negate=True applies to arithmetic operators only")
        if not data.dtype.is_int:
            raise NkiValidationError(f"nisa.{I}: op={op!r} needs an integer data tile, got {data.dtype}")
        res = op.alu.reduce(data.read(f"nisa.{I}: data"), axis=axes)  # type: ignore[union-attr]
        _write(I, dst, res.reshape(dst.shape[0], -1), converted=False)
    else:
        x = data.read(f"nisa.{I}: data").astype(np.float32)
        if op.name.startswith("logical"):
            x = (x != 0).astype(np.float32)
        ufunc = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
                 "minimum": np.minimum, "logical_and": np.minimum, "logical_or": np.maximum,
                 "logical_xor": np.not_equal}[op.name]  # fmt: skip
        with np.errstate(all="ignore"):
            if op.name == "logical_xor":
                res = (np.add.reduce(x, axis=axes) % 2).astype(np.float32)
            else:
                res = ufunc.reduce(x, axis=axes, dtype=np.float32)
        if negate:
            res = -res
        _write(I, dst, res.reshape(dst.shape[0], -1))
    _record(I, "vector", cost.vector_cycles(data.free_size))


@instruction
def tensor_tensor(dst: NkiTensor, data1: NkiTensor, data2: NkiTensor, op: Op, engine: engine = engine.unknown,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = data1 op data2 element-wise (Vector; GpSimd for all-int32 or nl.power)."""
    I = "tensor_tensor"
    op = _alu(_op(op, I, "op"), I, "op")
    dst = _operand(dst, I, "dst")
    data1 = _operand(data1, I, "data1")
    data2 = _operand(data2, I, "data2")
    _match(I, "dst", dst, "data1", data1)
    _match(I, "dst", dst, "data2", data2)
    _not_both_psum(I, "data1", data1, "data2", data2)
    psum = PSUM in (dst.buffer, data1.buffer, data2.buffer)
    all_int = all(t.dtype in ("int32", "uint32") for t in (dst, data1, data2))
    default = _E.gpsimd if ((all_int and not psum) or op.gpsimd_only) else _E.vector
    eng = _compute_engine(engine, I, (_E.vector, _E.gpsimd), default, psum)
    if op.gpsimd_only and eng != "gpsimd":
        raise NkiValidationError(f"nisa.{I}: op={op!r} runs on GpSimd only (SBUF operands, engine=gpsimd or unknown)")
    if op.bitvec:
        for f, t in (("data1", data1), ("data2", data2), ("dst", dst)):
            if not t.dtype.is_int:
                raise NkiValidationError(
                    f"nisa.{I}: op={op!r} is a bit-vector operator; {f} dtype {t.dtype} is not an integer"
                )
        res = _binary(op, _raw(data1, f"nisa.{I}: data1"), _raw(data2, f"nisa.{I}: data2"))
        _write(I, dst, res, converted=False)
    elif all(t.dtype.is_int for t in (data1, data2)) and eng == "gpsimd":
        a = _raw(data1, f"nisa.{I}: data1").astype(np.int64)
        res = _binary(op, a, _raw(data2, f"nisa.{I}: data2").astype(np.int64))  # exact integer arithmetic
        _write(I, dst, res)
    else:
        _write(I, dst, _binary(op, _f32(data1, f"nisa.{I}: data1"), _f32(data2, f"nisa.{I}: data2")))
    _record(I, eng, _cycles(eng, dst.free_size, 2))


@instruction
def tensor_scalar(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reverse0: bool = False,
                  op1: Op | None = None, operand1: Any = None, reverse1: bool = False, engine: engine = engine.unknown,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = (data op0 operand0) op1 operand1, operands scalars or (P, 1) tiles broadcast along the free dims."""
    I = "tensor_scalar"
    op0 = _alu(_op(op0, I, "op0"), I, "op0", unary_ok=True)
    if (op1 is None) != (operand1 is None) and not getattr(op1, "unary", False):
        raise NkiValidationError(f"nisa.{I}: op1 and operand1 must both be given or both be None")
    if op1 is not None:
        op1 = _alu(_op(op1, I, "op1"), I, "op1", unary_ok=True)
        if op1.bitvec != op0.bitvec:
            raise NkiValidationError(
                f"nisa.{I}: op0={op0!r} and op1={op1!r} must both be arithmetic or both bit-vector"
            )
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    _match(I, "dst", dst, "data", data)
    bitvec = op0.bitvec
    psum = PSUM in (dst.buffer, data.buffer)
    eng_e = _enum(engine, _E, I, "engine")
    E = _E
    eng = _compute_engine(eng_e, I, (E.vector, E.scalar, E.gpsimd), E.vector, psum)
    if eng == "scalar":
        pair = (op0.name, None if op1 is None else op1.name)
        if bitvec or pair not in (("multiply", "add"), ("multiply", None), ("add", None)):
            raise NkiValidationError(
                f"nisa.{I}: engine=scalar supports (multiply, add), (multiply,) and (add,) only, got {pair}"
            )
    if eng == "gpsimd" and op0.name != "rsqrt":
        raise NkiValidationError(f"nisa.{I}: engine=gpsimd is for op0=nl.rsqrt only")
    if bitvec:
        for f, t in (("data", data), ("dst", dst)):
            if not t.dtype.is_int:
                raise NkiValidationError(f"nisa.{I}: bit-vector op0={op0!r}: {f} dtype {t.dtype} is not an integer")
        x = _raw(data, f"nisa.{I}: data")
    else:
        x = _f32(data, f"nisa.{I}: data")

    def apply(op: Op, x: np.ndarray, operand: Any, reverse: bool, field: str) -> np.ndarray:
        if op.unary:
            if operand not in (None, 0, 0.0) or isinstance(operand, NkiTensor):
                raise NkiValidationError(
                    f"nisa.{I}: {field}={operand!r}: the unary operator {op!r} takes operand None or 0"
                )
            with np.errstate(all="ignore"):
                return np.asarray(op.alu(x), dtype=x.dtype)  # type: ignore[misc]
        o = _scalar_or_column(operand, I, field, data, bitvec=bitvec)
        if bitvec and not isinstance(o, np.ndarray):
            o = np.asarray(o).astype(x.dtype)
        return _binary(op, x, o, reverse)

    t = apply(op0, x, operand0, reverse0, "operand0")
    if op1 is not None:
        t = apply(op1, t, operand1, reverse1, "operand1")
    _write(I, dst, t, converted=not bitvec)
    _record(I, eng, _cycles(eng, data.free_size))


@instruction
def scalar_tensor_tensor(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, op1: Op, operand1: NkiTensor,
                         reverse0: bool = False, reverse1: bool = False, name: str | None = None) -> None:  # fmt: skip
    """dst = (data op0 operand0) op1 operand1; operand0 scalar or (P, 1), operand1 a full tile (Vector)."""
    I = "scalar_tensor_tensor"
    op0 = _alu(_op(op0, I, "op0"), I, "op0")
    op1 = _alu(_op(op1, I, "op1"), I, "op1")
    if op0.bitvec or op1.bitvec:
        raise NkiValidationError(f"nisa.{I}: arithmetic operators only, got {op0!r}, {op1!r}")
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    operand1 = _operand(operand1, I, "operand1")
    _match(I, "dst", dst, "data", data)
    _match(I, "data", data, "operand1", operand1)
    _not_both_psum(I, "data", data, "operand1", operand1)
    o0 = _scalar_or_column(operand0, I, "operand0", data, bitvec=False)
    t = _binary(op0, _f32(data, f"nisa.{I}: data"), o0, reverse0)
    _write(I, dst, _binary(op1, t, _f32(operand1, f"nisa.{I}: operand1"), reverse1))
    _record(I, "vector", cost.vector_cycles(data.free_size, 2))


@instruction
def tensor_copy(dst: NkiTensor, src: NkiTensor, engine: engine = engine.unknown, name: str | None = None) -> None:
    """dst = src (bit-exact when dtypes match, else converted through fp32)."""
    I = "tensor_copy"
    prog = context.current(f"nisa.{I}")
    dst = _operand(dst, I, "dst")
    src = _operand(src, I, "src")
    _match(I, "dst", dst, "src", src)
    E = _E
    psum = PSUM in (dst.buffer, src.buffer)
    eng = _compute_engine(engine, I, (E.vector, E.scalar, E.gpsimd), E.vector, psum)
    if eng == "scalar" and prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{I}: engine=scalar is not supported on trn1; use nisa.activation(op=nl.copy)")
    if dst.dtype == src.dtype:
        _write(I, dst, _raw(src, f"nisa.{I}: src"), converted=False)
    else:
        _write(I, dst, _f32(src, f"nisa.{I}: src"))
    _record(I, eng, _cycles(eng, src.free_size))


_PRED_DTYPES = ("uint8", "uint16", "uint32")


@instruction
def tensor_copy_predicated(dst: NkiTensor, src: Any, predicate: NkiTensor, reverse_pred: bool = False,
                           name: str | None = None) -> None:  # fmt: skip
    """dst = src where predicate != 0 (== 0 with reverse_pred); elsewhere dst keeps its value (Vector)."""
    I = "tensor_copy_predicated"
    dst = _operand(dst, I, "dst")
    predicate = _operand(predicate, I, "predicate")
    _match(I, "dst", dst, "predicate", predicate)
    if predicate.dtype not in _PRED_DTYPES:
        raise NkiValidationError(
            f"nisa.{I}: predicate dtype {predicate.dtype}: expected one of {', '.join(_PRED_DTYPES)}"
        )
    if isinstance(src, NkiTensor):
        src = _operand(src, I, "src")
        _match(I, "dst", dst, "src", src)
        _not_both_psum(I, "src", src, "predicate", predicate)
        if src.dtype != dst.dtype:
            raise NkiValidationError(f"nisa.{I}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
        vals = _raw(src, f"nisa.{I}: src")
    elif isinstance(src, (int, float)) and not isinstance(src, bool):
        vals = cast(np.full(_pf(dst), src, dtype=np.float64), dst.dtype)
    else:
        raise NkiValidationError(f"nisa.{I}: src={src!r}: expected a tile or a number")
    pred = _raw(predicate, f"nisa.{I}: predicate") != 0
    if reverse_pred:
        pred = ~pred
    cur = _raw(dst, check=False)  # kept where the predicate is off; the kernel owns its contents
    _write(I, dst, np.where(pred, vals, cur), converted=False)
    _record(I, "vector", cost.vector_cycles(dst.free_size, 2))


@instruction
def memset(dst: NkiTensor, value: Any, engine: engine = engine.unknown, name: str | None = None) -> None:
    """Fill dst with a compile-time constant whose kind matches dst's dtype (Vector or GpSimd)."""
    I = "memset"
    dst = _operand(dst, I, "dst")
    E = _E
    eng = _compute_engine(engine, I, (E.vector, E.gpsimd), E.vector, dst.buffer is PSUM)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise NkiValidationError(f"nisa.{I}: value={value!r}: expected a number matching dst dtype {dst.dtype}")
    if dst.dtype.is_int:
        if not isinstance(value, (int, np.integer)):
            raise NkiValidationError(
                f"nisa.{I}: value={value!r} for integer dst dtype {dst.dtype}: expected an integer literal "
                "(e.g. 2, not 2.0)"
            )
        lo, hi = np.iinfo(dst.dtype.np).min, np.iinfo(dst.dtype.np).max
        if not lo <= int(value) <= hi:
            raise NkiValidationError(f"nisa.{I}: value={value} does not fit dst dtype {dst.dtype} [{lo}, {hi}]")
        vals = np.full(_pf(dst), int(value), dtype=np.int64)
    else:
        vals = np.full(_pf(dst), float(value), dtype=np.float32)
    _write(I, dst, vals)
    _record(I, eng, _cycles(eng, dst.free_size))


@instruction
def iota(dst: NkiTensor, pattern: Any, offset: int = 0, channel_multiplier: int = 0, name: str | None = None) -> None:
    """dst[c, (w,z,y,x)] = offset + c*channel_multiplier + sum(index * step) in int32 (GpSimd, SBUF)."""
    I = "iota"
    dst = _operand(dst, I, "dst", (SBUF,))
    vals = _pattern_values(I, pattern, offset, channel_multiplier, dst.shape[0], dst.free_size)
    _write(I, dst, vals)
    _record(I, "gpsimd", cost.gpsimd_cycles(dst.free_size))


@instruction
def reciprocal(dst: NkiTensor, data: NkiTensor, name: str | None = None) -> None:
    """dst = 1 / data in fp32 (Vector)."""
    I = "reciprocal"
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    _match(I, "dst", dst, "data", data)
    with np.errstate(divide="ignore", invalid="ignore"):
        _write(I, dst, np.float32(1.0) / _f32(data, f"nisa.{I}: data"))
    _record(I, "vector", cost.vector_cycles(data.free_size))


# ---- selection, Vector accumulators, top-8 (nki-api.md 4.8, 4.19, 4.20) -------------------------
FP32_MIN = float(np.finfo(np.float32).min)
_RANGE_CMP = ("equal", "less", "less_equal", "greater", "greater_equal")
_REDUCE_IDENTITY = {"add": 0.0, "multiply": 1.0, "maximum": -np.inf, "minimum": np.inf}


def _pattern_values(instr: str, pattern: Any, offset: int, channel_multiplier: int, P: int, F: int) -> np.ndarray:
    """(P, F) int64 values `offset + c*channel_multiplier + sum(step * index)` of an iota-style pattern."""
    if not isinstance(pattern, (list, tuple)) or not 1 <= len(pattern) <= 4:
        raise NkiValidationError(f"nisa.{instr}: pattern={pattern!r}: expected 1 to 4 [step, count] pairs")
    pairs = []
    for p in pattern:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise NkiValidationError(f"nisa.{instr}: pattern entry {p!r}: expected a [step, count] pair")
        pairs.append((int(p[0]), int(p[1])))
    n = math.prod(c for _, c in pairs)
    if n != F:
        raise NkiValidationError(f"nisa.{instr}: pattern covers {n} elements but dst has {F} per partition")
    vals = np.full((P, *(c for _, c in pairs)), int(offset), dtype=np.int64)
    vals += (np.arange(P, dtype=np.int64) * int(channel_multiplier)).reshape((P,) + (1,) * len(pairs))
    for d, (step, cnt) in enumerate(pairs):
        shape = [1] * (len(pairs) + 1)
        shape[d + 1] = cnt
        vals = vals + (np.arange(cnt, dtype=np.int64) * step).reshape(shape)
    return vals.astype(np.int32).astype(np.int64).reshape(P, F)  # 32-bit ALU


def _accumulate(prog: context.Program, instr: str, cmd: reduce_cmd, op_name: str, part: np.ndarray,
                init: float | None = None) -> None:  # fmt: skip
    """Apply one instruction's per-partition reduction `part` (P,) to the Vector accumulators."""
    P = part.shape[0]
    acc = prog.dve_acc
    f = {"add": np.add, "multiply": np.multiply, "maximum": np.maximum, "minimum": np.minimum}[op_name]
    if cmd is _RC.reset_reduce:
        acc[:P] = part
    elif cmd is _RC.reduce:
        acc[:P] = f(acc[:P], part)
    elif cmd is _RC.reset:
        acc[:P] = _REDUCE_IDENTITY[op_name]
    elif cmd is _RC.load_reduce:
        if init is None:
            raise NkiValidationError(f"nisa.{instr}: reduce_cmd=load_reduce needs reduce_init")
        acc[:P] = f(np.float32(init), part)


def _reduce_res(instr: str, reduce_res: Any, values: np.ndarray) -> None:
    res = _operand(reduce_res, instr, "reduce_res")
    if res.shape[0] != values.shape[0] or res.free_size != 1:
        raise NkiValidationError(f"nisa.{instr}: reduce_res {list(res.shape)}: expected ({values.shape[0]}, 1)")
    _write(instr, res, values.reshape(-1, 1).copy())


@instruction
def affine_select(dst: NkiTensor, pattern: Any, channel_multiplier: int, on_true_tile: NkiTensor, on_false_value: Any,
                  cmp_op: Op = _ops.equal, offset: int = 0, name: str | None = None) -> None:  # fmt: skip
    """dst = on_true_tile where cmp_op(offset + c*cm + sum(step*index), 0), else on_false_value (GpSimd, SBUF)."""
    I = "affine_select"
    dst = _operand(dst, I, "dst", (SBUF,))
    on_true_tile = _operand(on_true_tile, I, "on_true_tile", (SBUF,))
    _match(I, "dst", dst, "on_true_tile", on_true_tile)
    cmp = _alu(_op(cmp_op, I, "cmp_op"), I, "cmp_op")
    if isinstance(on_false_value, bool) or not isinstance(on_false_value, (int, float)):
        raise NkiValidationError(f"nisa.{I}: on_false_value={on_false_value!r}: expected a number")
    a = _pattern_values(I, pattern, offset, channel_multiplier, dst.shape[0], dst.free_size).astype(np.float32)
    keep = _binary(cmp, a, np.float32(0.0)) != 0
    x = _f32(on_true_tile, f"nisa.{I}: on_true_tile")
    _write(I, dst, np.where(keep, x, np.float32(on_false_value)))
    _record(I, "gpsimd", cost.gpsimd_cycles(dst.free_size))


@instruction
def range_select(dst: NkiTensor, on_true_tile: NkiTensor, comp_op0: Op, comp_op1: Op, bound0: NkiTensor,
                 bound1: NkiTensor, reduce_cmd: reduce_cmd = reduce_cmd.reset_reduce,
                 reduce_res: NkiTensor | None = None, reduce_op: Op = _ops.maximum, range_start: int = 0,
                 on_false_value: float = FP32_MIN,
                 name: str | None = None) -> None:  # fmt: skip
    """Keep on_true_tile[p, j] where comp_op0(range_start+j, bound0[p]) and comp_op1(..., bound1[p]), else
    FP32_MIN; max-reduce the row into the Vector accumulators (trn2+)."""
    I = "range_select"
    prog = context.current(f"nisa.{I}")
    if prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{I}: needs trn2 (gen3) or later")
    cmd = _enum(reduce_cmd, _RC, I, "reduce_cmd")
    dst = _operand(dst, I, "dst")
    on_true_tile = _operand(on_true_tile, I, "on_true_tile")
    _match(I, "dst", dst, "on_true_tile", on_true_tile)
    if on_true_tile.dtype.is_int:
        raise NkiValidationError(f"nisa.{I}: on_true_tile dtype {on_true_tile.dtype}: expected a float dtype")
    ops = []
    for f, op in (("comp_op0", comp_op0), ("comp_op1", comp_op1)):
        o = _op(op, I, f)
        if o.name not in _RANGE_CMP:
            raise NkiValidationError(f"nisa.{I}: {f}={o!r}: expected one of {', '.join('nl.' + c for c in _RANGE_CMP)}")
        ops.append(o)
    if _op(reduce_op, I, "reduce_op").name != "maximum":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: range_select reduces with nl.maximum")
    if float(on_false_value) != FP32_MIN:
        raise NkiValidationError(f"nisa.{I}: on_false_value={on_false_value!r}: must be FP32_MIN ({FP32_MIN!r})")
    P, F = _pf(dst)
    b0 = _scalar_or_column(bound0, I, "bound0", dst, bitvec=False)
    b1 = _scalar_or_column(bound1, I, "bound1", dst, bitvec=False)
    j = (np.float32(range_start) + np.arange(F, dtype=np.float32))[None, :]
    keep = (_binary(ops[0], j, b0) != 0) & (_binary(ops[1], j, b1) != 0)
    out = np.where(keep, _f32(on_true_tile, f"nisa.{I}: on_true_tile"), np.float32(FP32_MIN)).astype(np.float32)
    _write(I, dst, out)
    _accumulate(prog, I, cmd, "maximum", out.max(axis=1))
    if reduce_res is not None:
        _reduce_res(I, reduce_res, prog.dve_acc[:P])
    _record(I, "vector", cost.vector_cycles(F))


@instruction
def select_reduce(dst: NkiTensor, predicate: NkiTensor, on_true: NkiTensor, on_false: Any,
                  reduce_res: NkiTensor | None = None, reduce_cmd: reduce_cmd = reduce_cmd.idle,
                  reduce_op: Op = _ops.maximum, reverse_pred: bool = False,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = where(predicate, on_true, on_false), optionally max-reducing each row (Vector)."""
    I = "select_reduce"
    prog = context.current(f"nisa.{I}")
    cmd = _enum(reduce_cmd, _RC, I, "reduce_cmd")
    dst = _operand(dst, I, "dst")
    predicate = _operand(predicate, I, "predicate")
    on_true = _operand(on_true, I, "on_true")
    _match(I, "dst", dst, "predicate", predicate)
    _match(I, "dst", dst, "on_true", on_true)
    _not_both_psum(I, "on_true", on_true, "predicate", predicate)
    if predicate.dtype not in ("int8", "uint8", "int16", "uint16"):
        raise NkiValidationError(f"nisa.{I}: predicate dtype {predicate.dtype}: expected int8, uint8, int16 or uint16")
    if on_true.dtype in ("tfloat32", "int32", "uint32"):
        raise NkiValidationError(f"nisa.{I}: on_true dtype {on_true.dtype} is not supported")
    if _op(reduce_op, I, "reduce_op").name != "maximum":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: select_reduce reduces with nl.maximum")
    pred = _raw(predicate, f"nisa.{I}: predicate") != 0
    if reverse_pred:
        pred = ~pred
    off = _scalar_or_column(on_false, I, "on_false", dst, bitvec=False)
    out = np.where(pred, _f32(on_true, f"nisa.{I}: on_true"), off).astype(np.float32)
    _write(I, dst, out)
    if cmd is not _RC.idle or reduce_res is not None:
        _accumulate(prog, I, cmd, "maximum", out.max(axis=1))
    if reduce_res is not None:
        _reduce_res(I, reduce_res, prog.dve_acc[: dst.shape[0]])
    _record(I, "vector", cost.vector_cycles(dst.free_size, 2))


@instruction
def tensor_scalar_reduce(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reduce_op: Op,
                         reduce_res: NkiTensor | None = None, reverse0: bool = False,
                         reduce_cmd: reduce_cmd = reduce_cmd.reset_reduce, reduce_init: float | None = None,
                         reduce_res_negate: bool = False, name: str | None = None) -> None:  # fmt: skip
    """dst = data op0 operand0, reduced over the free dims with reduce_op into the Vector accumulators."""
    I = "tensor_scalar_reduce"
    prog = context.current(f"nisa.{I}")
    cmd = _enum(reduce_cmd, _RC, I, "reduce_cmd")
    op0 = _alu(_op(op0, I, "op0"), I, "op0")
    if op0.bitvec:
        raise NkiValidationError(f"nisa.{I}: op0={op0!r}: arithmetic operators only")
    if reverse0:
        raise NkiValidationError(f"nisa.{I}: reverse0=True is documented as not supported yet")
    red = _op(reduce_op, I, "reduce_op")
    if red.name not in _REDUCE_IDENTITY:
        raise NkiValidationError(f"nisa.{I}: reduce_op={red!r}: expected nl.add, nl.multiply, nl.maximum or nl.minimum")
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    _match(I, "dst", dst, "data", data)
    out = _binary(op0, _f32(data, f"nisa.{I}: data"), _scalar_or_column(operand0, I, "operand0", data, bitvec=False))
    out = out.astype(np.float32)
    _write(I, dst, out)
    f = {"add": np.add, "multiply": np.multiply, "maximum": np.maximum, "minimum": np.minimum}[red.name]
    _accumulate(prog, I, cmd, red.name, f.reduce(out, axis=1), reduce_init)
    if reduce_res is not None:
        vals = prog.dve_acc[: dst.shape[0]].copy()
        _reduce_res(I, reduce_res, -vals if reduce_res_negate else vals)
    _record(I, "vector", cost.vector_cycles(data.free_size))


@instruction
def max8(dst: NkiTensor, src: NkiTensor, name: str | None = None) -> None:
    """dst (P, 8) = the 8 largest values of each partition of src, descending (Vector)."""
    I = "max8"
    dst = _operand(dst, I, "dst")
    src = _operand(src, I, "src")
    if dst.shape[0] != src.shape[0] or dst.free_size != 8:
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)}: expected ({src.shape[0]}, 8)")
    if not 8 <= src.free_size <= 16384:
        raise NkiValidationError(f"nisa.{I}: src has {src.free_size} elements per partition; expected 8 to 16384")
    x = _f32(src, f"nisa.{I}: src")
    _write(I, dst, -np.sort(-x, axis=1)[:, :8])
    _record(I, "vector", cost.vector_cycles(src.free_size))


@instruction
def nc_find_index8(dst: NkiTensor, data: NkiTensor, vals: NkiTensor, name: str | None = None) -> None:
    """dst (P, 8) = index of the first occurrence in data of each of the 8 vals (duplicates: successive
    occurrences; missing: all ones) (Vector)."""
    I = "nc_find_index8"
    dst = _operand(dst, I, "dst")
    data = _operand(data, I, "data")
    vals = _operand(vals, I, "vals")
    P = data.shape[0]
    if dst.shape[0] != P or dst.free_size != 8 or vals.shape[0] != P or vals.free_size != 8:
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)} and vals {list(vals.shape)}: expected ({P}, 8)")
    if dst.dtype not in ("uint32", "uint16"):
        raise NkiValidationError(f"nisa.{I}: dst dtype {dst.dtype}: expected uint32 or uint16")
    if not 8 <= data.free_size <= 16384:
        raise NkiValidationError(f"nisa.{I}: data has {data.free_size} elements per partition; expected 8 to 16384")
    x = _f32(data, f"nisa.{I}: data")
    v = _f32(vals, f"nisa.{I}: vals")
    missing = np.iinfo(dst.dtype.np).max
    out = np.full((P, 8), missing, dtype=np.int64)
    for p in range(P):  # 8 lookups per partition; rows are short
        used: set[int] = set()
        for k in range(8):
            hits = np.flatnonzero(x[p] == v[p, k])
            nxt = next((int(h) for h in hits if int(h) not in used), None)
            if nxt is not None:
                used.add(nxt)
                out[p, k] = nxt
    _write(I, dst, out)
    _record(I, "vector", cost.vector_cycles(data.free_size))


# ---- DMA ---------------------------------------------------------------------------------
def _addresses(view: NkiTensor, instr: str, field: str, oob: oob_mode) -> tuple[np.ndarray, np.ndarray]:
    """Flat storage indices (view shape) of an indirect view, and a per-element 'transfer' mask."""
    ind = view.indirect
    assert ind is not None
    idx = _raw(ind.index, f"nisa.{instr}: {field} offset tensor").reshape(-1).astype(np.int64)
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
        UNINIT_CHECK
        and init is not None
        and src.dtype.itemsize == src.storage.dtype.itemsize
        and not init[addr[ok]].all()
    ):
        raise NkiValidationError(
            f"nisa.{instr}: src: the gather reads elements of {src.storage.describe()} never written"
        )
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


def _run_elems(t: NkiTensor) -> int:
    """Elements of `t` that are contiguous in memory in its row-major traversal (one descriptor's run).

    On chip, or through an indirect (per-partition) view, the partition dim never extends a run.
    """
    dims = list(zip(t.shape, t.strides, strict=True))
    if t.on_chip or t.indirect is not None:
        dims = dims[1:]
    run, expect = 1, 1
    for n, s in reversed(dims):
        if n == 1:
            continue
        if s != expect:
            break
        run *= n
        expect *= n
    return run


def _dma_common(
    instr: str, dst: Any, src: Any, priority: Any, oob: Any, dge: Any
) -> tuple[NkiTensor, NkiTensor, oob_mode, dge_mode]:
    prog = context.current(f"nisa.{instr}")
    oob = _enum(oob, oob_mode, instr, "oob_mode")
    dge = _enum(dge, dge_mode, instr, "dge_mode")
    dst = _operand(dst, instr, "dst", (SBUF, *HBM), indirect=True, compute=False)
    src = _operand(src, instr, "src", (SBUF, *HBM), indirect=True, compute=False)
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
    E = _E
    eng = _enum(engine, E, I, "engine")
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
    run = math.gcd(_run_elems(src), _run_elems(dst)) * item
    prog.stats.record_dma(I, dge.name, n * item, rd, wr, run_bytes=run)


_TRANSPOSE_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


@instruction
def dma_transpose(dst: NkiTensor, src: NkiTensor, axes: Any = None, priority: Any = None,
                  dge_mode: dge_mode = dge_mode.unknown, oob_mode: oob_mode = oob_mode.error,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = transpose(src, axes) during the DMA (into SBUF; 2-byte dtypes)."""
    I = "dma_transpose"
    prog = context.current(f"nisa.{I}")
    dst, src, oob, dge = _dma_common(I, dst, src, priority, oob_mode, dge_mode)
    if prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{I}: DMA transpose is a trn2 (gen3) feature")
    if dst.buffer is not SBUF or dst.indirect is not None:
        raise NkiValidationError(f"nisa.{I}: dst must be a direct SBUF view")
    if src.dtype != dst.dtype or src.dtype.itemsize != 2:
        raise NkiValidationError(f"nisa.{I}: src {src.dtype} / dst {dst.dtype}: expected equal 2-byte dtypes")
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
    # A transposing DMA moves 2-byte elements to scattered places: charge per element run of the dst rows.
    prog.stats.record_dma(I, dge.name, n * 2, n * 2 if src.buffer.is_hbm else 0, 0, run_bytes=_run_elems(src) * 2)


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
    src = _operand(src, I, "src", (SBUF,), compute=False)
    dst = _operand(dst, I, "dst", (SBUF,), compute=False)
    to = _rank(send_to_rank, prog, I, "send_to_rank")
    frm = _rank(recv_from_rank, prog, I, "recv_from_rank")
    if isinstance(pipe_id, bool) or not isinstance(pipe_id, (int, np.integer)) or pipe_id < 0:
        raise NkiValidationError(f"nisa.{I}: pipe_id={pipe_id!r}: expected a non-negative int")
    de = _enum(dma_engine, _DE, I, "dma_engine")
    if src.dtype != dst.dtype:
        raise NkiValidationError(f"nisa.{I}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
    _match(I, "src", src, "dst", dst)
    if de.name == "gpsimd_dma":
        lim = _GPSIMD_DMA_LIMIT[src.dtype.itemsize]
        nb = src.free_size * src.dtype.itemsize
        if nb > lim:
            raise NkiValidationError(
                f"nisa.{I}: dma_engine=gpsimd_dma moves at most {lim} bytes per partition of {src.dtype}, src has {nb}"
            )
    payload = (_raw(src, f"nisa.{I}: src"), src.dtype, list(src.shape))  # snapshot before anyone writes dst
    channel = ("sendrecv", int(pipe_id))
    prog.launch.send(prog.pid, channel, to, payload)
    vals, dt, shape = prog.launch.recv(
        prog.pid, channel, frm, f"nisa.sendrecv(pipe_id={pipe_id}) in program {prog.pid}"
    )
    if dt != dst.dtype or vals.shape != _pf(dst):
        raise NkiValidationError(
            f"nisa.{I}: program {frm} sent {shape} {dt} ({vals.shape[0]} x {vals.shape[1]}) on pipe_id "
            f"{pipe_id} but this "
            f"program's dst is {list(dst.shape)} {dst.dtype}"
        )
    _write(I, dst, vals, converted=False)
    nb = src.size * src.dtype.itemsize
    prog.stats.record_dma(I, de.name, nb, 0, 0, run_bytes=_run_elems(src) * src.dtype.itemsize)
    prog.stats.sendrecv_bytes += nb


@instruction
def core_barrier(data: NkiTensor, cores: Any, engine: engine = engine.gpsimd, name: str | None = None) -> None:
    """Both programs reach the barrier before either continues (after writing halves of a shared_hbm `data`)."""
    I = "core_barrier"
    prog = _lnc2(I)
    data = _operand(data, I, "data", (SHARED_HBM,), compute=False)
    eng = _enum(engine, _E, I, "engine")
    if tuple(cores) != (0, 1):
        raise NkiValidationError(f"nisa.{I}: cores={cores!r}: expected (0, 1)")
    other = 1 - prog.pid
    prog.launch.send(prog.pid, ("barrier",), other, None)
    prog.launch.recv(prog.pid, ("barrier",), other, f"nisa.core_barrier in program {prog.pid}")
    eng_name = eng.name if eng.name in ("tensor", "vector", "scalar", "gpsimd") else "gpsimd"
    _record(I, eng_name, 0.0)


# ---- removed / not emulated ------------------------------------------------------------------
_REMOVED = {
    "tensor_copy_dynamic_src": "removed in NKI 0.4: use nisa.tensor_copy with an .ap(scalar_offset=...) view",
    "tensor_copy_dynamic_dst": "removed in NKI 0.4: use nisa.tensor_copy with an .ap(scalar_offset=...) view",
    "exponential": "trn3 (gen4) only: use nisa.activation(op=nl.exp, bias=-max) on trn1/trn2",
}


def __getattr__(name: str) -> Any:
    if name in _REMOVED:
        raise RemovedApiError(f"nisa.{name}: {_REMOVED[name]}")
    raise AttributeError(f"module 'nki.isa' (tkg NKI emulator) has no attribute {name!r}")


__all__ = [
    "NkiInstruction",
    "NkiValidationError",
    "activation",
    "activation_reduce",
    "affine_select",
    "core_barrier",
    "dge_mode",
    "dma_copy",
    "dma_engine",
    "dma_transpose",
    "engine",
    "get_nc_sub_version",
    "get_nc_version",
    "iota",
    "matmul_perf_mode",
    "max8",
    "memset",
    "nc_find_index8",
    "nc_matmul",
    "nc_transpose",
    "nc_version",
    "oob_mode",
    "range_select",
    "reciprocal",
    "reduce_cmd",
    "scalar_tensor_tensor",
    "select_reduce",
    "sendrecv",
    "tensor_copy",
    "tensor_copy_predicated",
    "tensor_reduce",
    "tensor_scalar",
    "tensor_scalar_reduce",
    "tensor_tensor",
]  # fmt: skip
