"""NKI dtypes (`nl.float32`, `nl.bfloat16`, ...) and their NumPy storage types.

The stubs type an NKI dtype as `str` (nki-api.md 3.1), and nki-library compares dtypes with `==`
and via `str(dtype)`, so a `DType` here is a `str` subclass ("float32", "bfloat16", ...) that also
carries its NumPy storage dtype (ml_dtypes for bf16 / fp8, as the official simulator's precise
mode). A kernel input's `.dtype` is the matching `DType`, so `q.dtype == nl.bfloat16` holds.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from tkg.kernel.nki_emu.errors import NkiValidationError


class DType(str):
    """An NKI dtype: compares equal to its name; `.np` is the NumPy storage dtype."""

    np: np.dtype
    is_float: bool
    is_int: bool
    packed: int  # values per element of a packed MX dtype (the `_x4` ones), else 1

    def __new__(cls, name: str, np_dtype: object, packed: int = 1) -> DType:
        obj = super().__new__(cls, name)
        obj.np = np.dtype(np_dtype)
        obj.packed = packed
        obj.is_int = obj.np.kind in "iub" and packed == 1
        obj.is_float = not obj.is_int
        return obj

    @property
    def itemsize(self) -> int:
        return int(self.np.itemsize)

    def __repr__(self) -> str:
        return f"nl.{self!s}"

    __hash__ = str.__hash__


# `nl.bool`: one byte per element, 0 or 1 (str "bool", as nki-library's dtype lookup expects).
bool_ = DType("bool", np.uint8)
int8 = DType("int8", np.int8)
uint8 = DType("uint8", np.uint8)
int16 = DType("int16", np.int16)
uint16 = DType("uint16", np.uint16)
int32 = DType("int32", np.int32)
uint32 = DType("uint32", np.uint32)
float16 = DType("float16", np.float16)
bfloat16 = DType("bfloat16", ml_dtypes.bfloat16)
# tfloat32 is a matmul input format stored in 4 bytes (UNVERIFIED storage; nki-api.md 3.1).
tfloat32 = DType("tfloat32", np.float32)
float32 = DType("float32", np.float32)
float8_e4m3 = DType("float8_e4m3", ml_dtypes.float8_e4m3)
float8_e4m3fn = DType("float8_e4m3fn", ml_dtypes.float8_e4m3fn)
float8_e5m2 = DType("float8_e5m2", ml_dtypes.float8_e5m2)
# MX (microscaling) types of trn3's matmul (nki-api.md 3.1 table): the shared 8-bit exponent scale and
# the packed `_x4` element types, 4 values per element (4 x fp8 in 4 bytes, 4 x fp4 in 2 bytes).
# The emulator stores their raw bits; only data movement (DMA, copies) is defined on them here.
float8_e8m0fnu = DType("float8_e8m0fnu", ml_dtypes.float8_e8m0fnu)
float8_e5m2_x4 = DType("float8_e5m2_x4", np.uint32, packed=4)
float8_e4m3fn_x4 = DType("float8_e4m3fn_x4", np.uint32, packed=4)
float4_e2m1fn_x4 = DType("float4_e2m1fn_x4", np.uint16, packed=4)

ALL = (bool_, int8, uint8, int16, uint16, int32, uint32, float16, bfloat16, tfloat32, float32,
       float8_e4m3, float8_e4m3fn, float8_e5m2, float8_e8m0fnu, float8_e5m2_x4, float8_e4m3fn_x4,
       float4_e2m1fn_x4)  # fmt: skip

# NumPy array dtype -> NKI dtype for kernel inputs (float32 wins over tfloat32; bool as uint8 storage).
_FROM_NP = {
    np.dtype(np.float32): float32,
    np.dtype(np.float16): float16,
    np.dtype(ml_dtypes.bfloat16): bfloat16,
    np.dtype(np.int8): int8,
    np.dtype(np.uint8): uint8,
    np.dtype(np.int16): int16,
    np.dtype(np.uint16): uint16,
    np.dtype(np.int32): int32,
    np.dtype(np.uint32): uint32,
    np.dtype(ml_dtypes.float8_e4m3): float8_e4m3,
    np.dtype(ml_dtypes.float8_e4m3fn): float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): float8_e5m2,
}


def from_numpy(dt: np.dtype, what: str) -> DType:
    """The NKI dtype of a NumPy array argument; float64 / int64 have none (32-bit NKI values)."""
    try:
        return _FROM_NP[np.dtype(dt)]
    except KeyError:
        names = ", ".join(sorted({str(d) for d in _FROM_NP}))
        raise NkiValidationError(
            f"{what}: NumPy dtype {np.dtype(dt)} has no NKI equivalent; expected one of {names}"
        ) from None


def check(dtype: object, what: str) -> DType:
    """`dtype` as an NKI DType; NumPy dtypes and plain strings are rejected (kernels use `nl.*`)."""
    if isinstance(dtype, DType):
        return dtype
    raise NkiValidationError(
        f"{what}: {dtype!r} is not an NKI dtype; expected an nl.* dtype such as nl.float32 or nl.bfloat16"
        " (NumPy dtypes are not part of the NKI language)"
    )


def info_range(dt: DType) -> tuple[int, int]:
    """(min, max) of an integer dtype."""
    ii = np.iinfo(dt.np)
    return int(ii.min), int(ii.max)


def cast(values: np.ndarray, dt: DType) -> np.ndarray:
    """Convert computed values to `dt` the way the engines write their output.

    Floats: NumPy/ml_dtypes conversion (round to nearest even). Float -> integer: round to nearest
    even with saturation to the destination range, NaN -> 0 (nki-api.md 1.4). Integer -> integer:
    saturation.
    """
    if dt.packed != 1:
        raise NkiValidationError(f"{dt}: packed MX values are moved as raw bits here; no arithmetic converts to them")
    if dt.is_int:
        lo, hi = info_range(dt)
        if values.dtype.kind in "iub":
            return np.clip(values.astype(np.int64), lo, hi).astype(dt.np)
        v = np.asarray(values, dtype=np.float64)
        v = np.where(np.isnan(v), 0.0, np.rint(v))
        return np.clip(v, lo, hi).astype(dt.np)
    return np.asarray(values).astype(dt.np)
