"""KV tiers never race their callers: each interleaving is forced with events, not sleeps.

A `Gated` copy parks a spill (`read_sequence`) or a restore (`write_sequence`) of sequence "a" on
the tiers' thread; the test then sends the racing call for "a" and, where the call must wait,
proves it reached that wait (`move_waits`) before opening the gate. Every test runs in both
phases: the spill in flight (a is still in the cache, its copy half made) and the restore in
flight (a's blocks reserved, it is still in the host tier). Without the waits, each of these
fails in at least one phase: the call acts on the half-moved sequence (a lost append or
truncation, NOT_FOUND, a leaked reservation, an expiry or a duplicate id behind the spill's back).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from support.fakes import FakeClock
from support.races import rpc
from support.service import Aborted, FakeContext, reached
from support.tiers import Gated, decode_batch, fill, move_waits, tier, tier_service

from tkg import codec
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb

PHASES = ["spill", "restore"]


def _service(clock: FakeClock | None = None) -> DecodeAttentionService:
    # 4 device blocks hold two 2-block sequences; a third one's append spills the oldest.
    return tier_service(None, num_blocks=4, host_blocks=16, clock=clock, wall=clock)


@contextlib.asynccontextmanager
async def a_moving(svc: DecodeAttentionService, phase: str) -> AsyncIterator[tuple[Gated, asyncio.Task]]:
    """Sequence "a" (5 tokens) parked mid-spill or mid-restore; yields (gate, the task moving it)."""
    await fill(svc, "a", 5, seed=1)
    await fill(svc, "b", 5, seed=2)
    if phase == "spill":
        with Gated("read_sequence") as gate:
            mover = asyncio.ensure_future(fill(svc, "c", 5, seed=3))  # needs a's blocks: a spills
            await gate.wait_started()
            assert svc.tiers.tier_of("a") == "device" and "a" in svc.tiers.moving
            yield gate, mover
        return
    await fill(svc, "c", 5, seed=3)  # a goes to the host tier
    assert await tier(svc, "a") == "host"
    with Gated("write_sequence") as gate:
        mover = asyncio.ensure_future(rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="a")))
        await gate.wait_started()
        assert svc.tiers.tier_of("a") == "host" and "a" in svc.tiers.moving
        yield gate, mover


async def _twin() -> DecodeAttentionService:
    """The same sequences on a pool that holds them all: the numbers every answer must match."""
    big = tier_service(None, num_blocks=64)
    big.start()
    for sid, seed in (("a", 1), ("b", 2), ("c", 3)):
        await fill(big, sid, 5, seed=seed)
    return big


def _blocks_add_up(svc: DecodeAttentionService) -> None:
    """No block leaked: the pool's used blocks are exactly those live sequences hold, and each
    tenant's charge is what a recount of every tier gives."""
    held = {b for s in svc.cache.snapshot() for b in s.block_ids}
    assert svc.cache.used_blocks == len(held)
    charged = {n: u.blocks for n, u in svc.ledger.usage.items()}
    states = [(s.seq_id, s.block_ids) for s in svc.cache.snapshot()]
    for i, r in enumerate(svc.tiers.index.records.values()):  # a spilled run's blocks are its own: distinct ids
        states.append((r.seq_id, range(-(i + 1) * 1000, -(i + 1) * 1000 + r.num_blocks)))
    svc.ledger.recount(states)
    assert {n: u.blocks for n, u in svc.ledger.usage.items()} == charged


@pytest.mark.parametrize("phase", PHASES)
def test_decode_waits_for_the_move_and_keeps_its_token(phase: str) -> None:
    async def main() -> None:
        svc, big = _service(), await _twin()
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            waiting = move_waits(svc)
            req = decode_batch(["a"], [5], seed=9)
            decode = asyncio.ensure_future(svc.decode(req))
            await reached(waiting, "the decode waiting for a's move")
            gate.gate.set()
            got = codec.decode((await decode).out, "out")
            await mover
        np.testing.assert_array_equal(got, codec.decode((await big.decode(req)).out, "out"))
        info = await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="a"))
        assert list(info.lengths) == [6, 5]  # the appended token survived the move
        _blocks_add_up(svc)
        await svc.close()
        await big.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_truncate_waits_for_the_move_and_is_not_undone_by_it(phase: str) -> None:
    async def main() -> None:
        svc = _service()
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            waiting = move_waits(svc)
            call = asyncio.ensure_future(
                rpc(svc, "TruncateSequence", pb.TruncateSequenceRequest(sequence_id="a", length=3))
            )
            await reached(waiting, "the truncate waiting for a's move")
            gate.gate.set()
            assert list((await call).lengths) == [3, 3]
            await mover
        assert list((await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="a"))).lengths) == [3, 3]
        _blocks_add_up(svc)
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_fork_waits_for_the_move_of_its_source(phase: str) -> None:
    async def main() -> None:
        svc, big = _service(), await _twin()
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            waiting = move_waits(svc)
            call = asyncio.ensure_future(
                rpc(svc, "ForkSequence", pb.ForkSequenceRequest(source_id="a", sequence_id="f"))
            )
            await reached(waiting, "the fork waiting for a's move")
            gate.gate.set()
            assert list((await call).lengths) == [5, 5]
            await mover
        await rpc(big, "ForkSequence", pb.ForkSequenceRequest(source_id="a", sequence_id="f"))
        req = decode_batch(["f"], [5], seed=4)
        np.testing.assert_array_equal(
            codec.decode((await svc.decode(req)).out, "out"), codec.decode((await big.decode(req)).out, "out")
        )
        _blocks_add_up(svc)
        await svc.close()
        await big.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_release_waits_for_the_move_and_a_new_sequence_of_that_id_is_left_alone(phase: str) -> None:
    async def main() -> None:
        svc = _service()
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            waiting = move_waits(svc)
            call = asyncio.ensure_future(rpc(svc, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id="a")))
            await reached(waiting, "the release waiting for a's move")
            gate.gate.set()
            await call
            await mover
        with pytest.raises(Aborted) as err:
            await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="a"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        await fill(svc, "a", 9, seed=5)  # the id is free again, and stays this new sequence's
        assert list((await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="a"))).lengths) == [9, 9]
        _blocks_add_up(svc)
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_export_waits_for_the_move_and_streams_every_token(phase: str) -> None:
    async def main() -> None:
        svc, big = _service(), await _twin()
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            waiting = move_waits(svc)

            async def export() -> list[pb.SequenceChunk]:
                return [m async for m in svc.ExportSequence(pb.ExportSequenceRequest(sequence_id="a"), None)]

            call = asyncio.ensure_future(export())
            await reached(waiting, "the export waiting for a's move")
            gate.gate.set()
            chunks = await call
            await mover
        want = [m async for m in big.ExportSequence(pb.ExportSequenceRequest(sequence_id="a"), None)]
        assert [m.SerializeToString() for m in chunks[1:]] == [m.SerializeToString() for m in want[1:]]
        _blocks_add_up(svc)
        await svc.close()
        await big.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_idle_expiry_skips_a_sequence_being_moved(phase: str) -> None:
    async def main() -> None:
        clock = FakeClock()
        svc = _service(clock)
        svc.start()
        async with a_moving(svc, phase) as (gate, mover):
            clock.t += 10 * svc.spec.idle_ttl_s  # everything is idle past the TTL
            assert "a" not in svc.expire_idle()
            gate.gate.set()
            await mover
        assert svc.tiers.tier_of("a") is not None  # it landed where the move took it
        clock.t += 10 * svc.spec.idle_ttl_s
        assert "a" in svc.expire_idle()  # and expires from there once it rests
        _blocks_add_up(svc)
        await svc.close()

    asyncio.run(main())


@pytest.mark.parametrize("phase", PHASES)
def test_an_import_of_an_id_being_moved_is_already_exists(phase: str) -> None:
    async def main() -> None:
        svc, big = _service(), await _twin()
        svc.start()
        stream_of_a = [m async for m in big.ExportSequence(pb.ExportSequenceRequest(sequence_id="a"), None)]

        async def messages() -> AsyncIterator[pb.SequenceChunk]:
            for m in stream_of_a:
                yield m

        async with a_moving(svc, phase) as (gate, mover):
            with pytest.raises(Aborted) as err:
                await svc.ImportSequence(messages(), FakeContext())
            assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
            gate.gate.set()
            await mover
        with pytest.raises(Aborted) as err:  # and once it rests in the host tier (spill) or the device
            await svc.ImportSequence(messages(), FakeContext())
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        _blocks_add_up(svc)
        await svc.close()
        await big.close()

    asyncio.run(main())
