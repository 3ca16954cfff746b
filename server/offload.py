"""Awaiting work handed to a thread, without letting go of it early.

`run_on(executor, fn)`: `fn()` on one of `executor`'s threads, awaited on the event loop. It
returns or raises only once the thread has let go of `fn`, even when the awaiting caller is
cancelled meanwhile (the CancelledError is raised after): `fn` works on memory the caller
reserved (slots of a plan, a restore's blocks), and the caller's undo must not free that memory
under the thread. The kernel thread (`tkg.server.step`) and the KV tiers' threads
(`tkg.server.tiers`) both hand work over this way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


async def run_on(executor: Executor, fn: Callable[[], T]) -> T:
    """`fn()` on `executor`; see the module docstring."""
    job = asyncio.wrap_future(executor.submit(fn))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({job})
        raise
