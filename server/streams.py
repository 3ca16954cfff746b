"""DecodeStream: pipelined decode over one bidirectional stream.

Every message is validated and queued as it arrives (`DecodeAttentionService.decode_work`, the
path a unary Decode takes); replies come back in request order; a failing message gets an `error`
response and the stream goes on. At most STREAM_WINDOW messages are read ahead of the reply being
sent: a caller that does not read its replies stops the server reading its requests (gRPC flow
control then holds the sender), so an unread stream holds at most that many requests. When the
stream ends, work still queued for it is cancelled.

Threading: the event loop only, like the service (one reader task per stream, plus a task per
message that has to wait for a batch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from tkg import status
from tkg.server import identity
from tkg.server.batcher import DecodeWork
from tkg.server.errors import ServiceError, Unavailable
from tkg.server.sequences import MAX_SEQUENCE_ID_LEN
from tkg.server.tenants import scrub
from tkg.v1 import decode_attention_pb2 as pb

if TYPE_CHECKING:
    from tkg.server.service import DecodeAttentionService

log = logging.getLogger("tkg.server")

# DecodeStream messages read ahead of the one being answered: past it the stream is not read
# (gRPC flow control then holds the sender), so an unread stream holds at most this many requests.
STREAM_WINDOW = 8
LOG_ID_CHARS = 64  # request ids are cut to this in logs


class DecodeStreams:
    """The DecodeStream calls of one service (see the module docstring)."""

    def __init__(self, service: DecodeAttentionService) -> None:
        self.service = service

    async def serve(
        self, request_iterator: AsyncIterator[pb.DecodeRequest], context: Any
    ) -> AsyncIterator[bytes | pb.DecodeResponse]:
        """Pipelined decode: every message is validated and queued as it arrives; responses come
        back in request order; a failing message gets an `error` response and the stream goes on.

        At most STREAM_WINDOW messages are read ahead of the reply being sent: a caller that does
        not read its replies stops the server reading its requests (gRPC flow control then holds
        the sender). When the stream ends, work still queued for it is cancelled."""
        svc = self.service
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = identity.current().tenant
        try:
            svc.check_access("DecodeStream")
            svc.ledger.open_stream(tenant)
        except ServiceError as exc:
            svc.metrics.observe_request("DecodeStream", exc.code.name, time.perf_counter() - t0, tenant.name)
            await context.abort(exc.code, exc.message)
        svc.enter()
        # What was read but not yet answered, in request order, then the end marker: a task per
        # message still queued or running, or its response when it was answered as it was read.
        # An answer is its wire bytes (`protowire`), an error answer its message.
        results: asyncio.Queue[asyncio.Task | bytes | pb.DecodeResponse | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    t0, work = self.begin(req)
                    if type(work) is not DecodeWork:  # invalid: answered now, no task
                        await results.put(work)
                    elif results.empty() and svc.batcher.runs_alone():
                        # Nothing else in flight and a lone caller: its launch runs on the loop
                        # whether in a task or here (`Batcher.decode`, `LoneCaller.inline`); here it
                        # costs no task and no extra loop pass per message.
                        await results.put(await self.one(req, t0, work))
                    else:
                        task = asyncio.ensure_future(self.one(req, t0, work))
                        try:
                            await results.put(task)  # waits while the window is full: no more reading
                        except asyncio.CancelledError:
                            task.cancel()
                            raise
            except asyncio.CancelledError:
                raise
            except Exception:  # the caller's half of the stream broke: answer what was read
                log.debug("DecodeStream: reading the requests failed", exc_info=True)
            await results.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await results.get()) is not None:
                yield await item if isinstance(item, asyncio.Future) else item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            reader.cancel()
            while not results.empty():  # the stream ended with work still queued: drop it
                item = results.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()
            svc.ledger.close_stream(tenant)
            svc.leave()
            svc.metrics.observe_request("DecodeStream", code.name, time.perf_counter() - t0, tenant.name)

    def begin(self, req: pb.DecodeRequest) -> tuple[float, DecodeWork | pb.DecodeResponse]:
        """(arrival time, the validated work) of a stream message, or its error response."""
        svc = self.service
        t0 = time.perf_counter()
        try:
            if svc.draining:
                raise Unavailable("server: draining for shutdown; expected a retry on another replica")
            return t0, svc.wire.decode(req, identity.current().tenant)
        except Exception as exc:
            return t0, self.failed(req, t0, exc)

    async def one(self, req: pb.DecodeRequest, t0: float, work: DecodeWork) -> bytes | pb.DecodeResponse:
        svc = self.service
        try:
            resp = await svc.decode_work(req, work, wire=True)
        except Exception as exc:
            return self.failed(req, t0, exc)
        svc.metrics.observe_request("DecodeStream.message", "OK", time.perf_counter() - t0, work.tenant.name)
        return resp

    def failed(self, req: pb.DecodeRequest, t0: float, exc: Exception) -> pb.DecodeResponse:
        """The error response of a failed stream message (the stream goes on), counted by code."""
        svc = self.service
        if isinstance(exc, ServiceError):
            code = exc.code
            resp = _error_response(req, code, scrub(exc, identity.current().tenant).message)
        else:  # a server bug fails this message, not the stream
            log.error("DecodeStream message %r failed", req.request_id[:LOG_ID_CHARS], exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            resp = _error_response(req, code, f"server: {type(exc).__name__}: {exc}")
        svc.metrics.observe_request(
            "DecodeStream.message", code.name, time.perf_counter() - t0, identity.current().tenant.name
        )
        return resp


def _error_response(req: pb.DecodeRequest, code: grpc.StatusCode, message: str) -> pb.DecodeResponse:
    error = pb.Error(code=status.number(code), message=message)
    request_id = req.request_id if len(req.request_id) <= MAX_SEQUENCE_ID_LEN else req.request_id[:MAX_SEQUENCE_ID_LEN]
    return pb.DecodeResponse(request_id=request_id, layer=req.layer, error=error)
