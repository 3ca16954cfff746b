"""Sequence-affine routing: rendezvous hashing unit tests, and three replicas behind one client."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from support.server_proc import ServerProc, start_server

from tkg.client import AsyncClient, Client, DecodeInput, errors, routing


def test_pick_is_stable_and_spreads() -> None:
    replicas = ["a:1", "b:1", "c:1"]
    ids = [f"seq-{i}" for i in range(3000)]
    owners = [routing.pick(replicas, s) for s in ids]
    assert owners == [routing.pick(list(replicas), s) for s in ids]  # deterministic, process-independent
    counts = Counter(owners)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 800  # roughly a third each


def test_adding_a_replica_moves_only_its_share() -> None:
    ids = [f"seq-{i}" for i in range(3000)]
    three, four = ["a:1", "b:1", "c:1"], ["a:1", "b:1", "c:1", "d:1"]
    moved = [s for s in ids if four[routing.pick(four, s)] != three[routing.pick(three, s)]]
    # Only sequences won by the new replica move; that is about 1/4 of them, never more.
    assert all(four[routing.pick(four, s)] == "d:1" for s in moved)
    assert 500 < len(moved) < 1000


def test_group_keeps_caller_order() -> None:
    replicas = ["a:1", "b:1"]
    ids = [f"s{i}" for i in range(10)]
    groups = routing.group(replicas, ids)
    assert sorted(p for ps in groups.values() for p in ps) == list(range(10))
    assert all(ps == sorted(ps) for ps in groups.values())


def test_router_follows_moved_sequences_and_candidates_are_the_drains_order() -> None:
    targets = ["a:1", "b:1", "c:1"]
    router = routing.Router(targets)
    ids = [f"s{i}" for i in range(60)]
    for sid in ids:
        owner = routing.pick(targets, sid)
        cands = router.candidates(sid, owner)
        assert sorted(cands) == sorted({0, 1, 2} - {owner})
        # A drain of the owner pushes to the owner computed without it: the first candidate.
        rest = [t for t in targets if t != targets[owner]]
        assert targets[cands[0]] == rest[routing.pick(rest, sid)]
    moved = ids[0]
    elsewhere = next(i for i in range(3) if i != routing.pick(targets, moved))
    router.moved(moved, elsewhere)
    assert router.home(moved) == elsewhere and len(router) == 1
    groups = router.group(ids)
    assert moved in [ids[p] for p in groups[elsewhere]]
    assert all(router.home(ids[p]) == r for r, ps in groups.items() for p in ps)
    router.moved(moved, routing.pick(targets, moved))  # found at its owner again: nothing to remember
    assert len(router) == 0 and router.home(moved) == routing.pick(targets, moved)
    router.moved(moved, elsewhere)
    router.forget(moved)
    assert len(router) == 0
    assert routing.Router(["only:1"]).group(["x", "y"]) == {0: [0, 1]}


def test_resolve_targets() -> None:
    assert routing.resolve_targets("a:1, b:2") == ["a:1", "b:2"]
    assert routing.resolve_targets(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert routing.resolve_targets("dns:///localhost:5") in (["127.0.0.1:5"], ["127.0.0.1:5", "[::1]:5"], ["[::1]:5"])
    with pytest.raises(ValueError, match="target"):
        routing.resolve_targets("dns:///nohostport")
    with pytest.raises(ValueError, match="target"):
        routing.resolve_targets("")


# 256 blocks per replica: placement follows the random ports, and the test keeps ~5 one-block
# sequences (forks) per id it places; 60 ids landing mostly on one replica must still fit (64 did not).
ARGS = ("--num-layers", "1", "--num-q-heads", "2", "--num-kv-heads", "1", "--head-dim", "64", "--kv-dtype", "float32",
        "--block-len", "4", "--num-blocks", "256", "--max-context", "64", "--fuse-rope", "false")  # fmt: skip


@pytest.fixture()
def replicas() -> Iterator[list[ServerProc]]:
    procs = [start_server(*ARGS) for _ in range(3)]
    yield procs
    for p in procs:
        p.stop(signal.SIGKILL)


def test_three_replicas_route_merge_and_fail_alone(replicas: list[ServerProc]) -> None:
    rng = np.random.default_rng(0)
    targets = [p.target for p in replicas]
    with Client(targets, timeout=10) as c:
        # Ports are random, so placement is too: create until every replica owns at least 3
        # sequences, then keep 12 (bounded: 60 draws miss a replica with probability ~1e-9).
        sids: list[str] = []
        owned = Counter()
        for _ in range(60):
            sid = c.create_sequence().sequence_id
            sids.append(sid)
            owned[routing.pick(targets, sid)] += 1
            if len(sids) >= 12 and min(owned[i] for i in range(3)) >= 3:
                break
        n = len(sids)
        # Each sequence exists on exactly its own replica.
        for sid in sids:
            home = routing.pick(targets, sid)
            for i, t in enumerate(targets):
                with Client(t) as single:
                    if i == home:
                        single.get_sequence(sid)
                    else:
                        with pytest.raises(errors.NotFound):
                            single.get_sequence(sid)
        assert len({routing.pick(targets, s) for s in sids}) == 3  # spread over all replicas
        # A batched decode over all replicas comes back in the caller's order: check each row
        # against a single-sequence decode of a fork made before the step (same cache, same inputs).
        forks = [c.fork(s).sequence_id for s in sids]
        q = rng.standard_normal((n, 2, 1, 64)).astype(np.float32)
        k = rng.standard_normal((n, 1, 1, 64)).astype(np.float32)
        v = rng.standard_normal((n, 1, 1, 64)).astype(np.float32)
        res = c.decode(0, sids, [0] * n, q, k, v)
        for b, f in enumerate(forks):
            alone = c.decode(0, [f], [0], q[b : b + 1], k[b : b + 1], v[b : b + 1])
            np.testing.assert_array_equal(res.out[b], alone.out[0])
        # Both clients route, merge and stream alike: a batched step over forks made by each (same
        # cache, same inputs) gives the same rows, and a DecodeStream over the sequences of one
        # replica reaches it and answers each row as the batch did.
        q2, k2, v2 = (x * 0.5 for x in (q, k, v))
        sync_forks = [c.fork(s).sequence_id for s in sids]
        r0 = routing.pick(targets, sids[0])
        on_r0 = [b for b, s in enumerate(sids) if routing.pick(targets, s) == r0]
        stream_forks = [c.fork(sids[b]).sequence_id for b in on_r0]
        expect = c.decode(0, sync_forks, [1] * n, q2, k2, v2).out
        streamed = c.decode_stream(
            [
                DecodeInput(0, [f], [1], q2[b : b + 1], k2[b : b + 1], v2[b : b + 1])
                for f, b in zip(stream_forks, on_r0, strict=True)
            ]
        )
        np.testing.assert_array_equal(np.concatenate([r.out for r in streamed]), expect[on_r0])
        elsewhere = next(f"id{i}" for i in range(1000) if routing.pick(targets, f"id{i}") != r0)
        with pytest.raises(ValueError, match="routes to"):
            c.fork(sids[0], elsewhere)

        async def aio() -> tuple[np.ndarray, np.ndarray]:
            async with AsyncClient(targets, timeout=10) as ac:
                forks = [(await ac.fork(s)).sequence_id for s in sids]
                streams = [(await ac.fork(sids[b])).sequence_id for b in on_r0]
                with pytest.raises(ValueError, match="routes to"):
                    await ac.fork(sids[0], elsewhere)
                out = (await ac.decode(0, forks, [1] * n, q2, k2, v2)).out
                reqs = [
                    DecodeInput(0, [f], [1], q2[b : b + 1], k2[b : b + 1], v2[b : b + 1])
                    for f, b in zip(streams, on_r0, strict=True)
                ]
                rows = np.concatenate([r.out async for r in ac.decode_stream(reqs)])
                for f in forks + streams:
                    await ac.release(f)
                return out, rows

        aio_out, aio_rows = asyncio.run(aio())
        np.testing.assert_array_equal(aio_out, expect)
        np.testing.assert_array_equal(aio_rows, expect[on_r0])
        for f in sync_forks + stream_forks:
            c.release(f)
        # Kill one replica: only its sequences fail, with UNAVAILABLE naming it.
        dead = routing.pick(targets, sids[0])
        replicas[dead].stop(signal.SIGKILL)
        mine = [s for s in sids if routing.pick(targets, s) == dead]
        others = [s for s in sids if routing.pick(targets, s) != dead]
        for s in others:
            c.get_sequence(s)
        with pytest.raises(errors.Unavailable) as info:
            c.get_sequence(mine[0])
        assert targets[dead] in str(info.value)
        with pytest.raises(errors.PartialDecodeError) as info:
            c.decode(0, sids, [1] * n, q, k, v)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and targets[dead] in str(info.value)
        assert sorted(info.value.errors) == sorted(mine) == sorted(info.value.failed_sequences)
        ok = info.value.result.ok  # the other replicas' rows came back and are kept
        assert [sids[b] for b in np.flatnonzero(ok)] == others and np.isnan(info.value.result.out[~ok]).all()
        assert np.isfinite(info.value.result.out[ok]).all()
        assert [c.get_sequence(s).lengths[0] for s in others] == [2] * len(others)
