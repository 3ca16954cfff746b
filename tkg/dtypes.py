"""The dtypes of the wire, the KV cache and the kernel: one row per dtype holding every fact about it.

Config files, the command line and the transformers spec name a dtype (`bfloat16`); the wire carries
its `tkg.v1.DType` code; numpy holds it (ml_dtypes for bf16 and fp8); torch holds it too, looked up
only when asked (the client and the codec import this module and must never import torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ml_dtypes import bfloat16, float8_e4m3

from tkg.v1 import decode_attention_pb2 as pb

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # config files, the command line, metrics, the transformers spec
    short: str  # the benchmarks' and tests' case names (`bf16`)
    code: int  # the proto's `DType` value on the wire
    numpy: np.dtype  # ml_dtypes for bf16 and fp8
    io: bool  # q/k/v/out may travel in it; False: KV storage only
    torch_name: str  # the `torch` attribute holding it on the host (see FLOAT8_E4M3)
    exponent: int  # the exponent's bits, all ones: NaN or infinity when the bits below the sign reach it

    @property
    def uint(self) -> np.dtype:
        """The unsigned integer of the same width, to read the bits (little-endian, as on the wire)."""
        return np.dtype(f"<u{self.itemsize}")

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def torch(self) -> torch.dtype:
        import torch  # only here: the client and the codec never pay for it

        return getattr(torch, self.torch_name)


# Trainium's fp8 e4m3 (NKI `float8_e4m3`): IEEE-style, bias 7, with inf/NaN, largest finite 240.
# 1 byte of K/V storage: the service stores value / scale, saturated (`to_fp8`). torch's
# float8_e4m3fn is another encoding (no inf, largest 448), so torch carries the bits as uint8.
# fmt: off
#                   name           short   wire code                numpy                  io     torch       exponent
FLOAT32 =     DType("float32",     "fp32", pb.DTYPE_FLOAT32,     np.dtype("<f4"),       True,  "float32",  0x7F800000)
FLOAT16 =     DType("float16",     "fp16", pb.DTYPE_FLOAT16,     np.dtype("<f2"),       True,  "float16",  0x7C00)
BFLOAT16 =    DType("bfloat16",    "bf16", pb.DTYPE_BFLOAT16,    np.dtype(bfloat16),    True,  "bfloat16", 0x7F80)
FLOAT8_E4M3 = DType("float8_e4m3", "fp8",  pb.DTYPE_FLOAT8_E4M3, np.dtype(float8_e4m3), False, "uint8",    0x78)
# fmt: on

ALL: tuple[DType, ...] = (FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3)
IO: tuple[DType, ...] = tuple(d for d in ALL if d.io)
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
BY_SHORT: dict[str, DType] = {d.short: d for d in ALL}
BY_CODE: dict[int, DType] = {d.code: d for d in ALL}
BY_NUMPY: dict[np.dtype, DType] = {d.numpy: d for d in ALL}
# Tuples for the kernel's hot checks (`dtype in IO_NUMPY`): what q/out may be, what K/V may be.
IO_NUMPY: tuple[np.dtype, ...] = tuple(d.numpy for d in IO)
KV_NUMPY: tuple[np.dtype, ...] = tuple(d.numpy for d in ALL)

# Short names for the two numpy dtypes numpy does not have, used all over the kernel and the tests.
BF16 = BFLOAT16.numpy
FP8 = FLOAT8_E4M3.numpy
FP8_MAX = 240.0


def names(dtypes: tuple[DType, ...] = ALL) -> str:
    """`float32, float16, bfloat16, float8_e4m3`: for messages saying what is expected."""
    return ", ".join(d.name for d in dtypes)


def kv_dtype(name: str | np.dtype) -> np.dtype:
    """The numpy dtype of a KV dtype name (`float32`, `float16`, `bfloat16`, `float8_e4m3`) or dtype."""
    row = BY_NAME.get(name if isinstance(name, str) else np.dtype(name).name)
    if row is None:
        raise ValueError(f"kv_dtype: expected one of {sorted(BY_NAME)}, got {name!r}")
    return row.numpy


def to_fp8(x: np.ndarray) -> np.ndarray:
    """Round to float8_e4m3, saturating finite values beyond +-240 to +-240 (NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)
