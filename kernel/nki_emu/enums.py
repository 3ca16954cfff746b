"""`nki.isa` enums, the instruction handle and the target query (nki-api.md 4.0).

Enum parameters must be enum members (ints are rejected since NKI 0.3); `nc_version` is an IntEnum
because nki-library compares it with both members and plain ints.
"""

from __future__ import annotations

import enum
from typing import Any

from tkg.kernel.nki_emu import context
from tkg.kernel.nki_emu.limits import target_from_env


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
Engine = engine
ReduceCmd = reduce_cmd
DmaEngine = dma_engine


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
