"""Per-program and per-launch state: allocations, counters, and the LNC2 rendezvous.

Each program of a launch runs in its own thread with a `Program` in thread-local storage; ISA and
language calls find it with `current()`. The `Launch` is shared by the programs: it pairs their
`shared_hbm` allocations (the k-th allocation of a name in program 1 is the same memory as the
k-th of that name in program 0; nki-api.md 2.2), and carries the mailboxes of `sendrecv` and
`core_barrier`. A receive that can never be satisfied - the partner finished or failed, or every
live program is waiting for a message nobody will send - raises `DeadlockError` at once, and a
backstop timeout (`NKI_EMU_TIMEOUT` seconds, default 60) turns any other hang into an error.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from tkg.kernel.nki_emu.counters import ProgramStats
from tkg.kernel.nki_emu.dtypes import DType
from tkg.kernel.nki_emu.errors import DeadlockError, LaunchError, NkiValidationError
from tkg.kernel.nki_emu.limits import Target
from tkg.kernel.nki_emu.tensor import PSUM, SBUF, SHARED_HBM, MemoryRegion, NkiTensor, Storage

_tls = threading.local()
POLL_S = 0.02


def default_timeout() -> float:
    return float(os.environ.get("NKI_EMU_TIMEOUT", "60"))


class Launch:
    """State shared by the programs of one kernel launch."""

    def __init__(self, kernel: str, lnc: int, target: Target, timeout: float | None = None):
        self.kernel = kernel
        self.lnc = lnc
        self.grid_ndim = 1
        self.target = target
        self.timeout = default_timeout() if timeout is None else timeout
        self.cv = threading.Condition()
        self.shared: dict[tuple[str, int], Storage] = {}
        self.mail: dict[tuple[Any, ...], collections.deque[Any]] = collections.defaultdict(collections.deque)
        self.state = ["running"] * lnc
        self.waiting: list[tuple[tuple[Any, ...], str] | None] = [None] * lnc

    # -- shared HBM -------------------------------------------------------------------------
    def shared_storage(self, key: tuple[str, int], shape: tuple[int, ...], dtype: DType, pid: int) -> Storage:
        with self.cv:
            st = self.shared.get(key)
            if st is None:
                st = Storage(shape, dtype, SHARED_HBM, key[0])
                self.shared[key] = st
                return st
        if st.shape != shape or st.dtype != dtype:
            raise NkiValidationError(
                f"nl.ndarray(shared_hbm, name={key[0]!r}): program {pid} allocates {list(shape)} {dtype} but the other "
                f"program allocated {list(st.shape)} {st.dtype} for the same (name, occurrence {key[1]}); "
                "both programs of "
                "an LNC2 launch must allocate their shared_hbm tensors identically"
            )
        return st

    # -- rendezvous -------------------------------------------------------------------------
    def set_state(self, pid: int, state: str) -> None:
        with self.cv:
            self.state[pid] = state
            self.cv.notify_all()

    def send(self, pid: int, channel: tuple[Any, ...], to: int, payload: Any) -> None:
        with self.cv:
            self.mail[(*channel, pid, to)].append(payload)
            self.cv.notify_all()

    def _who_waits(self) -> str:
        parts = []
        for q in range(self.lnc):
            w = self.waiting[q]
            parts.append(f"program {q}: {w[1] if w else self.state[q]}")
        return "; ".join(parts)

    def recv(self, pid: int, channel: tuple[Any, ...], frm: int, desc: str) -> Any:
        """Wait for the message `frm` sends to `pid` on `channel`; DeadlockError if it never can come."""
        key = (*channel, frm, pid)
        deadline = time.monotonic() + self.timeout
        with self.cv:
            self.waiting[pid] = (key, desc)
            try:
                while True:
                    box = self.mail.get(key)
                    if box:
                        return box.popleft()
                    if self.state[frm] == "failed":
                        raise DeadlockError(f"{desc}: partner program {frm} failed before it got there")
                    if self.state[frm] == "done":
                        raise DeadlockError(
                            f"{desc}: deadlock: partner program {frm} finished without the matching call "
                            f"({self._who_waits()})"
                        )
                    if self._all_stuck():
                        raise DeadlockError(f"{desc}: deadlock: every program waits for a message nobody sends "
                                            f"({self._who_waits()})")  # fmt: skip
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeadlockError(f"{desc}: no matching call within {self.timeout:g} s ({self._who_waits()})")
                    self.cv.wait(min(POLL_S, left))
            finally:
                self.waiting[pid] = None

    def _all_stuck(self) -> bool:
        for q in range(self.lnc):
            if self.state[q] != "running":
                continue
            w = self.waiting[q]
            if w is None or self.mail.get(w[0]):
                return False
        return True


class Program:
    """One program (physical NeuronCore) of a launch: its on-chip memory, accumulators, counters."""

    def __init__(self, launch: Launch, pid: int):
        self.launch = launch
        self.pid = pid
        self.target = launch.target
        self.stats = ProgramStats(program_id=pid)
        self.addressed: dict[MemoryRegion, list[Storage]] = {SBUF: [], PSUM: []}
        self.hbm_names: collections.Counter[str] = collections.Counter()
        self.n_alloc = 0
        self.psum_banks: set[int] = set()
        # Scalar-engine accumulator registers, one fp32 per partition lane (nki-api.md 4.3).
        self.act_acc = np.zeros(launch.target.pmax, dtype=np.float32)
        # Vector-engine accumulators (tensor_scalar_reduce & co.; nki-api.md 4.8).
        self.dve_acc = np.zeros(launch.target.pmax, dtype=np.float32)
        # Reads of never-written memory (tensor.py): how many, and the first one's description.
        self.poison_reads = 0
        self.first_poison_read: str | None = None

    def note_poison_read(self, msg: str) -> None:
        self.poison_reads += 1
        if self.first_poison_read is None:
            self.first_poison_read = f"program {self.pid}: {msg}"

    @property
    def nprog(self) -> int:
        return self.launch.lnc

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: DType, region: MemoryRegion, name: str,
                 address: tuple[int, int] | None) -> NkiTensor:  # fmt: skip
        what = f"nl.ndarray({list(shape)}, {dtype}, buffer={region!r}, name={name!r})"
        t = self.target
        if region.on_chip:
            if len(shape) > t.max_view_dims:
                raise NkiValidationError(f"{what}: {len(shape)} dims; at most {t.max_view_dims}")
            if shape[0] > t.pmax:
                raise NkiValidationError(
                    f"{what}: {shape[0]} partitions (dim 0 is the partition dim); expected <= {t.pmax}"
                )
            free_bytes = math.prod(shape[1:]) * dtype.itemsize
            cap = t.sbuf_usable_bytes if region is SBUF else t.psum_partition_bytes
            if free_bytes > cap:
                unit = "usable SBUF" if region is SBUF else "PSUM (8 banks x 2 KiB)"
                raise NkiValidationError(f"{what}: {free_bytes} bytes per partition exceed the {cap} bytes of {unit}")
        elif address is not None:
            raise NkiValidationError(f"{what}: address= is only for SBUF / PSUM tensors")
        self.n_alloc += 1
        label = name or f"t{self.n_alloc}"
        if region is SHARED_HBM:
            n = self.hbm_names[label]
            self.hbm_names[label] += 1
            st = self.launch.shared_storage((label, n), shape, dtype, self.pid)
            return _whole(st)
        st = Storage(shape, dtype, region, label, program=self.pid, address=address)
        if address is not None:
            self._place(st, what)
        return _whole(st)

    def _place(self, st: Storage, what: str) -> None:
        t = self.target
        if not (isinstance(st.address, tuple) and len(st.address) == 2 and all(isinstance(a, int) for a in st.address)):
            raise NkiValidationError(f"{what}: address={st.address!r}: expected (partition_offset, byte_offset) ints")
        p0, off = st.address
        nb = st.free_bytes
        if p0 < 0 or p0 + st.partitions > t.pmax:
            raise NkiValidationError(
                f"{what}: address partition offset {p0} + {st.partitions} partitions exceeds {t.pmax}"
            )
        if off < 0 or off % st.dtype.itemsize:
            raise NkiValidationError(
                f"{what}: address byte offset {off}: expected >= 0 and a multiple of {st.dtype.itemsize}"
            )
        if st.region is SBUF:
            cap = t.sbuf_usable_bytes
            if off + nb > cap:
                raise NkiValidationError(
                    f"{what}: SBUF bytes [{off}, {off + nb}) overflow the {cap} usable bytes per partition "
                    f"(nl.tile_size.total_available_sbuf_size)"
                )
            self.stats.sbuf_high_water_bytes = max(self.stats.sbuf_high_water_bytes, off + nb)
        else:
            cap = t.psum_partition_bytes
            if off % t.psum_bank_bytes:
                raise NkiValidationError(
                    f"{what}: PSUM address {off} must start at a bank boundary (multiple of {t.psum_bank_bytes} bytes)"
                )
            if off + nb > cap:
                raise NkiValidationError(
                    f"{what}: PSUM bytes [{off}, {off + nb}) overflow the {cap} bytes (8 banks x 2 KiB) per partition"
                )
        live = self.addressed[st.region]
        keep = []
        for old in live:
            q0, qoff = old.address  # type: ignore[misc]
            if q0 < p0 + st.partitions and p0 < q0 + old.partitions and qoff < off + nb and off < qoff + old.free_bytes:
                old.dead = f"its memory was re-allocated to {st.describe()}"
            else:
                keep.append(old)
        keep.append(st)
        self.addressed[st.region] = keep


def _whole(st: Storage) -> NkiTensor:
    shape = st.shape
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return NkiTensor(st, shape, tuple(reversed(strides)), 0, what=f"nl.ndarray {st.name!r}")


def current(what: str = "this call") -> Program:
    """The program running in this thread; LaunchError outside a kernel launch / session."""
    prog = getattr(_tls, "program", None)
    if prog is None:
        raise LaunchError(
            f"{what} needs a running NKI kernel: call it inside an @nki.jit kernel (or tkg.kernel.nki_emu.session())"
        )
    return prog


def current_or_none() -> Program | None:
    return getattr(_tls, "program", None)


@contextmanager
def bind(prog: Program):
    """Make `prog` the current program of this thread for the duration of the block."""
    prev = getattr(_tls, "program", None)
    _tls.program = prog
    try:
        yield prog
    finally:
        _tls.program = prev
