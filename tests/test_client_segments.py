"""`tkg.client.segments` without a server: which segments a decode step asks (windows), where
segments live (the id's rendezvous ranking), when a new segment starts, errors naming the sequence."""

from __future__ import annotations

import numpy as np
import pytest

from tkg import codec
from tkg.client import routing
from tkg.client.errors import NotFound, OutOfRange
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
    reqs = [c.request for c in batch.values()]
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
    assert s.bases["x"] == [0, 1803] and [c.request.sequence_ids[0] for c in batch.values()] == ["x#0", "x#1"]
    # Answers merge: segment 0 saw nothing (lse -inf), segment 1 answers 1s with lse 0.
    out = np.ones((1, 2, 1, 4), np.float32)
    answers = {}
    for n, lse in ((0, -np.inf), (1, 0.0)):
        r = pb.DecodeResponse()
        codec.encode(out * (n + 1), r.out)
        codec.encode(np.full((1, 2, 1), lse, np.float32), r.lse)
        answers[n] = r
    with pytest.raises(StopIteration) as done:
        plan.send(answers)
    np.testing.assert_array_equal(done.value.value.out, out * 2)


def test_errors_name_the_sequence_not_the_segment() -> None:
    err = renamed(OutOfRange("length: 9 is past sequence 'x#12''s length 3; x#2 too", "b:2"), "x")
    assert type(err) is OutOfRange and err.details == "length: 9 is past sequence 'x''s length 3; x too"
    assert err.replica == "b:2"
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
