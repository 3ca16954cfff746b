"""`Client`: the synchronous thin client (numpy in, numpy out), over one or several replicas.

With several targets (or a `dns:///` name resolving to a StatefulSet's pods) each sequence is
routed to one replica by rendezvous hashing of its id (`tkg.client.routing`); a batched `decode`
is split per replica, sent concurrently and merged in the caller's order. A sequence moved by a
replica's drain (`tkg serve --peers`) is followed: NOT_FOUND or UNAVAILABLE at its replica makes the
client look for it on the others once and, found, use that replica for it from then on.

Every decision (routing, requests, verdicts on errors, splitting and merging) is made by
`tkg.client.core.Core`, shared with `AsyncClient`; this class only makes the calls it asks for.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    drive,
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


class Client(Shell):
    """Synchronous client. Every method raises a `TkgError` subclass on failure.

    Args:
        target: "host:port" or "unix:///path/tkg.sock" (a co-located server's `--listen` socket), a list
            of them (one per replica), or "dns:///name:port".
        timeout: default deadline per call, seconds (None = none).
        token: bearer token sent as `authorization: Bearer <token>`.
        tls: use TLS; `root_certificates` (PEM bytes) overrides the system roots.
        certificate_chain, private_key: PEM client certificate and key, for servers started with
            `--tls-client-ca` (mTLS; implies TLS).
        metadata: extra metadata on every call.
        max_message_bytes: send/receive limit (large tensors need more than gRPC's 4 MiB default).
        segment_tokens: context parallelism: every sequence is split in segments of about this many
            tokens over the replicas (`tkg.client.segments`, docs/context-parallel.md); None: off.
    """

    _pool: ThreadPoolExecutor | None = None  # made at the first split decode

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

    def _call(self, call: Call, timeout: float | None = None, follow: bool = True) -> Any:
        """Make `call`; on failure make what `Core.failed` decides instead (the same call where
        its sequences were found, once), or raise its error. A response stream is returned as a
        list."""
        try:
            fn = getattr(self._stubs[call.replica], call.method)
            body = iter(call.request) if isinstance(call.request, list) else call.request  # a list: kept to resend
            resp = fn(body, timeout=timeout or self.timeout, metadata=self._metadata)
            if call.method in STREAM_RESPONSE_METHODS:
                resp = list(resp)
        except grpc.RpcError as exc:
            verdict = self._drive(self._core.failed(call, self._core.error(exc, call.replica), follow))
            if isinstance(verdict, Call):
                return self._call(verdict, timeout, follow=False)
            raise verdict from None
        self._core.answered(call, resp)
        return resp

    def _run(self, plan: Generator[dict[int, Call], dict[int, Any], T], timeout: float | None) -> T:
        """Run a core plan (`Core.decode`, `tkg.client.segments`): make each batch it yields."""
        try:
            batch = next(plan)
            while True:
                batch = plan.send(self._decode_batch(batch, timeout))
        except StopIteration as done:
            return done.value

    def _drive(self, decision: Decision[T]) -> T:
        return drive(decision, self._answer)

    def _answer(self, ask: Ask) -> Any:
        """A verdict's question, answered with a short blocking RPC (None when it fails)."""
        if isinstance(ask, Pause):  # a drain may still be pushing what a stream follows
            time.sleep(ask.seconds)
            return None
        stub = self._stubs[ask.replica]
        opts = {"timeout": probe_timeout(self.timeout), "metadata": self._metadata}
        try:
            if isinstance(ask, AskInstance):
                return stub.GetServerInfo(pb.GetServerInfoRequest(), **opts).instance_id or None
            return stub.GetSequence(pb.GetSequenceRequest(sequence_id=ask.sequence_id), **opts)
        except grpc.RpcError:
            return None

    # ---- RPCs ------------------------------------------------------------------------------

    def server_info(self, replica: int = 0, timeout: float | None = None) -> pb.ServerInfo:
        return self._call(self._core.server_info(replica), timeout)

    def instance_id(self, replica: int = 0, timeout: float | None = None) -> str:
        """The replica's `ServerInfo.instance_id` (random per server process start)."""
        return self.server_info(replica, timeout).instance_id

    def create_sequence(self, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        """Create a sequence; with several replicas the id is chosen here so it can be routed."""
        if self._segments is not None:
            return self._run(self._segments.create(sequence_id or uuid.uuid4().hex), timeout)
        return self._call(self._core.create(sequence_id), timeout)

    def get_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        if self._segments is not None:
            return self._run(self._segments.info(sequence_id), timeout)
        return self._call(self._core.get(sequence_id), timeout)

    def prefetch_sequence(self, sequence_id: str, timeout: float | None = None) -> pb.SequenceInfo:
        """Bring a spilled sequence (`SequenceInfo.tier` "host" or "disk") back to the device ahead
        of its next step; returns its `SequenceInfo` once it is there (tier "device"). A sequence
        already there answers at once. Followed after a drain like `get_sequence`; with
        `segment_tokens`, every segment at once (the merged info's tier is the coldest segment's)."""
        if self._segments is not None:
            return self._run(self._segments.prefetch(sequence_id), timeout)
        return self._call(self._core.prefetch(sequence_id), timeout)

    def truncate(self, sequence_id: str, length: int, timeout: float | None = None) -> pb.SequenceInfo:
        if self._segments is not None:
            return self._run(self._segments.truncate(sequence_id, length), timeout)
        return self._call(self._core.truncate(sequence_id, length), timeout)

    def fork(self, source_id: str, sequence_id: str | None = None, timeout: float | None = None) -> pb.SequenceInfo:
        """Fork `source_id`; with several replicas the child lives with its source (the id is
        chosen so that it routes there; a given id routing elsewhere raises ValueError). A segmented
        client refuses (FailedPrecondition)."""
        if self._segments is not None:
            raise self._segments.fork(source_id)
        return self._call(self._core.fork(source_id, sequence_id), timeout)

    def release(self, sequence_id: str, timeout: float | None = None) -> int:
        """Release a sequence; returns the number of blocks freed."""
        if self._segments is not None:
            return self._run(self._segments.release(sequence_id), timeout)
        return self._call(self._core.release(sequence_id), timeout).freed_blocks

    def export_sequence(self, sequence_id: str, timeout: float | None = None) -> list[pb.SequenceChunk]:
        """The sequence's migration stream (header, then K/V of every layer); feed it to
        `import_sequence` (of this or another client) to copy the sequence."""
        if self._segments is not None:
            return self._run(self._segments.export(sequence_id), timeout)
        return self._call(self._core.export(sequence_id), timeout)

    def import_sequence(
        self, messages: Iterable[pb.SequenceChunk], replica: int | None = None, timeout: float | None = None
    ) -> pb.SequenceInfo:
        """Create a sequence from an `export_sequence` stream, all-or-nothing; by default on the
        replica its id routes to."""
        if self._segments is not None:
            return self._run(self._segments.import_(list(messages)), timeout)
        it = iter(messages)
        first = next(it, None)
        return self._call(self._core.import_(first, itertools.chain([first], it), replica), timeout)

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
        if self._segments is not None:
            return self._run(self._segments.append(sequence_id, layer, position, k, v, chunk_tokens), timeout)
        return self._call(self._core.append(sequence_id, layer, position, k, v, chunk_tokens), timeout)

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
        return self._run(self._core.decode(d) if self._segments is None else self._segments.decode(d), timeout)

    def _decode_batch(self, batch: dict[int, Call], timeout: float | None) -> dict[int, Any]:
        """Each call's response or `TkgError` (keys: replica indices of `Core.decode`, call numbers
        of `tkg.client.segments`); a lone call inline, several at once."""
        if len(batch) == 1:
            return {r: self._outcome(call, timeout) for r, call in batch.items()}
        if self._pool is None:
            # One per replica, also for segmented steps (up to two calls per replica): 6 threads for 3
            # replicas measured no faster at B = 8, 16 and ~0.7 ms slower at B = 1 (3 calls) than 3.
            self._pool = ThreadPoolExecutor(max_workers=min(32, len(self.targets)), thread_name_prefix="tkg-client")
        futures = {r: self._pool.submit(self._outcome, call, timeout) for r, call in batch.items()}
        return {r: fut.result() for r, fut in futures.items()}

    def _outcome(self, call: Call, timeout: float | None) -> Any:
        try:
            return self._call(call, timeout)
        except TkgError as exc:
            return exc

    def decode_stream(self, requests: Iterable[DecodeInput], timeout: float | None = None) -> Iterator[DecodeResult]:
        """Pipelined decode on one stream to the replica holding every request's sequences
        (ValueError when they live on several). A failing message yields a result with `error`
        set; the stream goes on. Sequences moved by a drain are followed (`core.StreamPlan`): the
        requests not answered yet go, in order, on a stream to their new replica.

        With `segment_tokens` each request is one segmented step (`segments.Segments.streamed`:
        the same calls and merge as `decode`, grouped per replica, followed like `decode`), made
        after the previous one was answered: results equal `decode`'s, in order, a failure naming
        the sequence; no request is in flight ahead of another's answer (a step's latency each),
        and `timeout` bounds each step's calls rather than the whole stream."""
        if self._segments is not None:
            for d in requests:
                yield self._run(self._segments.streamed(d), timeout)
            return
        replica, ahead = 0, []
        if len(self.targets) > 1:
            requests = list(requests)  # all of them, to find their replica before sending
            replica = self._core.stream_replica(d.sequence_ids for d in requests)
            ahead = [s for d in requests for s in d.sequence_ids]
        plan = StreamPlan(self._core, replica, ahead)
        source = iter(requests)

        def messages(generation: int) -> Iterator[bytes]:
            while (msg := plan.next_message(generation, lambda: next(source, None))) is not None:
                yield msg

        while True:
            generation = plan.open()
            try:
                stream = self._stubs[plan.replica].DecodeStream(
                    messages(generation), timeout=timeout or self.timeout, metadata=self._metadata
                )
                for resp in stream:
                    plan.answered(resp)
                    yield from plan.ready()
            except grpc.RpcError as exc:
                plan.broke(self._core.error(exc, plan.replica))
            again = self._drive(plan.next_stream())
            yield from plan.ready()
            if not again:
                if plan.failure is not None:
                    raise plan.failure from None
                return
