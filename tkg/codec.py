"""numpy <-> `tkg.v1.Tensor`: the one wire codec, shared by server and client.

Tensors travel as row-major little-endian raw bytes. Decoding is zero-copy (`np.frombuffer`
over the message's bytes, read-only); encoding copies once (`tobytes`), which protobuf needs,
except for an array made by `output_array` (its memory already is a bytes object).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterable

import numpy as np

from tkg import dtypes
from tkg.v1 import decode_attention_pb2 as pb

# Views of the registry (`tkg.dtypes`) for the per-request lookups. fp8 travels only as KV storage
# (exported sequences), never as q/k/v/out: the service checks that, the codec carries any dtype.
_TO_NUMPY: dict[int, np.dtype] = {d.code: d.numpy for d in dtypes.ALL}
_FROM_NUMPY: dict[np.dtype, int] = {d.numpy: d.code for d in dtypes.ALL}


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
        raise TensorError(f"unsupported numpy dtype {dt}; expected one of {dtypes.names()}") from None


def wire_array(array: np.ndarray) -> tuple[int, np.ndarray]:
    """(the Tensor dtype code, `array` in little-endian byte order): what a Tensor of `array` holds
    (`encode`, and `tkg.protowire`'s one-copy messages)."""
    a = np.asarray(array)
    code = _FROM_NUMPY.get(a.dtype)  # native-order dtypes hit here (the per-request path)
    if code is None:
        code = dtype_from_numpy(a.dtype)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
    return code, a


def encode(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """`array` as a Tensor (one copy into the message's bytes; none before it for an `output_array`)."""
    code, a = wire_array(array)
    t = pb.Tensor() if out is None else out
    t.dtype = code
    if t.shape:
        del t.shape[:]
    t.shape.extend(a.shape)
    data = _whole_bytes(a) if a.base is not None else None
    t.data = a.tobytes() if data is None else data
    return t


# Below this size an answer's `tobytes` is quicker than making an `output_array` (measured on a
# step after the kernel: 64 KiB, batch 8, ~2 us quicker; 512 KiB, batch 64, ~45 us slower).
OUTPUT_MIN_BYTES = 128 << 10

# Our own prototype of PyBytes_FromStringAndSize (not `ctypes.pythonapi`'s shared function object,
# whose restype/argtypes other code may set); None off CPython, where answers take `tobytes`.
try:
    _new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
        ("PyBytes_FromStringAndSize", ctypes.pythonapi)
    )
except (AttributeError, OSError):
    _new_bytes = None


class _BytesMemory:
    """The memory of a new, not yet shared bytes object as numpy's array interface (the base of an
    `output_array`), with the bytes object itself (`data`), which `encode` hands on."""

    __slots__ = ("__array_interface__", "address", "data")

    def __init__(self, n: int) -> None:
        # PyBytes_FromStringAndSize(NULL, n): a new bytes object of n bytes left to be filled, the
        # C API's way to build one in place (n > 1: never a shared singleton). Nothing but this
        # holder sees it until `encode` hands it on, after its array was written.
        self.data = _new_bytes(None, n)
        self.address = ctypes.cast(ctypes.c_char_p(self.data), ctypes.c_void_p).value
        self.__array_interface__ = {"data": (self.address, False), "shape": (n,), "typestr": "|u1", "version": 3}


def output_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised, writable, C-contiguous array for an answer (the kernel's `out`) that
    `encode` of the whole of it turns into a Tensor without `tobytes`: its memory is a new bytes
    object, handed to the message as it is (~60 us less on a batch-64 answer of 512 KiB, a
    memory-bound copy). Write it only before encoding it: once encoded, its bytes are a message's.
    Small arrays are plain `np.empty` (a copy costs less than the holder there)."""
    dt = np.dtype(dtype)
    n = dt.itemsize * math.prod(shape)
    if n < OUTPUT_MIN_BYTES or _new_bytes is None:
        return np.empty(shape, dt)
    return np.asarray(_BytesMemory(n)).view(dt).reshape(shape)


def _whole_bytes(a: np.ndarray) -> bytes | None:
    """The bytes object `a` is all of (an `output_array`, or a view of all of it in order), else None."""
    base = a.base
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, _BytesMemory) or a.nbytes != len(base.data) or not a.flags.c_contiguous:
        return None
    return base.data if a.__array_interface__["data"][0] == base.address else None


def decode(
    t: pb.Tensor,
    field: str = "tensor",
    shape: tuple[int, ...] | None = None,
    data: bytes | memoryview | None = None,
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


def int64s(values: Iterable[int], n: int) -> np.ndarray:
    """int64 `[n]` from a message's repeated int field (one C loop, no list in between)."""
    return np.fromiter(values, np.int64, n)


# Per float dtype: the unsigned view, the bits below the sign, and the exponent bits. The
# exponent is the top of the bits below the sign, so a value is NaN or infinite exactly when those
# bits, read as an unsigned integer, reach the all-ones exponent.
_EXPONENT = {d.numpy: (d.uint, (1 << (8 * d.itemsize - 1)) - 1, d.exponent) for d in dtypes.ALL}


def _harmless_top_bytes(mask: int) -> bytes:
    """Values of a little-endian float's top byte (the sign and the exponent's high bits, `mask`)
    that leave an exponent bit clear: a value whose top byte is one of them is finite."""
    return bytes(b for b in range(256) if b & mask != mask)




# The largest magnitude q, k and v may hold on the wire, per dtype, as a power of two (`|x| < 2**n`).
# Finite values beyond it overflow inside attention: q = k = 3e38 (float32) make the score q.k
# infinite and the softmax NaN; float16 values past 65504 / sqrt(2) overflow float16 when fused
# RoPE rotates them (a rotated pair keeps its norm, so one element may grow by sqrt(2)).
# - float32, bfloat16 (8 exponent bits): 2**49 (~5.6e14). A score is then below
#   2 * 2**98 * head_dim (<= 2**7, config.MAX_HEAD_DIM) * softmax_scale = 2**106 * softmax_scale,
#   far inside float32's 2**128 for any scale below 2**21, and a softmax-weighted sum of values
#   below 2**49 * max_context.
# - float16: 2**15 (32768): rotated, below 46341 < 65504; scores are computed in float32.
# - float8_e4m3 (KV storage only, exported and imported): finite is enough (largest 240).
MAGNITUDE_LOG2: dict[np.dtype, int] = {dtypes.FLOAT32.numpy: 49, dtypes.BFLOAT16.numpy: 49, dtypes.FLOAT16.numpy: 15}


def magnitude_bound(dtype: np.dtype) -> str:
    """What `bounded_bytes` asks of `dtype`'s values, for messages: `|x| < 2**49 (5.63e+14)`."""
    n = MAGNITUDE_LOG2.get(np.dtype(dtype))
    return "finite values" if n is None else f"|x| < 2**{n} ({2.0**n:.3g})"


def _bounded_top_bytes(d: dtypes.DType) -> bytes:
    """Top bytes of a little-endian `d` value that guarantee it finite and below its bound
    (MAGNITUDE_LOG2). Exact, not a first pass: float32's and bfloat16's top byte holds the sign
    and the exponent's high 7 bits, and the bound's biased exponent (127 + 49 = 176) is even, so
    `|x| < 2**49` is exactly `(top byte & 0x7F) < 88`; float16's top byte holds its whole 5-bit
    exponent (bias 15: `|x| < 2**15` is an exponent below 30), and fp8's byte is the value."""
    n = MAGNITUDE_LOG2.get(d.numpy)
    if n is None:
        return _harmless_top_bytes(d.exponent >> (8 * (d.itemsize - 1)))
    if d.exponent >> (8 * (d.itemsize - 1)) == 0x7F:  # 8 exponent bits, bias 127
        assert (127 + n) % 2 == 0, "the top byte holds the exponent without its lowest bit"
        return bytes(b for b in range(256) if b & 0x7F < (127 + n) >> 1)
    assert d.exponent == 0x7C00, "float16: 5 exponent bits, bias 15, all in the top byte"
    return bytes(b for b in range(256) if (b >> 2) & 0x1F < 15 + n)


_BOUNDED_TOP = {d.numpy: (d.itemsize, _bounded_top_bytes(d)) for d in dtypes.ALL}


def _mask_limit(allowed: bytes) -> tuple[int, int] | None:
    """(mask, limit) such that `b & mask < limit` holds exactly for the bytes in `allowed`, or None:
    the native check's form of a set of top bytes (derived from the set, so the two cannot differ)."""
    ok = set(allowed)
    for mask in (0x7F, 0x7C, 0x78):
        limit = min((b & mask for b in range(256) if b not in ok), default=256)
        if all((b & mask < limit) == (b in ok) for b in range(256)):
            return mask, limit
    return None


_BOUNDED_NATIVE = {dt: (size, ml) for dt, (size, top) in _BOUNDED_TOP.items() if (ml := _mask_limit(top))}
# Below this many bytes the two bytes calls are as quick as the native call's lookup.
_NATIVE_MIN_BYTES = 1024


@functools.cache
def _native_top_bytes_below() -> Callable[[bytes, int, int, int], bool] | None:
    """The native extension's check (`tkg.kernel.backends.cpu`), or None where it is not built.
    Looked up at the first large tensor, so importing the codec does not import the kernel."""
    try:
        from tkg.kernel.backends.host_ops import host_ops_available, native_top_bytes_below
    except ImportError:  # a client-only install without the kernel package
        return None
    return native_top_bytes_below if host_ops_available() else None


def bounded_bytes(data: bytes | memoryview, dtype: np.dtype) -> bool:
    """Every little-endian `dtype` value in `data` finite and within its bound (MAGNITUDE_LOG2):
    what q, k and v must satisfy on the wire. Exact (see `_bounded_top_bytes`). Large tensors: one
    native pass over the top bytes (~40x quicker than the bytes calls: ~6 vs ~220 us for a batch-64
    bf16 q); small ones, or without the extension, `bounded_bytes_python`."""
    native = _BOUNDED_NATIVE.get(dtype) if len(data) >= _NATIVE_MIN_BYTES else None
    if native is not None:
        check = _native_top_bytes_below()
        if check is not None:
            size, (mask, limit) = native
            return check(data, size, mask, limit)
    return bounded_bytes_python(data, dtype)


def bounded_bytes_python(data: bytes | memoryview, dtype: np.dtype) -> bool:
    """`bounded_bytes` without the extension: one C loop over the top bytes and one deletion, no
    numpy, no second pass."""
    size, harmless = _BOUNDED_TOP[dtype]
    top = data[size - 1 :: size]
    return not (top if type(top) is bytes else bytes(top)).translate(None, harmless)


def all_finite(*arrays: np.ndarray) -> bool:
    """No NaN or infinity in any of `arrays` (one dtype: float32/float16/bfloat16/float8_e4m3),
    read as integers: `max(bits & ~sign) < exponent` over all of them in one pass (two numpy
    calls), ~8x faster than `np.isfinite` on bfloat16, whose ufuncs go through ml_dtypes'
    generic loops. On a request's wire bytes `bounded_bytes` decides (finite and within bounds);
    this names which of the two a refused tensor failed."""
    uint, magnitude, exponent = _EXPONENT[arrays[0].dtype]
    views = [a.view(uint).reshape(-1) for a in arrays]
    bits = views[0] if len(views) == 1 else np.concatenate(views)
    if not bits.size:
        return True
    return int(np.bitwise_and(bits, magnitude).max()) < exponent
