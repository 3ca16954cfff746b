"""CPU policy of one server process: how many cores the kernel may use, and the GIL switch interval.

Owns: `available_cores` (the one place that asks the OS), `kernel_threads` (the thread cap of one
launch, inline on the event loop or on the worker thread), `tune_gil` (the process-wide switch
interval) and `CorePolicy`, the per-launch kernel options the step engine passes to the store.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# The GIL switch interval while a service runs (CPython's default: 5 ms). The kernel thread needs
# the GIL to start a launch and to hand its result back; while the loop runs other calls' Python
# it gets it only at the loop's next blocking call or after this interval. With 16 callers
# (`tkg bench serve`) the default left 1.5-2.4 ms between a launch's kernel and its step at batch
# 3.6-4.2, 0.7-0.9 ms at 0.5 ms (batch 4.3-5.4). The native pool's threads never take the GIL.
GIL_SWITCH_S = 5e-4


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask; a cgroup CPU quota is not looked at)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def kernel_threads(cores: int, inline: bool) -> int:
    """Threads the kernel may use for one launch out of `cores`.

    On the event loop (inline) the loop waits for the kernel anyway, so it gets every core. On the
    worker thread the loop goes on receiving, (de)serializing and answering calls during the
    launch; a kernel on every core would preempt it (and be preempted: its fork-join then waits
    for the slowest thread), so it leaves the loop one core. Idle kernel workers sleep (the native
    pool never spins), so an unused core costs nothing."""
    return max(1, cores if inline else cores - 1)


def tune_gil() -> None:
    """Shorten the process's GIL switch interval to GIL_SWITCH_S (a shorter one set elsewhere stays).

    Process-wide on purpose: the interval is a property of the interpreter, not of one service."""
    if sys.getswitchinterval() > GIL_SWITCH_S:
        sys.setswitchinterval(GIL_SWITCH_S)


class CorePolicy:
    """The kernel options of one launch: a thread cap for stores whose kernel takes one.

    Args:
        cores: cores the kernel may use; 0: `available_cores()`.
        takes_threads: the store's kernel accepts `max_threads` (`KVStore.takes_max_threads`).
    """

    def __init__(self, cores: int, takes_threads: bool) -> None:
        self.cores = cores or available_cores()
        self._options = (
            {True: {"max_threads": kernel_threads(self.cores, True)},
             False: {"max_threads": kernel_threads(self.cores, False)}}
            if takes_threads else {True: {}, False: {}}
        )  # fmt: skip

    def options(self, inline: bool) -> dict[str, Any]:
        """Keyword options for `KVStore.decode` of a launch on the loop (`inline`) or the worker thread."""
        return self._options[inline]
