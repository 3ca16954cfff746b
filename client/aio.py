"""`AsyncClient`: the grpc.aio twin of `Client` (same methods, awaitable; same routing, and it
follows sequences moved by a drain the same way)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc
import numpy as np

from tkg.client import routing
from tkg.client.client import _subset, merge_split, moved_away
from tkg.client.errors import NotFound, TkgError, Unavailable, from_rpc_error
from tkg.client.instances import FOLLOW_METHODS, SEQUENCE_METHODS, Instances, sequence_ids_of
from tkg.client.messages import (
    DEFAULT_MAX_MESSAGE,
    DecodeInput,
    DecodeResult,
    append_chunks,
    auth_metadata,
    decode_request,
    decode_result,
    open_channels,
)
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc


class AsyncClient:
    """Asynchronous client; create inside a running event loop. Arguments as `Client`."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.targets = routing.resolve_targets(target)
        self.timeout = timeout
        self._metadata = auth_metadata(metadata, token)
        self._channels = open_channels(
            self.targets, aio=True, tls=tls, root_certificates=root_certificates,
            certificate_chain=certificate_chain, private_key=private_key,
            max_message_bytes=max_message_bytes,
        )  # fmt: skip
        self._stubs = [pb_grpc.DecodeAttentionStub(c) for c in self._channels]
        self._instances = Instances()
        self._router = routing.Router(self.targets)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _replica(self, seq_id: str) -> int:
        return self._router.home(seq_id)

    async def _call(
        self,
        replica: int,
        method: str,
        request: object,
        timeout: float | None = None,
        seq_ids: list[str] | None = None,
        follow: bool = True,
    ) -> object:
        """As `Client._call`: NOT_FOUND after a restart becomes `ServerRestarted`; sequences
        found on one other replica are followed there."""
        try:
            fn = getattr(self._stubs[replica], method)
            body = iter(request) if isinstance(request, list) else request  # a list: a request stream kept to resend
            resp = await fn(body, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc, self.targets[replica] if len(self.targets) > 1 else None)
            ids = seq_ids if seq_ids is not None else sequence_ids_of(request)
            if method in SEQUENCE_METHODS and isinstance(err, NotFound):
                err = self._instances.verdict(err, replica, ids, await self._current_instance(replica))
            if follow and method in FOLLOW_METHODS and isinstance(err, NotFound | Unavailable):
                where = await self._locate(ids, replica)
                if where is not None and len(where) == 1:
                    return await self._call(where.pop(), method, request, timeout, seq_ids, follow=False)
            raise err from None
        if isinstance(resp, pb.SequenceInfo):
            self._instances.note(replica, resp.instance_id, resp.sequence_id)
        return resp

    async def _locate(self, seq_ids: list[str], failed: int) -> set[int] | None:
        """As `Client._locate`, driving `routing.locate` with awaited lookups."""
        if len(self.targets) < 2 or not seq_ids:
            return None
        search = routing.locate(self._router, seq_ids, failed, self._found)
        info = None
        try:
            while True:
                replica, sid = search.send(info)
                info = await self._lookup(replica, sid)
        except StopIteration as done:
            return done.value

    def _found(self, replica: int, seq_id: str, info: pb.SequenceInfo) -> None:
        self._instances.note(replica, info.instance_id, seq_id)

    async def _lookup(self, replica: int, seq_id: str) -> pb.SequenceInfo | None:
        try:
            req = pb.GetSequenceRequest(sequence_id=seq_id)
            timeout = min(self.timeout or 5.0, 5.0)
            return await self._stubs[replica].GetSequence(req, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError:
            return None

    async def _current_instance(self, replica: int) -> str | None:
        try:
            info = await self._stubs[replica].GetServerInfo(
                pb.GetServerInfoRequest(), timeout=min(self.timeout or 5.0, 5.0), metadata=self._metadata
            )
        except grpc.RpcError:
            return None
        return info.instance_id or None

    async def server_info(self, replica: int = 0, timeout: float | None = None) -> pb.ServerInfo:
        info = await self._call(replica, "GetServerInfo", pb.GetServerInfoRequest(), timeout)
        self._instances.note(replica, info.instance_id)
        return info

    async def instance_id(self, replica: int = 0, timeout: float | None = None) -> str:
        """The replica's `ServerInfo.instance_id` (random per server process start)."""
        return (await self.server_info(replica, timeout)).instance_id

    async def create_sequence(self, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        if sequence_id is None and len(self.targets) > 1:
            sequence_id = uuid.uuid4().hex
        req = pb.CreateSequenceRequest(sequence_id=sequence_id or "")
        return await self._call(self._replica(sequence_id or ""), "CreateSequence", req, timeout)

    async def get_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        req = pb.GetSequenceRequest(sequence_id=sequence_id)
        return await self._call(self._replica(sequence_id), "GetSequence", req, timeout)

    async def truncate(self, sequence_id: str, length: int, timeout: float | None = None) -> pb.SequenceInfo:
        req = pb.TruncateSequenceRequest(sequence_id=sequence_id, length=length)
        return await self._call(self._replica(sequence_id), "TruncateSequence", req, timeout)

    async def fork(
        self, source_id: str, sequence_id: str | None = None, timeout: float | None = None
    ) -> pb.SequenceInfo:
        if len(self.targets) > 1 and sequence_id is None:
            home = self._replica(source_id)
            while self._replica(sequence_id := uuid.uuid4().hex) != home:
                pass
        req = pb.ForkSequenceRequest(source_id=source_id, sequence_id=sequence_id or "")
        info = await self._call(self._replica(source_id), "ForkSequence", req, timeout, seq_ids=[source_id])
        self._router.moved(info.sequence_id, self._replica(source_id))  # the child lives with its source
        return info

    async def release(self, sequence_id: str, timeout: float | None = None) -> int:
        req = pb.ReleaseSequenceRequest(sequence_id=sequence_id)
        freed = (await self._call(self._replica(sequence_id), "ReleaseSequence", req, timeout)).freed_blocks
        self._instances.forget(sequence_id)
        self._router.forget(sequence_id)
        return freed

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
        chunks = list(append_chunks(sequence_id, layer, position, k, v, chunk_tokens))  # a list: sent again if moved
        return await self._call(self._replica(sequence_id), "AppendKV", chunks, timeout, seq_ids=[sequence_id])

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
        groups = self._router.group(d.sequence_ids)
        if len(groups) == 1:
            (replica, _), = groups.items()
            try:
                return decode_result(await self._call(replica, "Decode", decode_request(d), timeout))
            except (NotFound, Unavailable):
                groups = self._router.group(d.sequence_ids)
                if len(groups) == 1 or not moved_away(self._router, d.sequence_ids, replica):
                    raise  # as `Client.decode`
        replicas = list(groups)
        results = await asyncio.gather(
            *(self._call(r, "Decode", decode_request(_subset(d, groups[r])), timeout) for r in replicas),
            return_exceptions=True,
        )
        outcomes = {}
        for r, res in zip(replicas, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, TkgError):
                raise res
            outcomes[r] = res if isinstance(res, TkgError) else decode_result(res)
        return merge_split(d, groups, outcomes)

    async def decode_stream(
        self, requests: Iterable[DecodeInput] | AsyncIterator[DecodeInput], timeout: float | None = None
    ) -> AsyncIterator[DecodeResult]:
        """Pipelined decode on one stream to the first request's replica (or the only one)."""

        async def messages() -> AsyncIterator[pb.DecodeRequest]:
            if hasattr(requests, "__aiter__"):
                async for d in requests:
                    yield decode_request(d)
            else:
                for d in requests:
                    yield decode_request(d)

        replica = 0
        if len(self.targets) > 1:
            raise ValueError("decode_stream: open one AsyncClient per replica for streams (targets > 1)")
        try:
            call = self._stubs[replica].DecodeStream(
                messages(), timeout=timeout or self.timeout, metadata=self._metadata
            )
            async for resp in call:
                yield decode_result(resp)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
