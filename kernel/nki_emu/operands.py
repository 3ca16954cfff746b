"""Shared machinery of the emulated instructions: operand checks, reads, writes, argument parsing.

Operand rule (nki-api.md 1.3): unless an instruction says otherwise, operands have the same
partition count and the same number of elements per partition; free dims are flattened in each
view's row-major order, so ranks may differ. Reads convert to fp32 (or keep raw bits) and refuse
never-written elements; writes cast to the destination dtype (round to nearest even, saturating
for integers) and clear PSUM's matmul-accumulation flags.
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
from tkg.kernel.nki_emu.dtypes import cast
from tkg.kernel.nki_emu.enums import NkiInstruction, engine
from tkg.kernel.nki_emu.errors import NkiValidationError, RemovedApiError
from tkg.kernel.nki_emu.ops import Op
from tkg.kernel.nki_emu.tensor import PRIVATE_HBM, PSUM, SBUF, SHARED_HBM, MemoryRegion, NkiTensor

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
def where_str(regions: tuple[MemoryRegion, ...]) -> str:
    return " or ".join(repr(r) for r in regions)


def operand(t: Any, instr: str, field: str, where: tuple[MemoryRegion, ...] = ONCHIP, *,
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
        raise NkiValidationError(f"{what}: tensor {t.name!r} is in {t.buffer!r}; expected {where_str(where)}{hint}")
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


def pf(t: NkiTensor) -> tuple[int, int]:
    return t.shape[0], t.free_size


def match_pf(instr: str, ref_field: str, ref: NkiTensor, field: str, t: NkiTensor) -> None:
    if pf(ref) != pf(t):
        raise NkiValidationError(
            f"nisa.{instr}: {field} {list(t.shape)} has {t.shape[0]} partitions x {t.free_size} elements "
            f"but {ref_field} "
            f"{list(ref.shape)} has {ref.shape[0]} x {ref.free_size}; expected equal partition counts and "
            "elements per partition"
        )


def not_both_psum(instr: str, a_field: str, a: Any, b_field: str, b: Any) -> None:
    if isinstance(a, NkiTensor) and isinstance(b, NkiTensor) and a.buffer is PSUM and b.buffer is PSUM:
        raise NkiValidationError(f"nisa.{instr}: {a_field} and {b_field} are both in PSUM; at most one input may be")


def read_raw(t: NkiTensor, what: str = "operand", check: bool = True) -> np.ndarray:
    """A copy of the elements, native dtype, shape (P, F); `check`: raise on never-written elements."""
    if check:
        t.check_initialised(what)
    return np.array(t.array()).reshape(t.shape[0], -1)


def read_f32(t: NkiTensor, what: str = "operand", check: bool = True) -> np.ndarray:
    """The elements converted to fp32, shape (P, F) (a copy)."""
    if check:
        t.check_initialised(what)
    return t.array().astype(np.float32).reshape(t.shape[0], -1)


def mm_flags(t: NkiTensor) -> np.ndarray:
    """Writable view of the PSUM 'written by matmul' flags of `t`'s elements."""
    st = t.storage
    assert st.mm_written is not None
    if t.dtype.itemsize != st.dtype.itemsize:
        raise NkiValidationError(f"tensor {t.name!r}: a dtype-reinterpreted PSUM view cannot be a matmul operand here")
    return as_strided(st.mm_written[t.offset :], shape=t.shape, strides=t.strides)


def write(instr: str, dst: NkiTensor, values: np.ndarray, *, converted: bool = True) -> None:
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
        mm_flags(dst)[...] = False


def enum_arg(value: Any, cls: type[enum.Enum], instr: str, field: str) -> Any:
    if not isinstance(value, cls):
        members = ", ".join(f"nisa.{cls.__name__}.{m.name}" for m in cls)
        raise NkiValidationError(
            f"nisa.{instr}: {field}={value!r}: expected an enum member ({members}); ints are not accepted since NKI 0.3"
        )
    return value


def op_arg(op: Any, instr: str, field: str) -> Op:
    if not isinstance(op, Op):
        raise NkiValidationError(
            f"nisa.{instr}: {field}={op!r}: expected an nl.* operator such as nl.add or nl.maximum"
        )
    prog = context.current(f"nisa.{instr}")
    if op.gen4_only and prog.target.gen < 4:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is available on trn3 (gen4) only")
    return op


def alu_arg(op: Op, instr: str, field: str, *, unary_ok: bool = False) -> Op:
    if op.alu is None:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is not an ALU operator (nki-api.md 3.9 table)")
    if op.unary and not unary_ok:
        raise NkiValidationError(f"nisa.{instr}: {field}={op!r} is unary; expected a binary ALU operator")
    return op


def scalar_or_column(v: Any, instr: str, field: str, data: NkiTensor, *, bitvec: bool) -> np.ndarray | float | int:
    """An operand that is a compile-time scalar or a (P, 1) tile broadcast along the free dims."""
    if isinstance(v, NkiTensor):
        operand(v, instr, field)
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
            return read_raw(v, f"nisa.{instr}: {field}")
        if v.dtype != "float32":
            raise NkiValidationError(f"nisa.{instr}: {field} dtype {v.dtype}: tile operands must be float32")
        return read_f32(v, f"nisa.{instr}: {field}")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise NkiValidationError(f"nisa.{instr}: {field}={v!r}: expected a number or a (P, 1) tile")
    if bitvec:
        if not isinstance(v, (int, np.integer)):
            raise NkiValidationError(f"nisa.{instr}: {field}={v!r}: bit-vector operators need an integer scalar")
        return int(v)
    return np.float32(v)


def record(instr: str, eng: str, cycles: float) -> None:
    context.current(f"nisa.{instr}").stats.record(eng, instr, cycles)


def compute_engine(eng: engine, instr: str, allowed: tuple[engine, ...], default: engine, psum: bool) -> str:
    e = enum_arg(eng, engine, instr, "engine")
    if e is engine.unknown:
        e = default
    if e not in allowed:
        raise NkiValidationError(f"nisa.{instr}: engine={e}: expected one of {', '.join(str(a) for a in allowed)}")
    if e is engine.gpsimd and psum:
        raise NkiValidationError(f"nisa.{instr}: engine=gpsimd cannot access PSUM (GpSimd reads and writes SBUF only)")
    return e.name


def cycles(eng: str, n: int, inputs: int = 1) -> float:
    if eng == "scalar":
        return cost.scalar_cycles(n)
    if eng == "gpsimd":
        return cost.gpsimd_cycles(n, inputs)
    return cost.vector_cycles(n, inputs)


def binary(op: Op, a: np.ndarray, b: Any, reverse: bool = False) -> np.ndarray:
    if reverse:
        a, b = b, a
    with np.errstate(all="ignore"):
        return np.asarray(op.alu(a, b))  # type: ignore[misc]


def pattern_values(instr: str, pattern: Any, offset: int, channel_multiplier: int, P: int, F: int) -> np.ndarray:
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


def run_elems(t: NkiTensor) -> int:
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
