"""`DeviceWorker`, the one thread of a device store: order, not waiting on posts, failures kept.

Interleavings are forced with events (a job that blocks until the test lets it go), never sleeps.
"""

from __future__ import annotations

import threading

import pytest

from tkg.kernel.backends.device_worker import DeviceFailed, DeviceWorker


def _gate(worker: DeviceWorker) -> tuple[threading.Event, threading.Event]:
    """Post a job that holds the worker until `release` is set; `entered` once it runs."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        assert release.wait(10)

    worker.post(hold)
    assert entered.wait(10)
    return entered, release


def test_jobs_run_in_submission_order_on_one_thread_and_posts_do_not_wait() -> None:
    worker = DeviceWorker("t")
    ran: list[tuple[str, str]] = []
    _, release = _gate(worker)  # a "kernel" is running
    for name in ("w1", "w2"):  # the event loop posts writes meanwhile: post returns at once
        worker.post(lambda name=name: ran.append((name, threading.current_thread().name)))
    assert ran == []
    result: list[str] = []
    caller = threading.Thread(target=lambda: result.append(worker.call(lambda: "decoded")))
    caller.start()  # a decode from another thread queues behind the writes
    release.set()
    caller.join(10)
    assert result == ["decoded"]
    assert [n for n, _ in ran] == ["w1", "w2"] and {t for _, t in ran} == {"tkg-device-t"}
    assert worker.call(lambda: worker.call(lambda: 7)) == 7  # a job calling back runs inline, no deadlock
    worker.close()


def test_a_failed_posted_job_fails_everything_after_it() -> None:
    worker = DeviceWorker("t")
    _, release = _gate(worker)

    def broken() -> None:
        raise RuntimeError("index out of range on the device")

    worker.post(broken)
    queued_after: list[int] = []
    worker.post(lambda: queued_after.append(1))  # queued behind the failure: must not run
    release.set()
    with pytest.raises(DeviceFailed, match=r"an earlier device job failed.*index out of range on the device"):
        worker.drain()
    assert queued_after == []
    with pytest.raises(DeviceFailed, match="index out of range"):
        worker.post(lambda: None)
    worker.close()


def test_a_failed_call_raises_to_its_caller_only() -> None:
    worker = DeviceWorker("t")
    with pytest.raises(ValueError, match="bad launch"):
        worker.call(lambda: (_ for _ in ()).throw(ValueError("bad launch")))
    assert worker.call(lambda: 3) == 3  # a launch that failed changed no pool: the store goes on
    worker.close()
