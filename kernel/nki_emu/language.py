"""`nki.language` (`nl`): dtypes, buffers, tile sizes, allocation, SPMD queries, operators.

Follows research/nki-api.md section 3. Allocation (`nl.ndarray` and friends) goes through the
current program (context.py), which places `address=` allocations, checks capacity and overlap,
and pairs `shared_hbm` outputs across the programs of an LNC2 launch. The `nl.*` element-wise
wrappers and `nl.load` / `nl.store` / `nl.copy` / `nl.matmul` / `nl.transpose` are provided for
completeness (our kernel uses `nki.isa` directly); they allocate their result in SBUF (PSUM for
`matmul` / `transpose`) and are counted like the instruction they stand for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context, cost, isa
from tkg.kernel.nki_emu.dtypes import (  # noqa: F401 - re-exported as nl.*
    DType,
    bfloat16,
    bool_,
    cast,
    check,
    float4_e2m1fn_x4,
    float8_e4m3,
    float8_e4m3fn,
    float8_e4m3fn_x4,
    float8_e5m2,
    float8_e5m2_x4,
    float8_e8m0fnu,
    float16,
    float32,
    int8,
    int16,
    int32,
    tfloat32,
    uint8,
    uint16,
    uint32,
)
from tkg.kernel.nki_emu.errors import NkiValidationError, RemovedApiError
from tkg.kernel.nki_emu.isa_vector import norm_axis
from tkg.kernel.nki_emu.limits import Target, target_from_env
from tkg.kernel.nki_emu.ops import *  # noqa: F403 - nl.add, nl.exp, ... (operator constants)
from tkg.kernel.nki_emu.ops import ELEMENTWISE, OPS, Op
from tkg.kernel.nki_emu.tensor import (
    PRIVATE_HBM,
    PSUM,
    SBUF,
    SHARED_HBM,
    DynSlice,
    MemoryRegion,
    NkiTensor,
)

# `nl.dtype`: the type of every nl.* dtype (annotations). `nl.bool` is served by __getattr__ below so
# this module's own code keeps the builtin `bool`.
dtype = DType

sbuf = SBUF
psum = PSUM
private_hbm = PRIVATE_HBM
hbm = PRIVATE_HBM  # alias (nki-api.md 3.2)
shared_hbm = SHARED_HBM


def is_hbm(buffer: MemoryRegion) -> bool:
    return buffer.is_hbm


def is_on_chip(buffer: MemoryRegion) -> bool:
    return buffer.on_chip


def is_psum(buffer: MemoryRegion) -> bool:
    return buffer is PSUM


def is_sbuf(buffer: MemoryRegion) -> bool:
    return buffer is SBUF


def _target() -> Target:
    prog = context.current_or_none()
    return prog.target if prog is not None else target_from_env()


class _TileSize:
    """`nl.tile_size`: hardware constants of the current target (limits.py has the sources)."""

    @property
    def pmax(self) -> int:
        return _target().pmax

    @property
    def psum_fmax(self) -> int:
        return _target().psum_bank_bytes // 4

    psum_bank_fmax = psum_fmax

    @property
    def psum_bank_fmax_bytes(self) -> int:
        return _target().psum_bank_bytes

    @property
    def psum_num_banks(self) -> int:
        return _target().psum_banks

    @property
    def gemm_stationary_fmax(self) -> int:
        return _target().gemm_stationary_fmax

    @property
    def gemm_moving_fmax(self) -> int:
        return _target().gemm_moving_fmax

    @property
    def sbuf_size_bytes(self) -> int:
        t = _target()
        return t.pmax * t.sbuf_partition_bytes

    @property
    def sbuf_fmax_bytes(self) -> int:
        return _target().sbuf_usable_bytes

    @property
    def sbuf_fmax(self) -> int:
        return _target().sbuf_usable_bytes // 4

    @property
    def total_available_sbuf_size(self) -> int:
        """Usable SBUF bytes per partition (despite the name; nki-api.md 3.3)."""
        return _target().sbuf_usable_bytes

    @property
    def bn_stats_fmax(self) -> int:
        return 512

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"nl.tile_size.{name}: not provided by the emulator (value UNVERIFIED in the docs)")


tile_size = _TileSize()


# ---- allocation ------------------------------------------------------------------------------
def _shape(shape: Any, what: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise NkiValidationError(f"{what}: shape={shape!r}: expected a non-empty tuple of ints")
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise NkiValidationError(f"{what}: shape={tuple(shape)!r}: every dim must be a positive int")
        out.append(int(n))
    return tuple(out)


def _buffer(buffer: Any, what: str) -> MemoryRegion:
    if isinstance(buffer, MemoryRegion):
        return buffer
    raise NkiValidationError(
        f"{what}: buffer={buffer!r}: expected nl.sbuf, nl.psum, nl.hbm/nl.private_hbm or nl.shared_hbm "
        "(string buffer names were removed in NKI 0.3)"
    )


def ndarray(shape: Any, dtype: DType, buffer: MemoryRegion = SBUF, name: str = "",
            address: tuple[int, int] | None = None) -> NkiTensor:  # fmt: skip
    """A new, uninitialised tensor (floats NaN, integers 0xA5 bytes). `address=(partition, byte)` on chip."""
    what = "nl.ndarray"
    shp = _shape(shape, what)
    dt = check(dtype, f"{what}: dtype")
    buf = _buffer(buffer, what)
    if address is not None and (not isinstance(address, (tuple, list)) or len(address) != 2):
        raise NkiValidationError(f"{what}: address={address!r}: expected (partition_offset, byte_offset)")
    addr = None if address is None else (int(address[0]), int(address[1]))
    return context.current("nl.ndarray").allocate(shp, dt, buf, str(name or ""), addr)


def empty_like(
    x: NkiTensor, dtype: DType | None = None, buffer: MemoryRegion | None = None, name: str = ""
) -> NkiTensor:
    return ndarray(x.shape, x.dtype if dtype is None else dtype, x.buffer if buffer is None else buffer, name)


def full(shape: Any, fill_value: Any, dtype: DType, buffer: MemoryRegion = SBUF, name: str = "") -> NkiTensor:
    t = ndarray(shape, dtype, buffer, name)
    value = fill_value
    if t.dtype.is_int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if t.on_chip:
        isa.memset(t, value)
    else:
        t.write(cast(np.full(t.shape, value, dtype=np.float64), t.dtype))
    return t


def zeros(shape: Any, dtype: DType, buffer: MemoryRegion = SBUF, name: str = "") -> NkiTensor:
    return full(shape, 0, dtype, buffer, name)


def ones(shape: Any, dtype: DType, buffer: MemoryRegion = SBUF, name: str = "") -> NkiTensor:
    return full(shape, 1, dtype, buffer, name)


def zeros_like(
    x: NkiTensor, dtype: DType | None = None, buffer: MemoryRegion | None = None, name: str = ""
) -> NkiTensor:
    return zeros(x.shape, x.dtype if dtype is None else dtype, SBUF if buffer is None else buffer, name)


def ds(start: int, size: int) -> DynSlice:
    """Index helper: `t[nl.ds(start, size)]` is `t[start:start+size]` (compile-time start)."""
    if isinstance(start, NkiTensor):
        raise NkiValidationError(
            "nl.ds: a runtime (tensor) start is not available in NKI 0.3-0.6; use .ap(scalar_offset=...)"
        )
    return DynSlice(int(start), int(size))


class NKIObject:
    """Base class of classes used inside kernels (configs, records); subclasses may be dataclasses."""

    def __init__(self, **kwargs: Any):
        for k, v in kwargs.items():
            setattr(self, k, v)


# ---- SPMD ------------------------------------------------------------------------------------
def program_id(axis: int = 0) -> int:
    if axis != 0:
        raise NkiValidationError(f"nl.program_id(axis={axis}): LNC launches have one grid axis (0)")
    return context.current("nl.program_id").pid


def num_programs(axes: int = 0) -> int:
    if axes not in (0, None):
        raise NkiValidationError(f"nl.num_programs(axes={axes}): LNC launches have one grid axis (0)")
    return context.current("nl.num_programs").nprog


def program_ndim() -> int:
    return context.current("nl.program_ndim").launch.grid_ndim


# ---- loops and scheduling --------------------------------------------------------------------
def affine_range(start: int, stop: int | None = None, step: int = 1) -> range:
    """Deprecated alias of `range` in NKI 0.6 (fully unrolled)."""
    return range(start, stop, step) if stop is not None else range(start)


sequential_range = affine_range
static_range = affine_range


def fori_loop(lower: int, upper: int, body_fun: Any, step: int = 1) -> None:
    """Runtime loop (0.6+); the emulator runs it eagerly with a Python int as the register."""
    if not isinstance(step, int) or step < 1:
        raise NkiValidationError(f"nl.fori_loop: step={step!r}: expected a positive compile-time int")
    for i in range(int(lower), int(upper), step):
        body_fun(i)


@contextmanager
def no_reorder() -> Iterator[None]:
    """Scheduling hint; no effect in an eager emulator."""
    yield


def device_print(print_prefix: str, tensor: NkiTensor) -> None:
    prog = context.current("nl.device_print")
    print(f"[program {prog.pid}] {print_prefix}{np.array(tensor.array())}")


# ---- nl.* wrappers (experimental in NKI; not used by our kernel) -----------------------------
def _count(engine: str, name: str, n: int, inputs: int = 1) -> None:
    cyc = cost.scalar_cycles(n) if engine == "scalar" else cost.vector_cycles(n, inputs)
    context.current(f"nl.{name}").stats.record(engine, f"nl.{name}", cyc)


def elementwise(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> NkiTensor:
    """`nl.<op>(x[, y], dtype=None)`: a new SBUF tile of x's shape (no broadcasting between tiles)."""
    dtype = kwargs.pop("dtype", None)
    if kwargs:
        raise NkiValidationError(f"nl.{op.name}: unexpected keyword arguments {sorted(kwargs)}")
    tiles = [a for a in args if isinstance(a, NkiTensor)]
    if not tiles:
        raise NkiValidationError(f"nl.{op.name}: expected at least one tile argument")
    for t in tiles:
        t.check_alive(f"nl.{op.name}")
        if not t.on_chip:
            raise NkiValidationError(f"nl.{op.name}: operand {t.name!r} is in HBM; load it into SBUF first")
    ref = tiles[0]
    for t in tiles[1:]:
        if t.shape != ref.shape:
            raise NkiValidationError(
                f"nl.{op.name}: tile shapes {list(ref.shape)} and {list(t.shape)} differ (no broadcasting)"
            )
    vals = []
    for a in args:
        if isinstance(a, NkiTensor):
            x = a.read(f"nl.{op.name}")
            vals.append(x.astype(np.float32) if not op.bitvec else x)
        else:
            vals.append(np.float32(a) if not op.bitvec else a)
    with np.errstate(all="ignore"):
        if op.name == "sin":
            x = vals[0]
            res = np.sin(x)  # nl.sin range-reduces before the Scalar-engine sine
        elif op.name in ELEMENTWISE:
            res = ELEMENTWISE[op.name](*vals)
        elif op.alu is not None and (op.unary or len(vals) == 2):
            res = op.alu(*vals)
        elif op.act is not None and len(vals) == 1:
            res = op.act(vals[0])
        else:
            raise NkiValidationError(f"nl.{op.name}: wrong number of arguments ({len(args)})")
    out = ndarray(ref.shape, ref.dtype if dtype is None else dtype, SBUF)
    res = np.broadcast_to(np.asarray(res), ref.shape)
    out.write(res.astype(out.dtype.np) if op.bitvec else cast(res, out.dtype))
    _count("scalar" if (op.act is not None and op.alu is None) else "vector", op.name, ref.free_size, len(tiles))
    return out


def _reduce(name: str, fn: Any, x: NkiTensor, axis: Any, dtype: DType | None, keepdims: bool) -> NkiTensor:
    x.check_alive(f"nl.{name}")
    axes = norm_axis(axis, x.ndim, name)
    with np.errstate(all="ignore"):
        res = fn(x.read(f"nl.{name}").astype(np.float32), axis=axes, keepdims=keepdims)
    shape = res.shape if keepdims else (x.shape[0], *tuple(res.shape[1:]))
    if len(shape) < 2:
        shape = (x.shape[0], 1)
    out = ndarray(shape, x.dtype if dtype is None else dtype, SBUF)
    out.write(cast(np.asarray(res).reshape(shape), out.dtype))
    _count("vector", name, x.free_size)
    return out


def sum(x: NkiTensor, axis: Any, dtype: DType | None = None, keepdims: bool = False) -> NkiTensor:
    return _reduce("sum", np.sum, x, axis, dtype, keepdims)


def max(x: NkiTensor, axis: Any, dtype: DType | None = None, keepdims: bool = False) -> NkiTensor:
    return _reduce("max", np.max, x, axis, dtype, keepdims)


def min(x: NkiTensor, axis: Any, dtype: DType | None = None, keepdims: bool = False) -> NkiTensor:
    return _reduce("min", np.min, x, axis, dtype, keepdims)


def mean(x: NkiTensor, axis: Any, dtype: DType | None = None, keepdims: bool = False) -> NkiTensor:
    return _reduce("mean", np.mean, x, axis, dtype, keepdims)


def load(src: NkiTensor, dtype: DType | None = None) -> NkiTensor:
    """DMA an HBM tensor into a new SBUF tile (src dim 0 becomes the partition dim)."""
    out = ndarray(src.shape if src.ndim > 1 else (src.shape[0], 1), src.dtype if dtype is None else dtype, SBUF)
    isa.dma_copy(out, src)
    return out


def store(dst: NkiTensor, value: NkiTensor) -> None:
    """DMA an SBUF tile into HBM (PSUM must be copied to SBUF first)."""
    isa.dma_copy(dst, value)


def _copy_tile(x: NkiTensor, dtype: DType | None = None) -> NkiTensor:
    """A new SBUF copy of x (Vector tensor_copy, NKI 0.6)."""
    if not isinstance(x, NkiTensor):
        raise NkiValidationError(f"nl.copy: expected a tile, got {x!r}")
    out = ndarray(x.shape, x.dtype if dtype is None else dtype, SBUF)
    isa.tensor_copy(out, x)
    return out


def matmul(x: NkiTensor, y: NkiTensor, transpose_x: bool = False) -> NkiTensor:
    """`x.T @ y` into a new fp32 PSUM tile (only transpose_x=True works in 0.3/0.4)."""
    if not transpose_x:
        raise NkiValidationError(
            "nl.matmul: use transpose_x=True with x [K, M] (K on partitions); transpose_x=False fails in NKI 0.3/0.4"
        )
    out = ndarray((x.free_size, y.free_size), float32, PSUM)
    isa.nc_matmul(out, x, y)
    return out


def transpose(x: NkiTensor, dtype: DType | None = None) -> NkiTensor:
    """2-D partition <-> free swap on the Tensor engine into a new PSUM tile."""
    out = ndarray((x.free_size, x.shape[0]), x.dtype if dtype is None else dtype, PSUM)
    isa.nc_transpose(out, x)
    return out


class _CopyOp(Op):
    """`nl.copy`: the identity activation (`op=nl.copy`) and the `nl.copy(x)` wrapper in one object."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _copy_tile(*args, **kwargs)


copy = _CopyOp("copy", act=lambda x: x)
OPS["copy"] = copy

_REMOVED = {
    "arange": "nl.arange was removed in NKI 0.2: index with ints, slices, nl.ds(start, size) or .ap()",
    "mgrid": "nl.mgrid was removed in NKI 0.2: index with ints, slices, nl.ds(start, size) or .ap()",
    "par_dim": "nl.par_dim (block dimensions) was removed in NKI 0.2: the partition dim is always dim 0",
    "dynamic_range": "nl.dynamic_range is deprecated in NKI 0.6: use nl.fori_loop",
    "load_transpose2d": "nl.load_transpose2d is not emulated: use nisa.dma_copy then nisa.nc_transpose",
}


def __getattr__(name: str) -> Any:
    if name == "bool":
        return bool_
    if name in _REMOVED:
        raise RemovedApiError(_REMOVED[name])
    raise AttributeError(f"module 'nki.language' (tkg NKI emulator) has no attribute {name!r}")
