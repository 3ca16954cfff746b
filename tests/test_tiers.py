"""KV tiers end to end over the in-process service: capacity past the device pool with identical
numbers, where sequences live, restore before use, errors that change nothing, quotas, expiry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support.fakes import FakeClock
from support.races import rpc
from support.service import Aborted
from support.tiers import SPEC, decode_batch, fill, tier, tier_service

from tkg import codec
from tkg.server import identity
from tkg.server.tenants import inward
from tkg.v1 import decode_attention_pb2 as pb

TOKENS = 5  # two blocks of 4 per sequence: the 64-block device pool alone holds 32 sequences


def _out(resp: pb.DecodeResponse) -> np.ndarray:
    return codec.decode(resp.out, "out")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_twenty_times_the_device_pool_decodes_like_one_large_pool(tmp_path: Path, backend: str) -> None:
    """640+ sequences of 2 blocks (the 64-block pool alone holds 32) over a host and a disk tier;
    batches of 4 random sequences force restores and spills on nearly every step; every output
    equals a server whose pool holds them all (reference: bit for bit; cpu: its tests' tolerance,
    its key split depends on the batch). Afterwards nothing is lost and every block is back."""
    n = 20 * 32 + 8

    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=64, host_blocks=128, backend=backend)
        big = tier_service(None, num_blocks=2 * n + 8, backend=backend)
        for s in (svc, big):
            s.start()
        for i in range(n):
            for s in (svc, big):
                await fill(s, f"s{i}", TOKENS, seed=i)
        tiers = svc.tiers
        assert len(svc.cache) <= 32 and tiers.index.count["host"] > 0 and tiers.index.count["disk"] > 0
        assert len(svc.cache) + len(tiers.index) == n
        rng = np.random.default_rng(7)
        order = rng.permutation(n)
        pos = dict.fromkeys((f"s{i}" for i in range(n)), TOKENS)
        restores_before = sum(tiers.counts.restores.values())
        steps = 0
        for b0 in range(0, n, 4):
            sids = [f"s{i}" for i in order[b0 : b0 + 4]]
            req = decode_batch(sids, [pos[s] for s in sids], seed=b0)
            got, want = _out(await svc.decode(req)), _out(await big.decode(req))
            if backend == "reference":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
            for s in sids:
                pos[s] += 1
            steps += 1
        restored = sum(tiers.counts.restores.values()) - restores_before
        assert restored >= 3 * steps, f"{restored} restores in {steps} steps: the order did not force them"
        assert tiers.counts.restores[("disk", "ok")] > 0 and tiers.counts.restores[("host", "ok")] > 0
        assert tiers.counts.spills["host"] > 0 and tiers.counts.spills["disk"] > 0
        for i in range(n):  # lengths kept through every move; the one layer decoded grew by one
            info = await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id=f"s{i}"))
            assert list(info.lengths) == [TOKENS + 1, TOKENS]
        usage = svc.ledger.of(identity.ANONYMOUS.tenant)
        assert (usage.sequences, usage.blocks) == (n, 2 * n)
        for i in range(n):
            await rpc(svc, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id=f"s{i}"))
        await svc.close()
        await big.close()
        assert svc.cache.free_blocks == 64 and len(tiers.index) == 0
        assert (usage.sequences, usage.blocks) == (0, 0)
        assert not list(tmp_path.glob("*.kv"))

    asyncio.run(main())


def test_get_sequence_reports_the_tier_without_restoring_and_prefetch_restores(tmp_path: Path) -> None:
    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2)
        svc.start()
        for i in range(3):  # 2 blocks each: the third pushes the first down
            await fill(svc, f"s{i}", TOKENS, seed=i)
        assert [await tier(svc, f"s{i}") for i in range(3)] == ["host", "device", "device"]
        # The host holds one sequence: the older s0 moves on to disk and s1 takes its place (the
        # tiers stay in recency order: device, host, disk).
        await fill(svc, "s3", TOKENS, seed=3)
        assert [await tier(svc, f"s{i}") for i in range(4)] == ["disk", "host", "device", "device"]
        info = await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="s0"))
        assert (list(info.lengths), info.num_blocks) == ([TOKENS, TOKENS], 2)
        assert await tier(svc, "s0") == "disk"  # a read: nothing moved
        info = await rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="s0"))
        assert info.tier == "device" and list(info.lengths) == [TOKENS, TOKENS]
        assert await tier(svc, "s2") in ("host", "disk")  # the least recently used resident one made room
        with pytest.raises(Aborted) as err:
            await rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="nope"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details
        await svc.close()

    asyncio.run(main())


def test_every_tier_full_is_resource_exhausted_naming_them_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2, disk_blocks=2)
        svc.start()
        for i in range(4):
            await fill(svc, f"s{i}", TOKENS, seed=i)
        where = {f"s{i}": await tier(svc, f"s{i}") for i in range(4)}
        assert sorted(where.values()) == ["device", "device", "disk", "host"]
        free = svc.cache.free_blocks
        with pytest.raises(Aborted) as err:
            await fill(svc, "s4", TOKENS, seed=4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for full in ("host tier 1024 of 1024 bytes", "disk tier 1024 of 1024 bytes"):
            assert full in err.value.details
        # s4 was created (no blocks) before its append failed; nothing else moved, no block leaked
        assert {s: await tier(svc, s) for s in where} == where and svc.cache.free_blocks == free
        info = await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="s4"))
        assert list(info.lengths) == [0, 0]
        await svc.close()

    asyncio.run(main())


def test_truncate_fork_and_export_restore_first_and_match_a_large_pool(tmp_path: Path) -> None:
    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2)
        big = tier_service(None, num_blocks=64)
        for s in (svc, big):
            s.start()
            for i in range(4):
                await fill(s, f"s{i}", 7, seed=i)
        assert await tier(svc, "s0") == "disk" and await tier(svc, "s1") == "host"
        for s in (svc, big):
            info = await rpc(s, "TruncateSequence", pb.TruncateSequenceRequest(sequence_id="s0", length=3))
            assert list(info.lengths) == [3, 3]
            await rpc(s, "ForkSequence", pb.ForkSequenceRequest(source_id="s1", sequence_id="f1"))
        req = decode_batch(["s0", "f1"], [3, 7], seed=5)
        np.testing.assert_array_equal(_out(await svc.decode(req)), _out(await big.decode(req)))
        await svc.decode(decode_batch(["s2", "s3"], [7, 7], seed=6))  # push s0 and f1 down again
        assert await tier(svc, "f1") != "device"
        chunks = [m async for m in svc.ExportSequence(pb.ExportSequenceRequest(sequence_id="f1"), None)]
        want = [m async for m in big.ExportSequence(pb.ExportSequenceRequest(sequence_id="f1"), None)]
        assert [m.SerializeToString() for m in chunks[1:]] == [m.SerializeToString() for m in want[1:]]
        assert list(chunks[0].header.lengths) == [8, 7]
        for s in (svc, big):
            await s.close()

    asyncio.run(main())


def test_spilled_ids_are_taken_and_release_frees_their_tier(tmp_path: Path) -> None:
    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=0, max_sequences=5)
        svc.start()
        for i in range(4):
            await fill(svc, f"s{i}", TOKENS, seed=i)
        assert await tier(svc, "s0") == "disk" and len(list(tmp_path.glob("*.kv"))) == 2
        with pytest.raises(Aborted) as err:
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="s0"))
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="s4"))
        with pytest.raises(Aborted) as err:  # max_sequences counts every tier: 5 live, 2 of them on disk
            await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id="s5"))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "5 live" in err.value.details
        resp = await rpc(svc, "ReleaseSequence", pb.ReleaseSequenceRequest(sequence_id="s0"))
        assert resp.freed_blocks == 0  # it held no device block
        svc.tiers.close()  # the file's removal runs on the tiers' thread: let it finish
        assert len(svc.tiers.index) == 1 and len(list(tmp_path.glob("*.kv"))) == 1
        with pytest.raises(Aborted) as err:
            await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id="s0"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        await svc.close()

    asyncio.run(main())


def test_idle_expiry_reaches_every_tier_on_wall_clock_time(tmp_path: Path) -> None:
    async def main() -> None:
        clock, wall = FakeClock(), FakeClock()
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2, clock=clock, wall=wall)
        svc.start()
        for i in range(4):
            await fill(svc, f"s{i}", TOKENS, seed=i)
            clock.t += 1.0
            wall.t += 1.0
        assert [await tier(svc, f"s{i}") for i in range(4)] == ["disk", "host", "device", "device"]
        ttl = SPEC["idle_ttl_s"]
        clock.t += ttl - 2.5  # s0 and s1 (used at t, t+1) are now older than the TTL, s2 and s3 not
        wall.t += ttl - 2.5
        assert sorted(svc.expire_idle()) == ["s0", "s1"]
        assert svc.cache.evicted["idle_ttl"] == 2 and len(svc.tiers.index) == 0
        usage = svc.ledger.of(identity.ANONYMOUS.tenant)
        assert (usage.sequences, usage.blocks) == (2, 4)
        await svc.close()

    asyncio.run(main())


def test_blocks_of_a_spilled_sequence_stay_charged_to_its_owner(tmp_path: Path) -> None:
    """Tenant a's sequence is spilled to make room for tenant b: a keeps its charge (every tier
    counts against max_blocks), b is charged only its own blocks; b cannot see a's spilled id."""
    alice, bob = identity.Tenant("alice", identity.Quota(max_blocks=4)), identity.Tenant("bob", identity.Quota())

    async def as_tenant(tenant: identity.Tenant, coro_fn) -> object:  # type: ignore[no-untyped-def]
        token = identity.CURRENT.set(identity.Identity(tenant))
        try:
            return await coro_fn()
        finally:
            identity.CURRENT.reset(token)

    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2)
        svc.start()
        await as_tenant(alice, lambda: fill(svc, "x", TOKENS, seed=1))
        await as_tenant(bob, lambda: fill(svc, "y", TOKENS, seed=2))
        await as_tenant(bob, lambda: fill(svc, "z", TOKENS, seed=3))
        assert svc.tiers.tier_of(inward(alice, "x")) == "host"
        assert (svc.ledger.of(alice).blocks, svc.ledger.of(bob).blocks) == (2, 4)
        with pytest.raises(Aborted) as err:
            await as_tenant(bob, lambda: rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="x")))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(Aborted) as err:  # alice: 2 blocks held on the host tier + 3 more > max_blocks 4
            await as_tenant(alice, lambda: fill(svc, "x2", 9, seed=4))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_blocks" in err.value.details
        await svc.close()

    asyncio.run(main())


def test_a_restore_with_no_room_anywhere_is_resource_exhausted_not_a_hang(tmp_path: Path) -> None:
    """s0 sits in a one-sequence host tier; bringing it back would spill a device sequence, which
    fits no tier while s0's own bytes still fill the host tier (no disk tier): the answer is
    RESOURCE_EXHAUSTED at once, s0 stays where it was (a restore never waits on itself)."""

    async def main() -> None:
        svc = tier_service(None, num_blocks=4, host_blocks=2)
        svc.start()
        for i in range(3):
            await fill(svc, f"s{i}", TOKENS, seed=i)
        assert [await tier(svc, f"s{i}") for i in range(3)] == ["host", "device", "device"]
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="s0")), 30)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no disk tier" in err.value.details
        assert [await tier(svc, f"s{i}") for i in range(3)] == ["host", "device", "device"]
        await svc.close()

    asyncio.run(main())


def test_on_a_device_store_a_spill_is_d2h_and_a_restore_h2d(tmp_path: Path) -> None:
    """nki-emu: the KV pools live in (emulated) device memory; a spill reads the sequence's run
    back to the host and a restore writes it, counted by `tkg_device_transfer_bytes_total`."""

    async def main() -> None:
        svc = tier_service(
            tmp_path, num_blocks=4, host_blocks=4, backend="nki-emu", spec={"max_batch": 1, "max_context": 16}
        )  # fmt: skip
        store = svc.cache.store
        svc.start()
        for i in range(2):
            await fill(svc, f"s{i}", TOKENS, seed=i)
        run = 2 * svc.tiers.block_bytes  # one sequence: 2 blocks of every layer, K and V
        before = store.transfer_bytes()
        await fill(svc, "s2", TOKENS, seed=2)  # s0 spills
        assert await tier(svc, "s0") == "host"
        spilled = store.transfer_bytes()
        assert spilled["d2h"] - before["d2h"] >= run
        await rpc(svc, "PrefetchSequence", pb.PrefetchSequenceRequest(sequence_id="s0"))
        restored = store.transfer_bytes()
        assert restored["h2d"] - spilled["h2d"] >= run
        got = await svc.decode(decode_batch(["s0"], [TOKENS], seed=3))
        big = tier_service(None, num_blocks=16)
        big.start()
        await fill(big, "s0", TOKENS, seed=0)
        want = await big.decode(decode_batch(["s0"], [TOKENS], seed=3))
        np.testing.assert_allclose(_out(got), _out(want), rtol=1e-5, atol=1e-5)
        await svc.close()
        await big.close()

    asyncio.run(main())


def test_a_failed_demotion_calls_off_the_rest_and_leaves_nothing_reserved(tmp_path: Path) -> None:
    """The host is full of two older sequences when a third must move there: both are to go to disk
    first. The first one's disk write fails: the demotion not yet begun is called off, every mark
    (disk reservation, host bytes leaving, moving) is undone, and the room is made on the next try:
    both end on disk and the request is served."""

    async def main() -> None:
        svc = tier_service(tmp_path, num_blocks=4, host_blocks=2)
        svc.start()
        for i, tokens in enumerate((4, 4, 5, 5)):  # 1, 1, 2, 2 blocks: s0 and s1 end on the host
            await fill(svc, f"s{i}", tokens, seed=i)
        assert [await tier(svc, f"s{i}") for i in range(4)] == ["host", "host", "device", "device"]
        tiers, real, written = svc.tiers, svc.tiers.write_run, []

        def fails_once(rec: Any, payload: np.ndarray) -> Path:
            written.append(rec.seq_id)
            if len(written) == 1:
                raise OSError("disk full (test)")
            return real(rec, payload)

        tiers.write_run = fails_once  # type: ignore[method-assign]
        await fill(svc, "s4", TOKENS, seed=4)  # s2 must go to the host: s0 then s1 to disk first
        assert written == ["s0", "s0", "s1"]  # s1's first demotion was called off, not run
        assert [await tier(svc, s) for s in ("s0", "s1", "s4")] == ["disk", "disk", "device"]
        assert tiers._reserved == {"host": 0, "disk": 0} and tiers._leaving_host == 0 and not tiers.moving
        await svc.close()

    asyncio.run(main())
