"""Stand-ins the tests hand to production code instead of the real thing."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that moves only when a test sets `t` (idle expiry without waiting)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t
