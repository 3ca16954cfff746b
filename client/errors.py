"""Typed client errors: one exception class per gRPC status code, carrying the server's message.

`TkgError` is the base (`.code` a `grpc.StatusCode`, `.details` the server's text, `.replica` the
target that answered when the client talks to several). Catch a subclass (`NotFound`,
`FailedPrecondition`, ...) for one situation of docs/operations.md ("Status codes"), or `TkgError` for all of them.
"""

from __future__ import annotations

import grpc

from tkg import status


class TkgError(Exception):
    """A failed call: `code` (grpc.StatusCode), `details` (the server's message), `replica` (target or None)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, replica: str | None = None) -> None:
        self.details = details
        self.replica = replica
        super().__init__(self._text())

    def _text(self) -> str:
        where = f" [replica {self.replica}]" if self.replica else ""
        return f"{self.code.name}{where}: {self.details}"


class Cancelled(TkgError):
    code = grpc.StatusCode.CANCELLED


class Unknown(TkgError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(TkgError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(TkgError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(TkgError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TkgError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TkgError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TkgError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TkgError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(TkgError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(TkgError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(TkgError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(TkgError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(TkgError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(TkgError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(TkgError):
    code = grpc.StatusCode.UNAUTHENTICATED


# Every code but OK (tests/test_status.py checks none is missing).
BY_CODE: dict[grpc.StatusCode, type[TkgError]] = status.by_code((
    Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
    ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
    DataLoss, Unauthenticated,
))  # fmt: skip


def error_for(code: grpc.StatusCode | int, details: str, replica: str | None = None) -> TkgError:
    """The typed exception for a status code (enum or wire number, e.g. from a DecodeStream `Error`)."""
    if isinstance(code, int):
        code = status.from_number(code)
    return BY_CODE.get(code, Unknown)(details, replica)


def from_rpc_error(exc: grpc.RpcError, replica: str | None = None) -> TkgError:
    """Convert a failed gRPC call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", replica)


# What gRPC says when a plaintext channel reaches a TLS port: the server reads a TLS record that is
# not one and closes the connection, and the client sees only "Socket closed" (or a reset).
_CLOSED_ON_HELLO = ("Socket closed", "Connection reset")
PLAINTEXT_HINT = (
    " (the server may expect TLS: a plaintext connection to a TLS port is closed like this; pass "
    "tls=True, with root_certificates=<CA PEM> for a private CA, to Client/AsyncClient, or drop "
    "--insecure from tkg loadtest)"
)


def with_plaintext_hint(err: TkgError) -> TkgError:
    """`err` with PLAINTEXT_HINT added when it is the UNAVAILABLE a plaintext client gets from a TLS
    port (the caller knows it used plaintext); otherwise `err` as it is."""
    if err.code != grpc.StatusCode.UNAVAILABLE or not any(m in err.details for m in _CLOSED_ON_HELLO):
        return err
    return type(err)(err.details + PLAINTEXT_HINT, err.replica)


class ServerRestarted(NotFound):
    """NOT_FOUND from a replica whose `ServerInfo.instance_id` changed since the sequence was
    created there (or since this client last heard from it): the process restarted and every
    sequence it held is gone (re-prefill), as opposed to one sequence expiring or being released.

    `old_instance` / `new_instance`: the instance ids before and now."""

    def __init__(self, details: str, replica: str | None, old_instance: str, new_instance: str) -> None:
        self.old_instance, self.new_instance = old_instance, new_instance
        super().__init__(f"{details} (server restarted: instance {old_instance} is now {new_instance})", replica)


class PartialDecodeError(TkgError):
    """A multi-replica `decode` where some replicas failed and others answered.

    The sequences that succeeded DID advance on their replicas: `result.out[b]` holds their rows
    (`result.ok[b]` True); `errors` maps each failed sequence id to its typed error. `code` is the
    failures' code (UNAVAILABLE when a replica is down), or UNKNOWN when they differ.
    """

    def __init__(self, result: object, errors: dict[str, TkgError]) -> None:
        self.result = result
        self.errors = errors
        codes = {e.code for e in errors.values()}
        self.code = codes.pop() if len(codes) == 1 else grpc.StatusCode.UNKNOWN
        by_replica: dict[str, list[str]] = {}
        for sid, e in errors.items():
            by_replica.setdefault(e.replica or "?", []).append(sid)
        parts = [
            f"replica {r}: sequences {', '.join(ids)}: {errors[ids[0]].details}" for r, ids in by_replica.items()
        ]
        total = len(result.ok) if getattr(result, "ok", None) is not None else len(errors)
        super().__init__(f"{len(errors)} of {total} sequences failed; " + "; ".join(parts))

    @property
    def failed_sequences(self) -> list[str]:
        return list(self.errors)


def from_code(code: grpc.StatusCode | int, details: str, replica: str | None = None) -> TkgError:
    """Alias of `error_for` (the name `messages`/`client` use)."""
    return error_for(code, details, replica)
