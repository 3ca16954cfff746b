"""`nki.isa` (`nisa`): the instructions, in NumPy, with the documented signatures and checks.

Every instruction follows research/nki-api.md section 4 (the NKI 0.3-0.6 stubs): destination first
(except `sendrecv` / `core_barrier`), no `dtype=` / `mask=`, enum members for enum parameters, fp32
internal math with a cast to `dst.dtype` on write. Each call validates buffers, shapes, dtypes and
the target's limits, raising `NkiValidationError` naming the instruction and the argument, then
executes on the tensors' storage and is counted on its engine. The implementations live in one
module per engine (isa_tensor, isa_scalar, isa_vector, isa_select, isa_dma, isa_collectives) over
the shared operand machinery (operands.py); this module is what `import nki.isa` returns.
"""

from __future__ import annotations

from typing import Any

from tkg.kernel.nki_emu.enums import (
    NkiInstruction,
    dge_mode,
    dma_engine,
    engine,
    get_nc_sub_version,
    get_nc_version,
    gpsimd_engine,
    matmul_perf_mode,
    nc_version,
    oob_mode,
    reduce_cmd,
    scalar_engine,
    tensor_engine,
    unknown_engine,
    vector_engine,
)
from tkg.kernel.nki_emu.errors import NkiValidationError, RemovedApiError
from tkg.kernel.nki_emu.isa_collectives import core_barrier, sendrecv
from tkg.kernel.nki_emu.isa_dma import dma_copy, dma_transpose
from tkg.kernel.nki_emu.isa_scalar import activation, activation_reduce
from tkg.kernel.nki_emu.isa_select import (
    affine_select,
    max8,
    nc_find_index8,
    range_select,
    select_reduce,
    tensor_scalar_reduce,
)
from tkg.kernel.nki_emu.isa_tensor import nc_matmul, nc_transpose
from tkg.kernel.nki_emu.isa_vector import (
    iota,
    memset,
    nc_stream_shuffle,
    reciprocal,
    scalar_tensor_tensor,
    tensor_copy,
    tensor_copy_predicated,
    tensor_reduce,
    tensor_scalar,
    tensor_tensor,
)

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
    "gpsimd_engine",
    "iota",
    "matmul_perf_mode",
    "max8",
    "memset",
    "nc_find_index8",
    "nc_matmul",
    "nc_stream_shuffle",
    "nc_transpose",
    "nc_version",
    "oob_mode",
    "range_select",
    "reciprocal",
    "reduce_cmd",
    "scalar_engine",
    "scalar_tensor_tensor",
    "select_reduce",
    "sendrecv",
    "tensor_copy",
    "tensor_copy_predicated",
    "tensor_engine",
    "tensor_reduce",
    "tensor_scalar",
    "tensor_scalar_reduce",
    "tensor_tensor",
    "unknown_engine",
    "vector_engine",
]  # fmt: skip
