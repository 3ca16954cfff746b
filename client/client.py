"""`Client`: the synchronous thin client (numpy in, numpy out), over one or several replicas.

With several targets (or a `dns:///` name resolving to a StatefulSet's pods) each sequence is
routed to one replica by rendezvous hashing of its id (`tkg.client.routing`); a batched `decode`
is split per replica, sent concurrently and merged in the caller's order. A sequence moved by a
replica's drain (`tkg serve --peers`) is followed: NOT_FOUND or UNAVAILABLE at its replica makes the
client look for it on the others once and, found, use that replica for it from then on
(`tkg.client.routing.Router`).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from tkg.client import routing
from tkg.client.errors import NotFound, PartialDecodeError, TkgError, Unavailable, from_rpc_error
from tkg.client.instances import FOLLOW_METHODS, SEQUENCE_METHODS, Instances, sequence_ids_of
from tkg.client.messages import (
    DEFAULT_MAX_MESSAGE,
    DecodeInput,
    DecodeResult,
    append_chunks,
    auth_metadata,
    decode_request,
    decode_result,
    merge_rows,
    open_channels,
)
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc


class Client:
    """Synchronous client. Every method raises a `TkgError` subclass on failure.

    Args:
        target: "host:port", a list of them (one per replica), or "dns:///name:port".
        timeout: default deadline per call, seconds (None = none).
        token: bearer token sent as `authorization: Bearer <token>`.
        tls: use TLS; `root_certificates` (PEM bytes) overrides the system roots.
        certificate_chain, private_key: PEM client certificate and key, for servers started with
            `--tls-client-ca` (mTLS; implies TLS).
        metadata: extra metadata on every call.
        max_message_bytes: send/receive limit (large tensors need more than gRPC's 4 MiB default).
    """

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
            self.targets, aio=False, tls=tls, root_certificates=root_certificates,
            certificate_chain=certificate_chain, private_key=private_key,
            max_message_bytes=max_message_bytes,
        )  # fmt: skip
        self._stubs = [pb_grpc.DecodeAttentionStub(c) for c in self._channels]
        self._pool: ThreadPoolExecutor | None = None
        self._instances = Instances()
        self._router = routing.Router(self.targets)

    # ---- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        for c in self._channels:
            c.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replica(self, seq_id: str) -> int:
        return self._router.home(seq_id)

    def _call(
        self,
        replica: int,
        method: str,
        request: object,
        timeout: float | None = None,
        seq_ids: list[str] | None = None,
        follow: bool = True,
    ) -> object:
        """One RPC; a NOT_FOUND about a sequence becomes `ServerRestarted` when the replica's
        instance id changed (see `tkg.client.instances`). With `follow`, NOT_FOUND or UNAVAILABLE
        about sequences that are all found on one other replica repeats the call there (a
        request iterator must then be a list, so it can be sent again)."""
        try:
            fn = getattr(self._stubs[replica], method)
            body = iter(request) if isinstance(request, list) else request  # a list: a request stream kept to resend
            resp = fn(body, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc, self.targets[replica] if len(self.targets) > 1 else None)
            ids = seq_ids if seq_ids is not None else sequence_ids_of(request)
            if method in SEQUENCE_METHODS and isinstance(err, NotFound):
                err = self._instances.verdict(err, replica, ids, self._current_instance(replica))
            if follow and method in FOLLOW_METHODS and isinstance(err, NotFound | Unavailable):
                where = self._locate(ids, replica)
                if where is not None and len(where) == 1:
                    return self._call(where.pop(), method, request, timeout, seq_ids, follow=False)
            raise err from None
        if isinstance(resp, pb.SequenceInfo):
            self._instances.note(replica, resp.instance_id, resp.sequence_id)
        return resp

    def _locate(self, seq_ids: list[str], failed: int) -> set[int] | None:
        """Look for `seq_ids` on the replicas other than `failed` and remember where each is
        (`routing.locate`); the replicas holding them, or None when one was found nowhere (error
        paths only: up to one GetSequence per other replica and sequence)."""
        if len(self.targets) < 2 or not seq_ids:
            return None
        return routing.run_search(routing.locate(self._router, seq_ids, failed, self._found), self._lookup)

    def _found(self, replica: int, seq_id: str, info: pb.SequenceInfo) -> None:
        self._instances.note(replica, info.instance_id, seq_id)

    def _lookup(self, replica: int, seq_id: str) -> pb.SequenceInfo | None:
        try:
            req = pb.GetSequenceRequest(sequence_id=seq_id)
            return self._stubs[replica].GetSequence(req, timeout=min(self.timeout or 5.0, 5.0), metadata=self._metadata)
        except grpc.RpcError:
            return None

    def _current_instance(self, replica: int) -> str | None:
        try:
            info = self._stubs[replica].GetServerInfo(
                pb.GetServerInfoRequest(), timeout=min(self.timeout or 5.0, 5.0), metadata=self._metadata
            )
        except grpc.RpcError:
            return None
        return info.instance_id or None

    # ---- RPCs ------------------------------------------------------------------------------

    def server_info(self, replica: int = 0, timeout: float | None = None) -> pb.ServerInfo:
        info = self._call(replica, "GetServerInfo", pb.GetServerInfoRequest(), timeout)
        self._instances.note(replica, info.instance_id)
        return info

    def instance_id(self, replica: int = 0, timeout: float | None = None) -> str:
        """The replica's `ServerInfo.instance_id` (random per server process start)."""
        return self.server_info(replica, timeout).instance_id

    def create_sequence(self, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        """Create a sequence; with several replicas the id is chosen here so it can be routed."""
        if sequence_id is None and len(self.targets) > 1:
            sequence_id = uuid.uuid4().hex
        req = pb.CreateSequenceRequest(sequence_id=sequence_id or "")
        return self._call(self._replica(sequence_id or ""), "CreateSequence", req, timeout)

    def get_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        req = pb.GetSequenceRequest(sequence_id=sequence_id)
        return self._call(self._replica(sequence_id), "GetSequence", req, timeout)

    def truncate(self, sequence_id: str, length: int, timeout: float | None = None) -> pb.SequenceInfo:
        req = pb.TruncateSequenceRequest(sequence_id=sequence_id, length=length)
        return self._call(self._replica(sequence_id), "TruncateSequence", req, timeout)

    def fork(self, source_id: str, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        """Fork `source_id`; with several replicas the child lives with its source (the id is
        chosen so that it routes there)."""
        if len(self.targets) > 1:
            home = self._replica(source_id)
            if sequence_id is None:
                while self._replica(sequence_id := uuid.uuid4().hex) != home:
                    pass
            elif self._replica(sequence_id) != home:
                raise ValueError(
                    f"sequence_id: {sequence_id!r} routes to {self.targets[self._replica(sequence_id)]}, not to the "
                    f"source's replica {self.targets[home]}; expected None (the client picks a routable id)"
                )
        req = pb.ForkSequenceRequest(source_id=source_id, sequence_id=sequence_id or "")
        info = self._call(self._replica(source_id), "ForkSequence", req, timeout, seq_ids=[source_id])
        self._router.moved(info.sequence_id, self._replica(source_id))  # the child lives with its source
        return info

    def release(self, sequence_id: str, timeout: float | None = None) -> int:
        """Release a sequence; returns the number of blocks freed."""
        req = pb.ReleaseSequenceRequest(sequence_id=sequence_id)
        freed = self._call(self._replica(sequence_id), "ReleaseSequence", req, timeout).freed_blocks
        self._instances.forget(sequence_id)
        self._router.forget(sequence_id)
        return freed

    def export_sequence(self, sequence_id: str, timeout: float | None = None) -> list[pb.SequenceChunk]:
        """The sequence's migration stream (header, then K/V of every layer); feed it to
        `import_sequence` (of this or another client) to copy the sequence."""
        replica = self._replica(sequence_id)
        req = pb.ExportSequenceRequest(sequence_id=sequence_id)
        try:
            call = self._stubs[replica].ExportSequence(req, timeout=timeout or self.timeout, metadata=self._metadata)
            return list(call)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc, self.targets[replica] if len(self.targets) > 1 else None)
            if isinstance(err, NotFound):
                err = self._instances.verdict(err, replica, [sequence_id], self._current_instance(replica))
            if isinstance(err, NotFound | Unavailable) and self._locate([sequence_id], replica):
                return self.export_sequence(sequence_id, timeout)  # found elsewhere: the router now says where
            raise err from None

    def import_sequence(
        self, messages: Iterable[pb.SequenceChunk], replica: int | None = None, timeout: float | None = None
    ) -> pb.SequenceInfo:
        """Create a sequence from an `export_sequence` stream, all-or-nothing; by default on the
        replica its id routes to."""
        it = iter(messages)
        first = next(it, None)
        if first is None:
            raise ValueError("messages: empty; expected the stream export_sequence returns")
        if replica is None:
            replica = self._replica(first.sequence_id)
        return self._call(replica, "ImportSequence", itertools.chain([first], it), timeout, seq_ids=[first.sequence_id])

    def append_kv(
        self,
        sequence_id: str,
        layer: int,
        k: np.ndarray,
        v: np.ndarray,
        position: int | None = None,
        chunk_tokens: int = 512,
        timeout: float | None = None,
    ) -> pb.SequenceInfo:
        """Bulk-load prompt K/V `[T, num_kv_heads, head_dim]` at `position` (default: the current
        length at `layer`), streamed in chunks of `chunk_tokens`."""
        if position is None:
            position = self.get_sequence(sequence_id, timeout).lengths[layer]
        chunks = list(append_chunks(sequence_id, layer, position, k, v, chunk_tokens))  # a list: sent again if moved
        return self._call(self._replica(sequence_id), "AppendKV", chunks, timeout, seq_ids=[sequence_id])

    def decode(
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
        """One decode step of one layer: q `[B, Hq, S, d]`, k/v `[B, Hkv, S, d]` -> out `[B, Hq, S, d]`."""
        d = DecodeInput(layer, list(sequence_ids), list(positions), q, k, v, request_id)
        groups = self._router.group(d.sequence_ids)
        if len(groups) == 1:
            (replica, _), = groups.items()
            try:
                return decode_result(self._call(replica, "Decode", decode_request(d), timeout))
            except (NotFound, Unavailable):
                groups = self._router.group(d.sequence_ids)
                if len(groups) == 1 or not moved_away(self._router, d.sequence_ids, replica):
                    raise  # not found elsewhere, or `_call` already followed them to one replica
                # found on several replicas: split there
        return self._decode_split(d, groups, timeout)

    def _decode_split(self, d: DecodeInput, groups: dict[int, list[int]], timeout: float | None) -> DecodeResult:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(32, len(self.targets)), thread_name_prefix="tkg-client")
        futures = {r: self._pool.submit(self._call, r, "Decode", decode_request(_subset(d, pos)), timeout)
                   for r, pos in groups.items()}  # fmt: skip
        outcomes = {}
        for r, fut in futures.items():
            try:
                outcomes[r] = decode_result(fut.result())
            except TkgError as exc:
                outcomes[r] = exc
        return merge_split(d, groups, outcomes)

    def decode_stream(self, requests: Iterable[DecodeInput], timeout: float | None = None) -> Iterator[DecodeResult]:
        """Pipelined decode on one stream (single replica, or all sequences on one replica).
        A failing message yields a result with `error` set; the stream goes on."""
        replica = 0
        if len(self.targets) > 1:
            requests = list(requests)
            homes = {self._replica(s) for d in requests for s in d.sequence_ids}
            if len(homes) > 1:
                raise ValueError("decode_stream: sequences live on several replicas; expected one stream per replica")
            replica = homes.pop() if homes else 0
        try:
            stream = self._stubs[replica].DecodeStream(
                (decode_request(d) for d in requests), timeout=timeout or self.timeout, metadata=self._metadata
            )
            for resp in stream:
                yield decode_result(resp)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def moved_away(router: routing.Router, seq_ids: Sequence[str], replica: int) -> bool:
    """Every one of `seq_ids` is now known to be on a replica other than `replica`."""
    return all(router.home(s) != replica for s in seq_ids)


def _subset(d: DecodeInput, positions: list[int]) -> DecodeInput:
    idx = np.asarray(positions)
    return DecodeInput(
        d.layer, [d.sequence_ids[i] for i in positions], [d.positions[i] for i in positions],
        d.q[idx], d.k[idx], d.v[idx], d.request_id,
    )  # fmt: skip


def merge_split(
    d: DecodeInput, groups: dict[int, list[int]], outcomes: dict[int, DecodeResult | TkgError]
) -> DecodeResult:
    """One result from the per-replica outcomes of a split decode; raises `PartialDecodeError`
    (with the rows that succeeded and each failed sequence's error) when any replica failed."""
    parts, errors, timing = [], {}, None
    for r, res in outcomes.items():
        if isinstance(res, TkgError):
            errors.update({d.sequence_ids[i]: res for i in groups[r]})
            continue
        parts.append((groups[r], res.out))
        if timing is None or res.timing.total_us > timing.total_us:
            timing = res.timing  # the slowest replica sets the step's time
    out = merge_rows(parts, len(d.sequence_ids)) if parts else None
    if not errors:
        return DecodeResult(d.request_id, d.layer, out, timing)
    ok = np.zeros(len(d.sequence_ids), dtype=bool)
    for positions, _ in parts:
        ok[positions] = True
    if out is not None:
        out[~ok] = np.nan  # rows of failed sequences hold no answer
    raise PartialDecodeError(DecodeResult(d.request_id, d.layer, out, timing, ok=ok), errors)
