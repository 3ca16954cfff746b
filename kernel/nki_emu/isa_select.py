"""Selection, Vector-accumulator and top-8 instructions (nki-api.md 4.8, 4.19, 4.20)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context, cost
from tkg.kernel.nki_emu import ops as _ops
from tkg.kernel.nki_emu.enums import ReduceCmd, reduce_cmd
from tkg.kernel.nki_emu.errors import NkiValidationError
from tkg.kernel.nki_emu.operands import (
    alu_arg,
    binary,
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
from tkg.kernel.nki_emu.tensor import SBUF, NkiTensor

# ---- selection, Vector accumulators, top-8 (nki-api.md 4.8, 4.19, 4.20) -------------------------
FP32_MIN = float(np.finfo(np.float32).min)
_RANGE_CMP = ("equal", "less", "less_equal", "greater", "greater_equal")
_REDUCE_IDENTITY = {"add": 0.0, "multiply": 1.0, "maximum": -np.inf, "minimum": np.inf}


def _accumulate(prog: context.Program, instr: str, cmd: reduce_cmd, op_name: str, part: np.ndarray,
                init: float | None = None) -> None:  # fmt: skip
    """Apply one instruction's per-partition reduction `part` (P,) to the Vector accumulators."""
    P = part.shape[0]
    acc = prog.dve_acc
    f = {"add": np.add, "multiply": np.multiply, "maximum": np.maximum, "minimum": np.minimum}[op_name]
    if cmd is ReduceCmd.reset_reduce:
        acc[:P] = part
    elif cmd is ReduceCmd.reduce:
        acc[:P] = f(acc[:P], part)
    elif cmd is ReduceCmd.reset:
        acc[:P] = _REDUCE_IDENTITY[op_name]
    elif cmd is ReduceCmd.load_reduce:
        if init is None:
            raise NkiValidationError(f"nisa.{instr}: reduce_cmd=load_reduce needs reduce_init")
        acc[:P] = f(np.float32(init), part)


def _reduce_res(instr: str, reduce_res: Any, values: np.ndarray) -> None:
    res = operand(reduce_res, instr, "reduce_res")
    if res.shape[0] != values.shape[0] or res.free_size != 1:
        raise NkiValidationError(f"nisa.{instr}: reduce_res {list(res.shape)}: expected ({values.shape[0]}, 1)")
    write(instr, res, values.reshape(-1, 1).copy())


@instruction
def affine_select(dst: NkiTensor, pattern: Any, channel_multiplier: int, on_true_tile: NkiTensor, on_false_value: Any,
                  cmp_op: Op = _ops.equal, offset: int = 0, name: str | None = None) -> None:  # fmt: skip
    """dst = on_true_tile where cmp_op(offset + c*cm + sum(step*index), 0), else on_false_value (GpSimd, SBUF)."""
    I = "affine_select"
    dst = operand(dst, I, "dst", (SBUF,))
    on_true_tile = operand(on_true_tile, I, "on_true_tile", (SBUF,))
    match_pf(I, "dst", dst, "on_true_tile", on_true_tile)
    cmp = alu_arg(op_arg(cmp_op, I, "cmp_op"), I, "cmp_op")
    if isinstance(on_false_value, bool) or not isinstance(on_false_value, (int, float)):
        raise NkiValidationError(f"nisa.{I}: on_false_value={on_false_value!r}: expected a number")
    a = pattern_values(I, pattern, offset, channel_multiplier, dst.shape[0], dst.free_size).astype(np.float32)
    keep = binary(cmp, a, np.float32(0.0)) != 0
    x = read_f32(on_true_tile, f"nisa.{I}: on_true_tile")
    write(I, dst, np.where(keep, x, np.float32(on_false_value)))
    record(I, "gpsimd", cost.gpsimd_cycles(dst.free_size))


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
    cmd = enum_arg(reduce_cmd, ReduceCmd, I, "reduce_cmd")
    dst = operand(dst, I, "dst")
    on_true_tile = operand(on_true_tile, I, "on_true_tile")
    match_pf(I, "dst", dst, "on_true_tile", on_true_tile)
    if on_true_tile.dtype.is_int:
        raise NkiValidationError(f"nisa.{I}: on_true_tile dtype {on_true_tile.dtype}: expected a float dtype")
    ops = []
    for f, op in (("comp_op0", comp_op0), ("comp_op1", comp_op1)):
        o = op_arg(op, I, f)
        if o.name not in _RANGE_CMP:
            raise NkiValidationError(f"nisa.{I}: {f}={o!r}: expected one of {', '.join('nl.' + c for c in _RANGE_CMP)}")
        ops.append(o)
    if op_arg(reduce_op, I, "reduce_op").name != "maximum":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: range_select reduces with nl.maximum")
    if float(on_false_value) != FP32_MIN:
        raise NkiValidationError(f"nisa.{I}: on_false_value={on_false_value!r}: must be FP32_MIN ({FP32_MIN!r})")
    P, F = pf(dst)
    b0 = scalar_or_column(bound0, I, "bound0", dst, bitvec=False)
    b1 = scalar_or_column(bound1, I, "bound1", dst, bitvec=False)
    j = (np.float32(range_start) + np.arange(F, dtype=np.float32))[None, :]
    keep = (binary(ops[0], j, b0) != 0) & (binary(ops[1], j, b1) != 0)
    out = np.where(keep, read_f32(on_true_tile, f"nisa.{I}: on_true_tile"), np.float32(FP32_MIN)).astype(np.float32)
    write(I, dst, out)
    _accumulate(prog, I, cmd, "maximum", out.max(axis=1))
    if reduce_res is not None:
        _reduce_res(I, reduce_res, prog.dve_acc[:P])
    record(I, "vector", cost.vector_cycles(F))


@instruction
def select_reduce(dst: NkiTensor, predicate: NkiTensor, on_true: NkiTensor, on_false: Any,
                  reduce_res: NkiTensor | None = None, reduce_cmd: reduce_cmd = reduce_cmd.idle,
                  reduce_op: Op = _ops.maximum, reverse_pred: bool = False,
                  name: str | None = None) -> None:  # fmt: skip
    """dst = where(predicate, on_true, on_false), optionally max-reducing each row (Vector)."""
    I = "select_reduce"
    prog = context.current(f"nisa.{I}")
    cmd = enum_arg(reduce_cmd, ReduceCmd, I, "reduce_cmd")
    dst = operand(dst, I, "dst")
    predicate = operand(predicate, I, "predicate")
    on_true = operand(on_true, I, "on_true")
    match_pf(I, "dst", dst, "predicate", predicate)
    match_pf(I, "dst", dst, "on_true", on_true)
    not_both_psum(I, "on_true", on_true, "predicate", predicate)
    if predicate.dtype not in ("int8", "uint8", "int16", "uint16"):
        raise NkiValidationError(f"nisa.{I}: predicate dtype {predicate.dtype}: expected int8, uint8, int16 or uint16")
    if on_true.dtype in ("tfloat32", "int32", "uint32"):
        raise NkiValidationError(f"nisa.{I}: on_true dtype {on_true.dtype} is not supported")
    if op_arg(reduce_op, I, "reduce_op").name != "maximum":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: select_reduce reduces with nl.maximum")
    pred = read_raw(predicate, f"nisa.{I}: predicate") != 0
    if reverse_pred:
        pred = ~pred
    off = scalar_or_column(on_false, I, "on_false", dst, bitvec=False)
    out = np.where(pred, read_f32(on_true, f"nisa.{I}: on_true"), off).astype(np.float32)
    write(I, dst, out)
    if cmd is not ReduceCmd.idle or reduce_res is not None:
        _accumulate(prog, I, cmd, "maximum", out.max(axis=1))
    if reduce_res is not None:
        _reduce_res(I, reduce_res, prog.dve_acc[: dst.shape[0]])
    record(I, "vector", cost.vector_cycles(dst.free_size, 2))


@instruction
def tensor_scalar_reduce(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reduce_op: Op,
                         reduce_res: NkiTensor | None = None, reverse0: bool = False,
                         reduce_cmd: reduce_cmd = reduce_cmd.reset_reduce, reduce_init: float | None = None,
                         reduce_res_negate: bool = False, name: str | None = None) -> None:  # fmt: skip
    """dst = data op0 operand0, reduced over the free dims with reduce_op into the Vector accumulators."""
    I = "tensor_scalar_reduce"
    prog = context.current(f"nisa.{I}")
    cmd = enum_arg(reduce_cmd, ReduceCmd, I, "reduce_cmd")
    op0 = alu_arg(op_arg(op0, I, "op0"), I, "op0")
    if op0.bitvec:
        raise NkiValidationError(f"nisa.{I}: op0={op0!r}: arithmetic operators only")
    if reverse0:
        raise NkiValidationError(f"nisa.{I}: reverse0=True is documented as not supported yet")
    red = op_arg(reduce_op, I, "reduce_op")
    if red.name not in _REDUCE_IDENTITY:
        raise NkiValidationError(f"nisa.{I}: reduce_op={red!r}: expected nl.add, nl.multiply, nl.maximum or nl.minimum")
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    match_pf(I, "dst", dst, "data", data)
    out = binary(op0, read_f32(data, f"nisa.{I}: data"), scalar_or_column(operand0, I, "operand0", data, bitvec=False))
    out = out.astype(np.float32)
    write(I, dst, out)
    f = {"add": np.add, "multiply": np.multiply, "maximum": np.maximum, "minimum": np.minimum}[red.name]
    _accumulate(prog, I, cmd, red.name, f.reduce(out, axis=1), reduce_init)
    if reduce_res is not None:
        vals = prog.dve_acc[: dst.shape[0]].copy()
        _reduce_res(I, reduce_res, -vals if reduce_res_negate else vals)
    record(I, "vector", cost.vector_cycles(data.free_size))


@instruction
def max8(dst: NkiTensor, src: NkiTensor, name: str | None = None) -> None:
    """dst (P, 8) = the 8 largest values of each partition of src, descending (Vector)."""
    I = "max8"
    dst = operand(dst, I, "dst")
    src = operand(src, I, "src")
    if dst.shape[0] != src.shape[0] or dst.free_size != 8:
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)}: expected ({src.shape[0]}, 8)")
    if not 8 <= src.free_size <= 16384:
        raise NkiValidationError(f"nisa.{I}: src has {src.free_size} elements per partition; expected 8 to 16384")
    x = read_f32(src, f"nisa.{I}: src")
    write(I, dst, -np.sort(-x, axis=1)[:, :8])
    record(I, "vector", cost.vector_cycles(src.free_size))


@instruction
def nc_find_index8(dst: NkiTensor, data: NkiTensor, vals: NkiTensor, name: str | None = None) -> None:
    """dst (P, 8) = index of the first occurrence in data of each of the 8 vals (duplicates: successive
    occurrences; missing: all ones) (Vector)."""
    I = "nc_find_index8"
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    vals = operand(vals, I, "vals")
    P = data.shape[0]
    if dst.shape[0] != P or dst.free_size != 8 or vals.shape[0] != P or vals.free_size != 8:
        raise NkiValidationError(f"nisa.{I}: dst {list(dst.shape)} and vals {list(vals.shape)}: expected ({P}, 8)")
    if dst.dtype not in ("uint32", "uint16"):
        raise NkiValidationError(f"nisa.{I}: dst dtype {dst.dtype}: expected uint32 or uint16")
    if not 8 <= data.free_size <= 16384:
        raise NkiValidationError(f"nisa.{I}: data has {data.free_size} elements per partition; expected 8 to 16384")
    x = read_f32(data, f"nisa.{I}: data")
    v = read_f32(vals, f"nisa.{I}: vals")
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
    write(I, dst, out)
    record(I, "vector", cost.vector_cycles(data.free_size))
