"""ExportSequence / ImportSequence: the stream round-trips exactly, imports are all-or-nothing,
ServerInfo/SequenceInfo carry the instance id; plus the drain of `tkg serve --peers` end to end."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
import numpy as np
import pytest
from support.races import rand
from support.server_proc import free_port, start_server
from support.service import Aborted, FakeContext, make_service, reached, settle_waits
from support.wait import wait_for

from tkg import codec
from tkg.client import AsyncClient, Client, DecodeInput, errors, routing
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

L, HQ, HKV, D, BL = 2, 4, 2, 16, 8


def service(num_blocks: int = 32, **spec: Any) -> DecodeAttentionService:
    raw = {"num_layers": L, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_len": BL,
           "num_blocks": num_blocks, "kv_dtype": "float32", "max_context": 128, "fuse_rope": True, "max_batch": 4,
           **spec}  # fmt: skip
    # Small messages: several K/V chunks per layer.
    return make_service(raw, max_pending=16, max_message_bytes=4096)


async def fill(svc: DecodeAttentionService, sid: str, lengths: tuple[int, ...], seed: int) -> None:
    await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid), FakeContext())
    for layer, n in enumerate(lengths):
        if n:
            msg = pb.AppendKVRequest(sequence_id=sid, layer=layer, position=0)
            codec.encode(rand((n, HKV, D), seed + layer), msg.k)
            codec.encode(rand((n, HKV, D), seed + 10 + layer), msg.v)
            await svc.AppendKV(_aiter([msg]), FakeContext())


async def _aiter(items: list) -> Any:
    for x in items:
        yield x


async def export(svc: DecodeAttentionService, sid: str) -> list[pb.SequenceChunk]:
    return [m async for m in svc.ExportSequence(pb.ExportSequenceRequest(sequence_id=sid), FakeContext())]


async def import_(svc: DecodeAttentionService, msgs: list[pb.SequenceChunk]) -> pb.SequenceInfo:
    return await svc.ImportSequence(_aiter(msgs), FakeContext())


def step(svc: DecodeAttentionService, sid: str, layer: int, pos: int) -> Any:
    req = pb.DecodeRequest(layer=layer, sequence_ids=[sid], positions=[pos])
    for i, (name, h) in enumerate((("q", HQ), ("k", HKV), ("v", HKV))):
        codec.encode(rand((1, h, 1, D), 99 + i), getattr(req, name))
    return svc.decode(req)


def test_export_import_round_trip_decodes_identically() -> None:
    async def main() -> None:
        a, b = service(), service()
        for svc in (a, b):
            svc.start()
        await fill(a, "s", (37, 29), seed=1)  # layers of different lengths, several chunks each
        msgs = await export(a, "s")
        header = msgs[0].header
        assert list(header.lengths) == [37, 29] and header.chunks == len(msgs) - 1 > 2
        assert header.instance_id == a.instance_id and header.fuse_rope
        info = await import_(b, msgs)
        assert list(info.lengths) == [37, 29] and info.instance_id == b.instance_id != a.instance_id
        assert [m.SerializeToString() for m in await export(b, "s")][1:] == [m.SerializeToString() for m in msgs][1:]
        for layer, pos in ((0, 37), (1, 29)):
            out_a, out_b = await step(a, "s", layer, pos), await step(b, "s", layer, pos)
            assert out_a.out.data == out_b.out.data  # RoPE'd keys moved as stored: same bits
        for svc in (a, b):
            await svc.close()

    asyncio.run(main())


def _broken(msgs: list[pb.SequenceChunk]) -> dict[str, tuple[list[pb.SequenceChunk], grpc.StatusCode, str]]:
    def edit(i: int, fn: Any) -> list[pb.SequenceChunk]:
        out = [pb.SequenceChunk.FromString(m.SerializeToString()) for m in msgs]
        fn(out[i])
        return out

    def wrong_dtype(m: pb.SequenceChunk) -> None:
        m.k.dtype = pb.DTYPE_FLOAT16

    IA = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "cut short": (msgs[:-1], IA, "stream ended after"),
        "no header": (msgs[1:], IA, "header: missing in message 0"),
        "header twice": (msgs[:2] + msgs[:1] + msgs[2:], IA, "header: set in message 2"),
        "out of order": ([msgs[0], msgs[2], msgs[1], *msgs[3:]], IA, "position:"),
        "other id": (edit(2, lambda m: setattr(m, "sequence_id", "t")), IA, "sequence_id: 't' in message 2"),
        "head_dim": (edit(0, lambda m: setattr(m.header, "head_dim", 8)), IA, "header.head_dim: 8; expected 16"),
        "rope": (edit(0, lambda m: setattr(m.header, "fuse_rope", False)), IA, "header.fuse_rope"),
        "too long": (edit(0, lambda m: m.header.lengths.__setitem__(0, 999)), grpc.StatusCode.OUT_OF_RANGE,
                     "header.lengths[0]: 999"),
        "dtype": (edit(1, wrong_dtype), IA, "k.dtype"),
        "extra": (msgs + msgs[-1:], IA, "more K/V messages than header.chunks"),
        "empty": ([], IA, "empty stream"),
    }  # fmt: skip


def test_import_is_all_or_nothing() -> None:
    async def main() -> None:
        a, b = service(), service(num_blocks=8)
        for svc in (a, b):
            svc.start()
        await fill(a, "s", (37, 29), seed=1)
        msgs = await export(a, "s")
        free = b.cache.free_blocks
        for what, (stream, code, text) in _broken(msgs).items():
            with pytest.raises(Aborted) as err:
                await import_(b, stream)
            assert err.value.code == code and text in err.value.details, what
            assert len(b.cache) == 0 and b.cache.free_blocks == free, what
        await fill(b, "s", (1, 0), seed=5)
        with pytest.raises(Aborted) as err:
            await import_(b, msgs)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and b.cache.get("s").lengths == (1, 0)
        await b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="s"), FakeContext())
        await fill(b, "hog", (40, 0), seed=5)  # 5 of 8 blocks: 37 tokens need 5 more
        with pytest.raises(Aborted) as err:
            await import_(b, msgs)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(b.cache) == 1
        for svc in (a, b):
            await svc.close()

    asyncio.run(main())


def test_export_waits_for_the_launch_and_truncate_waits_for_the_export() -> None:
    """An export of a sequence held by a launch starts after it (and carries the step's token);
    a truncate arriving while the export streams applies after the stream is done."""
    from support.races import GatedKernel

    async def main() -> None:
        a = service()
        a.batcher.lone.inline_kernel_bytes = a.batcher.lone.lone_inline_bytes = -1
        a.start()
        await fill(a, "s", (10, 10), seed=1)
        with GatedKernel() as kernel:
            decode = asyncio.ensure_future(step(a, "s", 0, 10))
            await kernel.wait_started()
            waiting = settle_waits(a)
            gen = a.ExportSequence(pb.ExportSequenceRequest(sequence_id="s"), FakeContext())
            first = asyncio.ensure_future(gen.__anext__())
            await reached(waiting, "the export waiting for the launch")
            assert not first.done()
            kernel.gate.set()
            await decode
            header = (await first).header
        assert list(header.lengths) == [11, 10]
        waiting.clear()
        truncate = asyncio.ensure_future(
            a.TruncateSequence(pb.TruncateSequenceRequest(sequence_id="s", length=0), FakeContext())
        )
        await reached(waiting, "the truncate waiting for the export")
        assert not truncate.done()
        rest = [m async for m in gen]
        assert len(rest) == header.chunks
        assert list((await truncate).lengths) == [0, 0]
        await a.close()

    asyncio.run(main())


# ---- end to end: instance identity, restarts, drain --------------------------------------------

GEOMETRY = ("--backend", "reference", "--num-layers", "2", "--num-q-heads", "4", "--num-kv-heads", "2",
            "--head-dim", "16", "--block-len", "8", "--num-blocks", "64", "--max-context", "128",
            "--kv-dtype", "float32", "--fuse-rope", "true")  # fmt: skip


def test_drain_moves_every_sequence_to_its_new_home_and_restart_is_detected() -> None:
    """Three replicas; the client's sequences spread over them. Replica 0 gets SIGTERM with
    --peers naming the other two: every one of its sequences moves to the replica the client's
    routing over the remaining two picks, where each decodes to exactly what it would have given
    before. Then replica 1 is killed and restarted on its port: NOT_FOUND there is ServerRestarted."""
    np.random.default_rng(3)
    peers = [start_server(*GEOMETRY) for _ in range(2)]
    targets = [p.target for p in peers]
    draining = start_server(*GEOMETRY, "--peers", ",".join(targets), "--grace-s", "30")
    everyone = [draining.target, *targets]
    try:
        c = Client(everyone, timeout=30)
        sids = [c.create_sequence().sequence_id for _ in range(12)]
        while not any(routing.pick(everyone, s) == 0 for s in sids):
            sids.append(c.create_sequence().sequence_id)
        for s in sids:
            c.append_kv(s, 0, rand((13, HKV, D), 1), rand((13, HKV, D), 2))
            c.append_kv(s, 1, rand((5, HKV, D), 3), rand((5, HKV, D), 4))
        # What each sequence answers now (from a fork taken on its own replica, then released).
        q, k, v = rand((1, HQ, 1, D), 5), rand((1, HKV, 1, D), 6), rand((1, HKV, 1, D), 7)
        expect = {}
        for s in sids:
            f = c.fork(s).sequence_id
            expect[s] = c.decode(0, [f], [13], q, k, v).out
            c.release(f)
        moving = [s for s in sids if routing.pick(everyone, s) == 0]
        assert draining.stop(signal.SIGTERM, timeout=60) == 0
        out = draining.proc.stdout.read()
        assert f"drain moved {len(moving)} sequences, 0 could not move" in out
        rest = Client(targets, timeout=30)
        for s in sids:
            assert list(rest.get_sequence(s).lengths) == [13, 5]
            np.testing.assert_array_equal(rest.decode(0, [s], [13], q, k, v).out, expect[s])
        # A SIGKILLed replica restarted on its port: its sequences are gone, and the client says why.
        victim = peers[0]
        lost = [s for s in sids if routing.pick(targets, s) == 0]
        assert lost
        victim.stop(signal.SIGKILL)
        with pytest.raises(errors.Unavailable):
            rest.get_sequence(lost[0])
        peers[0] = start_server(*GEOMETRY, "--port", str(victim.port))
        seen: list[errors.TkgError] = []

        def answered() -> bool:  # UNAVAILABLE until the channel has reconnected
            try:
                rest.get_sequence(lost[0])
            except errors.Unavailable:
                return False
            except errors.TkgError as exc:
                seen.append(exc)
            return True

        wait_for(answered, timeout=30, what="the restarted replica to answer")
        assert isinstance(seen[0], errors.ServerRestarted) and isinstance(seen[0], errors.NotFound)
        assert seen[0].new_instance == rest.instance_id(0) != seen[0].old_instance
        with pytest.raises(errors.NotFound):  # the client has learnt the new instance; the id is just unknown
            rest.get_sequence(lost[0])
        s = rest.create_sequence().sequence_id
        rest.release(s)
        with pytest.raises(errors.NotFound) as err:  # released, same instance: plain NOT_FOUND
            rest.get_sequence(s)
        assert not isinstance(err.value, errors.ServerRestarted)
        c.close()
        rest.close()
    finally:
        for p in (*peers, draining):
            p.stop(signal.SIGKILL)


def test_push_all_reports_what_could_not_move_and_keeps_it() -> None:
    """A peer that is down: every sequence is reported with the reason and stays resident."""
    from tkg.server import migration

    async def main() -> None:
        a = service()
        a.start()
        for sid in ("s", "t"):
            await fill(a, sid, (9, 3), seed=2)
        released: list[str] = []
        loop = asyncio.get_running_loop()
        report = await migration.push_all(
            ["s", "t"], a.export_messages, released.append, ["127.0.0.1:1"], loop.time() + 10
        )
        assert report.moved == [] and released == [] and sorted(report.failed) == ["s", "t"]
        assert all("to 127.0.0.1:1: UNAVAILABLE" in why for why in report.failed.values()), report.failed
        expired = await migration.push_all(["s"], a.export_messages, released.append, ["127.0.0.1:1"], loop.time())
        assert "grace period ran out" in expired.failed["s"]
        assert len(a.cache) == 2
        await a.close()

    asyncio.run(main())


def test_rolling_update_loses_nothing_and_clients_follow_the_moved_sequences() -> None:
    """Three replicas started alike (`--peers` naming all three, `--advertise` their own name), as
    the StatefulSet starts them. Replica 0 drains on SIGTERM and comes back on its port (a rolling
    update): the client that was running on, never rebuilt, keeps decoding every sequence to
    exactly what it gave before, while replica 0 is down and after it is back, and so does a new
    client that never saw the move (NOT_FOUND at the owner, found on the others). New sequences
    are owned by replica 0 again."""
    ports = [free_port() for _ in range(3)]
    targets = [f"127.0.0.1:{p}" for p in ports]
    common = (*GEOMETRY, "--peers", ",".join(targets), "--grace-s", "30")

    def replica(i: int) -> Any:
        return start_server(*common, "--port", str(ports[i]), "--advertise", targets[i])

    procs = [replica(i) for i in range(3)]
    try:
        c = Client(targets, timeout=30)
        sids = [c.create_sequence().sequence_id for _ in range(6)]
        while sum(routing.pick(targets, s) == 0 for s in sids) < 2:
            sids.append(c.create_sequence().sequence_id)
        for s in sids:
            c.append_kv(s, 0, rand((13, HKV, D), 1), rand((13, HKV, D), 2))
            c.append_kv(s, 1, rand((5, HKV, D), 3), rand((5, HKV, D), 4))
        q, k, v = rand((1, HQ, 1, D), 5), rand((1, HKV, 1, D), 6), rand((1, HKV, 1, D), 7)

        def answers(client: Client, ids: list[str]) -> np.ndarray:
            """One batched step of forks of `ids` (taken where each lives, released after)."""
            forks = [client.fork(s).sequence_id for s in ids]
            n = len(ids)
            out = client.decode(0, forks, [13] * n, *(np.repeat(x, n, 0) for x in (q, k, v))).out
            for f in forks:
                client.release(f)
            return out

        expect = answers(c, sids)
        moving = [i for i, s in enumerate(sids) if routing.pick(targets, s) == 0]
        assert procs[0].stop(signal.SIGTERM, timeout=60) == 0
        assert f"drain moved {len(moving)} sequences, 0 could not move" in procs[0].proc.stdout.read()
        # Replica 0 is down: its sequences answer from where the drain put them.
        for i in moving:
            np.testing.assert_array_equal(answers(c, [sids[i]]), expect[i : i + 1])
        procs[0] = replica(0)
        fresh = Client(targets, timeout=30)
        wait_for(lambda: _answers(fresh, 0), timeout=30, what="the restarted replica to answer")
        # Batched steps over every sequence from both clients: the moved rows follow.
        for client in (c, fresh):
            np.testing.assert_array_equal(answers(client, sids), expect)
        assert all(fresh._replica(sids[i]) != 0 for i in moving)

        async def aio_answers() -> np.ndarray:  # the asyncio client follows them the same way
            async with AsyncClient(targets, timeout=30) as ac:
                forks = [(await ac.fork(s)).sequence_id for s in sids]
                n = len(sids)
                out = (await ac.decode(0, forks, [13] * n, *(np.repeat(x, n, 0) for x in (q, k, v)))).out
                for f in forks:
                    await ac.release(f)
                return out

        np.testing.assert_array_equal(asyncio.run(aio_answers()), expect)
        new = fresh.create_sequence().sequence_id
        while routing.pick(targets, new) != 0:
            fresh.release(new)
            new = fresh.create_sequence().sequence_id
        assert list(fresh.get_sequence(new).lengths) == [0, 0] and fresh._replica(new) == 0
        for i in moving:  # released where it lives; then it is gone everywhere
            c.release(sids[i])
            with pytest.raises(errors.NotFound):
                fresh.get_sequence(sids[i])
        c.close()
        fresh.close()
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def test_a_shared_peers_list_without_advertise_loses_nothing() -> None:
    """Three replicas given one `--peers` list naming all three and no `--advertise`, as an
    operator writing their own manifest would: each recognises its own entry by its instance id,
    so SIGTERM on one moves every sequence it held to the others (none is pushed to itself, which
    refuses while draining), and every sequence is then found and decodes as before."""
    ports = [free_port() for _ in range(3)]
    targets = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_server(*GEOMETRY, "--peers", ",".join(targets), "--grace-s", "30", "--port", str(p)) for p in ports]
    try:
        c = Client(targets, timeout=30)
        sids = [c.create_sequence().sequence_id for _ in range(4)]
        while sum(routing.pick(targets, s) == 0 for s in sids) < 4:
            sids.append(c.create_sequence().sequence_id)
        for i, s in enumerate(sids):
            c.append_kv(s, 0, rand((13, HKV, D), 10 * i), rand((13, HKV, D), 10 * i + 1))
            c.append_kv(s, 1, rand((5, HKV, D), 10 * i + 2), rand((5, HKV, D), 10 * i + 3))
        q, k, v = rand((1, HQ, 1, D), 5), rand((1, HKV, 1, D), 6), rand((1, HKV, 1, D), 7)

        def answer(client: Client, sid: str) -> np.ndarray:
            fork = client.fork(sid).sequence_id  # decoding appends a token: step a fork, keep the sequence
            out = client.decode(0, [fork], [13], q, k, v).out
            client.release(fork)
            return out

        expect = {s: answer(c, s) for s in sids}
        moving = [s for s in sids if routing.pick(targets, s) == 0]
        assert procs[0].stop(signal.SIGTERM, timeout=60) == 0
        out = procs[0].proc.stdout.read()
        assert f"drain moved {len(moving)} sequences, 0 could not move" in out, out
        fresh = Client(targets, timeout=30)  # never saw the move: finds them by looking
        for client in (c, fresh):
            for s in sids:
                assert list(client.get_sequence(s).lengths) == [13, 5]
                np.testing.assert_array_equal(answer(client, s), expect[s])
        assert all(fresh._replica(s) != 0 for s in moving)
        c.close()
        fresh.close()
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def test_decode_stream_follows_its_sequence_through_a_real_drain() -> None:
    """An AsyncClient's decode_stream over three `tkg serve` replicas: three messages answered by
    replica 0, then SIGTERM; the next messages meet the drain (UNAVAILABLE), the client ends its
    stream (so the drain can push), finds the sequence where the drain put it and sends, in order,
    what was not answered. Every answer equals a twin sequence's on an undisturbed replica, and
    the sequence holds each step once (nothing answered was sent again)."""
    ports = [free_port() for _ in range(3)]
    targets = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_server(*GEOMETRY, "--peers", ",".join(targets), "--grace-s", "30", "--port", str(p)) for p in ports]
    shapes = ((1, HQ, 1, D), (1, HKV, 1, D), (1, HKV, 1, D))  # q, k, v of one step
    steps = [tuple(rand(shape, 50 + 3 * i + j) for j, shape in enumerate(shapes)) for i in range(6)]

    def requests(sid: str) -> list[DecodeInput]:
        return [DecodeInput(0, [sid], [13 + i], *steps[i], request_id=str(i)) for i in range(6)]

    async def until_draining(target: str) -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.DecodeAttentionStub(ch)
            while True:
                try:
                    await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return
                await asyncio.sleep(0.02)

    async def main() -> tuple[list[Any], list[Any], list[int]]:
        async with AsyncClient(targets, timeout=60) as c:
            ids = {}
            while len(ids) < 2:  # `a` on the replica to drain, its twin `b` on one that stays
                sid = (await c.create_sequence()).sequence_id
                home = routing.pick(targets, sid)
                name = "a" if home == 0 else "b"
                if name not in ids:
                    ids[name] = sid
                else:
                    await c.release(sid)
            for sid in ids.values():
                for layer in (0, 1):
                    await c.append_kv(sid, layer, rand((13, HKV, D), 1 + layer), rand((13, HKV, D), 3 + layer))
            expect = [r async for r in c.decode_stream(requests(ids["b"]))]
            three_answered = asyncio.Event()

            async def source() -> Any:
                for i, d in enumerate(requests(ids["a"])):
                    if i == 3:
                        await three_answered.wait()
                        procs[0].proc.send_signal(signal.SIGTERM)
                        await until_draining(targets[0])
                    yield d

            got = []
            async for r in c.decode_stream(source()):
                got.append(r)
                if len(got) == 3:
                    three_answered.set()
            info = await c.get_sequence(ids["a"])
            return expect, got, [c._replica(ids["a"]), *info.lengths]

    try:
        expect, got, (where, *lengths) = asyncio.run(main())
        assert [r.request_id for r in got] == [str(i) for i in range(6)]
        assert all(r.error is None for r in got), [r.error for r in got]
        for mine, twin in zip(got, expect, strict=True):
            np.testing.assert_array_equal(mine.out, twin.out)
        assert where != 0 and lengths == [19, 13]  # six steps, each once
        assert procs[0].proc.wait(60) == 0
        assert "0 could not move" in procs[0].proc.stdout.read()
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def _answers(client: Client, replica: int) -> bool:
    try:
        client.server_info(replica)
    except errors.Unavailable:
        return False
    return True
