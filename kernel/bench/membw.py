"""Read bandwidth of this machine, measured in the same process as the kernel it is compared to.

Decode attention is memory bound, so a kernel's speed is reported as effective bandwidth (compulsory
KV bytes / time) over the machine's read bandwidth measured in the same run (design/performance.md).
The measure is a torch sum over a float32 buffer far larger than the last-level cache, using the same
thread count as the kernels (both cores by default): the bytes are read once, nothing is written.

Every timed pass starts on a quiet process (`settle`): torch's OpenMP workers keep spinning for
about 10 ms after each parallel region, and whatever runs in that time (the next probe pass, or the
kernel timed right after a torch peer) loses a core to them. Measured here: a kernel step timed right
after a 512 MiB `torch.sum` took 1.6x as long as the same step after a 20 ms pause.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

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


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 7, threads: int | None = None) -> Bandwidth:
    """Median and best GB/s of `torch.sum` over a float32 buffer of `nbytes` (touched before timing).

    Each pass starts on a settled process (`settle`), as every peer of `tkg bench kernel` does.

    Args:
        nbytes: buffer size in bytes; keep it >= 10x the last-level cache (512 MiB default).
        reps: timed passes (after one warm-up pass).
        threads: torch intra-op threads for the measurement (None = the current setting).
    """
    if nbytes < 4 * 2**20:
        raise ValueError(f"read_bandwidth: nbytes: {nbytes} must be >= 4 MiB to exceed the caches")
    if reps < 1:
        raise ValueError(f"read_bandwidth: reps: {reps} must be >= 1")
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: no page faults while timed
        buf.sum()  # warm-up pass
        times = []
        for _ in range(reps):
            settle()
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    nb = buf.numel() * 4
    return Bandwidth(nb / statistics.median(times) / 1e9, nb / min(times) / 1e9, nb, reps, used)
