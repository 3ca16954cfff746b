"""numpy <-> `tkg.v1.Tensor`: the one wire codec, shared by server and client.

Tensors travel as row-major little-endian raw bytes. Decoding is zero-copy (`np.frombuffer`
over the message's bytes, read-only); encoding copies once (`tobytes`), which protobuf needs.
"""

from __future__ import annotations

import math

import numpy as np

from tkg.kernel_dtypes import BF16, FP8
from tkg.v1 import decode_attention_pb2 as pb

_TO_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_BFLOAT16: BF16,
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT8_E4M3: FP8,  # KV storage only (exported sequences); never q/k/v/out
}
_FROM_NUMPY: dict[np.dtype, int] = {v: k for k, v in _TO_NUMPY.items()}
DTYPE_NAMES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16, "float16": pb.DTYPE_FLOAT16,
    "float8_e4m3": pb.DTYPE_FLOAT8_E4M3,
}  # fmt: skip


def io_dtype_code(info: pb.ServerInfo) -> int:
    """The dtype q/k/v/out travel in: ServerInfo.io_dtype (servers before it: kv_dtype)."""
    return info.io_dtype or info.kv_dtype


class TensorError(ValueError):
    """A Tensor message that cannot be decoded; the message names the field."""


def dtype_to_numpy(dtype: int, field: str = "dtype") -> np.dtype:
    try:
        return _TO_NUMPY[dtype]
    except KeyError:
        names = ", ".join(pb.DType.Name(k) for k in _TO_NUMPY)
        raise TensorError(f"{field}: unsupported dtype {dtype}; expected one of {names}") from None


def dtype_from_numpy(dtype: np.dtype) -> int:
    dt = np.dtype(dtype)
    try:
        return _FROM_NUMPY[dt.newbyteorder("<") if dt.byteorder == ">" else dt]
    except KeyError:
        raise TensorError(f"unsupported numpy dtype {dt}; expected float32, float16 or bfloat16") from None


def encode(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """`array` as a Tensor (one copy into the message's bytes)."""
    a = np.asarray(array)
    code = _FROM_NUMPY.get(a.dtype)  # native-order dtypes hit here (the per-request path)
    if code is None:
        code = dtype_from_numpy(a.dtype)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
    t = pb.Tensor() if out is None else out
    t.dtype = code
    if t.shape:
        del t.shape[:]
    t.shape.extend(a.shape)
    t.data = a.tobytes()
    return t


def decode(
    t: pb.Tensor, field: str = "tensor", shape: tuple[int, ...] | None = None, data: bytes | None = None
) -> np.ndarray:
    """A read-only numpy view of `t`'s bytes; TensorError naming `field` when malformed.
    `shape`, `data`: `tuple(t.shape)` and `t.data` when the caller has read them already.

    On every request's path (q, k, v, out): plain Python on the shape (`math.prod`, one read of
    `t.data`, which copies out of the message), no numpy reductions on tiny arrays."""
    dt = _TO_NUMPY.get(t.dtype)
    if dt is None:
        dt = dtype_to_numpy(t.dtype, f"{field}.dtype")
    if shape is None:
        shape = tuple(t.shape)
    if shape and min(shape) < 0:
        raise TensorError(f"{field}.shape: {list(shape)} has a negative dimension")
    if data is None:
        data = t.data
    expected = dt.itemsize * math.prod(shape)  # Python ints: a huge shape cannot wrap around
    if len(data) != expected:
        raise TensorError(
            f"{field}.data: {len(data)} bytes, expected {expected} "
            f"({np.dtype(dt).name} x shape {list(shape)})"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)
