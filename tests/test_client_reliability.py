"""Client reliability without a server, run against BOTH clients (`Client` and `AsyncClient`), so a
behaviour one of them drifts away from fails here: partial failures keep what succeeded, NOT_FOUND
becomes ServerRestarted exactly when the replica's instance id changed, sequences moved by a drain
are followed, fork and decode_stream route like each other, export/import round-trip.

The replicas are in-memory fakes (`Replica`) behind stubs with the sync or the grpc.aio calling
convention, so each test goes through the whole shell: its stubs, error conversion and the core.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from tkg import codec, protowire
from tkg.client import AsyncClient, Client, DecodeInput, core, errors, routing
from tkg.client.instances import Instances
from tkg.client.messages import DecodeResult
from tkg.placement import ranking
from tkg.v1 import decode_attention_pb2 as pb

TARGETS = ["replica-a:1", "replica-b:1", "replica-c:1"]
HQ, HKV, S, D = 2, 1, 1, 4


class RpcFailure(grpc.RpcError):
    """What a stub raises: a status code and the server's message (as `grpc.RpcError` carries)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Replica:
    """One replica in memory: sequence id -> tokens cached (one layer), the process's instance id,
    and every call it received (`calls`: (method, sequence ids)). `down` answers UNAVAILABLE.
    `tiers`: where each sequence's KV is ("device" unless a test spilled it; GetSequence reports
    it, PrefetchSequence brings it back); `bases`: each sequence's base position.
    `draining` answers each DecodeStream message UNAVAILABLE (the stream goes on); `before(method)`
    runs as each call arrives and `on_stream(i)` before a stream's i-th answer (tests move
    sequences there, as a drain would).

    Decode answers each row with `100 * index + rank` (rank: the row's place in the request), so a
    merged result shows which replica answered each row and in which order."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.seqs: dict[str, int] = {}
        self.tiers: dict[str, str] = {}
        self.bases: dict[str, int] = {}
        self.instance = f"r{index}-start0"
        self.down = False
        self.draining = False
        self.before: Callable[[str], None] | None = None
        self.on_stream: Callable[[int], None] | None = None
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def restart(self) -> None:
        self.seqs.clear()
        self.instance += "+"

    def handle(self, method: str, request: Any) -> Any:
        """`method` on `request` as the client's stub hands it over: Decode and DecodeStream
        requests as wire bytes, their answers parsed as the client's stub parses them."""
        if isinstance(request, Iterator):  # a client stream
            request = list(request)
        if method in ("Decode", "DecodeStream"):
            request = [_message(r) for r in request] if isinstance(request, list) else _message(request)
            answer = self._handle(method, request)
            return protowire.answer_of(answer) if method == "Decode" else map(protowire.answer_of, answer)
        return self._handle(method, request)

    def _handle(self, method: str, request: Any) -> Any:
        ids = [getattr(m, "sequence_id", "") or getattr(m, "source_id", "") for m in _listed(request)]
        ids += [s for m in _listed(request) for s in getattr(m, "sequence_ids", ())]
        self.calls.append((method, tuple(i for i in ids if i)))
        if self.before is not None:
            self.before(method)
        if self.down:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return getattr(self, method)(request)

    def _need(self, sid: str) -> None:
        if sid not in self.seqs:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"sequence_id: {sid!r} not found")

    def _info(self, sid: str) -> pb.SequenceInfo:
        return pb.SequenceInfo(
            sequence_id=sid, lengths=[self.seqs[sid]], instance_id=self.instance,
            tier=self.tiers.get(sid, "device"), base_position=self.bases.get(sid, 0),
        )  # fmt: skip

    def _add(self, sid: str, tokens: int, base: int = 0) -> pb.SequenceInfo:
        if sid in self.seqs:
            raise RpcFailure(grpc.StatusCode.ALREADY_EXISTS, f"sequence_id: {sid!r} exists")
        self.seqs[sid] = tokens
        self.bases[sid] = base
        return self._info(sid)

    def GetServerInfo(self, req: pb.GetServerInfoRequest) -> pb.ServerInfo:
        return pb.ServerInfo(instance_id=self.instance)

    def CreateSequence(self, req: pb.CreateSequenceRequest) -> pb.SequenceInfo:
        return self._add(req.sequence_id or f"auto-{self.index}-{len(self.seqs)}", 0, req.base_position)

    def GetSequence(self, req: pb.GetSequenceRequest) -> pb.SequenceInfo:
        self._need(req.sequence_id)
        return self._info(req.sequence_id)

    def PrefetchSequence(self, req: pb.PrefetchSequenceRequest) -> pb.SequenceInfo:
        self._need(req.sequence_id)
        self.tiers[req.sequence_id] = "device"
        return self._info(req.sequence_id)

    def TruncateSequence(self, req: pb.TruncateSequenceRequest) -> pb.SequenceInfo:
        self._need(req.sequence_id)
        self.seqs[req.sequence_id] = min(self.seqs[req.sequence_id], req.length)
        return self._info(req.sequence_id)

    def ForkSequence(self, req: pb.ForkSequenceRequest) -> pb.SequenceInfo:
        self._need(req.source_id)
        return self._add(req.sequence_id or f"fork-{self.index}-{len(self.seqs)}", self.seqs[req.source_id])

    def ReleaseSequence(self, req: pb.ReleaseSequenceRequest) -> pb.ReleaseSequenceResponse:
        self._need(req.sequence_id)
        return pb.ReleaseSequenceResponse(freed_blocks=self.seqs.pop(req.sequence_id) + 1)

    def AppendKV(self, msgs: list[pb.AppendKVRequest]) -> pb.SequenceInfo:
        sid = msgs[0].sequence_id
        self._need(sid)
        self.seqs[sid] += sum(m.k.shape[0] for m in msgs)
        return self._info(sid)

    def Decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        for sid in req.sequence_ids:
            self._need(sid)
        for sid in req.sequence_ids:
            self.seqs[sid] += 1
        B = len(req.sequence_ids)
        out = (
            np.zeros((B, HQ, S, D), np.float32) + 100 * self.index + np.arange(B, dtype=np.float32)[:, None, None, None]
        )
        resp = pb.DecodeResponse(request_id=req.request_id, layer=req.layer, timing=pb.Timing(total_us=10 + self.index))
        codec.encode(out, resp.out)
        return resp

    def DecodeStream(self, reqs: list[pb.DecodeRequest]) -> Iterator[pb.DecodeResponse]:
        for i, req in enumerate(reqs):
            if self.on_stream is not None:
                self.on_stream(i)
            try:
                if self.draining:
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "server: draining for shutdown")
                yield self.Decode(req)
            except RpcFailure as f:  # a message's error is its response; the stream goes on
                err = pb.Error(code=f.code().value[0], message=f.details())
                yield pb.DecodeResponse(request_id=req.request_id, layer=req.layer, error=err)

    def ExportSequence(self, req: pb.ExportSequenceRequest) -> Iterator[pb.SequenceChunk]:
        self._need(req.sequence_id)
        n = self.seqs[req.sequence_id]
        header = pb.SequenceHeader(lengths=[n], num_layers=1, chunks=1, instance_id=self.instance)
        yield pb.SequenceChunk(sequence_id=req.sequence_id, header=header)
        chunk = pb.SequenceChunk(sequence_id=req.sequence_id, layer=0, position=0)
        codec.encode(np.zeros((n, HKV, D), np.float32), chunk.k)
        codec.encode(np.zeros((n, HKV, D), np.float32), chunk.v)
        yield chunk

    def ImportSequence(self, msgs: list[pb.SequenceChunk]) -> pb.SequenceInfo:
        return self._add(msgs[0].sequence_id, msgs[0].header.lengths[0])


def _listed(request: Any) -> list[Any]:
    return request if isinstance(request, list) else [request]


STREAM_RESPONSES = ("ExportSequence", "DecodeStream")


def _message(raw: bytes | pb.DecodeRequest) -> pb.DecodeRequest:
    return raw if isinstance(raw, pb.DecodeRequest) else pb.DecodeRequest.FromString(raw)


class SyncStub:
    """`DecodeAttentionStub`'s calling convention over a `Replica`."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            return self.replica.handle(method, request)

        return call


class AioStub(SyncStub):
    """grpc.aio's calling convention: awaitables, async-iterable response streams, request
    streams that may be async iterables."""

    def __getattr__(self, method: str) -> Callable[..., Any]:
        async def messages(request: Any) -> Any:
            return [m async for m in request] if isinstance(request, AsyncIterable) else request

        if method in STREAM_RESPONSES:

            async def stream(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
                for m in self.replica.handle(method, await messages(request)):
                    yield m

            return stream

        async def unary(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            return self.replica.handle(method, await messages(request))

        return unary


class Blocking:
    """Either client behind blocking calls, so one test body runs against both: an
    `AsyncClient`'s coroutines run on `loop`; response streams come back as lists."""

    def __init__(self, client: Client | AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if inspect.isawaitable(out):
                return self.loop.run_until_complete(out)
            if inspect.isasyncgen(out):
                return self.loop.run_until_complete(_collect(out))
            return list(out) if inspect.isgenerator(out) else out

        return call


async def _collect(agen: Any) -> list[Any]:
    return [x async for x in agen]


Make = Callable[..., tuple[Blocking, list[Replica]]]


@pytest.fixture(params=["sync", "async"])
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    """`make(targets)`: a client of the parametrized kind over fake replicas, and the replicas
    (`replicas`: over these instead of new ones, as a second process would be; `segment_tokens`:
    a segmented client)."""
    loop = asyncio.new_event_loop()
    made: list[Client | AsyncClient] = []

    def build(
        targets: list[str] = TARGETS, replicas: list[Replica] | None = None, segment_tokens: int | None = None
    ) -> tuple[Blocking, list[Replica]]:
        replicas = replicas or [Replica(i) for i in range(len(targets))]
        if request.param == "sync":
            client: Client | AsyncClient = Client(targets, segment_tokens=segment_tokens)
            client._stubs = [SyncStub(r) for r in replicas]
        else:

            async def create() -> AsyncClient:  # grpc.aio channels belong to a running loop
                return AsyncClient(targets, segment_tokens=segment_tokens)

            client = loop.run_until_complete(create())
            client._stubs = [AioStub(r) for r in replicas]
        made.append(client)
        return Blocking(client, loop), replicas

    yield build
    for c in made:
        out = c.close()
        if inspect.isawaitable(out):
            loop.run_until_complete(out)
    loop.close()


def ids_on_every_replica(n: int = 6) -> list[str]:
    ids, seen, i = [], set(), 0
    while len(seen) < len(TARGETS) or len(ids) < n:
        sid = f"s{i}"
        i += 1
        seen.add(routing.pick(TARGETS, sid))
        ids.append(sid)
    return ids


def id_routing_to(replica: int, prefix: str = "x") -> str:
    return next(f"{prefix}{i}" for i in range(1000) if routing.pick(TARGETS, f"{prefix}{i}") == replica)


def zeros(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((n, HQ, S, D), np.float32),
        np.zeros((n, HKV, S, D), np.float32),
        np.zeros((n, HKV, S, D), np.float32),
    )


def check_rows(out: np.ndarray, homes: list[int], ok: list[bool]) -> None:
    """Each surviving row is its replica's answer for it, in the caller's order; the others NaN."""
    for b, home in enumerate(homes):
        if not ok[b]:
            assert np.isnan(out[b]).all()
            continue
        rank = [i for i, h in enumerate(homes) if h == home].index(b)
        assert (out[b] == 100 * home + rank).all(), (b, home, out[b, 0, 0, 0])


def test_split_decode_keeps_the_rows_that_succeeded(make: Make) -> None:
    c, replicas = make()
    sids = ids_on_every_replica()
    for s in sids:
        c.create_sequence(s)
    homes = [routing.pick(TARGETS, s) for s in sids]
    res = c.decode(0, sids, [0] * len(sids), *zeros(len(sids)), request_id="r1")
    assert isinstance(res, DecodeResult) and res.ok is None and res.request_id == "r1"
    check_rows(res.out, homes, [True] * len(sids))
    assert res.timing.total_us == 10 + max(homes)  # the slowest replica's time
    dead = homes[0]
    replicas[dead].down = True
    with pytest.raises(errors.PartialDecodeError) as info:
        c.decode(0, sids, [1] * len(sids), *zeros(len(sids)))
    err = info.value
    assert err.code == grpc.StatusCode.UNAVAILABLE and TARGETS[dead] in str(err)
    assert sorted(err.errors) == sorted(s for s, h in zip(sids, homes, strict=True) if h == dead)
    assert all(isinstance(e, errors.Unavailable) for e in err.errors.values())
    assert err.result.ok.tolist() == [h != dead for h in homes]
    check_rows(err.result.out, homes, err.result.ok.tolist())
    assert all(replicas[h].seqs[s] == 2 for s, h in zip(sids, homes, strict=True) if h != dead)  # they advanced


def test_not_found_is_server_restarted_only_after_a_restart(make: Make) -> None:
    c, replicas = make(TARGETS[:1])
    c.create_sequence("a")
    c.create_sequence("b")
    c.release("b")
    with pytest.raises(errors.NotFound) as gone:  # released: same instance, plain NOT_FOUND
        c.get_sequence("b")
    assert type(gone.value) is errors.NotFound
    replicas[0].restart()
    with pytest.raises(errors.ServerRestarted) as restarted:
        c.decode(0, ["a"], [0], *zeros(1))
    assert restarted.value.old_instance == "r0-start0" and restarted.value.new_instance == "r0-start0+"
    with pytest.raises(errors.NotFound) as again:  # told once; now simply unknown there
        c.get_sequence("a")
    assert type(again.value) is errors.NotFound


def test_a_moved_sequence_is_followed_and_remembered(make: Make) -> None:
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    c.append_kv(sid, 0, np.zeros((3, HKV, D), np.float32), np.zeros((3, HKV, D), np.float32), chunk_tokens=2)
    drain_to = routing.Router(TARGETS).candidates(sid, 0)[0]  # where a drain of replica 0 pushes it
    replicas[drain_to].seqs[sid] = replicas[0].seqs.pop(sid)
    assert list(c.get_sequence(sid).lengths) == [3]  # NOT_FOUND at 0, found at drain_to, asked there
    replicas[0].calls.clear()
    c.append_kv(sid, 0, np.zeros((2, HKV, D), np.float32), np.zeros((2, HKV, D), np.float32))  # position: asked
    res = c.decode(0, [sid], [5], *zeros(1))
    assert (res.out == 100 * drain_to).all()
    assert replicas[drain_to].seqs[sid] == 6 and replicas[0].calls == []  # straight to where it lives now
    replicas[drain_to].down = True  # its new replica down and found nowhere else: UNAVAILABLE naming it
    with pytest.raises(errors.Unavailable, match=TARGETS[drain_to]):
        c.get_sequence(sid)


def test_a_batch_whose_sequences_moved_to_several_replicas_is_split_there(make: Make) -> None:
    c, replicas = make()
    on0 = [id_routing_to(0, p) for p in ("m", "n")]
    for s in on0:
        c.create_sequence(s)
    # A drain put them on two different replicas (as if the first choice was full for one).
    for s, r in zip(on0, (1, 2), strict=True):
        replicas[r].seqs[s] = replicas[0].seqs.pop(s)
    res = c.decode(0, on0, [0, 0], *zeros(2))
    assert [res.out[0, 0, 0, 0], res.out[1, 0, 0, 0]] == [100.0, 200.0]
    assert (replicas[1].seqs[on0[0]], replicas[2].seqs[on0[1]]) == (1, 1)  # each advanced once


def test_fork_refuses_an_id_routing_away_from_the_source(make: Make) -> None:
    c, replicas = make()
    src = id_routing_to(0)
    c.create_sequence(src)
    with pytest.raises(ValueError, match="routes to replica-"):
        c.fork(src, id_routing_to(1, "child"))
    assert [m for m, _ in replicas[0].calls] == ["CreateSequence"]  # refused before any call
    here = id_routing_to(0, "child")
    assert c.fork(src, here).sequence_id == here and here in replicas[0].seqs
    picked = c.fork(src).sequence_id
    assert routing.pick(TARGETS, picked) == 0 and picked in replicas[0].seqs


def test_decode_stream_goes_to_the_replica_holding_the_sequences(make: Make) -> None:
    c, replicas = make()
    a, b = id_routing_to(2, "a"), id_routing_to(2, "b")
    for s in (a, b):
        c.create_sequence(s)
    reqs = [
        DecodeInput(0, [a], [0], *zeros(1), request_id="1"),
        DecodeInput(0, [b, a], [0, 1], *zeros(2), request_id="2"),
    ]
    results = c.decode_stream(reqs)
    assert [r.request_id for r in results] == ["1", "2"] and all(r.error is None for r in results)
    assert (results[1].out == 200 + np.arange(2)[:, None, None, None]).all()
    assert replicas[2].seqs == {a: 2, b: 1}
    elsewhere = id_routing_to(0, "e")
    c.create_sequence(elsewhere)
    calls = [len(r.calls) for r in replicas]
    with pytest.raises(ValueError, match="several replicas"):
        c.decode_stream([DecodeInput(0, [a], [2], *zeros(1)), DecodeInput(0, [elsewhere], [0], *zeros(1))])
    assert [len(r.calls) for r in replicas] == calls  # nothing sent


def move_all(src: Replica, dst: Replica) -> None:
    """What a drain does: every sequence of `src` now lives on `dst`, lengths kept."""
    dst.seqs.update(src.seqs)
    src.seqs.clear()


def stream_of(sid: str, first: int, n: int) -> list[DecodeInput]:
    """n consecutive steps of `sid` from position `first`, request ids "0", "1", ..."""
    return [DecodeInput(0, [sid], [first + i], *zeros(1), request_id=str(i)) for i in range(n)]


def decoded_by(results: list[DecodeResult]) -> list[int]:
    """Which replica answered each result (the fakes answer row 0 with 100 * replica index)."""
    assert all(r.error is None for r in results), [r.error for r in results]
    return [int(r.out[0, 0, 0, 0]) // 100 for r in results]


def test_decode_stream_follows_a_sequence_moved_mid_stream(make: Make) -> None:
    """After two answers the sequence moves (NOT_FOUND for the rest): the four messages not
    answered go, in order, on a stream to its new replica; the answered two are not sent again."""
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    to = routing.Router(TARGETS).candidates(sid, 0)[0]
    replicas[0].on_stream = lambda i: move_all(replicas[0], replicas[to]) if i == 2 else None
    results = c.decode_stream(stream_of(sid, 0, 6))
    assert [r.request_id for r in results] == [str(i) for i in range(6)]
    assert decoded_by(results) == [0, 0, to, to, to, to]
    assert replicas[to].seqs[sid] == 6  # 2 steps taken on 0, 4 here: none twice
    sent_there = [ids for m, ids in replicas[to].calls if m == "DecodeStream"]
    assert sent_there == [(sid,) * 4]  # one stream, only the four unanswered messages
    assert c._replica(sid) == to  # remembered: the next stream goes straight there
    replicas[0].calls.clear()
    assert decoded_by(c.decode_stream(stream_of(sid, 6, 2))) == [to, to] and replicas[0].calls == []


def test_decode_stream_follows_a_draining_replica_once_its_push_is_done(make: Make) -> None:
    """A draining replica answers the stream's messages UNAVAILABLE and pushes its sequences only
    after the stream has ended (and here only after the client has looked once): the client stops
    sending, looks again after a pause, and sends the unanswered messages where they went."""
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    to = routing.Router(TARGETS).candidates(sid, 0)[0]
    replicas[0].on_stream = lambda i: setattr(replicas[0], "draining", True) if i == 3 else None
    lookups: list[str] = []

    def push_late(method: str) -> None:  # the push lands after the first lookup missed it
        if method == "GetSequence":
            lookups.append(method)
            if len(lookups) == 2:
                move_all(replicas[0], replicas[to])

    replicas[to].before = push_late
    results = c.decode_stream(stream_of(sid, 0, 5))
    assert decoded_by(results) == [0, 0, 0, to, to] and [r.request_id for r in results] == list("01234")
    assert replicas[to].seqs[sid] == 5 and len(lookups) >= 2


def test_decode_stream_resends_what_a_broken_stream_left_unanswered(make: Make) -> None:
    """The stream itself fails (UNAVAILABLE) after two answers, the sequence found elsewhere:
    the answered two are delivered once, the other three are sent to where it lives now."""
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    to = routing.Router(TARGETS).candidates(sid, 0)[0]

    def crash(i: int) -> None:
        if i == 2:
            move_all(replicas[0], replicas[to])
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection reset")

    replicas[0].on_stream = crash
    results = c.decode_stream(stream_of(sid, 0, 5))
    assert decoded_by(results) == [0, 0, to, to, to] and replicas[to].seqs[sid] == 5


def test_decode_stream_follows_through_a_restart_and_says_restarted_when_nothing_moved(make: Make) -> None:
    """A rolling update: replica 0 drained (the sequence went elsewhere) and came back with a new
    instance id. The stream's NOT_FOUND there is followed all the same; a sequence that was not
    moved is answered `ServerRestarted`, as `decode` would raise."""
    c, replicas = make()
    sid, lost = id_routing_to(0), id_routing_to(0, "lost")
    c.create_sequence(sid)
    c.create_sequence(lost)
    to = routing.Router(TARGETS).candidates(sid, 0)[0]
    replicas[to].seqs[sid] = replicas[0].seqs.pop(sid)
    replicas[0].restart()
    assert decoded_by(c.decode_stream(stream_of(sid, 0, 2))) == [to, to]
    (res,) = c.decode_stream(stream_of(lost, 0, 1))
    assert isinstance(res.error, errors.ServerRestarted) and res.error.new_instance == "r0-start0+"


def test_decode_stream_without_anywhere_to_follow_answers_the_error_and_goes_on(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message about a sequence found nowhere keeps its NOT_FOUND answer, in its place; the
    messages around it are answered where they are (nothing re-sent), and a stream that breaks
    with nowhere to go raises once the answered ones are delivered (after looking again: a drain
    may still have been pushing; one short pause here)."""
    monkeypatch.setattr(core, "FOLLOW_PAUSES_S", (0.001,))
    c, replicas = make()
    sid, gone = id_routing_to(0), id_routing_to(0, "gone")
    c.create_sequence(sid)
    reqs = [DecodeInput(0, [sid], [0], *zeros(1), request_id="0"),
            DecodeInput(0, [gone], [0], *zeros(1), request_id="1"),
            DecodeInput(0, [sid], [1], *zeros(1), request_id="2")]  # fmt: skip
    results = c.decode_stream(reqs)
    assert [r.request_id for r in results] == ["0", "1", "2"]
    assert isinstance(results[1].error, errors.NotFound) and results[0].error is None and results[2].error is None
    assert replicas[0].seqs[sid] == 2 and [m for m, _ in replicas[0].calls].count("DecodeStream") == 1

    def crash_after_one(i: int) -> None:
        if i == 1:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection reset")

    replicas[0].on_stream = crash_after_one
    got: list[DecodeResult] = []
    with pytest.raises(errors.Unavailable):
        if isinstance(c.client, Client):
            got.extend(c.client.decode_stream(stream_of(sid, 2, 3)))
        else:
            c.loop.run_until_complete(_extend(got, c.client.decode_stream(stream_of(sid, 2, 3))))
    assert decoded_by(got) == [0]


async def _extend(out: list[Any], agen: Any) -> None:
    async for x in agen:
        out.append(x)


def test_async_decode_stream_from_an_async_iterable_follows_its_first_request() -> None:
    """An async iterable cannot be read ahead: the first request picks the replica, and a later one
    naming sequences held elsewhere ends the stream (unsent) after the answers to what was sent."""

    async def main() -> None:
        c = AsyncClient(TARGETS)
        replicas = [Replica(i) for i in range(3)]
        c._stubs = [AioStub(r) for r in replicas]
        a, elsewhere = id_routing_to(1, "a"), id_routing_to(2, "e")
        for s in (a, elsewhere):
            await c.create_sequence(s)

        async def requests(ids: list[str]) -> Any:
            for i, sid in enumerate(ids):
                yield DecodeInput(0, [sid], [i], *zeros(1), request_id=str(i))

        got = [r.request_id async for r in c.decode_stream(requests([a, a]))]
        assert got == ["0", "1"] and replicas[1].seqs[a] == 2
        got = []
        with pytest.raises(ValueError, match="several replicas"):
            async for r in c.decode_stream(requests([a, elsewhere, a])):
                got.append(r.request_id)
        assert got == ["0"] and replicas[2].seqs[elsewhere] == 0 and replicas[1].seqs[a] == 3
        await c.close()

    asyncio.run(main())


def test_export_then_import_copies_a_sequence_and_follows_a_moved_one(make: Make) -> None:
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    c.append_kv(sid, 0, np.zeros((5, HKV, D), np.float32), np.zeros((5, HKV, D), np.float32), position=0)
    chunks = c.export_sequence(sid)
    assert [m.HasField("header") for m in chunks] == [True, False] and chunks[0].header.lengths == [5]
    with pytest.raises(ValueError, match="empty"):
        c.import_sequence([])
    c.release(sid)
    info = c.import_sequence(iter(chunks))  # any iterable, sent once
    assert info.sequence_id == sid and replicas[0].seqs == {sid: 5}
    c.release(sid)
    assert c.import_sequence(chunks, replica=2).lengths == [5] and sid in replicas[2].seqs  # where asked
    other = id_routing_to(0, "o")
    c.create_sequence(other)
    moved_to = routing.Router(TARGETS).candidates(other, 0)[0]
    replicas[moved_to].seqs[other] = replicas[0].seqs.pop(other)
    assert [m.sequence_id for m in c.export_sequence(other)] == [other, other]  # followed where it lives
    assert c._replica(other) == moved_to
    with pytest.raises(errors.NotFound):
        c.export_sequence("nowhere")


def test_release_forgets_a_moved_sequence(make: Make) -> None:
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    there = routing.Router(TARGETS).candidates(sid, 0)[0]
    replicas[there].seqs[sid] = replicas[0].seqs.pop(sid)
    c.truncate(sid, 0)  # followed and remembered
    assert c._replica(sid) == there
    assert c.release(sid) == 1 and c._replica(sid) == 0  # released: routed by its hash again


def move(src: Replica, dst: Replica, sid: str, tier: str = "device") -> None:
    """What a drain does to one sequence: it lives on `dst` now (length and base kept), in `tier` there."""
    dst.seqs[sid], dst.bases[sid], dst.tiers[sid] = src.seqs.pop(sid), src.bases.pop(sid), tier
    src.tiers.pop(sid, None)


def prefetched(replicas: list[Replica]) -> list[tuple[int, str]]:
    """(replica, sequence) of every PrefetchSequence call received, in replica order."""
    return [(r.index, ids[0]) for r in replicas for method, ids in r.calls if method == "PrefetchSequence"]


def test_prefetch_brings_a_spilled_sequence_back_and_follows_a_moved_one(make: Make) -> None:
    c, replicas = make()
    sid = id_routing_to(0)
    c.create_sequence(sid)
    replicas[0].tiers[sid] = "disk"  # spilled while idle
    assert c.get_sequence(sid).tier == "disk"  # GetSequence reports where it is, does not restore
    info = c.prefetch_sequence(sid)
    assert (info.sequence_id, info.tier) == (sid, "device") and replicas[0].tiers[sid] == "device"
    # A drain pushed it where the clients look first (spilled to host there): followed like GetSequence.
    drain_to = routing.Router(TARGETS).candidates(sid, 0)[0]
    move(replicas[0], replicas[drain_to], sid, tier="host")
    for r in replicas:
        r.calls.clear()
    info = c.prefetch_sequence(sid)
    assert info.tier == "device" and replicas[drain_to].tiers[sid] == "device"
    assert replicas[0].calls == [("PrefetchSequence", (sid,)), ("GetServerInfo", ())]  # NOT_FOUND, then the verdict
    assert replicas[drain_to].calls == [("GetSequence", (sid,)), ("PrefetchSequence", (sid,))]  # found, repeated
    assert c._replica(sid) == drain_to
    replicas[0].calls.clear()
    assert c.prefetch_sequence(sid).tier == "device" and replicas[0].calls == []  # straight to where it lives
    with pytest.raises(errors.NotFound):
        c.prefetch_sequence("nowhere")


def test_segmented_prefetch_brings_every_segment_back_wherever_it_lives(make: Make) -> None:
    c, replicas = make(segment_tokens=4)
    c.create_sequence("conv")
    kv = np.zeros((10, HKV, D), np.float32)
    c.append_kv("conv", 0, kv, kv, position=0)  # segments conv#0 [0, 4), conv#1 [4, 8), conv#2 [8, 10)
    homes = {f"conv#{j}": r for j, r in enumerate(ranking(TARGETS, "conv"))}
    assert all(replicas[r].seqs.get(sid) == (2 if sid == "conv#2" else 4) for sid, r in homes.items())
    for sid, tier in zip(homes, ("host", "disk", "device"), strict=True):
        replicas[homes[sid]].tiers[sid] = tier
    info = c.get_sequence("conv")
    assert (list(info.lengths), info.tier) == ([10], "disk")  # the coldest segment: what a step waits for
    # A drain moved conv#1 where clients look for it first: the prefetch follows it there.
    moved_to = routing.Router(TARGETS).candidates("conv#1", homes["conv#1"])[0]
    move(replicas[homes["conv#1"]], replicas[moved_to], "conv#1", tier="disk")
    for r in replicas:
        r.calls.clear()
    info = c.prefetch_sequence("conv")
    assert (info.sequence_id, list(info.lengths), info.tier) == ("conv", [10], "device")
    where = {"conv#0": homes["conv#0"], "conv#1": moved_to, "conv#2": homes["conv#2"]}
    assert all(replicas[r].tiers[sid] == "device" for sid, r in where.items())
    asked = sorted([*((r, sid) for sid, r in where.items()), (homes["conv#1"], "conv#1")])  # + the NOT_FOUND
    assert sorted(prefetched(replicas)) == asked
    # Another client (another process) finds the segments first, then prefetches every one.
    for sid, r in where.items():
        replicas[r].tiers[sid] = "host"
    other, _ = make(replicas=replicas, segment_tokens=4)
    for r in replicas:
        r.calls.clear()
    info = other.prefetch_sequence("conv")
    assert (list(info.lengths), info.tier) == ([10], "device")
    # Its search for conv#1 (GetSequence) already followed it: each segment asked once, where it lives.
    assert sorted(prefetched(replicas)) == sorted((r, sid) for sid, r in where.items())
    with pytest.raises(errors.NotFound, match="'nowhere'"):  # the caller's id, not a segment's
        other.prefetch_sequence("nowhere")


def test_verdict_unit_not_found_is_server_restarted_only_when_the_instance_changed() -> None:
    inst = Instances()
    nf = errors.NotFound("no sequence 'a'", "r0")
    inst.note(0, "old", "a")
    inst.note(0, "old", "b")
    same = inst.verdict(nf, 0, ["a"], "old")
    assert type(same) is errors.NotFound  # expired or released: the instance is the same
    restarted = inst.verdict(nf, 0, ["a"], "new")
    assert isinstance(restarted, errors.ServerRestarted) and isinstance(restarted, errors.NotFound)
    assert (restarted.old_instance, restarted.new_instance) == ("old", "new") and "restarted" in str(restarted)
    again = inst.verdict(nf, 0, ["a"], "new")  # told once; the id is now simply unknown there
    assert type(again) is errors.NotFound
    assert isinstance(inst.verdict(nf, 0, ["b"], "new"), errors.ServerRestarted)  # b lived on "old" too
    assert type(inst.verdict(nf, 0, ["b"], None)) is errors.NotFound  # no answer from the replica: no claim
    assert type(Instances().verdict(nf, 0, ["x"], "new")) is errors.NotFound  # nothing known: no claim
    fresh = Instances()
    fresh.note(1, "i1")  # replica seen (GetServerInfo), sequence never
    assert isinstance(fresh.verdict(nf, 1, ["zzz"], "i2"), errors.ServerRestarted)


def test_both_clients_have_the_same_methods() -> None:
    """A method added to one client and not the other is a drift: same public names, same
    parameters."""

    def api(cls: type) -> dict[str, list[str]]:
        return {
            n: list(inspect.signature(f).parameters)
            for n, f in vars(cls).items()
            if callable(f) and not n.startswith("_")
        }

    assert api(Client) == api(AsyncClient)
