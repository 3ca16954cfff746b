"""`SbufManager`: a stack allocator handing out SBUF tiles at explicit addresses.

The kernel places every SBUF tile itself instead of leaving placement to the compiler, so the
memory plan is visible, bounded and identical on every run (the same approach as nki-library's
allocator, written from scratch here). The manager owns the per-partition byte range
`[lower, upper)`; a tile of shape `(P, f1, f2, ...)` takes `prod(f) * itemsize` bytes on each of
its partitions at one address, rounded up to `align` bytes.

Scopes free in LIFO order: `open_scope()` remembers the stack top, `close_scope()` returns to it.
A scope opened with `interleave_degree=N` is split into N *sections* for multi-buffering a loop:
call `increment_section()` at the end of every iteration, and iteration i allocates in section
i % N. Section k starts where section k-1 ended the first time it was used; re-entering a section
frees what it held N iterations ago, so the DMA of iteration i+1 can overlap compute of iteration
i on hardware. Using more bytes in a re-entered section than it had the first time overlaps the
next section and is an error.

Kernel-side code: it runs at trace time inside an NKI kernel, so it keeps to the NKI language
subset (an `nl.NKIObject`, no `is`, plain loops and arithmetic).
"""

import nki.language as nl

P_MAX = 128


def dtype_bytes(dtype) -> int:
    """Bytes per element of an NKI dtype (the dtypes the kernel uses)."""
    if dtype == nl.float32 or dtype == nl.int32 or dtype == nl.uint32:
        return 4
    if dtype == nl.bfloat16 or dtype == nl.float16 or dtype == nl.int16 or dtype == nl.uint16:
        return 2
    if dtype == nl.uint8 or dtype == nl.int8 or dtype == nl.float8_e4m3:
        return 1
    raise AssertionError(f"SbufManager: unsupported dtype {dtype}")


def free_elems(shape) -> int:
    """Elements per partition of a tile: the product of the free dims (dims 1..)."""
    n = 1
    for i in range(1, len(shape)):
        n = n * shape[i]
    return n


class SbufManager(nl.NKIObject):
    """Stack allocator with scopes and multi-buffer sections over SBUF bytes `[lower, upper)`.

    Args:
        lower: first usable byte offset within each partition.
        upper: one past the last usable byte offset within each partition.
        name: prefix of the tile names (tiles are named `<name>.<tile>.<n>`).
        align: byte alignment of every allocation.
    """

    def __init__(self, lower: int, upper: int, name: str = "sbm", align: int = 64):
        assert lower >= 0 and lower < upper, f"SbufManager: bad range [{lower}, {upper})"
        self.lower = lower
        self.upper = upper
        self.name = name
        self.align = align
        self.top = lower
        self.high_water = lower
        self.n_allocs = 0
        # One record per open scope: [start, degree, section, bases, ends].
        self.scopes = []

    # -- scopes -------------------------------------------------------------------------
    def open_scope(self, interleave_degree: int = 1):
        """Start a scope; with `interleave_degree` N > 1 its allocations rotate among N sections."""
        assert interleave_degree >= 1, f"SbufManager: interleave_degree {interleave_degree} must be >= 1"
        self.scopes.append([self.top, interleave_degree, 0, [self.top], [self.top]])

    def close_scope(self):
        """Free everything allocated since the matching `open_scope`."""
        assert len(self.scopes) > 0, "SbufManager: close_scope without open_scope"
        rec = self.scopes.pop()
        self.top = rec[0]

    def increment_section(self):
        """Move to the next section of the innermost scope, freeing that section's old tiles."""
        assert len(self.scopes) > 0, "SbufManager: increment_section outside a scope"
        rec = self.scopes[-1]
        degree = rec[1]
        section = rec[2]
        bases = rec[3]
        ends = rec[4]
        ends[section] = max(ends[section], self.top)
        nxt = (section + 1) % degree
        if nxt == len(bases):
            # First use of this section: it starts where the previous one reached.
            bases.append(ends[section])
            ends.append(ends[section])
        rec[2] = nxt
        self.top = bases[nxt]

    def section(self) -> int:
        """Index of the current section of the innermost scope (0 when no scope is open)."""
        if len(self.scopes) == 0:
            return 0
        return self.scopes[-1][2]

    # -- allocation ---------------------------------------------------------------------
    def reserve(self, nbytes: int, what: str) -> int:
        """Take `nbytes` per partition from the stack; return the byte address."""
        size = ((nbytes + self.align - 1) // self.align) * self.align
        addr = self.top
        end = addr + size
        assert end <= self.upper, (
            f"SbufManager: SBUF budget exceeded allocating {what}: needs {size} B/partition at offset "
            f"{addr}, budget ends at {self.upper} ({self.upper - addr} B free)"
        )
        # Every enclosing multi-buffered scope bounds the current section by where the next one starts.
        for i in range(len(self.scopes)):
            rec = self.scopes[i]
            bases = rec[3]
            nxt = rec[2] + 1
            if nxt < len(bases):
                assert end <= bases[nxt], (
                    f"SbufManager: {what} needs {size} B/partition but section {rec[2]} has only "
                    f"{bases[nxt] - addr} B left before section {nxt}; allocate the same tiles in every iteration"
                )
        for i in range(len(self.scopes)):
            rec = self.scopes[i]
            ends = rec[4]
            ends[rec[2]] = max(ends[rec[2]], end)  # a section's extent includes nested scopes
        self.top = end
        self.high_water = max(self.high_water, end)
        return addr

    def alloc(self, shape, dtype, name: str = "tile"):
        """A new SBUF tile of `shape` (partition dim first, <= 128) and `dtype` at the stack top."""
        assert shape[0] <= P_MAX, f"SbufManager: {name}: {shape[0]} partitions exceed {P_MAX}"
        addr = self.reserve(free_elems(shape) * dtype_bytes(dtype), name)
        self.n_allocs = self.n_allocs + 1
        return nl.ndarray(
            tuple(shape), dtype=dtype, buffer=nl.sbuf, name=f"{self.name}.{name}.{self.n_allocs}", address=(0, addr)
        )

    def get_free_space(self) -> int:
        """Bytes per partition still free above the stack top."""
        return self.upper - self.top
