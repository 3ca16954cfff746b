"""`tkg.client.core` on its own: no channels, no event loop. Its generators are driven by hand,
answering each question it asks, so the test sees exactly what it asks, in which order, and what
it decides."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from support.fakes import sent

from tkg import codec, protowire
from tkg.client import DecodeInput, errors, routing
from tkg.client.core import AskInstance, Call, Core, drive, merge_split, probe_timeout
from tkg.client.messages import DecodeResult, Timing
from tkg.v1 import decode_attention_pb2 as pb

TARGETS = ["a:1", "b:1", "c:1"]


def on(replica: int, prefix: str = "s") -> str:
    """An id whose rendezvous owner is `replica`."""
    return next(f"{prefix}{i}" for i in range(1000) if routing.pick(TARGETS, f"{prefix}{i}") == replica)


def info(sid: str, instance: str) -> pb.SequenceInfo:
    return pb.SequenceInfo(sequence_id=sid, instance_id=instance)


def run(decision: Any, answers: dict[Any, Any]) -> tuple[Any, list[Any]]:
    """Drive `decision`, answering from `answers` (missing: None); its result and what it asked."""
    asked: list[Any] = []

    def answer(ask: Any) -> Any:
        asked.append(ask)
        return answers.get(ask)

    return drive(decision, answer), asked


def test_a_not_found_asks_the_instance_then_searches_in_the_drains_order_and_follows_once() -> None:
    core = Core(TARGETS)
    sid = on(0)
    core.answered(core.create(sid), info(sid, "i0"))
    call = core.get(sid)
    order = core.router.candidates(sid, 0)
    found_at = order[1]  # not where a drain would put it first: the search goes on
    verdict, asked = run(
        core.failed(call, errors.NotFound("gone", "a:1")),
        {AskInstance(0): "i0", routing.Lookup(found_at, sid): info(sid, "i9")},
    )
    assert asked == [AskInstance(0), routing.Lookup(order[0], sid), routing.Lookup(found_at, sid)]
    assert verdict == Call(found_at, "GetSequence", call.request, (sid,))
    assert core.replica(sid) == found_at and core.instances.of_sequence[sid] == "i9"
    # The repeated call is not followed again: its failure is the caller's.
    again, asked = run(
        core.failed(verdict, errors.NotFound("gone", "b:1"), follow=False), {AskInstance(found_at): "i9"}
    )
    assert type(again) is errors.NotFound and asked == [AskInstance(found_at)]


def test_a_restart_is_told_and_still_searched() -> None:
    core = Core(TARGETS)
    sid = on(1)
    core.answered(core.create(sid), info(sid, "old"))
    verdict, asked = run(core.failed(core.get(sid), errors.NotFound("gone")), {AskInstance(1): "new"})
    assert isinstance(verdict, errors.ServerRestarted) and (verdict.old_instance, verdict.new_instance) == (
        "old",
        "new",
    )
    assert asked[0] == AskInstance(1) and {a.replica for a in asked[1:]} == {0, 2}  # found nowhere else


def test_unavailable_searches_without_asking_the_instance_and_other_errors_ask_nothing() -> None:
    core = Core(TARGETS)
    sid = on(2)
    verdict, asked = run(core.failed(core.truncate(sid, 3), errors.Unavailable("down")), {})
    assert isinstance(verdict, errors.Unavailable) and all(isinstance(a, routing.Lookup) for a in asked)
    assert [a.replica for a in asked] == core.router.candidates(sid, 2)
    for err in (errors.InvalidArgument("bad"), errors.ResourceExhausted("full")):
        assert run(core.failed(core.get(sid), err), {}) == (err, [])
    # CreateSequence's NOT_FOUND is not about an existing sequence: no verdict, no search.
    nf = errors.NotFound("x")
    assert run(core.failed(core.create(sid), nf), {}) == (nf, [])
    # One replica: nowhere else to look.
    single = Core(TARGETS[:1])
    down = errors.Unavailable("down")
    assert run(single.failed(single.get(sid), down), {}) == (down, [])


def test_sequences_found_on_several_replicas_are_not_followed_by_one_call() -> None:
    core = Core(TARGETS)
    a, b = on(0, "a"), on(0, "b")
    ra = core.router.candidates(a, 0)[0]
    rb = ({1, 2} - {ra}).pop()
    answers = {routing.Lookup(ra, a): info(a, "x"), routing.Lookup(rb, b): info(b, "y")}
    call = Call(0, "Decode", pb.DecodeRequest(sequence_ids=[a, b]), (a, b))
    verdict, _ = run(core.failed(call, errors.Unavailable("down")), answers)
    assert isinstance(verdict, errors.Unavailable)  # the caller splits (see the decode test)
    assert (core.replica(a), core.replica(b)) == (ra, rb)  # but both finds are remembered


def response(replica: int, n: int, total_us: int) -> protowire.DecodeAnswer:
    out = np.full((n, 1, 1, 2), 10.0 * replica, np.float32) + np.arange(n, dtype=np.float32)[:, None, None, None]
    resp = pb.DecodeResponse(timing=pb.Timing(total_us=total_us))
    codec.encode(out, resp.out)
    return protowire.answer_of(resp)


def decode_input(sids: list[str]) -> DecodeInput:
    z = np.zeros((len(sids), 1, 1, 2), np.float32)
    return DecodeInput(0, sids, [7] * len(sids), z, z, z, "rid")


def test_decode_one_replica_is_one_call_and_its_error_is_raised_as_is() -> None:
    core = Core(TARGETS)
    sids = [on(1, "p"), on(1, "q")]
    step = core.decode(decode_input(sids))
    batch = next(step)
    assert list(batch) == [1] and batch[1].method == "Decode" and list(sent(batch[1].request).sequence_ids) == sids
    with pytest.raises(StopIteration) as done:
        step.send({1: response(1, 2, 5)})
    assert done.value.value.out[:, 0, 0, 0].tolist() == [10.0, 11.0]
    step = core.decode(decode_input(sids))
    next(step)
    err = errors.FailedPrecondition("positions[0]")
    with pytest.raises(errors.FailedPrecondition) as raised:
        step.send({1: err})
    assert raised.value is err


def test_decode_splits_by_replica_and_merges_in_the_callers_order() -> None:
    core = Core(TARGETS)
    sids = [on(2, "a"), on(0, "b"), on(2, "c"), on(1, "d")]
    step = core.decode(decode_input(sids))
    batch = next(step)
    assert {r: list(sent(c.request).sequence_ids) for r, c in batch.items()} == {
        2: [sids[0], sids[2]],
        0: [sids[1]],
        1: [sids[3]],
    }
    assert all(list(sent(c.request).positions) == [7] * len(c.seq_ids) for c in batch.values())
    with pytest.raises(StopIteration) as done:
        step.send({2: response(2, 2, 30), 0: response(0, 1, 10), 1: response(1, 1, 20)})
    res = done.value.value
    assert res.out[:, 0, 0, 0].tolist() == [20.0, 0.0, 21.0, 10.0] and res.timing.total_us == 30
    assert res.request_id == "rid" and res.ok is None


def test_decode_of_sequences_moved_to_several_replicas_is_split_after_the_lone_call() -> None:
    core = Core(TARGETS)
    a, b = on(0, "a"), on(0, "b")
    step = core.decode(decode_input([a, b]))
    assert list(next(step)) == [0]
    core.router.moved(a, 1)  # what the lone call's verdict found
    core.router.moved(b, 2)
    batch = step.send({0: errors.NotFound("gone")})
    assert {r: list(sent(c.request).sequence_ids) for r, c in batch.items()} == {1: [a], 2: [b]}
    with pytest.raises(errors.PartialDecodeError) as partial:
        step.send({1: response(1, 1, 3), 2: errors.Unavailable("down", "c:1")})
    assert partial.value.result.ok.tolist() == [True, False] and list(partial.value.errors) == [b]
    # Moved to one replica, the verdict already repeated the call: its error stands.
    step = core.decode(decode_input([a]))
    next(step)
    with pytest.raises(errors.Unavailable):
        step.send({1: errors.Unavailable("down")})


def test_merge_split_marks_failed_rows_and_names_them() -> None:
    d = decode_input(["x", "y", "z"])
    ok = DecodeResult("rid", 0, np.ones((2, 1, 1, 2), np.float32), Timing(0, 0, 4, 2, 1))
    with pytest.raises(errors.PartialDecodeError) as partial:
        merge_split(d, {0: [0, 2], 1: [1]}, {0: ok, 1: errors.Unavailable("down", "b:1")})
    err = partial.value
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.failed_sequences == ["y"] and "b:1" in str(err)
    assert err.result.ok.tolist() == [True, False, True]
    assert np.isnan(err.result.out[1]).all() and (err.result.out[[0, 2]] == 1).all()
    with pytest.raises(errors.PartialDecodeError) as none_ok:
        merge_split(d, {0: [0, 2], 1: [1]}, {0: errors.Unavailable("a"), 1: errors.NotFound("b")})
    assert none_ok.value.result.out is None and none_ok.value.code == grpc.StatusCode.UNKNOWN


def test_fork_picks_or_checks_an_id_on_the_sources_replica() -> None:
    core = Core(TARGETS)
    src = on(1)
    call = core.fork(src, None)
    assert call.replica == 1 and routing.pick(TARGETS, call.request.sequence_id) == 1
    with pytest.raises(ValueError, match=f"routes to {TARGETS[2]}, not to the source's replica {TARGETS[1]}"):
        core.fork(src, on(2, "c"))
    core.router.moved(src, 2)  # a moved source: its children go where it is
    assert core.fork(src, on(2, "c")).replica == 2
    core.answered(Call(2, "ForkSequence", call.request, (src,)), info(on(0, "k"), "i"))
    assert core.replica(on(0, "k")) == 2
    assert Core(TARGETS[:1]).fork(src, "any").request.sequence_id == "any"  # one replica: nothing to check


def test_release_forgets_and_create_picks_routable_ids() -> None:
    core = Core(TARGETS)
    sid = on(0)
    core.router.moved(sid, 2)
    core.answered(core.get(sid), info(sid, "i2"))
    release = core.release(sid)
    assert release.replica == 2
    core.answered(release, pb.ReleaseSequenceResponse(freed_blocks=3))
    assert core.replica(sid) == 0 and sid not in core.instances.of_sequence
    assert core.create(None).request.sequence_id  # several replicas: the client names it
    assert Core(TARGETS[:1]).create(None).request.sequence_id == ""  # one: the server does


def test_stream_replica_and_probe_timeout() -> None:
    core = Core(TARGETS)
    assert core.stream_replica([[on(2, "a")], [on(2, "b"), on(2, "c")]]) == 2
    with pytest.raises(ValueError, match="several replicas"):
        core.stream_replica([[on(2, "a")], [on(0, "b")]])
    assert core.stream_replica([]) == 0 and Core(["x:1"]).stream_replica([["anything"]]) == 0
    assert (probe_timeout(None), probe_timeout(30.0), probe_timeout(0.5)) == (5.0, 5.0, 0.5)


def test_import_and_append_requests() -> None:
    core = Core(TARGETS)
    with pytest.raises(ValueError, match="empty"):
        core.import_(None, iter(()), None)
    first = pb.SequenceChunk(sequence_id=on(1))
    assert core.import_(first, [first], None).replica == 1 and core.import_(first, [first], 0).replica == 0
    k = np.zeros((5, 1, 2), np.float32)
    call = core.append(on(2), 1, 3, k, k, chunk_tokens=2)
    assert call.replica == 2 and [(m.layer, m.position, m.k.shape[0]) for m in call.request] == [
        (1, 3, 2),
        (1, 5, 2),
        (1, 7, 1),
    ]


def test_prefetch_is_routed_and_followed_like_get_sequence() -> None:
    core = Core(TARGETS)
    sid = on(0)
    call = core.prefetch(sid)
    assert (call.replica, call.method, call.request.sequence_id, call.seq_ids) == (0, "PrefetchSequence", sid, (sid,))
    first = core.router.candidates(sid, 0)[0]
    found = {routing.Lookup(first, sid): info(sid, "i1")}
    verdict, asked = run(core.failed(call, errors.Unavailable("draining", "a:1")), found)
    assert verdict == call.to(first) and asked == [routing.Lookup(first, sid)]  # UNAVAILABLE: no instance check
    assert core.prefetch(sid).replica == first  # remembered
