"""`AsyncClient`: the grpc.aio twin of `Client` (same methods, awaitable; same routing, and it
follows sequences moved by a drain the same way: both run `tkg.client.core.Core`, this class only
makes the calls it asks for, awaited)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from tkg.client.core import (
    STREAM_RESPONSE_METHODS,
    Ask,
    AskInstance,
    Call,
    Decision,
    Pause,
    StreamPlan,
    probe_timeout,
)
from tkg.client.errors import TkgError
from tkg.client.messages import (
    DecodeInput,
    DecodeResult,
)
from tkg.client.shell import Shell
from tkg.v1 import decode_attention_pb2 as pb

T = TypeVar("T")


class AsyncClient(Shell):
    """Asynchronous client; create inside a running event loop. Arguments as `Client`."""

    AIO = True

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, call: Call, timeout: float | None = None, follow: bool = True) -> Any:
        """As `Client._call`: make `call`, or on failure what `Core.failed` decides."""
        try:
            fn = getattr(self._stubs[call.replica], call.method)
            body = iter(call.request) if isinstance(call.request, list) else call.request  # a list: kept to resend
            rpc = fn(body, timeout=timeout or self.timeout, metadata=self._metadata)
            resp = [m async for m in rpc] if call.method in STREAM_RESPONSE_METHODS else await rpc
        except grpc.RpcError as exc:
            err = self._core.error(exc, call.replica)
            verdict = await self._drive(self._core.failed(call, err, follow))
            if isinstance(verdict, Call):
                return await self._call(verdict, timeout, follow=False)
            raise verdict from None
        self._core.answered(call, resp)
        return resp

    async def _run(self, plan: Generator[dict[int, Call], dict[int, Any], T], timeout: float | None) -> T:
        """As `Client._run`: make each batch a core plan yields, awaited."""
        try:
            batch = next(plan)
            while True:
                batch = plan.send(await self._decode_batch(batch, timeout))
        except StopIteration as done:
            return done.value

    async def _drive(self, decision: Decision[T]) -> T:
        """`core.drive` with awaited answers."""
        try:
            ask = next(decision)
            while True:
                ask = decision.send(await self._answer(ask))
        except StopIteration as done:
            return done.value

    async def _answer(self, ask: Ask) -> Any:
        """As `Client._answer`, awaited."""
        if isinstance(ask, Pause):  # a drain may still be pushing what a stream follows
            await asyncio.sleep(ask.seconds)
            return None
        stub = self._stubs[ask.replica]
        opts = {"timeout": probe_timeout(self.timeout), "metadata": self._metadata}
        try:
            if isinstance(ask, AskInstance):
                return (await stub.GetServerInfo(pb.GetServerInfoRequest(), **opts)).instance_id or None
            return await stub.GetSequence(pb.GetSequenceRequest(sequence_id=ask.sequence_id), **opts)
        except grpc.RpcError:
            return None

    async def server_info(self, replica: int = 0, timeout: float | None = None) -> pb.ServerInfo:
        return await self._call(self._core.server_info(replica), timeout)

    async def instance_id(self, replica: int = 0, timeout: float | None = None) -> str:
        """The replica's `ServerInfo.instance_id` (random per server process start)."""
        return (await self.server_info(replica, timeout)).instance_id

    async def create_sequence(self, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        if self._segments is not None:
            return await self._run(self._segments.create(sequence_id or uuid.uuid4().hex), timeout)
        return await self._call(self._core.create(sequence_id), timeout)

    async def get_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        if self._segments is not None:
            return await self._run(self._segments.info(sequence_id), timeout)
        return await self._call(self._core.get(sequence_id), timeout)

    async def prefetch_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        """As `Client.prefetch_sequence`: the sequence's `SequenceInfo` once it is on the device."""
        if self._segments is not None:
            return await self._run(self._segments.prefetch(sequence_id), timeout)
        return await self._call(self._core.prefetch(sequence_id), timeout)

    async def truncate(self, sequence_id: str, length: int, timeout: float | None = None) -> pb.SequenceInfo:
        if self._segments is not None:
            return await self._run(self._segments.truncate(sequence_id, length), timeout)
        return await self._call(self._core.truncate(sequence_id, length), timeout)

    async def fork(
        self, source_id: str, sequence_id: str | None = None, timeout: float | None = None
    ) -> pb.SequenceInfo:
        """As `Client.fork` (a given id routing away from the source's replica raises ValueError)."""
        if self._segments is not None:
            raise self._segments.fork(source_id)
        return await self._call(self._core.fork(source_id, sequence_id), timeout)

    async def release(self, sequence_id: str, timeout: float | None = None) -> int:
        if self._segments is not None:
            return await self._run(self._segments.release(sequence_id), timeout)
        return (await self._call(self._core.release(sequence_id), timeout)).freed_blocks

    async def export_sequence(self, sequence_id: str, timeout: float | None = None) -> list[pb.SequenceChunk]:
        """As `Client.export_sequence`: the sequence's migration stream, for `import_sequence`."""
        if self._segments is not None:
            return await self._run(self._segments.export(sequence_id), timeout)
        return await self._call(self._core.export(sequence_id), timeout)

    async def import_sequence(
        self,
        messages: Iterable[pb.SequenceChunk] | AsyncIterable[pb.SequenceChunk],
        replica: int | None = None,
        timeout: float | None = None,
    ) -> pb.SequenceInfo:
        """As `Client.import_sequence` (also from an async iterable)."""
        if self._segments is not None:
            msgs = [m async for m in messages] if isinstance(messages, AsyncIterable) else list(messages)
            return await self._run(self._segments.import_(msgs), timeout)
        if isinstance(messages, AsyncIterable):
            it = aiter(messages)
            first = await anext(it, None)

            async def stream() -> AsyncIterator[pb.SequenceChunk]:
                yield first
                async for m in it:
                    yield m

            return await self._call(self._core.import_(first, stream(), replica), timeout)
        it = iter(messages)
        first = next(it, None)
        return await self._call(self._core.import_(first, itertools.chain([first], it), replica), timeout)

    async def append_kv(
        self,
        sequence_id: str,
        layer: int,
        k: np.ndarray,
        v: np.ndarray,
        position: int | None = None,
        chunk_tokens: int = 512,
        timeout: float | None = None,
    ) -> pb.SequenceInfo:
        if position is None:
            position = (await self.get_sequence(sequence_id, timeout)).lengths[layer]
        if self._segments is not None:
            return await self._run(self._segments.append(sequence_id, layer, position, k, v, chunk_tokens), timeout)
        return await self._call(self._core.append(sequence_id, layer, position, k, v, chunk_tokens), timeout)

    async def decode(
        self,
        layer: int,
        sequence_ids: Sequence[str],
        positions: Sequence[int],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        request_id: str = "",
        timeout: float | None = None,
    ) -> DecodeResult:
        d = DecodeInput(layer, list(sequence_ids), list(positions), q, k, v, request_id)
        return await self._run(self._core.decode(d) if self._segments is None else self._segments.decode(d), timeout)

    async def _decode_batch(self, batch: dict[int, Call], timeout: float | None) -> dict[int, Any]:
        """Each replica's Decode response or `TkgError`, all at once."""
        replicas = list(batch)
        results = await asyncio.gather(*(self._call(batch[r], timeout) for r in replicas), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, TkgError):
                raise res
        return dict(zip(replicas, results, strict=True))

    async def decode_stream(
        self, requests: Iterable[DecodeInput] | AsyncIterable[DecodeInput], timeout: float | None = None
    ) -> AsyncIterator[DecodeResult]:
        """As `Client.decode_stream`: one stream to the replica holding every request's sequences,
        following them when a drain moves them. With several targets an iterable is read whole
        first; an async iterable is routed by its first request, and one naming sequences held
        elsewhere ends the stream (not sent) with ValueError once the earlier requests are answered.
        With `segment_tokens`, as `Client.decode_stream`: one segmented step after another."""
        if self._segments is not None:
            if isinstance(requests, AsyncIterable):
                async for d in requests:
                    yield await self._run(self._segments.streamed(d), timeout)
            else:
                for d in requests:
                    yield await self._run(self._segments.streamed(d), timeout)
            return
        replica, ahead = 0, []
        source: Any = requests
        if len(self.targets) > 1 and isinstance(requests, AsyncIterable):
            source = aiter(requests)
            first = await anext(source, None)  # routes the stream: later requests cannot be known yet
            replica = self._core.stream_replica([first.sequence_ids] if first is not None else [])
            source = _prepend(first, source) if first is not None else source
        elif len(self.targets) > 1:
            source = list(requests)  # all of them, to find their replica before sending
            replica = self._core.stream_replica(d.sequence_ids for d in source)
            ahead = [s for d in source for s in d.sequence_ids]
        source = aiter(source) if isinstance(source, AsyncIterable) else iter(source)
        plan = StreamPlan(self._core, replica, ahead)
        while True:
            generation, halt = plan.open(), asyncio.Event()
            try:
                call = self._stubs[plan.replica].DecodeStream(
                    _messages(plan, generation, source, halt), timeout=timeout or self.timeout,
                    metadata=self._metadata,
                )  # fmt: skip
                async for resp in call:
                    plan.answered(resp)
                    if plan.stopped:
                        halt.set()  # the request side ends: the old replica may finish its drain
                    for result in plan.ready():
                        yield result
            except grpc.RpcError as exc:
                plan.broke(self._core.error(exc, plan.replica))
            halt.set()
            again = await self._drive(plan.next_stream())
            for result in plan.ready():
                yield result
            if not again:
                if plan.pull is not None:
                    plan.pull.cancel()
                if plan.failure is not None:
                    raise plan.failure from None
                return


async def _prepend(first: DecodeInput, rest: AsyncIterator[DecodeInput]) -> AsyncIterator[DecodeInput]:
    """`first`, then `rest`."""
    yield first
    async for d in rest:
        yield d


async def _messages(
    plan: StreamPlan, generation: int, source: AsyncIterator[DecodeInput] | Iterator[DecodeInput], halt: asyncio.Event
) -> AsyncIterator[bytes]:
    """The request side of the stream of `generation`: messages to resend, then the caller's
    requests. A plain iterable is read in place (never waits). A read of an async `source` still
    waiting when the stream stops (`halt`) is kept in `plan.pull` for the next stream, so no
    request is lost or read twice, and a caller whose next request waits for an answer does not
    keep the old stream open."""
    if not isinstance(source, AsyncIterator):
        while (msg := plan.next_message(generation, lambda: next(source, None))) is not None:
            yield msg
        return
    while plan.sendable(generation):
        msg = plan.resend()
        if msg is None:
            if plan.pull is None:
                plan.pull = asyncio.ensure_future(anext(source, None))
            halted = asyncio.ensure_future(halt.wait())
            try:
                await asyncio.wait({plan.pull, halted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                halted.cancel()
            if not plan.sendable(generation) or not plan.pull.done():
                return  # the read stays in plan.pull for the next stream
            d, plan.pull = plan.pull.result(), None
            if d is None:
                plan.exhausted = True
                return
            msg = plan.admit(d, generation)
            if msg is None:
                return
        yield msg
