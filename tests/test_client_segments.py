"""`tkg.client.segments` without a server: which segments a decode step asks (windows), where
segments live (the id's rendezvous ranking), when a new segment starts, errors naming the sequence."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from support.fakes import sent

from tkg import codec, protowire
from tkg.client import routing
from tkg.client.core import Call
from tkg.client.errors import NotFound, OutOfRange, PermissionDenied, ServerRestarted, Unavailable
from tkg.client.merge import merge_states
from tkg.client.messages import DecodeInput
from tkg.client.segments import Segments, merged, renamed
from tkg.placement import pick, ranking
from tkg.v1 import decode_attention_pb2 as pb

TARGETS = ["a:1", "b:2", "c:3"]


def _segments(bases: list[int], windows: list[int]) -> Segments:
    s = Segments(routing.Router(TARGETS), 1800)
    s.bases["x"] = list(bases)
    s.windows = windows
    return s


def _step(layer: int, p: int) -> DecodeInput:
    z = np.zeros((1, 2, 1, 4), np.float32)
    return DecodeInput(layer, ["x"], [p], z, z[:, :1], z[:, :1])


@pytest.mark.parametrize(("layer", "asked"), [(0, [1, 2]), (1, [0, 1, 2])])
def test_a_step_asks_only_segments_its_window_reaches(layer: int, asked: list[int]) -> None:
    s = _segments([0, 1800, 3600], [1500, 0])
    batch = next(s.decode(_step(layer, 4990)))
    reqs = [sent(c.request) for c in batch.values()]
    assert [r.sequence_ids[0] for r in reqs] == [f"x#{j}" for j in asked]
    assert [r.attend_only for r in reqs] == [True] * (len(asked) - 1) + [False]
    assert all(r.return_lse and r.positions == [4990] for r in reqs)
    assert not reqs[0].HasField("k") and reqs[-1].HasField("k")


def test_segments_live_on_the_ids_ranking() -> None:
    s = _segments([0, 1800, 3600], [0, 0])
    order = ranking(TARGETS, "x")
    assert order[0] == pick(TARGETS, "x") and sorted(order) == [0, 1, 2]
    assert [s.place("x", j)[1] for j in range(4)] == [*order, order[0]]


def test_a_full_tail_starts_a_segment_where_the_write_begins() -> None:
    s = _segments([0], [0, 0])
    plan = s.decode(_step(0, 1803))  # the tail (base 0) has 1803 >= 1800 tokens before the step
    batch = next(plan)
    ((_, call),) = batch.items()
    assert call.method == "CreateSequence" and call.request.base_position == 1803
    assert call.request.sequence_id == "x#1" and call.replica == ranking(TARGETS, "x")[1]
    batch = plan.send({0: pb.SequenceInfo(sequence_id="x#1", base_position=1803)})
    assert s.bases["x"] == [0, 1803] and [sent(c.request).sequence_ids[0] for c in batch.values()] == ["x#0", "x#1"]
    # Answers merge: segment 0 saw nothing (lse -inf), segment 1 answers 1s with lse 0.
    out = np.ones((1, 2, 1, 4), np.float32)
    answers = {}
    for n, lse in ((0, -np.inf), (1, 0.0)):
        r = pb.DecodeResponse()
        codec.encode(out * (n + 1), r.out)
        codec.encode(np.full((1, 2, 1), lse, np.float32), r.lse)
        answers[n] = protowire.answer_of(r)
    with pytest.raises(StopIteration) as done:
        plan.send(answers)
    np.testing.assert_array_equal(done.value.value.out, out * 2)


def test_errors_name_the_sequence_not_the_segment() -> None:
    err = renamed(OutOfRange("length: 9 is past sequence 'x#12''s length 3; x#2 too", "b:2"), "x")
    assert type(err) is OutOfRange and err.details == "length: 9 is past sequence 'x''s length 3; x too"
    assert err.replica == "b:2"
    restarted = renamed(ServerRestarted("no sequence 'x#1'", "b:2", "i-old", "i-new"), "x")
    assert type(restarted) is ServerRestarted and (restarted.old_instance, restarted.new_instance) == ("i-old", "i-new")
    assert restarted.details == "no sequence 'x' (server restarted: instance i-old is now i-new)"
    assert str(restarted) == f"NOT_FOUND [replica b:2]: {restarted.details}"
    s = _segments([0, 1800], [0, 0])
    plan = s.release("x")
    next(plan)
    with pytest.raises(NotFound, match="no sequence 'x'"):
        plan.send({0: pb.ReleaseSequenceResponse(freed_blocks=1), 1: NotFound("no sequence 'x#1'")})


def test_a_segmented_sequence_is_in_its_coldest_segments_tier() -> None:
    def infos(*tiers: str) -> dict[int, pb.SequenceInfo]:
        return {j: pb.SequenceInfo(lengths=[4], base_position=4 * j, num_blocks=1, tier=t) for j, t in enumerate(tiers)}

    assert merged("x", [0, 4, 8], infos("device", "disk", "host")).tier == "disk"
    assert merged("x", [0, 4], infos("host", "device")).tier == "host"
    assert merged("x", [0, 4], infos("device", "device")).tier == "device"
    assert merged("x", [0, 4], infos("", "")).tier == ""  # servers without tiers: nothing claimed
    assert merged("x", [0, 4], infos("", "host")).tier == "host"
    assert merged("x", [0, 4], infos("disk", "tape")).tier == "tape"  # unknown: not assumed ready
    info = merged("x", [0, 4, 8], infos("device", "device", "device"))
    assert (info.sequence_id, list(info.lengths), info.num_blocks) == ("x", [12], 3)


def _batch_step(n: int, p: int) -> DecodeInput:
    """A step of sequences s0 .. s{n-1} at position `p`, row b's q/k/v all b."""
    q = np.stack([np.full((2, 1, 4), b, np.float32) for b in range(n)])
    return DecodeInput(0, [f"s{b}" for b in range(n)], [p] * n, q, q[:, :1], q[:, :1])


def _answer(call: Call, state: Callable[[str, int], tuple[np.ndarray, np.ndarray]]) -> protowire.DecodeAnswer:
    """A Decode response to `call`: row r's out and lse from `state(sequence id, segment index)`."""
    outs, lses = [], []
    for sid in sent(call.request).sequence_ids:
        seq, _, j = sid.rpartition("#")
        o, lse = state(seq, int(j))
        outs.append(o)
        lses.append(lse)
    r = pb.DecodeResponse()
    codec.encode(np.stack(outs), r.out)
    codec.encode(np.stack(lses), r.lse)
    return protowire.answer_of(r)


def _state(seq: str, j: int) -> tuple[np.ndarray, np.ndarray]:
    """A segment's made-up partial state: out `[Hq=2, S=1, d=4]`, lse `[2, 1]`, distinct per (seq, j)."""
    b = int(seq[1:])
    return np.full((2, 1, 4), 10 * b + j, np.float32), np.full((2, 1), 0.5 * j - 0.25 * b, np.float32)


def test_a_batch_asks_each_replica_at_most_twice() -> None:
    """Four sequences of three segments each over three replicas: one Decode per (replica, tail or
    attend-only), never one per (sequence, segment) (12 calls before grouping); each row merges its
    own segments' states, in the caller's order."""
    s = Segments(routing.Router(TARGETS), 1800)
    s.windows = [0]
    for b in range(4):
        s.bases[f"s{b}"] = [0, 1800, 3600]
    plan = s.decode(_batch_step(4, 4990))
    batch = next(plan)
    kinds = [(c.replica, sent(c.request).attend_only) for c in batch.values()]
    assert len(kinds) == len(set(kinds)) <= 6 and all(c.method == "Decode" for c in batch.values())
    asked = sorted(sid for c in batch.values() for sid in sent(c.request).sequence_ids)
    assert asked == sorted(f"s{b}#{j}" for b in range(4) for j in range(3))
    for c in batch.values():
        for sid in sent(c.request).sequence_ids:  # each segment asked where it lives, tails with their k/v
            seq, _, j = sid.rpartition("#")
            assert c.replica == ranking(TARGETS, seq)[int(j)] and sent(c.request).attend_only == (j != "2")
        assert sent(c.request).HasField("k") != sent(c.request).attend_only and sent(c.request).return_lse
        rows = [int(sid[1]) for sid in sent(c.request).sequence_ids]
        np.testing.assert_array_equal(codec.decode(sent(c.request).q)[:, 0, 0, 0], rows)  # q rows follow the ids
    with pytest.raises(StopIteration) as done:
        plan.send({n: _answer(c, _state) for n, c in batch.items()})
    for b in range(4):
        want = merge_states(*zip(*(_state(f"s{b}", j) for j in range(3)), strict=True))[0]
        np.testing.assert_array_equal(done.value.value.out[b], want)


def test_a_grouped_failure_names_the_callers_sequence_and_index() -> None:
    s = Segments(routing.Router(TARGETS), 1800)
    s.windows = [0]
    for b in range(3):
        s.bases[f"s{b}"] = [0, 1800]
    plan = s.decode(_batch_step(3, 2000))
    batch = next(plan)
    # The tails' call on one replica refuses the row of s2 (whichever index it has in that call).
    reqs = {n: sent(c.request) for n, c in batch.items()}
    n, call = next((n, batch[n]) for n, m in reqs.items() if not m.attend_only and "s2#1" in m.sequence_ids)
    r = list(sent(call.request).sequence_ids).index("s2#1")
    err = OutOfRange(f"positions[{r}]: 2000 is before sequence 's2#1''s end at layer 0", "b:2")
    outcomes = {m: err if m == n else _answer(c, _state) for m, c in batch.items()}
    with pytest.raises(OutOfRange) as raised:
        plan.send(outcomes)
    assert raised.value.details == "positions[2]: 2000 is before sequence 's2''s end at layer 0"


def test_segments_moved_to_several_replicas_are_asked_again_where_they_are() -> None:
    """A drain moved the segments one call asked to two different replicas (the verdict on the
    call found them and told the router): the step asks them again there, grouped anew, once."""
    s = Segments(routing.Router(TARGETS), 1800)
    s.windows = [0]
    for b in range(3):
        s.bases[f"s{b}"] = [0, 1800, 3600]
    plan = s.decode(_batch_step(3, 4000))
    batch = next(plan)
    n, call = max(batch.items(), key=lambda nc: len(sent(nc[1].request).sequence_ids))
    assert len(sent(call.request).sequence_ids) >= 2
    others = [r for r in range(3) if r != call.replica]
    for i, sid in enumerate(sent(call.request).sequence_ids):  # where the verdict's lookups found them
        s.router.moved(sid, others[i % 2])
    outcomes = {m: NotFound("gone", TARGETS[c.replica]) if m == n else _answer(c, _state) for m, c in batch.items()}
    again = plan.send(outcomes)
    asked = sent(call.request)
    assert sorted(sid for c in again.values() for sid in sent(c.request).sequence_ids) == sorted(asked.sequence_ids)
    assert all(c.replica != call.replica and sent(c.request).attend_only == asked.attend_only for c in again.values())
    with pytest.raises(StopIteration) as done:
        plan.send({m: _answer(c, _state) for m, c in again.items()})
    for b in range(3):
        want = merge_states(*zip(*(_state(f"s{b}", j) for j in range(3)), strict=True))[0]
        np.testing.assert_array_equal(done.value.value.out[b], want)


def test_a_streamed_step_answers_its_failure_instead_of_raising() -> None:
    s = _segments([0, 1800], [0, 0])
    plan = s.streamed(_step(0, 2000))
    batch = next(plan)
    n = next(n for n, c in batch.items() if not sent(c.request).attend_only)
    ok = _answer(batch[1 - n], lambda seq, j: (np.zeros((2, 1, 4), np.float32), np.zeros((2, 1), np.float32)))
    outcomes = {n: OutOfRange("sequence 'x#1' refused", "b:2"), 1 - n: ok}
    with pytest.raises(StopIteration) as done:
        plan.send(outcomes)
    res = done.value.value
    assert res.out is None and type(res.error) is OutOfRange and res.error.details == "sequence 'x' refused"


def test_the_windows_are_asked_of_the_next_replica_when_one_is_down() -> None:
    """Replica 0 drained (UNAVAILABLE): the layers' windows come from replica 1's ServerInfo,
    and the step goes on; any other refusal is raised."""
    s = _segments([0, 1800], [0, 0])
    s.windows = None
    plan = s.decode(_step(0, 2000))
    ask = next(plan)
    assert [(c.replica, c.method) for c in ask.values()] == [(0, "GetServerInfo")]
    ask = plan.send({0: Unavailable("draining", "a:1")})
    assert [(c.replica, c.method) for c in ask.values()] == [(1, "GetServerInfo")]
    batch = plan.send({0: pb.ServerInfo(sliding_window=[0, 0])})
    assert s.windows == [0, 0] and {c.method for c in batch.values()} == {"Decode"}
    s.windows = None
    plan = s.decode(_step(0, 2000))
    next(plan)
    with pytest.raises(PermissionDenied):
        plan.send({0: PermissionDenied("no", "a:1")})
