"""The client's decisions, without I/O: one core under `Client` (grpc, threads) and `AsyncClient`
(grpc.aio), so the two cannot drift apart.

`Core` says which replica each call goes to and builds its request (`Call`), records what answers
teach it (instance ids, where moved sequences live), and decides what a failure means. Where a
decision needs the network, it is a generator that yields what it must know and is sent the
answers; the shells answer with blocking or awaited RPCs (`drive` / `AsyncClient._drive`):

- `Core.failed`: the verdict on a failed call. Asks the replica's instance id (`AskInstance`) to
  tell a restart (`ServerRestarted`) from an unknown sequence, then looks for the sequences on the
  other replicas (`routing.Lookup`, via `routing.locate`); returns the `Call` to repeat where they
  all are (once), or the error to raise.
- `Core.decode`: a batched decode. Yields `{replica: Call}` batches (the shell makes them,
  concurrently when several) and is sent `{replica: DecodeResponse | TkgError}`; splits the batch
  by replica, re-splits after sequences were found elsewhere, and merges the parts in the caller's
  order (`merge_split`, `PartialDecodeError` when some replica failed).
- `StreamPlan`: one decode_stream across replicas: what each (re)opened stream sends, which
  answers are delivered, and `StreamPlan.follow`, where its sequences went after a drain.

- `Core.segments` (with `segment_tokens`): context parallelism, a sequence split by token ranges
  over replicas (`tkg.client.segments`, its own module for size: the same kind of decisions, no
  I/O). Its operations are generators like `Core.decode`: they yield batches of calls and are sent
  the outcomes.

Everything here runs without a server; tests/test_client_reliability.py drives it directly and
through both shells.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np

from tkg.client import routing
from tkg.client.errors import (
    NotFound,
    PartialDecodeError,
    ServerRestarted,
    TkgError,
    Unavailable,
    from_rpc_error,
    with_plaintext_hint,
)
from tkg.client.instances import Instances
from tkg.client.messages import DecodeInput, DecodeResult, append_chunks, decode_result, merge_rows, request_bytes
from tkg.client.segments import Segments
from tkg.protowire import DecodeAnswer
from tkg.v1 import decode_attention_pb2 as pb

T = TypeVar("T")

# RPCs whose NOT_FOUND is about a sequence (and may mean the replica restarted). A failure of one of
# them about sequences found on one other replica is repeated there.
SEQUENCE_METHODS = frozenset(
    {
        "GetSequence", "PrefetchSequence", "AppendKV", "Decode", "TruncateSequence", "ForkSequence",
        "ReleaseSequence", "ExportSequence",
    }
)  # fmt: skip
# RPCs answered with a stream: the shells collect it whole, so a failure mid-stream is a failed call.
STREAM_RESPONSE_METHODS = frozenset({"ExportSequence"})
# The lookups a verdict makes (GetSequence, GetServerInfo) are error paths: short deadlines.
PROBE_TIMEOUT_S = 5.0
# Pauses (s) between looks for a stream's sequences after UNAVAILABLE: a draining replica pushes
# them only once the stream has ended. ~26 s in all, past a drain's default 20 s grace period.
FOLLOW_PAUSES_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0)


@dataclass(frozen=True)
class Call:
    """One RPC to make: `method` on replica index `replica` with `request` (a message; for a
    client-streaming RPC a list, kept to be sent again if the call is repeated elsewhere, or an
    iterator sent once); `seq_ids`: the sequences it is about (for the verdict on a failure)."""

    replica: int
    method: str
    request: Any
    seq_ids: tuple[str, ...] = ()

    def to(self, replica: int) -> Call:
        return replace(self, replica=replica)


class AskInstance(NamedTuple):
    """What a verdict asks: the `ServerInfo.instance_id` of replica index `replica` now (answer:
    the id, or None when it did not answer)."""

    replica: int


class Pause(NamedTuple):
    """What a stream's follow asks while a drain may still be pushing: wait `seconds` (answer:
    anything, ignored)."""

    seconds: float


Ask = AskInstance | routing.Lookup | Pause
# A decision needing answers: yields what it asks, is sent the answers, returns its result.
Decision = Generator[Ask, Any, T]
# A decode batch: one Decode call per replica index, and what each returned or raised.
Batch = dict[int, Call]
Outcomes = dict[int, "DecodeAnswer | TkgError"]


def drive(decision: Decision[T], answer: Callable[[Ask], Any]) -> T:
    """Run `decision` to its result, answering each question with a blocking `answer(ask)`."""
    try:
        ask = next(decision)
        while True:
            ask = decision.send(answer(ask))
    except StopIteration as done:
        return done.value


def probe_timeout(timeout: float | None) -> float:
    """Deadline (s) of a verdict's lookups: the caller's, at most `PROBE_TIMEOUT_S`."""
    return min(timeout or PROBE_TIMEOUT_S, PROBE_TIMEOUT_S)


class Core:
    """Routing, requests and verdicts for one client over `targets` (replica index = position);
    `plaintext`: the channels are not TLS (a failure that looks like a TLS port says so)."""

    def __init__(self, targets: Sequence[str], segment_tokens: int | None = None, plaintext: bool = False) -> None:
        self.targets = list(targets)
        self.plaintext = plaintext
        self.router = routing.Router(self.targets)
        self.instances = Instances()
        # Context parallelism: every sequence of this client is split in segments of N tokens.
        self.segments = None if segment_tokens is None else Segments(self.router, segment_tokens)

    # ---- routing ---------------------------------------------------------------------------

    def replica(self, seq_id: str) -> int:
        """Index of the replica to call about `seq_id` (its owner, or where it was found)."""
        return self.router.home(seq_id)

    def name(self, replica: int) -> str | None:
        """The replica's target for error messages; None with one target (nothing to tell apart)."""
        return self.targets[replica] if len(self.targets) > 1 else None

    def error(self, exc: grpc.RpcError, replica: int | None) -> TkgError:
        """The typed error of a failed RPC to replica index `replica` (None: no replica named),
        with the TLS hint when this client speaks plaintext (`errors.with_plaintext_hint`)."""
        err = from_rpc_error(exc, None if replica is None else self.name(replica))
        return with_plaintext_hint(err) if self.plaintext else err

    # ---- requests --------------------------------------------------------------------------

    def server_info(self, replica: int) -> Call:
        return Call(replica, "GetServerInfo", pb.GetServerInfoRequest())

    def create(self, sequence_id: str | None) -> Call:
        """With several replicas the id is chosen here (a random hex id), so it can be routed."""
        if sequence_id is None and len(self.targets) > 1:
            sequence_id = uuid.uuid4().hex
        req = pb.CreateSequenceRequest(sequence_id=sequence_id or "")
        return Call(self.replica(sequence_id or ""), "CreateSequence", req)

    def get(self, sequence_id: str) -> Call:
        req = pb.GetSequenceRequest(sequence_id=sequence_id)
        return Call(self.replica(sequence_id), "GetSequence", req, (sequence_id,))

    def prefetch(self, sequence_id: str) -> Call:
        """PrefetchSequence: the server brings a spilled sequence (tier "host" or "disk") back to
        the device and answers its `SequenceInfo` once it is there. Routed, and followed after a
        drain moved it, exactly like `get`."""
        req = pb.PrefetchSequenceRequest(sequence_id=sequence_id)
        return Call(self.replica(sequence_id), "PrefetchSequence", req, (sequence_id,))

    def truncate(self, sequence_id: str, length: int) -> Call:
        req = pb.TruncateSequenceRequest(sequence_id=sequence_id, length=length)
        return Call(self.replica(sequence_id), "TruncateSequence", req, (sequence_id,))

    def fork(self, source_id: str, sequence_id: str | None) -> Call:
        """With several replicas the child must live with its source: an id is chosen that routes
        there, and a caller's id routing elsewhere is refused (ValueError) before any call."""
        home = self.replica(source_id)
        if len(self.targets) > 1:
            if sequence_id is None:
                while self.replica(sequence_id := uuid.uuid4().hex) != home:
                    pass
            elif (there := self.replica(sequence_id)) != home:
                raise ValueError(
                    f"sequence_id: {sequence_id!r} routes to {self.targets[there]}, not to the "
                    f"source's replica {self.targets[home]}; expected None (the client picks a routable id)"
                )
        req = pb.ForkSequenceRequest(source_id=source_id, sequence_id=sequence_id or "")
        return Call(home, "ForkSequence", req, (source_id,))

    def release(self, sequence_id: str) -> Call:
        req = pb.ReleaseSequenceRequest(sequence_id=sequence_id)
        return Call(self.replica(sequence_id), "ReleaseSequence", req, (sequence_id,))

    def export(self, sequence_id: str) -> Call:
        req = pb.ExportSequenceRequest(sequence_id=sequence_id)
        return Call(self.replica(sequence_id), "ExportSequence", req, (sequence_id,))

    def import_(self, first: pb.SequenceChunk | None, stream: Any, replica: int | None) -> Call:
        """ImportSequence of `stream` (an iterable or async iterable whose first message is
        `first`, sent once); by default on the replica its id routes to."""
        if first is None:
            raise ValueError("messages: empty; expected the stream export_sequence returns")
        where = self.replica(first.sequence_id) if replica is None else replica
        return Call(where, "ImportSequence", stream, (first.sequence_id,))

    def append(
        self, sequence_id: str, layer: int, position: int, k: np.ndarray, v: np.ndarray, chunk_tokens: int
    ) -> Call:
        """AppendKV of k, v `[T, num_kv_heads, head_dim]` at token `position`, in messages of at
        most `chunk_tokens` tokens (a list: sent again if the sequence is found elsewhere)."""
        chunks = list(append_chunks(sequence_id, layer, position, k, v, chunk_tokens))
        return Call(self.replica(sequence_id), "AppendKV", chunks, (sequence_id,))

    def decode_call(self, replica: int, d: DecodeInput) -> Call:
        return Call(replica, "Decode", request_bytes(d), tuple(d.sequence_ids))

    # ---- answers ---------------------------------------------------------------------------

    def answered(self, call: Call, resp: Any) -> None:
        """Record what the answer to `call` (as made: after a follow, at the replica that
        answered) says: the instance each sequence and replica is on, where a fork's child lives
        (with its source), that a released sequence is gone."""
        if isinstance(resp, pb.SequenceInfo):
            self.instances.note(call.replica, resp.instance_id, resp.sequence_id)
        elif isinstance(resp, pb.ServerInfo):
            self.instances.note(call.replica, resp.instance_id)
        if call.method == "ForkSequence":
            self.router.moved(resp.sequence_id, call.replica)
        elif call.method == "ReleaseSequence":
            self.instances.forget(call.request.sequence_id)
            self.router.forget(call.request.sequence_id)

    # ---- verdicts --------------------------------------------------------------------------

    def failed(self, call: Call, err: TkgError, follow: bool = True) -> Decision[Call | TkgError]:
        """The verdict on `call` failing with `err`: the `Call` to make instead (the same one at
        the one other replica where all its sequences were found; only with `follow`), or the
        error to raise (`ServerRestarted` when a NOT_FOUND came from a replica whose instance id
        changed). Asks at most one `AskInstance` and one `Lookup` per other replica and sequence."""
        if call.method in SEQUENCE_METHODS and isinstance(err, NotFound):
            current = yield AskInstance(call.replica)
            err = self.instances.verdict(err, call.replica, list(call.seq_ids), current)
        if follow and call.method in SEQUENCE_METHODS and isinstance(err, NotFound | Unavailable):
            where = yield from self.locate(call.seq_ids, call.replica)
            if where is not None and len(where) == 1:
                return call.to(where.pop())
        return err

    def locate(self, seq_ids: Sequence[str], failed: int) -> Decision[set[int] | None]:
        """Look for `seq_ids` on the replicas other than `failed` and remember where each is
        (`routing.locate`); the replicas holding them, or None when one was found nowhere."""
        if len(self.targets) < 2 or not seq_ids:
            return None
        return (yield from routing.locate(self.router, seq_ids, failed, self._found))

    def _found(self, replica: int, seq_id: str, info: pb.SequenceInfo) -> None:
        self.instances.note(replica, info.instance_id, seq_id)

    # ---- decode ----------------------------------------------------------------------------

    def decode(self, d: DecodeInput) -> Generator[Batch, Outcomes, DecodeResult]:
        """One decode step over whichever replicas hold `d`'s sequences: yields a batch of calls
        (one per replica) and is sent each one's response or `TkgError`; returns the merged
        result, or raises (the error of a lone call; `PartialDecodeError` for a split one).

        A lone call's NOT_FOUND / UNAVAILABLE is raised unless its verdict found the sequences
        on several other replicas (one other: it was already repeated there): then they are
        asked again, split by replica."""
        groups = self.router.group(d.sequence_ids)
        if len(groups) == 1:
            ((replica, _),) = groups.items()
            outcome = (yield {replica: self.decode_call(replica, d)})[replica]
            if not isinstance(outcome, TkgError):
                return decode_result(outcome)
            groups = self.router.group(d.sequence_ids)
            if (
                not isinstance(outcome, NotFound | Unavailable)
                or len(groups) == 1
                or not moved_away(self.router, d.sequence_ids, replica)
            ):
                raise outcome
        outcomes = yield {r: self.decode_call(r, subset(d, pos)) for r, pos in groups.items()}
        results = {r: o if isinstance(o, TkgError) else decode_result(o) for r, o in outcomes.items()}
        return merge_split(d, groups, results)

    def stream_replica(self, sequence_ids: Iterable[Sequence[str]]) -> int:
        """The one replica holding every sequence of a DecodeStream's requests (their id lists);
        ValueError when they live on several (a stream reaches one replica)."""
        if len(self.targets) == 1:
            return 0
        homes = {self.replica(s) for ids in sequence_ids for s in ids}
        if len(homes) > 1:
            raise ValueError("decode_stream: sequences live on several replicas; expected one stream per replica")
        return homes.pop() if homes else 0


def moved_away(router: routing.Router, seq_ids: Sequence[str], replica: int) -> bool:
    """Every one of `seq_ids` is now known to be on a replica other than `replica`."""
    return all(router.home(s) != replica for s in seq_ids)


def subset(d: DecodeInput, positions: list[int]) -> DecodeInput:
    """The rows `positions` (indices into `d.sequence_ids`) of a decode request."""
    idx = np.asarray(positions)
    return DecodeInput(
        d.layer, [d.sequence_ids[i] for i in positions], [d.positions[i] for i in positions],
        d.q[idx], d.k[idx], d.v[idx], d.request_id,
    )  # fmt: skip


def merge_split(
    d: DecodeInput, groups: dict[int, list[int]], outcomes: dict[int, DecodeResult | TkgError]
) -> DecodeResult:
    """One result `[B, Hq, S, d]` from the per-replica outcomes of a split decode (`groups`:
    replica -> its rows' indices in `d`); raises `PartialDecodeError` (with the rows that
    succeeded, NaN in the others, and each failed sequence's error) when any replica failed."""
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


@dataclass
class _Message:
    d: DecodeInput
    result: DecodeResult | None = None  # its answer to deliver; None: not answered (yet)
    held: DecodeResult | None = None  # a NOT_FOUND / UNAVAILABLE answer, kept while following


class StreamPlan:
    """One `decode_stream` across replicas, so that it follows sequences moved by a drain the way
    `decode` does. The shells open a DecodeStream at `replica` (`open`), send `resend()` messages,
    then `admit(d)` of each new request while they return a message, hand every response to
    `answered` (or the stream's failure to `broke`), deliver `ready()`, and when the stream has
    ended with requests unanswered run `follow()`.

    A message answered with NOT_FOUND (its sequences are not there) or UNAVAILABLE (draining, or
    gone) stops the stream: nothing more is sent on it (a draining server finishes its drain, and
    pushes its sequences, only once its open streams end); what is still coming is read. `follow`
    then looks for every sequence of the stream on the other replicas (after UNAVAILABLE, again
    after `Pause`s while the drain may still be pushing). Found on one other replica, the next
    stream goes there and the messages not answered yet are sent first, in order; answered ones
    (results, or errors of any other kind) are never sent again. Answers reach the caller in
    request order: one that arrived after an unanswered message waits for it. A follow that finds
    them nowhere, or on several replicas (a stream reaches one), turns the held errors into
    answers and the stream goes on where it was, without following again.

    Thread use (the sync shell): `resend`/`admit` run on gRPC's request thread while `answered`
    runs on the caller's. An answer comes only after its message was appended to `_inflight`
    (before it was sent), the request side only appends, the answer side only pops from the
    left, and `deque.append`/`popleft` are atomic in CPython; `stopped` is a flag set once by
    the answer side (a message taken just after it is set is held for the next stream)."""

    def __init__(self, core: Core, replica: int, ahead: Iterable[str] = ()) -> None:
        self.core = core
        self.replica = replica
        self.ids: dict[str, None] = dict.fromkeys(ahead)  # every sequence of the stream (ordered set)
        self.stopped = False  # send no more on the current stream
        self.error: TkgError | None = None  # why it stopped (the first move-like error) or broke
        self.wrong: ValueError | None = None  # a new request names sequences held elsewhere: the end
        self.follows = len(core.targets) > 1  # False once a follow found nothing
        self._order: deque[_Message] = deque()  # taken and not delivered, in request order
        self._inflight: deque[_Message] = deque()  # sent on the current stream, not answered
        self._unsent: deque[_Message] = deque()  # to send first on the current stream
        self._fruitless = 0  # follows since an answer last arrived (bounded: no ping-pong)
        self.generation = 0  # of the current stream (`open`)
        self.broken: TkgError | None = None  # the current stream failed with this
        self.exhausted = False  # the caller's requests are all taken (set by the shell)
        self.failure: BaseException | None = None  # what ends the decode_stream (`next_stream`)
        self.lock = threading.Lock()  # the sync shell's request threads vs `open`
        self.pull: Any = None  # the async shell's pending read of the caller's requests (kept across streams)

    # ---- sending ---------------------------------------------------------------------------

    def open(self) -> int:
        """A stream is being opened at `replica`: what was not answered goes first. Returns the
        stream's generation, which its request side passes to `sendable`."""
        with self.lock:
            self.generation += 1
            self.stopped, self.error, self.broken = False, None, None
            self._inflight.clear()
            self._unsent = deque(m for m in self._order if m.result is None)
            for m in self._unsent:
                m.held = None
            return self.generation

    def sendable(self, generation: int) -> bool:
        """The stream of `generation` may send more (it is the current one, and not stopping)."""
        return generation == self.generation and not self.stopped and self.wrong is None

    def resend(self) -> bytes | None:
        """The next message of an earlier stream to send again (None: none left)."""
        if not self._unsent:
            return None
        m = self._unsent.popleft()
        self._inflight.append(m)
        return request_bytes(m.d)

    def admit(self, d: DecodeInput, generation: int) -> bytes | None:
        """A new request from the caller, taken by the stream of `generation`: its message, or
        None when it waits for the next stream (that one is stopping or over) or names sequences
        held elsewhere (`wrong`, raised by the shell after the answers to what was sent)."""
        if len(self.core.targets) > 1 and {self.core.replica(s) for s in d.sequence_ids} - {self.replica}:
            self.wrong = ValueError(
                "decode_stream: sequences live on several replicas; expected one stream per replica"
            )
            return None
        m = _Message(d)
        self._order.append(m)
        self.ids.update(dict.fromkeys(d.sequence_ids))
        if not self.sendable(generation):
            self._unsent.append(m)  # after what the current stream still has to resend: in order
            return None
        self._inflight.append(m)
        return request_bytes(d)

    def next_message(self, generation: int, pull: Callable[[], DecodeInput | None]) -> bytes | None:
        """The sync shell's request side: what the stream of `generation` sends next (a message to
        resend, else `pull()`'s next request), or None to end its request side. Under `lock`:
        a request thread of an ended stream may still ask, concurrently with the next stream's."""
        with self.lock:
            if not self.sendable(generation):
                return None
            msg = self.resend()
            if msg is None:
                d = pull()
                if d is None:
                    self.exhausted = True
                    return None
                msg = self.admit(d, generation)
            return msg

    # ---- answers ---------------------------------------------------------------------------

    def answered(self, resp: DecodeAnswer) -> None:
        """The answer to the oldest message in flight on this stream."""
        m = self._inflight.popleft()
        result = decode_result(resp)
        if self.follows and isinstance(result.error, NotFound | Unavailable):
            m.held = result
            if not self.stopped:
                self.error, self.stopped = result.error, True
            return
        m.result = result
        self._fruitless = 0

    def broke(self, err: TkgError) -> None:
        """The stream failed with `err`: what was in flight has no answer."""
        with self.lock:
            self._inflight.clear()
            self.broken = err
            if self.error is None:
                self.error = err
            self.stopped = True

    def next_stream(self) -> Decision[bool]:
        """After a stream ended: True to open another at `replica` (followed, or where it was for
        the requests not sent yet); False when the decode_stream is over, with `failure` to raise
        once `ready()` is delivered (None: it ended well)."""
        if self.unanswered():
            if (yield from self.follow()):
                return True
            if self.unanswered():  # requests without any answer: lost with the stream
                n = sum(m.result is None for m in self._order)
                self.failure = self.error or Unavailable(
                    f"decode_stream: the stream ended with {n} requests unanswered; expected an answer to each",
                    self.core.name(self.replica),
                )
                return False
        elif self.broken is not None:
            self.failure = self.broken
            return False
        if self.wrong is not None:
            self.failure = self.wrong
            return False
        return not self.exhausted

    def ready(self) -> list[DecodeResult]:
        """The answers deliverable now: the answered prefix of the requests, in order."""
        out: list[DecodeResult] = []
        while self._order and self._order[0].result is not None:
            out.append(self._order.popleft().result)  # type: ignore[arg-type]
        return out

    def unanswered(self) -> bool:
        return any(m.result is None for m in self._order)

    # ---- following -------------------------------------------------------------------------

    def follow(self) -> Decision[bool]:
        """The stream ended with requests unanswered: True to open the next stream at `replica`
        (updated). False: held errors became answers (`ready`); requests with none at all are
        lost with `error`, which the shell raises."""
        err = self.error
        if not isinstance(err, NotFound | Unavailable) or not self.follows or self._fruitless >= len(self.core.targets):
            return self._give_up()
        if isinstance(err, NotFound) and not isinstance(err, ServerRestarted):
            # A restarted replica (rolling update) may have pushed them first: look either way,
            # as `failed` does; found nowhere, the held NOT_FOUNDs say it restarted.
            current = yield AskInstance(self.replica)
            err = self.core.instances.verdict(err, self.replica, list(self.ids), current)
        where = None
        for pause in (0.0, *FOLLOW_PAUSES_S):
            if pause:
                yield Pause(pause)
            where = yield from self.core.locate(list(self.ids), self.replica)
            if where is not None or not isinstance(err, Unavailable):  # after NOT_FOUND nothing is in transit
                break
        if where is None or len(where) != 1:
            return self._give_up(err if isinstance(err, ServerRestarted) else None)
        self.replica = where.pop()
        self._fruitless += 1
        return True

    def _give_up(self, restarted: ServerRestarted | None = None) -> bool:
        """No follow: each held error becomes its request's answer (a NOT_FOUND as `restarted`
        when the replica was found restarted); following stops for the rest of the stream."""
        self.follows = False
        for m in self._order:
            if m.result is None and m.held is not None:
                if restarted is not None and type(m.held.error) is NotFound:
                    m.held.error = restarted
                m.result, m.held = m.held, None
        return False
