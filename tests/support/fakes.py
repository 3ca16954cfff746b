"""Stand-ins the tests hand to production code instead of the real thing."""

from __future__ import annotations

from typing import Any


class FakeClock:
    """A monotonic clock that moves only when a test sets `t` (idle expiry without waiting)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sent(request: Any) -> Any:
    """A client call's request as a message: a Decode request travels as wire bytes
    (`tkg.protowire`), every other request as its message."""
    from tkg.v1 import decode_attention_pb2 as pb

    return pb.DecodeRequest.FromString(request) if isinstance(request, bytes) else request


def replied(answer: Any) -> Any:
    """A Decode or DecodeStream answer of the service as a message: a success travels as its wire
    bytes (`tkg.protowire`), an error answer as its message."""
    from tkg.v1 import decode_attention_pb2 as pb

    return pb.DecodeResponse.FromString(answer) if isinstance(answer, bytes) else answer
