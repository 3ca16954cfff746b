"""Service errors: each carries the gRPC status code the contract (docs/operations.md, "Status codes") assigns.

Raised anywhere below the RPC layer (validation, KV cache, batcher, the auth guard); the RPC layer
turns them into `context.abort(code, message)` or, in DecodeStream, a per-message `Error`. Messages
name the offending field and the expected value. Each class is named after its code
(`INVALID_ARGUMENT` -> `InvalidArgument`) and arrives at the client as the same-named class of
`tkg.client.errors` (`tkg.status` holds the mapping; tests/test_status.py checks both sides).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with a gRPC status code and a message for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Denied(ServiceError):
    """The auth guard's refusals (`tkg.server.auth`): an unknown caller or a call it may not make."""


class Unauthenticated(Denied):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(Denied):
    code = grpc.StatusCode.PERMISSION_DENIED


def pool_full(needed: int, what: str = "") -> ResourceExhausted:
    """The shared KV block pool cannot hold `needed` more blocks now (`what`: how they split).

    The message never says how many blocks are free: with several tenants that count is the other
    tenants' usage (docs/security.md), and the refusal already tells the caller that fewer than
    `needed` are. What a tenant may know of the pool is GetServerInfo.free_blocks."""
    return ResourceExhausted(
        f"KV cache: {needed} more blocks needed{what}, more than the shared pool has free now; "
        "expected a retry once sequences are released"
    )
