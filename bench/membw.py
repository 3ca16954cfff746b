"""Read bandwidth of this machine, measured in the same process as the kernel it is compared to.

Decode attention is memory bound, so a kernel's speed is reported as effective bandwidth (compulsory
KV bytes / time) over the machine's read bandwidth measured in the same run (docs/performance.md).
Two measures, both over buffers far larger than the last-level cache and with the same thread count
as the kernels (both cores by default), reading the bytes once and writing nothing: a torch sum, and
the native kernel's own thread pool streaming a numpy buffer (the kernel's threads, pinning and page
size: numpy's large buffers get transparent huge pages, torch's do not). Callers divide by the larger.

Every timed pass starts on a quiet process (`settle`): torch's OpenMP workers keep spinning for
about 10 ms after each parallel region, and whatever runs in that time (the next probe pass, or the
kernel timed right after a torch peer) loses a core to them. Measured here: a kernel step timed right
after a 512 MiB `torch.sum` took 1.6x as long as the same step after a 20 ms pause.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_SETTLE_STEP_S = 0.002
_SETTLE_MAX_S = 0.05


def settle(max_s: float = _SETTLE_MAX_S) -> float:
    """Sleep until no thread of this process burns CPU (at most `max_s` seconds); returns seconds waited.

    Polls the process CPU time every 2 ms and returns once a poll interval used under a quarter of
    the interval: the spinning OpenMP workers of the previous torch call have gone to sleep.
    """
    t0 = time.perf_counter()
    c0 = time.process_time()
    while time.perf_counter() - t0 < max_s:
        time.sleep(_SETTLE_STEP_S)
        c1 = time.process_time()
        if c1 - c0 < _SETTLE_STEP_S / 4:
            break
        c0 = c1
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Bandwidth:
    """Read bandwidth in GB/s (1e9 bytes per second) over `reps` passes of `nbytes`."""

    median_gbs: float
    best_gbs: float
    nbytes: int
    reps: int
    threads: int


def _timed_passes(read: Callable[[], object], reps: int) -> list[float]:
    """Seconds of `reps` calls of `read`, after one warm-up call, each on a settled process."""
    read()
    times = []
    for _ in range(reps):
        settle()
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    return times


def _check(nbytes: int, reps: int) -> None:
    if nbytes < 4 * 2**20:
        raise ValueError(f"read_bandwidth: nbytes: {nbytes} must be >= 4 MiB to exceed the caches")
    if reps < 1:
        raise ValueError(f"read_bandwidth: reps: {reps} must be >= 1")


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 7, threads: int | None = None) -> Bandwidth:
    """Median and best GB/s of `torch.sum` over a float32 buffer of `nbytes` (touched before timing).

    Args:
        nbytes: buffer size in bytes; keep it >= 10x the last-level cache (512 MiB default).
        reps: timed passes (after one warm-up pass), each on a settled process.
        threads: torch intra-op threads for the measurement (None = the current setting).
    """
    _check(nbytes, reps)
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: no page faults while timed
        times = _timed_passes(buf.sum, reps)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    nb = buf.numel() * 4
    return Bandwidth(nb / statistics.median(times) / 1e9, nb / min(times) / 1e9, nb, reps, used)


def native_reader(nbytes: int, threads: int) -> tuple[Callable[[], object], int] | None:
    """(one read pass of a fresh `nbytes` numpy buffer on the native kernel's pool, bytes read), or
    None without the native kernel. The buffer is allocated like the KV pools (numpy) and written
    once; the pass uses the kernel's threads and pinning (`tkg.kernel.backends.cpu.read_probe`)."""
    from tkg.kernel.backends import cpu

    if not cpu.native_variants():
        return None
    buf = np.ones(nbytes // 128 * 32, dtype=np.float32)
    return (lambda: cpu.read_probe(buf, threads=threads)), buf.nbytes


def native_read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 7, threads: int = 2) -> Bandwidth | None:
    """Median and best GB/s of the native kernel's pool reading a numpy buffer (None: not built)."""
    _check(nbytes, reps)
    reader = native_reader(nbytes, threads)
    if reader is None:
        return None
    read, nb = reader
    times = _timed_passes(read, reps)
    return Bandwidth(nb / statistics.median(times) / 1e9, nb / min(times) / 1e9, nb, reps, threads)
