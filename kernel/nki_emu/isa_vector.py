"""Vector (DVE) and GpSimd (Pool) instructions: reductions, element-wise ops, copies, memset, iota
(nki-api.md 4.4-4.13)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context, cost
from tkg.kernel.nki_emu.dtypes import cast
from tkg.kernel.nki_emu.enums import Engine, engine
from tkg.kernel.nki_emu.errors import NkiValidationError
from tkg.kernel.nki_emu.operands import (
    alu_arg,
    binary,
    compute_engine,
    cycles,
    enum_arg,
    instruction,
    match_pf,
    not_both_psum,
    op_arg,
    operand,
    pattern_values,
    pf,
    read_f32,
    read_raw,
    record,
    scalar_or_column,
    write,
)
from tkg.kernel.nki_emu.ops import Op
from tkg.kernel.nki_emu.tensor import PSUM, SBUF, NkiTensor


# ---- Vector / GpSimd engines -----------------------------------------------------------------
def norm_axis(axis: Any, ndim: int, instr: str) -> tuple[int, ...]:
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
    op = op_arg(op, I, "op")
    if not op.reducible:
        raise NkiValidationError(
            f"nisa.{I}: op={op!r} is not a reduction operator; use nl.add, nl.maximum, nl.minimum, ..."
        )
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    axes = norm_axis(axis, data.ndim, I)
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
        write(I, dst, res.reshape(dst.shape[0], -1), converted=False)
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
        write(I, dst, res.reshape(dst.shape[0], -1))
    record(I, "vector", cost.vector_cycles(data.free_size))


@instruction
def tensor_tensor(dst: NkiTensor, data1: NkiTensor, data2: NkiTensor, op: Op, engine: engine = engine.unknown,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = data1 op data2 element-wise (Vector; GpSimd for all-int32 or nl.power)."""
    I = "tensor_tensor"
    op = alu_arg(op_arg(op, I, "op"), I, "op")
    dst = operand(dst, I, "dst")
    data1 = operand(data1, I, "data1")
    data2 = operand(data2, I, "data2")
    match_pf(I, "dst", dst, "data1", data1)
    match_pf(I, "dst", dst, "data2", data2)
    not_both_psum(I, "data1", data1, "data2", data2)
    psum = PSUM in (dst.buffer, data1.buffer, data2.buffer)
    all_int = all(t.dtype in ("int32", "uint32") for t in (dst, data1, data2))
    default = Engine.gpsimd if ((all_int and not psum) or op.gpsimd_only) else Engine.vector
    eng = compute_engine(engine, I, (Engine.vector, Engine.gpsimd), default, psum)
    if op.gpsimd_only and eng != "gpsimd":
        raise NkiValidationError(f"nisa.{I}: op={op!r} runs on GpSimd only (SBUF operands, engine=gpsimd or unknown)")
    if op.bitvec:
        for f, t in (("data1", data1), ("data2", data2), ("dst", dst)):
            if not t.dtype.is_int:
                raise NkiValidationError(
                    f"nisa.{I}: op={op!r} is a bit-vector operator; {f} dtype {t.dtype} is not an integer"
                )
        res = binary(op, read_raw(data1, f"nisa.{I}: data1"), read_raw(data2, f"nisa.{I}: data2"))
        write(I, dst, res, converted=False)
    elif all(t.dtype.is_int for t in (data1, data2)) and eng == "gpsimd":
        a = read_raw(data1, f"nisa.{I}: data1").astype(np.int64)
        res = binary(op, a, read_raw(data2, f"nisa.{I}: data2").astype(np.int64))  # exact integer arithmetic
        write(I, dst, res)
    else:
        write(I, dst, binary(op, read_f32(data1, f"nisa.{I}: data1"), read_f32(data2, f"nisa.{I}: data2")))
    record(I, eng, cycles(eng, dst.free_size, 2))


@instruction
def tensor_scalar(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reverse0: bool = False,
                  op1: Op | None = None, operand1: Any = None, reverse1: bool = False, engine: engine = engine.unknown,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = (data op0 operand0) op1 operand1, operands scalars or (P, 1) tiles broadcast along the free dims."""
    I = "tensor_scalar"
    op0 = alu_arg(op_arg(op0, I, "op0"), I, "op0", unary_ok=True)
    if (op1 is None) != (operand1 is None) and not getattr(op1, "unary", False):
        raise NkiValidationError(f"nisa.{I}: op1 and operand1 must both be given or both be None")
    if op1 is not None:
        op1 = alu_arg(op_arg(op1, I, "op1"), I, "op1", unary_ok=True)
        if op1.bitvec != op0.bitvec:
            raise NkiValidationError(
                f"nisa.{I}: op0={op0!r} and op1={op1!r} must both be arithmetic or both bit-vector"
            )
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    match_pf(I, "dst", dst, "data", data)
    bitvec = op0.bitvec
    psum = PSUM in (dst.buffer, data.buffer)
    eng_e = enum_arg(engine, Engine, I, "engine")
    E = Engine
    eng = compute_engine(eng_e, I, (E.vector, E.scalar, E.gpsimd), E.vector, psum)
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
        x = read_raw(data, f"nisa.{I}: data")
    else:
        x = read_f32(data, f"nisa.{I}: data")

    def apply(op: Op, x: np.ndarray, operand: Any, reverse: bool, field: str) -> np.ndarray:
        if op.unary:
            if operand not in (None, 0, 0.0) or isinstance(operand, NkiTensor):
                raise NkiValidationError(
                    f"nisa.{I}: {field}={operand!r}: the unary operator {op!r} takes operand None or 0"
                )
            with np.errstate(all="ignore"):
                return np.asarray(op.alu(x), dtype=x.dtype)  # type: ignore[misc]
        o = scalar_or_column(operand, I, field, data, bitvec=bitvec)
        if bitvec and not isinstance(o, np.ndarray):
            o = np.asarray(o).astype(x.dtype)
        return binary(op, x, o, reverse)

    t = apply(op0, x, operand0, reverse0, "operand0")
    if op1 is not None:
        t = apply(op1, t, operand1, reverse1, "operand1")
    write(I, dst, t, converted=not bitvec)
    record(I, eng, cycles(eng, data.free_size))


@instruction
def scalar_tensor_tensor(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, op1: Op, operand1: NkiTensor,
                         reverse0: bool = False, reverse1: bool = False, name: str | None = None) -> None:  # fmt: skip
    """dst = (data op0 operand0) op1 operand1; operand0 scalar or (P, 1), operand1 a full tile (Vector)."""
    I = "scalar_tensor_tensor"
    op0 = alu_arg(op_arg(op0, I, "op0"), I, "op0")
    op1 = alu_arg(op_arg(op1, I, "op1"), I, "op1")
    if op0.bitvec or op1.bitvec:
        raise NkiValidationError(f"nisa.{I}: arithmetic operators only, got {op0!r}, {op1!r}")
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    operand1 = operand(operand1, I, "operand1")
    match_pf(I, "dst", dst, "data", data)
    match_pf(I, "data", data, "operand1", operand1)
    not_both_psum(I, "data", data, "operand1", operand1)
    o0 = scalar_or_column(operand0, I, "operand0", data, bitvec=False)
    t = binary(op0, read_f32(data, f"nisa.{I}: data"), o0, reverse0)
    write(I, dst, binary(op1, t, read_f32(operand1, f"nisa.{I}: operand1"), reverse1))
    record(I, "vector", cost.vector_cycles(data.free_size, 2))


@instruction
def tensor_copy(dst: NkiTensor, src: NkiTensor, engine: engine = engine.unknown, name: str | None = None) -> None:
    """dst = src (bit-exact when dtypes match, else converted through fp32)."""
    I = "tensor_copy"
    prog = context.current(f"nisa.{I}")
    dst = operand(dst, I, "dst")
    src = operand(src, I, "src")
    match_pf(I, "dst", dst, "src", src)
    E = Engine
    psum = PSUM in (dst.buffer, src.buffer)
    eng = compute_engine(engine, I, (E.vector, E.scalar, E.gpsimd), E.vector, psum)
    if eng == "scalar" and prog.target.gen < 3:
        raise NkiValidationError(f"nisa.{I}: engine=scalar is not supported on trn1; use nisa.activation(op=nl.copy)")
    if dst.dtype == src.dtype:
        write(I, dst, read_raw(src, f"nisa.{I}: src"), converted=False)
    else:
        write(I, dst, read_f32(src, f"nisa.{I}: src"))
    record(I, eng, cycles(eng, src.free_size))


_PRED_DTYPES = ("uint8", "uint16", "uint32")


@instruction
def tensor_copy_predicated(dst: NkiTensor, src: Any, predicate: NkiTensor, reverse_pred: bool = False,
                           name: str | None = None) -> None:  # fmt: skip
    """dst = src where predicate != 0 (== 0 with reverse_pred); elsewhere dst keeps its value (Vector)."""
    I = "tensor_copy_predicated"
    dst = operand(dst, I, "dst")
    predicate = operand(predicate, I, "predicate")
    match_pf(I, "dst", dst, "predicate", predicate)
    if predicate.dtype not in _PRED_DTYPES:
        raise NkiValidationError(
            f"nisa.{I}: predicate dtype {predicate.dtype}: expected one of {', '.join(_PRED_DTYPES)}"
        )
    if isinstance(src, NkiTensor):
        src = operand(src, I, "src")
        match_pf(I, "dst", dst, "src", src)
        not_both_psum(I, "src", src, "predicate", predicate)
        if src.dtype != dst.dtype:
            raise NkiValidationError(f"nisa.{I}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
        vals = read_raw(src, f"nisa.{I}: src")
    elif isinstance(src, (int, float)) and not isinstance(src, bool):
        vals = cast(np.full(pf(dst), src, dtype=np.float64), dst.dtype)
    else:
        raise NkiValidationError(f"nisa.{I}: src={src!r}: expected a tile or a number")
    pred = read_raw(predicate, f"nisa.{I}: predicate") != 0
    if reverse_pred:
        pred = ~pred
    cur = read_raw(dst, check=False)  # kept where the predicate is off; the kernel owns its contents
    write(I, dst, np.where(pred, vals, cur), converted=False)
    record(I, "vector", cost.vector_cycles(dst.free_size, 2))


@instruction
def memset(dst: NkiTensor, value: Any, engine: engine = engine.unknown, name: str | None = None) -> None:
    """Fill dst with a compile-time constant whose kind matches dst's dtype (Vector or GpSimd)."""
    I = "memset"
    dst = operand(dst, I, "dst")
    E = Engine
    eng = compute_engine(engine, I, (E.vector, E.gpsimd), E.vector, dst.buffer is PSUM)
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
        vals = np.full(pf(dst), int(value), dtype=np.int64)
    else:
        vals = np.full(pf(dst), float(value), dtype=np.float32)
    write(I, dst, vals)
    record(I, eng, cycles(eng, dst.free_size))


@instruction
def iota(dst: NkiTensor, pattern: Any, offset: int = 0, channel_multiplier: int = 0, name: str | None = None) -> None:
    """dst[c, (w,z,y,x)] = offset + c*channel_multiplier + sum(index * step) in int32 (GpSimd, SBUF)."""
    I = "iota"
    dst = operand(dst, I, "dst", (SBUF,))
    vals = pattern_values(I, pattern, offset, channel_multiplier, dst.shape[0], dst.free_size)
    write(I, dst, vals)
    record(I, "gpsimd", cost.gpsimd_cycles(dst.free_size))


@instruction
def reciprocal(dst: NkiTensor, data: NkiTensor, name: str | None = None) -> None:
    """dst = 1 / data in fp32 (Vector)."""
    I = "reciprocal"
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    match_pf(I, "dst", dst, "data", data)
    with np.errstate(divide="ignore", invalid="ignore"):
        write(I, dst, np.float32(1.0) / read_f32(data, f"nisa.{I}: data"))
    record(I, "vector", cost.vector_cycles(data.free_size))


SHUFFLE_KEEP = 255  # nc_stream_shuffle: this output partition is left unmodified


@instruction
def nc_stream_shuffle(dst: NkiTensor, src: NkiTensor, shuffle_mask: Any, name: str | None = None) -> None:
    """Cross-partition move within 32-partition quadrants (Vector): in every quadrant q of dst,
    dst[32q + i] = src[32q + shuffle_mask[i]], and dst[32q + i] is left unmodified where
    shuffle_mask[i] == 255. Same dtype and elements per partition; in-place allowed (src is read
    before dst is written)."""
    I = "nc_stream_shuffle"
    dst = operand(dst, I, "dst")
    src = operand(src, I, "src")
    if dst.dtype != src.dtype:
        raise NkiValidationError(f"nisa.{I}: dst dtype {dst.dtype} must equal src dtype {src.dtype}")
    if dst.free_size != src.free_size:
        raise NkiValidationError(
            f"nisa.{I}: dst has {dst.free_size} elements per partition, src {src.free_size}; expected equal"
        )
    if not isinstance(shuffle_mask, (list, tuple)) or len(shuffle_mask) != 32:
        raise NkiValidationError(f"nisa.{I}: shuffle_mask={shuffle_mask!r}: expected a list of 32 ints")
    mask = []
    for i, m in enumerate(shuffle_mask):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not (0 <= int(m) < 32 or m == SHUFFLE_KEEP):
            raise NkiValidationError(
                f"nisa.{I}: shuffle_mask[{i}]={m!r}: expected a source partition 0..31 of the quadrant or "
                f"{SHUFFLE_KEEP} (keep)"
            )
        mask.append(int(m))
    moves: list[tuple[int, int]] = []
    for q in range(math.ceil(dst.shape[0] / 32)):
        for i in range(min(32, dst.shape[0] - 32 * q)):
            if mask[i] == SHUFFLE_KEEP:
                continue
            s = 32 * q + mask[i]
            if s >= src.shape[0]:
                raise NkiValidationError(
                    f"nisa.{I}: dst partition {32 * q + i} copies src partition {s} (shuffle_mask[{i}]={mask[i]} "
                    f"in quadrant {q}) but src has {src.shape[0]} partitions"
                )
            moves.append((32 * q + i, s))
    rows = {s: read_raw(src[s : s + 1], f"nisa.{I}: src") for s in {s for _, s in moves}}
    for d, s in moves:
        write(I, dst[d : d + 1], rows[s], converted=False)
    record(I, "vector", cost.vector_cycles(src.free_size))
