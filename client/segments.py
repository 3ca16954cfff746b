"""Context parallelism in the client: one sequence split by token ranges over replicas (no I/O).

The scheme (docs/context-parallel.md): with `segment_tokens=N`, the
caller's sequence `X` is a list of server-side sequences, its *segments*, `"X#0"`, `"X#1"`, ...
Segment j holds the tokens from its base position `b_j` (`CreateSequenceRequest.base_position`;
`b_0 = 0`) up to the next segment's base, and lives on the j-th replica of X's rendezvous ranking
(`tkg.placement.ranking`; distinct replicas while there are fewer segments than replicas). A new
segment starts where a write begins at or past `b_last + N`, so bases are `j*N` unless an S-token
decode step overran its tail by up to S-1 tokens (a step's causal triangle is never split).

Writes (AppendKV, Decode's new tokens) go to the segment that holds their position; Decode asks
the tail with `return_lse` and every earlier segment that any query's window reaches with an
`attend_only` request, all at once, grouped per replica (at most two Decodes per replica: its
tail rows, its attend-only rows), and merges the answers exactly (`tkg.client.merge`).
`decode_stream` runs `streamed`, one step after another.
Truncate, release, export and prefetch act per segment; fork is refused. Errors name the caller's
sequence, never a segment.

Every operation is a generator in the `Core.decode` style: it yields a `Batch` of calls (keys are
call numbers) and is sent each one's response or `TkgError`; the shells make the calls,
concurrently when there are several. A client that does not know a sequence's segments (another
process made them) finds them by asking `"X#0"`, `"X#1"`, ... until one is not found.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

from tkg import codec, protowire
from tkg.client import routing
from tkg.client.errors import FailedPrecondition, NotFound, TkgError, Unavailable
from tkg.client.merge import merge_states
from tkg.client.messages import DecodeInput, DecodeResult, Timing, append_chunks, coldest_tier
from tkg.placement import ranking
from tkg.v1 import decode_attention_pb2 as pb

T = TypeVar("T")
SEGMENT_SEP = "#"
Plan = Generator[dict[int, Any], dict[int, Any], T]  # yields calls by number, is sent their outcomes


class Part(NamedTuple):
    """What a decode step asks of one segment: for the caller's `row`, segment `segment`, as the
    tail's normal request (`tail`: its new k/v appended) or an attend-only one."""

    row: int
    segment: int
    tail: bool


def segment_id(seq_id: str, j: int) -> str:
    """The server-side id of segment j of `seq_id`."""
    return f"{seq_id}{SEGMENT_SEP}{j}"


def renamed(err: TkgError, *seq_ids: str) -> TkgError:
    """`err` about segments of `seq_ids`, naming the sequences instead (same class and replica).
    Longer ids first, so that an id ending in another (`"ax"`, `"x"`) is renamed whole."""
    details = err.details
    for seq_id in sorted(seq_ids, key=len, reverse=True):
        details = re.sub(re.escape(seq_id + SEGMENT_SEP) + r"\d+", lambda _, s=seq_id: s, details)
    return with_details(err, details)


def with_details(err: TkgError, details: str) -> TkgError:
    """A copy of `err` saying `details`: same class, replica and any attributes of its own (a
    `ServerRestarted`'s instance ids: its constructor takes more than details and replica, so
    neither it nor `copy.copy`, which calls it with `args`, can make the copy)."""
    out = type(err).__new__(type(err))
    out.__dict__.update(vars(err), details=details)
    out.args = (out._text(),)
    return out


def merged(seq_id: str, bases: Sequence[int], infos: dict[int, pb.SequenceInfo]) -> pb.SequenceInfo:
    """Segment j's `infos[j]` (base `bases[j]`) as one `SequenceInfo` of `seq_id`: per layer the
    end `base + length` of its last non-empty segment, blocks summed, the first segment's
    instance id, and the coldest segment's tier (`messages.coldest_tier`: what a step waits for)."""
    lengths = [0] * len(infos[0].lengths)
    for j in range(len(bases)):
        for layer, n in enumerate(infos[j].lengths):
            if n:
                lengths[layer] = max(lengths[layer], int(infos[j].base_position) + n)
    return pb.SequenceInfo(
        sequence_id=seq_id, lengths=lengths, num_blocks=sum(i.num_blocks for i in infos.values()),
        instance_id=infos[0].instance_id, tier=coldest_tier([i.tier for i in infos.values()]),
    )  # fmt: skip


class Segments:
    """What the client knows of its segmented sequences: each one's segment bases, and the
    servers' sliding windows (per layer, 0 = full attention), asked once."""

    def __init__(self, router: routing.Router, segment_tokens: int) -> None:
        if segment_tokens < 1:
            raise ValueError(f"segment_tokens: {segment_tokens}; expected >= 1")
        self.router = router
        self.N = segment_tokens
        self.bases: dict[str, list[int]] = {}
        self.windows: list[int] | None = None

    # ---- placement -----------------------------------------------------------------------------

    def place(self, seq_id: str, j: int) -> tuple[str, int]:
        """Segment j's id and its replica (the j-th of the id's ranking, cycling), recorded with
        the router so that every call about the segment goes there (until it is found moved)."""
        sid = segment_id(seq_id, j)
        order = ranking(self.router.targets, seq_id)
        self.router.place(sid, order[j % len(order)])
        return sid, self.router.home(sid)

    def _call(self, seq_id: str, j: int, method: str, request: Any) -> Any:
        from tkg.client.core import Call  # the core imports this module

        sid, replica = self.place(seq_id, j)
        return Call(replica, method, request, (sid,))

    @staticmethod
    def _answers(outcomes: dict[int, Any], seq_id: str) -> dict[int, Any]:
        """The outcomes, or the first failure raised naming `seq_id`."""
        for o in outcomes.values():
            if isinstance(o, TkgError):
                raise renamed(o, seq_id) from None
        return outcomes

    # ---- knowledge -----------------------------------------------------------------------------

    def known(self, seq_id: str) -> Plan[list[int]]:
        """The segment bases of `seq_id`, asking the replicas when this client did not make them."""
        if seq_id in self.bases:
            return self.bases[seq_id]
        bases: list[int] = []
        while True:
            j = len(bases)
            call = self._call(seq_id, j, "GetSequence", pb.GetSequenceRequest(sequence_id=segment_id(seq_id, j)))
            outcome = (yield {0: call})[0]
            if isinstance(outcome, NotFound) and bases:
                break
            if isinstance(outcome, TkgError):
                raise renamed(outcome, seq_id) from None
            bases.append(int(outcome.base_position))
        self.bases[seq_id] = bases
        return bases

    def window_of(self, layer: int) -> Plan[int]:
        """The sliding window of `layer` (0: none), from the ServerInfo of the first replica that
        answers (every replica serves the same spec): one that is down or draining (UNAVAILABLE,
        e.g. replica 0 drained its segments to the others) must not stop the others' decodes."""
        if self.windows is None:
            from tkg.client.core import Call

            for r in range(len(self.router.targets)):
                info = (yield {0: Call(r, "GetServerInfo", pb.GetServerInfoRequest())})[0]
                if not isinstance(info, Unavailable):
                    break
            if isinstance(info, TkgError):
                raise info
            self.windows = list(info.sliding_window)
        return self.windows[layer] if layer < len(self.windows) else 0

    def info(self, seq_id: str) -> Plan[pb.SequenceInfo]:
        """The sequence as one `SequenceInfo` (`merged`), from every segment's GetSequence."""
        return (yield from self._each_info(seq_id, "GetSequence", pb.GetSequenceRequest))

    def prefetch(self, seq_id: str) -> Plan[pb.SequenceInfo]:
        """PrefetchSequence of every segment at once (a decode step reads all of them within the
        window, so all are brought back); the merged `SequenceInfo` once every one is on its
        replica's device."""
        return (yield from self._each_info(seq_id, "PrefetchSequence", pb.PrefetchSequenceRequest))

    def _each_info(self, seq_id: str, method: str, request: Callable[..., Any]) -> Plan[pb.SequenceInfo]:
        """`method` (answered with a `SequenceInfo`) for every segment in one batch, merged."""
        bases = yield from self.known(seq_id)
        calls = {
            j: self._call(seq_id, j, method, request(sequence_id=segment_id(seq_id, j))) for j in range(len(bases))
        }
        return merged(seq_id, bases, self._answers((yield calls), seq_id))

    # ---- sequences -----------------------------------------------------------------------------

    def create(self, seq_id: str) -> Plan[pb.SequenceInfo]:
        """Segment 0 of a new sequence (base 0); the rest start as tokens arrive."""
        req = pb.CreateSequenceRequest(sequence_id=segment_id(seq_id, 0))
        self._answers((yield {0: self._call(seq_id, 0, "CreateSequence", req)}), seq_id)
        self.bases[seq_id] = [0]
        return (yield from self.info(seq_id))

    def _segment_for(self, seq_id: str, position: int) -> Plan[tuple[int, int]]:
        """(segment index, tokens it may take from `position` before the next segment's base;
        None-like large for the tail) for a write at absolute `position`: a new tail segment is
        created at `position` when the tail has N tokens before it."""
        bases = yield from self.known(seq_id)
        j = max(i for i, b in enumerate(bases) if b <= position)
        if j == len(bases) - 1 and position - bases[j] >= self.N:
            j = len(bases)
            req = pb.CreateSequenceRequest(sequence_id=segment_id(seq_id, j), base_position=position)
            self._answers((yield {0: self._call(seq_id, j, "CreateSequence", req)}), seq_id)
            bases.append(position)
        room = bases[j + 1] - position if j + 1 < len(bases) else bases[j] + self.N - position
        return j, room

    def append(
        self, seq_id: str, layer: int, position: int, k: np.ndarray, v: np.ndarray, chunk_tokens: int
    ) -> Plan[pb.SequenceInfo]:
        """AppendKV of k, v `[T, Hkv, d]` at absolute `position`, cut at segment boundaries."""
        done = 0
        while done < k.shape[0]:
            j, room = yield from self._segment_for(seq_id, position + done)
            n = min(max(room, 1), k.shape[0] - done)
            chunks = list(append_chunks(segment_id(seq_id, j), layer, position + done, k[done : done + n],
                                        v[done : done + n], chunk_tokens))  # fmt: skip
            self._answers((yield {0: self._call(seq_id, j, "AppendKV", chunks)}), seq_id)
            done += n
        return (yield from self.info(seq_id))

    def truncate(self, seq_id: str, length: int) -> Plan[pb.SequenceInfo]:
        """Keep the first `length` tokens: the segment holding position `length` is truncated to
        `length - base`, later ones released (after it, so a refused truncate changes nothing)."""
        bases = yield from self.known(seq_id)
        if length < 0:
            raise ValueError(f"length: {length}; expected >= 0")
        j = max(i for i, b in enumerate(bases) if b <= length)
        req = pb.TruncateSequenceRequest(sequence_id=segment_id(seq_id, j), length=length - bases[j])
        self._answers((yield {0: self._call(seq_id, j, "TruncateSequence", req)}), seq_id)
        later = {
            i: self._call(seq_id, i, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id=segment_id(seq_id, i)))
            for i in range(j + 1, len(bases))
        }
        if later:
            self._answers((yield later), seq_id)
            del bases[j + 1 :]
        return (yield from self.info(seq_id))

    def release(self, seq_id: str) -> Plan[int]:
        """Release every segment; the blocks freed in all."""
        bases = yield from self.known(seq_id)
        calls = {
            j: self._call(seq_id, j, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id=segment_id(seq_id, j)))
            for j in range(len(bases))
        }
        freed = self._answers((yield calls), seq_id)
        self.bases.pop(seq_id, None)
        for j in range(len(bases)):
            self.router.forget(segment_id(seq_id, j))
        return sum(int(r.freed_blocks) for r in freed.values())

    def export(self, seq_id: str) -> Plan[list[pb.SequenceChunk]]:
        """Every segment's export stream, segment after segment (each starts with its header,
        which carries its base position); `import_` takes the concatenation back."""
        bases = yield from self.known(seq_id)
        calls = {
            j: self._call(seq_id, j, "ExportSequence", pb.ExportSequenceRequest(sequence_id=segment_id(seq_id, j)))
            for j in range(len(bases))
        }
        streams = self._answers((yield calls), seq_id)
        return [m for j in range(len(bases)) for m in streams[j]]

    def import_(self, messages: Sequence[pb.SequenceChunk]) -> Plan[pb.SequenceInfo]:
        """Import an `export` of a segmented sequence: each segment on its own replica."""
        pieces: list[list[pb.SequenceChunk]] = []
        for m in messages:
            if m.HasField("header"):
                pieces.append([])
            if not pieces:
                raise ValueError("messages: the first has no header; expected the stream export_sequence returns")
            pieces[-1].append(m)
        if not pieces:
            raise ValueError("messages: empty; expected the stream export_sequence returns")
        seq_id, _, _ = pieces[0][0].sequence_id.rpartition(SEGMENT_SEP)
        calls = {j: self._call(seq_id, j, "ImportSequence", piece) for j, piece in enumerate(pieces)}
        self._answers((yield calls), seq_id)
        self.bases[seq_id] = [int(p[0].header.base_position) for p in pieces]
        return (yield from self.info(seq_id))

    @staticmethod
    def fork(source_id: str) -> TkgError:
        return FailedPrecondition(
            f"source_id: {source_id!r} is a segmented sequence (segment_tokens is set); fork of a segmented "
            "sequence is not supported in this round; expected a client without segment_tokens"
        )

    # ---- decode --------------------------------------------------------------------------------

    def decode(self, d: DecodeInput) -> Plan[DecodeResult]:
        """One decode step: per sequence, its new tokens to the segment holding their position
        (with `return_lse`) and an `attend_only` request to every earlier segment within reach of
        the window. The requests are grouped per replica (`_grouped`: at most two Decodes per
        replica, its tails' and its attend-only rows'), all in one batch; each row merged exactly,
        in the caller's order, out in q's dtype. Fails as a whole, naming the first failing sequence."""
        W = yield from self.window_of(d.layer)
        parts: list[Part] = []
        for b, seq_id in enumerate(d.sequence_ids):
            p = int(d.positions[b])
            j, _ = yield from self._segment_for(seq_id, p)
            bases = self.bases[seq_id]
            reach = p - W + 1 if W else 0  # the earliest key any query of the step can see
            for i in range(j + 1):
                if i < j and bases[i + 1] <= reach:
                    continue  # wholly outside every query's window: not asked
                parts.append(Part(b, i, i == j))
        answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # part -> (out [Hq, S, d], lse [Hq, S])
        errors: dict[int, TkgError] = {}  # caller's row -> why it failed
        timing: pb.Timing | None = None
        todo = list(range(len(parts)))
        for attempt in range(2):
            groups = self._grouped(d, parts, todo)
            outcomes = yield {n: call for n, (call, _) in enumerate(groups)}
            todo = []
            for n, (call, mine) in enumerate(groups):
                o = outcomes[n]
                if isinstance(o, TkgError):
                    # A drain moved its segments elsewhere (the verdict on the call found them, on
                    # several replicas): ask again, grouped by where they are now (once). A failed
                    # Decode appended nothing, so its tail rows may be sent again.
                    if attempt == 0 and isinstance(o, NotFound | Unavailable) and self._moved_away(call):
                        todo.extend(mine)
                        continue
                    b = self._blamed(o, d, [parts[m].row for m in mine])
                    errors.setdefault(b, self._named(o, d, [parts[m].row for m in mine]))
                    continue
                outs, lses = o.out, o.lse
                if outs is None or lses is None:
                    raise codec.TensorError("out, lse: absent from a return_lse response; expected both")
                for r, m in enumerate(mine):
                    answers[m] = (outs[r], lses[r])
                if timing is None or o.timing.total_us > timing.total_us:
                    timing = o.timing  # the slowest call sets the step's time
            if not todo:
                break
        if errors:
            raise errors[min(errors)]
        out = np.empty(d.q.shape, dtype=d.q.dtype)
        for b in range(len(d.sequence_ids)):
            mine = [m for m, part in enumerate(parts) if part.row == b]  # in segment order
            out[b] = merge_states([answers[m][0] for m in mine], [answers[m][1] for m in mine])[0].astype(d.q.dtype)
        return DecodeResult(d.request_id, d.layer, out, Timing.from_pb(timing) if timing is not None else None)

    def streamed(self, d: DecodeInput) -> Plan[DecodeResult]:
        """One request of a segmented `decode_stream`: `decode(d)`, a failure as the result's
        `error` (naming the sequence) instead of raised, so that the stream goes on."""
        try:
            return (yield from self.decode(d))
        except TkgError as err:
            return DecodeResult(d.request_id, d.layer, None, None, err)

    def _grouped(self, d: DecodeInput, parts: Sequence[Part], todo: Sequence[int]) -> list[tuple[Any, list[int]]]:
        """The Decode calls asking `parts[m]` for every m in `todo`: one per (replica, tail or
        attend-only), since `return_lse`/`attend_only` are per request and a segment's replica is
        where the router says it is now. Each call with its parts, rows in `todo`'s order (the
        caller's)."""
        from tkg.client.core import Call  # the core imports this module

        groups: dict[tuple[int, bool], list[int]] = {}
        for m in todo:
            part = parts[m]
            _, replica = self.place(d.sequence_ids[part.row], part.segment)
            groups.setdefault((replica, part.tail), []).append(m)
        calls = []
        for (replica, tail), mine in groups.items():
            rows = np.asarray([parts[m].row for m in mine])
            ids = [segment_id(d.sequence_ids[parts[m].row], parts[m].segment) for m in mine]
            # Attend-only requests carry no k/v: they append nothing.
            req = protowire.decode_request_bytes(
                d.layer, ids, [int(d.positions[b]) for b in rows], d.q[rows],
                d.k[rows] if tail else None, d.v[rows] if tail else None,
                d.request_id, return_lse=True, attend_only=not tail,
            )  # fmt: skip
            calls.append((Call(replica, "Decode", req, tuple(ids)), mine))
        return calls

    def _moved_away(self, call: Any) -> bool:
        """Every segment `call` asked is now known on a replica other than the one that failed."""
        return all(self.router.home(s) != call.replica for s in call.seq_ids)

    @staticmethod
    def _blamed(err: TkgError, d: DecodeInput, rows: Sequence[int]) -> int:
        """The caller's row a failed grouped call's `err` is about: the first of `rows` whose
        segment the message names (the server names the sequence it refused), else the first."""
        for b in rows:
            if re.search(re.escape(d.sequence_ids[b] + SEGMENT_SEP) + r"\d+", err.details):
                return b
        return rows[0]

    @staticmethod
    def _named(err: TkgError, d: DecodeInput, rows: Sequence[int]) -> TkgError:
        """`err` of a grouped call whose request rows were the caller's `rows`: naming the caller's
        sequences instead of segments, and the caller's indices in `sequence_ids[i]`/`positions[i]`."""
        err = renamed(err, *{d.sequence_ids[b]: None for b in rows})

        def index(m: re.Match[str]) -> str:
            r = int(m.group(2))
            return f"{m.group(1)}[{rows[r]}]" if r < len(rows) else m.group(0)

        return with_details(err, re.sub(r"\b(sequence_ids|positions)\[(\d+)\]", index, err.details))
