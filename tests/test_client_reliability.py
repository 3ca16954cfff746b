"""Client reliability without a server: partial failures keep what succeeded (both clients), and
NOT_FOUND becomes ServerRestarted exactly when the replica's instance id changed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from tkg.client import AsyncClient, Client, errors, routing
from tkg.client.instances import Instances
from tkg.client.messages import DecodeResult
from tkg.v1 import decode_attention_pb2 as pb

TARGETS = ["replica-a:1", "replica-b:1", "replica-c:1"]


def ids_on_every_replica() -> list[str]:
    ids, seen = [], set()
    n = 0
    while len(seen) < len(TARGETS) or len(ids) < 6:
        sid = f"s{n}"
        n += 1
        seen.add(routing.pick(TARGETS, sid))
        ids.append(sid)
    return ids


def fake_call(dead: int) -> Any:
    """A `_call` answering Decode with rows = 100 * replica + position, and UNAVAILABLE from `dead`."""

    def answer(replica: int, method: str, request: pb.DecodeRequest, timeout: Any = None) -> pb.DecodeResponse:
        assert method == "Decode"
        if replica == dead:
            raise errors.Unavailable("connection refused", TARGETS[replica])
        from tkg import codec

        B = len(request.sequence_ids)
        out = np.arange(B, dtype=np.float32)[:, None, None, None] + 100 * replica + np.zeros((B, 2, 1, 4), np.float32)
        resp = pb.DecodeResponse(layer=request.layer, timing=pb.Timing(total_us=10 + replica))
        codec.encode(out, resp.out)
        return resp

    return answer


def check_partial(err: errors.PartialDecodeError, sids: list[str], dead: int) -> None:
    homes = [routing.pick(TARGETS, s) for s in sids]
    assert err.code == grpc.StatusCode.UNAVAILABLE and TARGETS[dead] in str(err)
    assert sorted(err.errors) == sorted(s for s, h in zip(sids, homes, strict=True) if h == dead)
    assert all(isinstance(e, errors.Unavailable) for e in err.errors.values())
    ok = err.result.ok
    assert ok.tolist() == [h != dead for h in homes]
    out = err.result.out
    assert np.isnan(out[~ok]).all()
    for b in np.flatnonzero(ok):  # each surviving row is its replica's answer for it, in caller order
        rank = [i for i, h in enumerate(homes) if h == homes[b]].index(b)
        assert out[b, 0, 0, 0] == 100 * homes[b] + rank


def test_sync_split_decode_keeps_the_rows_that_succeeded() -> None:
    sids = ids_on_every_replica()
    dead = routing.pick(TARGETS, sids[0])
    c = Client(TARGETS)
    c._call = fake_call(dead)  # type: ignore[method-assign]
    z = np.zeros((len(sids), 2, 1, 4), np.float32)
    with pytest.raises(errors.PartialDecodeError) as err:
        c.decode(0, sids, [0] * len(sids), z, z[:, :1], z[:, :1])
    check_partial(err.value, sids, dead)
    c._call = fake_call(-1)  # type: ignore[method-assign]
    res = c.decode(0, sids, [0] * len(sids), z, z[:, :1], z[:, :1])
    assert isinstance(res, DecodeResult) and res.ok is None and not np.isnan(res.out).any()
    c.close()


def test_async_split_decode_keeps_the_rows_that_succeeded() -> None:
    async def main() -> None:
        sids = ids_on_every_replica()
        dead = routing.pick(TARGETS, sids[-1])
        c = AsyncClient(TARGETS)
        sync = fake_call(dead)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return sync(*args, **kwargs)

        c._call = call  # type: ignore[method-assign]
        z = np.zeros((len(sids), 2, 1, 4), np.float32)
        with pytest.raises(errors.PartialDecodeError) as err:
            await c.decode(0, sids, [0] * len(sids), z, z[:, :1], z[:, :1])
        check_partial(err.value, sids, dead)
        await c.close()

    asyncio.run(main())


def test_not_found_is_server_restarted_only_when_the_instance_changed() -> None:
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
