"""`DeviceWorker`: the one thread every device operation of a `DeviceKVStore` runs on.

Why one thread: with torch-xla's lazy tensors each operation appends to a graph that is shared by
the whole process, and `torch_xla.sync()` cuts and runs everything pending. If the event loop
(writes, copies, reads) and the kernel thread (decodes) both built graphs, a barrier on one would
cut the other's half-built operations into its graph, and the graphs (so the compiled shapes)
would depend on the interleaving. On one thread, in submission order, every job is a whole
operation ending at its own barrier, so the set of graphs is fixed by the buckets alone.

Jobs run in the order they were submitted, from any thread: a write posted on the event loop
before a decode is submitted from the kernel thread runs before that decode. `post` does not wait
(mutations from the event loop must not stall it behind a running kernel); `call` waits for the
result. A posted job that fails leaves the pools in an unknown state: every later `post` or
`call` raises `DeviceFailed` naming the first failure.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class DeviceFailed(RuntimeError):
    """An earlier device job failed; the store's pools can no longer be trusted."""


class DeviceWorker:
    """A daemon thread running jobs in submission order (started at the first job)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any] | None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._failed: BaseException | None = None

    def _ensure_started(self) -> None:
        if self._failed is not None:
            raise DeviceFailed(f"{self.name}: an earlier device job failed: {self._failed!r}") from self._failed
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"tkg-device-{self.name}", daemon=True)
                    self._thread.start()

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, job: Callable[[], Any]) -> None:
        """Queue `job` without waiting; its failure is raised by every later `post`/`call`."""
        self._ensure_started()
        self._jobs.put((job, None))

    def call(self, job: Callable[[], T]) -> T:
        """Run `job` after everything queued before it and return its result (or raise its error)."""
        if self.on_worker():  # a job calling back into the store: already in order
            return job()
        self._ensure_started()
        done: Future[T] = Future()
        self._jobs.put((job, done))
        return done.result()

    def drain(self) -> None:
        """Wait until every job queued so far has run (raises DeviceFailed if one failed)."""
        self.call(lambda: None)
        if self._failed is not None:
            raise DeviceFailed(f"{self.name}: an earlier device job failed: {self._failed!r}") from self._failed

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if self._thread is not None and not self.on_worker():
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            if self._failed is not None:  # the pools are suspect: refuse everything after
                if done is not None:
                    done.set_exception(DeviceFailed(f"{self.name}: an earlier device job failed: {self._failed!r}"))
                continue
            try:
                result = job()
            except BaseException as exc:
                if done is None:
                    self._failed = exc
                else:
                    done.set_exception(exc)
                continue
            if done is not None:
                done.set_result(result)
