"""Tensors: storage (one allocation) plus a strided view, as in the NKI language guide.

A `Storage` is one allocation: a flat NumPy array in its dtype, the memory region, the allocation
shape and, on chip, the partition count P and the elements per partition F (the storage is
partition-major: element (p, f) is at flat index p*F + f). An `NkiTensor` is a view: shape,
strides and offset in elements of the storage (nki-api.md 1.2). Views are checked when they are
made: on-chip views keep dim 0 as the partition dim with partition step 1, never leave a
partition's free range, and have at most 4 free dims; HBM views stay inside the tensor.

`.ap(pattern, offset, vector_offset=..., scalar_offset=...)` builds raw access patterns over the
storage; with an offset tensor the view is *indirect* and is resolved (and bounds checked) by the
DMA that uses it.

Explicitly addressed on-chip allocations (`address=`) can be superseded: a new allocation that
overlaps an older one's bytes marks the older storage dead, and any later use of it raises
`DeadTensorError` naming both (this is how a stack allocator reuses memory; see context.py).
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from numpy.lib.stride_tricks import as_strided

from tkg.kernel.nki_emu.dtypes import DType
from tkg.kernel.nki_emu.errors import DeadTensorError, NkiValidationError


class MemoryRegion(enum.Enum):
    """`nl.sbuf`, `nl.psum`, `nl.private_hbm` (= `nl.hbm`), `nl.shared_hbm` (nki-api.md 3.2)."""

    sbuf = "sbuf"
    psum = "psum"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"

    @property
    def on_chip(self) -> bool:
        return self in (MemoryRegion.sbuf, MemoryRegion.psum)

    @property
    def is_hbm(self) -> bool:
        return not self.on_chip

    def __repr__(self) -> str:
        return f"nl.{self.value}"

    __str__ = __repr__


SBUF = MemoryRegion.sbuf
PSUM = MemoryRegion.psum
PRIVATE_HBM = MemoryRegion.private_hbm
SHARED_HBM = MemoryRegion.shared_hbm

# Fresh allocations are uninitialised on hardware: a read returns whatever the memory held. The
# emulator poisons them: floats hold NaN; integers the byte pattern 0xA5 (uint8 165, int32
# -1515870811, uint32 2779096485), nonzero as a predicate and out of bounds as an index. Reading
# never-written elements is legal (kernels compute on partly filled tiles and drop those lanes); the
# first such read of each program is recorded (Program.poison_reads), and the launch fails only when
# poison reaches a kernel output (never-written output elements, or NaN in a float output after a
# poisoned read), naming that instruction. NKI_EMU_UNINIT=error refuses every such read at once
# (debugging), =off records nothing.
GARBAGE_BYTE = 0xA5
UNINIT_MODE = os.environ.get("NKI_EMU_UNINIT", "poison").lower()
if UNINIT_MODE not in ("poison", "error", "off"):
    raise ValueError(f"NKI_EMU_UNINIT={UNINIT_MODE!r}: expected poison, error or off")


class Storage:
    """One allocation. `data` is flat; on chip, element (p, f) is at p*free + f."""

    _next_id = 0

    def __init__(self, shape: tuple[int, ...], dtype: DType, region: MemoryRegion, name: str,
                 data: np.ndarray | None = None, program: int | None = None,
                 address: tuple[int, int] | None = None):  # fmt: skip
        self.shape = shape
        self.dtype = dtype
        self.region = region
        self.name = name
        self.program = program
        self.address = address
        size = math.prod(shape)
        fresh = data is None
        if data is None:
            if dtype.np.kind in "iub":  # integers and packed MX raw bits
                data = np.full(size * dtype.itemsize, GARBAGE_BYTE, dtype=np.uint8).view(dtype.np)
            else:
                data = np.full(size, np.nan, dtype=np.float32).astype(dtype.np)
        # Which elements were written since allocation (None: all initialised, e.g. kernel inputs).
        self.init: np.ndarray | None = np.zeros(size, dtype=bool) if fresh else None
        self.data = data
        if region.on_chip:
            self.partitions = shape[0]
            self.free = math.prod(shape[1:])
        else:
            self.partitions = 0
            self.free = 0
        self.dead: str | None = None
        self.written = False  # set by any write (kernel inputs are copied back only if written)
        # PSUM: which elements hold a matmul result (accumulate=None / True semantics, nki-api.md 4.1).
        self.mm_written = np.zeros(size, dtype=bool) if region is PSUM else None
        Storage._next_id += 1
        self.id = Storage._next_id

    @property
    def free_bytes(self) -> int:
        return self.free * self.dtype.itemsize

    def flat(self, dtype: DType) -> np.ndarray:
        return self.data if dtype.np == self.data.dtype else self.data.view(dtype.np)

    def describe(self) -> str:
        where = self.region.value
        if self.address is not None:
            p0, off = self.address
            where += f" partitions [{p0}, {p0 + self.partitions}) bytes [{off}, {off + self.free_bytes})"
        return f"'{self.name}' {list(self.shape)} {self.dtype} in {where}"

    def check_alive(self, what: str) -> None:
        if self.dead is not None:
            raise DeadTensorError(f"{what}: tensor {self.describe()} is dead: {self.dead}")


@dataclass(frozen=True)
class DynSlice:
    """`nl.ds(start, size)`: the slice `start : start+size`."""

    start: int
    size: int


@dataclass(frozen=True)
class Indirect:
    """Runtime addressing of an `.ap()` view: partition w (vector) or all (scalar) start at
    `offset + value * multiplier`; `dim_size` bounds the index (oob check)."""

    kind: str  # "vector" | "scalar"
    index: NkiTensor
    multiplier: int
    dim_size: int


def poisoned_read(msg: str) -> None:
    """A read of never-written memory: raise in error mode, else remember it on the current program."""
    if UNINIT_MODE == "error":
        raise NkiValidationError(msg)
    from tkg.kernel.nki_emu import context  # context imports this module

    prog = context.current_or_none()
    if prog is not None:
        prog.note_poison_read(msg)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


class NkiTensor:
    """A view of a Storage: `shape`, `strides` and `offset` in elements of `dtype`."""

    __slots__ = ("dtype", "indirect", "offset", "shape", "storage", "strides")

    def __init__(self, storage: Storage, shape: tuple[int, ...], strides: tuple[int, ...], offset: int,
                 dtype: DType | None = None, indirect: Indirect | None = None, what: str = "view"):  # fmt: skip
        self.storage = storage
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.offset = int(offset)
        self.dtype = storage.dtype if dtype is None else dtype
        self.indirect = indirect
        self._validate(what)

    # -- attributes of the NKI tensor ------------------------------------------------------
    @property
    def buffer(self) -> MemoryRegion:
        return self.storage.region

    @property
    def name(self) -> str:
        return self.storage.name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def on_chip(self) -> bool:
        return self.storage.region.on_chip

    def part_stride(self) -> int:
        """Elements per partition of the storage, in this view's dtype."""
        return self.storage.free_bytes // self.dtype.itemsize

    @property
    def partitions(self) -> int:
        return self.shape[0]

    @property
    def free_size(self) -> int:
        """Elements per partition of the view (product of the free dims)."""
        return math.prod(self.shape[1:])

    @property
    def start_partition(self) -> int:
        """Physical start partition (allocation's partition offset + view's first partition)."""
        p0 = self.offset // self.part_stride() if self.part_stride() else 0
        if self.storage.address is not None:
            p0 += self.storage.address[0]
        return p0

    def __repr__(self) -> str:
        return (f"NkiTensor({self.name!r}, shape={list(self.shape)}, dtype={self.dtype}, "
                f"buffer={self.buffer!r}, offset={self.offset}, strides={list(self.strides)})")  # fmt: skip

    def __bool__(self) -> bool:
        raise NkiValidationError(
            f"tensor {self.name!r}: a tensor has no truth value at trace time; compare with == / != None "
            "or use its shape"
        )

    def __iter__(self) -> NoReturn:
        raise NkiValidationError(f"tensor {self.name!r}: tensors are not iterable; index them with slices")

    # -- validation -------------------------------------------------------------------------
    def _validate(self, what: str) -> None:
        if len(self.shape) != len(self.strides):
            raise NkiValidationError(f"{what}: shape {self.shape} and strides {self.strides} differ in rank")
        if any(n < 0 for n in self.shape):
            raise NkiValidationError(f"{what}: negative dimension in shape {list(self.shape)}")
        if len(self.shape) == 0:
            raise NkiValidationError(f"{what}: a view needs at least one dimension")
        if self.size == 0:
            raise NkiValidationError(f"{what}: empty view {list(self.shape)} of {self.storage.describe()}")
        flat_size = self.storage.data.nbytes // self.dtype.itemsize
        if self.indirect is not None:
            return  # resolved and bounds checked by the DMA at run time
        lo = self.offset + sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides, strict=True))
        hi = self.offset + sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides, strict=True))
        if lo < 0 or hi >= flat_size:
            raise NkiValidationError(
                f"{what}: view {list(self.shape)} strides {list(self.strides)} offset {self.offset} addresses "
                f"elements [{lo}, {hi}] outside {self.storage.describe()} ({flat_size} elements)"
            )
        if not self.on_chip:
            return
        if len(self.shape) > 5:
            raise NkiValidationError(f"{what}: {len(self.shape)}-D on-chip view; at most 1 partition + 4 free dims")
        F = self.part_stride()
        P = self.shape[0]
        if P > 1 and self.strides[0] != F:
            raise NkiValidationError(
                f"{what}: partition dim (dim 0) must step by one partition ({F} elements of "
                f"{self.storage.describe()}), "
                f"got stride {self.strides[0]}: partitions are accessed contiguously"
            )
        p0, f0 = divmod(self.offset, F)
        if p0 + P > self.storage.partitions:
            raise NkiValidationError(
                f"{what}: partitions [{p0}, {p0 + P}) outside the {self.storage.partitions} partitions of "
                f"{self.storage.describe()}"
            )
        flo = f0 + sum(min(0, (n - 1) * s) for n, s in zip(self.shape[1:], self.strides[1:], strict=True))
        fhi = f0 + sum(max(0, (n - 1) * s) for n, s in zip(self.shape[1:], self.strides[1:], strict=True))
        if flo < 0 or fhi >= F:
            raise NkiValidationError(
                f"{what}: free access [{flo}, {fhi}] leaves the partition's {F} elements of "
                f"{self.storage.describe()} (a free dim may not cross partitions)"
            )

    def check_alive(self, what: str) -> None:
        self.storage.check_alive(what)
        if self.indirect is not None:
            self.indirect.index.check_alive(f"{what} (offset tensor)")

    # -- element access (emulator internals) ------------------------------------------------
    def array(self) -> np.ndarray:
        """A strided NumPy view of the elements (writes go to the storage)."""
        if self.indirect is not None:
            raise NkiValidationError(f"tensor {self.name!r}: an indirect .ap() view can only be used by a DMA")
        flat = self.storage.flat(self.dtype)
        item = flat.itemsize
        return as_strided(flat[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.strides))

    def flat_indices(self) -> np.ndarray:
        """Storage flat indices (in this view's dtype) of every element, in row-major order."""
        idx = np.full(self.shape, self.offset, dtype=np.int64)
        for d, (n, s) in enumerate(zip(self.shape, self.strides, strict=True)):
            shape = [1] * len(self.shape)
            shape[d] = n
            idx = idx + (np.arange(n, dtype=np.int64) * s).reshape(shape)
        return idx

    def has_overlapping_elements(self) -> bool:
        """True if two indices address one element (stride 0 / broadcast dims): not writable."""
        return any(s == 0 and n > 1 for n, s in zip(self.shape, self.strides, strict=True))

    def _init_view(self) -> np.ndarray | None:
        """The storage's 'initialised' flags for this view's elements (None if not tracked / reinterpreted)."""
        init = self.storage.init
        if init is None or self.dtype.itemsize != self.storage.dtype.itemsize:
            return None
        return as_strided(init[self.offset :], shape=self.shape, strides=self.strides)

    def unwritten(self, what: str) -> str | None:
        """None if every element of this view was written since allocation, else a description."""
        iv = self._init_view()
        if iv is None or iv.all():
            return None
        bad = np.argwhere(~iv)
        return (
            f"{what}: reads {len(bad)} element(s) of {self.storage.describe()} that nothing wrote since allocation "
            f"(first at view index {tuple(int(i) for i in bad[0])}); on hardware this is stale memory"
        )

    def check_initialised(self, what: str) -> None:
        """Note (poison mode) or refuse (error mode) a read of never-written elements of this view."""
        if UNINIT_MODE == "off":
            return
        msg = self.unwritten(what)
        if msg is not None:
            poisoned_read(msg)

    def read(self, what: str) -> np.ndarray:
        """A copy of the elements (native dtype, view shape); never-written ones are poison (see top)."""
        self.check_initialised(what)
        return np.array(self.array())

    def write(self, values: np.ndarray) -> None:
        """Store already-converted values (dst dtype, any shape with this view's size) and mark them written."""
        self.array()[...] = np.asarray(values).reshape(self.shape)
        self.mark_written()

    def mark_written(self) -> None:
        st = self.storage
        st.written = True
        iv = self._init_view()
        if iv is not None:
            iv[...] = True
        elif st.init is not None:  # dtype-reinterpreted view: mark the byte span it covers
            idx = self.flat_indices()
            ratio = self.dtype.itemsize / st.dtype.itemsize
            lo, hi = int(idx.min() * ratio), math.ceil((idx.max() + 1) * ratio)
            st.init[lo:hi] = True

    # -- indexing ---------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> NkiTensor:
        if self.indirect is not None:
            raise NkiValidationError(f"tensor {self.name!r}: an indirect view cannot be indexed again")
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = len(self.shape) - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1 :]
        if len(key) > len(self.shape):
            raise NkiValidationError(
                f"index {key} has {len(key)} entries for the {len(self.shape)}-D tensor {self.name!r}"
            )
        key = key + (slice(None),) * (len(self.shape) - len(key))
        shape: list[int] = []
        strides: list[int] = []
        offset = self.offset
        for d, (k, n, s) in enumerate(zip(key, self.shape, self.strides, strict=True)):
            if isinstance(k, DynSlice):
                k = slice(k.start, k.start + k.size)
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise NkiValidationError(
                        f"index {int(k)} out of range for dim {d} of size {n} of tensor {self.name!r}"
                    )
                offset += i * s
                if self.on_chip and d == 0:
                    shape.append(1)
                    strides.append(s)
                continue
            if not isinstance(k, slice):
                raise NkiValidationError(
                    f"tensor {self.name!r}: index {k!r} for dim {d}: expected an int, a slice or nl.ds(start, size)"
                    " (nl.arange / index tiles were removed in NKI 0.2)"
                )
            step = 1 if k.step is None else int(k.step)
            if step < 1:
                raise NkiValidationError(f"tensor {self.name!r}: slice step {step} for dim {d}: expected >= 1")
            if self.on_chip and d == 0 and step != 1:
                raise NkiValidationError(
                    f"tensor {self.name!r}: partition slice step {step}: partitions are accessed contiguously (step 1)"
                )
            start = 0 if k.start is None else int(k.start)
            stop = n if k.stop is None else int(k.stop)
            if start < 0:
                start += n
            if stop < 0:
                stop += n
            if not (0 <= start < stop <= n):
                raise NkiValidationError(
                    f"tensor {self.name!r}: slice {start}:{stop} for dim {d} of size {n}: expected 0 <= "
                    f"start < stop <= {n}"
                )
            offset += start * s
            shape.append(len(range(start, stop, step)))
            strides.append(s * step)
        if self.on_chip and len(shape) < 2:
            shape.append(1)
            strides.append(1)
        if not shape:
            shape, strides = [1], [1]
        return NkiTensor(self.storage, tuple(shape), tuple(strides), offset, self.dtype, what=f"{self.name}[{key}]")

    def __setitem__(self, key: Any, value: Any) -> None:
        from tkg.kernel.nki_emu import isa

        dst = self[key]
        if not isinstance(value, NkiTensor):
            isa.memset(dst, value)
        elif dst.buffer.is_hbm or value.buffer.is_hbm:
            isa.dma_copy(dst, value)
        else:
            isa.tensor_copy(dst, value)

    # -- view methods -----------------------------------------------------------------------
    def is_contiguous(self) -> bool:
        """Dense row-major (partition stride ignored on chip)."""
        dims = list(zip(self.shape, self.strides, strict=True))
        if self.on_chip:
            dims = dims[1:]
        expect = 1
        for n, s in reversed(dims):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True

    def reshape(self, shape: Any) -> NkiTensor:
        shape = tuple(int(n) for n in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if math.prod(shape) != self.size:
            raise NkiValidationError(
                f"reshape of {self.name!r} {list(self.shape)} to {list(shape)}: element counts differ"
            )
        if not self.is_contiguous():
            raise NkiValidationError(
                f"reshape of {self.name!r}: the view {list(self.shape)} strides {list(self.strides)} is not contiguous"
            )
        if self.on_chip:
            if shape[0] != self.shape[0]:
                raise NkiValidationError(
                    f"reshape of on-chip {self.name!r} to {list(shape)}: dim 0 must stay the partition "
                    f"count {self.shape[0]}"
                )
            strides = (self.strides[0], *_c_strides(shape[1:]))
        else:
            strides = _c_strides(shape)
        return NkiTensor(self.storage, shape, strides, self.offset, self.dtype, what=f"{self.name}.reshape")

    def view(self, dtype: DType) -> NkiTensor:
        """Bit reinterpretation; the last dim scales by the itemsize ratio."""
        from tkg.kernel.nki_emu.dtypes import check

        dtype = check(dtype, f"{self.name}.view(dtype)")
        old, new = self.dtype.itemsize, dtype.itemsize
        if self.strides[-1] != 1:
            raise NkiValidationError(f"{self.name}.view({dtype}): the last dim must be contiguous")
        last = self.shape[-1] * old
        if last % new or (self.offset * old) % new or any((s * old) % new for s in self.strides[:-1]):
            raise NkiValidationError(
                f"{self.name}.view({dtype}): the last dim's {last} bytes do not divide into {new}-byte elements"
            )
        shape = (*self.shape[:-1], last // new)
        strides = (*tuple(s * old // new for s in self.strides[:-1]), 1)
        return NkiTensor(self.storage, shape, strides, self.offset * old // new, dtype, what=f"{self.name}.view")

    reinterpret_cast = view

    def get_pattern(self) -> list[list[int]]:
        return [[s, n] for n, s in zip(self.shape, self.strides, strict=True)]

    def is_indirect(self) -> bool:
        return self.indirect is not None

    def ap(self, pattern: Any, offset: int | None = None, scalar_offset: Any = None, vector_offset: Any = None,
           indirect_dim: int = 0, dtype: DType | None = None) -> NkiTensor:  # fmt: skip
        """Raw access pattern over the storage: element (i0..ik) at `offset + sum(stride_j * i_j)`.

        `offset` is absolute in the allocation (None keeps this view's offset); the pattern ignores
        this view's shape and strides (nki-api.md 3.5).
        """
        what = f"{self.name}.ap({pattern})"
        if not isinstance(pattern, (list, tuple)) or not pattern:
            raise NkiValidationError(f"{what}: pattern must be a non-empty list of [stride, count] pairs")
        pairs = []
        for p in pattern:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise NkiValidationError(f"{what}: each pattern entry must be a [stride, count] pair, got {p!r}")
            pairs.append((int(p[0]), int(p[1])))
        if dtype is not None:
            from tkg.kernel.nki_emu.dtypes import check

            dtype = check(dtype, f"{what}: dtype")
        vdtype = self.dtype if dtype is None else dtype
        off = self.offset if offset is None else int(offset)
        if dtype is not None and offset is None:
            off = self.offset * self.dtype.itemsize // vdtype.itemsize
        shape = tuple(n for _, n in pairs)
        strides = tuple(s for s, _ in pairs)
        if self.on_chip:
            F = self.storage.free_bytes // vdtype.itemsize
            if len(pairs) > 5:
                raise NkiValidationError(f"{what}: {len(pairs) - 1} free dims; at most 4 per operand")
            if shape[0] > 1 and strides[0] != F:
                raise NkiValidationError(
                    f"{what}: the first pair must be the partition pair [{F}, P] for {self.storage.describe()} "
                    f"(elements per partition of the allocation), got [{strides[0]}, {shape[0]}]"
                )
        if vector_offset is not None and scalar_offset is not None:
            raise NkiValidationError(f"{what}: scalar_offset and vector_offset are mutually exclusive")
        indirect = None
        if vector_offset is not None or scalar_offset is not None:
            if self.on_chip:
                raise NkiValidationError(f"{what}: runtime offsets need an HBM tensor, got {self.storage.describe()}")
            if not 0 <= indirect_dim < len(self.shape):
                raise NkiValidationError(f"{what}: indirect_dim {indirect_dim} out of range for {list(self.shape)}")
            idx = vector_offset if vector_offset is not None else scalar_offset
            field = "vector_offset" if vector_offset is not None else "scalar_offset"
            if not isinstance(idx, NkiTensor) or idx.buffer is not SBUF:
                raise NkiValidationError(f"{what}: {field} must be an SBUF tensor, got {idx!r}")
            if not idx.dtype.is_int:
                raise NkiValidationError(
                    f"{what}: {field} dtype {idx.dtype}: expected an integer dtype (uint32 / int32)"
                )
            if vector_offset is not None:
                if indirect_dim != 0:
                    raise NkiValidationError(f"{what}: vector_offset supports only indirect_dim=0, got {indirect_dim}")
                if idx.shape[0] != shape[0] or idx.free_size != 1:
                    raise NkiValidationError(
                        f"{what}: vector_offset shape {list(idx.shape)}: expected ({shape[0]}, 1), one index per "
                        "partition of the pattern's first pair"
                    )
                mult = math.prod(self.shape[1:])
                indirect = Indirect("vector", idx, mult, self.shape[0])
            else:
                if idx.shape[0] != 1 or idx.free_size != 1:
                    raise NkiValidationError(f"{what}: scalar_offset shape {list(idx.shape)}: expected (1, 1)")
                mult = math.prod(self.shape[indirect_dim + 1 :])
                indirect = Indirect("scalar", idx, mult, self.shape[indirect_dim])
        return NkiTensor(self.storage, shape, strides, off, vdtype, indirect=indirect, what=what)

    # -- NKI 0.5 view primitives (the ones that are pure views) ------------------------------
    def slice(self, dim: int, start: int, end: int, step: int = 1) -> NkiTensor:
        key: list[Any] = [slice(None)] * self.ndim
        key[dim] = slice(start, end, step)
        return self[tuple(key)]

    def permute(self, dims: Any) -> NkiTensor:
        dims = tuple(int(d) for d in dims)
        if sorted(dims) != list(range(self.ndim)):
            raise NkiValidationError(f"{self.name}.permute({dims}): expected a permutation of 0..{self.ndim - 1}")
        if self.on_chip and dims[0] != 0:
            raise NkiValidationError(f"{self.name}.permute({dims}): on-chip tensors keep the partition dim first")
        return NkiTensor(self.storage, tuple(self.shape[d] for d in dims), tuple(self.strides[d] for d in dims),
                         self.offset, self.dtype, what=f"{self.name}.permute")  # fmt: skip

    def expand_dim(self, dim: int) -> NkiTensor:
        if self.on_chip and dim == 0:
            raise NkiValidationError(f"{self.name}.expand_dim(0): on-chip tensors keep the partition dim first")
        shape = (*self.shape[:dim], 1, *self.shape[dim:])
        strides = (*self.strides[:dim], 0, *self.strides[dim:])
        return NkiTensor(self.storage, shape, strides, self.offset, self.dtype, what=f"{self.name}.expand_dim")

    def squeeze_dim(self, dim: int) -> NkiTensor:
        if self.shape[dim] != 1 or (self.on_chip and dim == 0):
            raise NkiValidationError(
                f"{self.name}.squeeze_dim({dim}): expected a size-1 free dim, shape {list(self.shape)}"
            )
        shape = self.shape[:dim] + self.shape[dim + 1 :]
        strides = self.strides[:dim] + self.strides[dim + 1 :]
        return NkiTensor(self.storage, shape, strides, self.offset, self.dtype, what=f"{self.name}.squeeze_dim")

    def broadcast(self, dim: int, size: int) -> NkiTensor:
        if self.shape[dim] != 1 or (self.on_chip and dim == 0):
            raise NkiValidationError(
                f"{self.name}.broadcast({dim}, {size}): expected a size-1 free dim, shape {list(self.shape)}"
            )
        shape = list(self.shape)
        strides = list(self.strides)
        shape[dim] = int(size)
        strides[dim] = 0
        return NkiTensor(
            self.storage, tuple(shape), tuple(strides), self.offset, self.dtype, what=f"{self.name}.broadcast"
        )
