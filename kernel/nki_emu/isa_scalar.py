"""Scalar-engine (ACT) instructions: `activation` with its accumulator registers (nki-api.md 4.3)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context, cost
from tkg.kernel.nki_emu.enums import ReduceCmd, reduce_cmd
from tkg.kernel.nki_emu.errors import NkiValidationError
from tkg.kernel.nki_emu.operands import (
    enum_arg,
    instruction,
    match_pf,
    op_arg,
    operand,
    read_f32,
    record,
    scalar_or_column,
    write,
)
from tkg.kernel.nki_emu.ops import Op
from tkg.kernel.nki_emu.tensor import NkiTensor


# ---- Scalar engine ---------------------------------------------------------------------------
@instruction
def activation(dst: NkiTensor, op: Op, data: NkiTensor, bias: Any = None, scale: Any = 1.0, reduce_op: Op | None = None,
               reduce_res: NkiTensor | None = None, reduce_cmd: reduce_cmd = reduce_cmd.idle,
               name: str | None = None) -> None:  # fmt: skip
    """dst = op(data * scale + bias) on the Scalar engine, with the optional add-reduction registers."""
    I = "activation"
    prog = context.current(f"nisa.{I}")
    op = op_arg(op, I, "op")
    if op.act is None:
        raise NkiValidationError(f"nisa.{I}: op={op!r} is not an activation function (e.g. nl.exp, nl.copy, nl.sin)")
    dst = operand(dst, I, "dst")
    data = operand(data, I, "data")
    match_pf(I, "dst", dst, "data", data)
    cmd = enum_arg(reduce_cmd, ReduceCmd, I, "reduce_cmd")
    P = data.shape[0]
    x = read_f32(data, f"nisa.{I}: data")
    x = x * scalar_or_column(scale, I, "scale", data, bitvec=False)
    if bias is not None:
        if isinstance(bias, NkiTensor):
            operand(bias, I, "bias")
            if bias.shape[0] != P or bias.free_size != 1:
                raise NkiValidationError(f"nisa.{I}: bias {list(bias.shape)}: expected a ({P}, 1) tile (free size 1)")
            if bias.dtype == "tfloat32":
                raise NkiValidationError(f"nisa.{I}: bias dtype tfloat32 is not supported")
            x = x + read_f32(bias, f"nisa.{I}: bias")
        else:
            if prog.target.gen < 3:
                raise NkiValidationError(f"nisa.{I}: a scalar bias needs trn2 (gen3); on trn1 pass a ({P}, 1) tile")
            x = x + scalar_or_column(bias, I, "bias", data, bitvec=False)
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
    if reduce_op is not None and op_arg(reduce_op, I, "reduce_op").name != "add":
        raise NkiValidationError(f"nisa.{I}: reduce_op={reduce_op!r}: activation reduces with nl.add only")
    if cmd is ReduceCmd.load_reduce:
        raise NkiValidationError(f"nisa.{I}: reduce_cmd=load_reduce is not an activation reduce command")
    if (cmd is not ReduceCmd.idle or reduce_res is not None) and reduce_op is None:
        raise NkiValidationError(f"nisa.{I}: reduce_cmd / reduce_res need reduce_op=nl.add")
    acc = prog.act_acc
    if cmd.name == "reset":
        acc[:P] = 0.0
    elif cmd.name == "reduce":
        acc[:P] += out.sum(axis=1, dtype=np.float32)
    elif cmd.name == "reset_reduce":
        acc[:P] = out.sum(axis=1, dtype=np.float32)
    write(I, dst, out)
    record(I, "scalar", cost.scalar_cycles(data.free_size))
    if reduce_res is not None:
        reduce_res = operand(reduce_res, I, "reduce_res")
        if reduce_res.shape[0] != P or reduce_res.free_size != 1:
            raise NkiValidationError(f"nisa.{I}: reduce_res {list(reduce_res.shape)}: expected ({P}, 1)")
        write(I, reduce_res, acc[:P].reshape(P, 1).copy())
        record(I, "scalar", cost.scalar_cycles(1))


@instruction
def activation_reduce(dst: NkiTensor, op: Op, data: NkiTensor, reduce_op: Op, reduce_res: NkiTensor, bias: Any = None,
                      scale: Any = 1.0, name: str | None = None) -> None:  # fmt: skip
    """`activation(..., reduce_cmd=reset_reduce, reduce_res=...)` (kept for backward compatibility)."""
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=reduce_cmd.reset_reduce)  # fmt: skip
