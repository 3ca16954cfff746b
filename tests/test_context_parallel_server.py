"""Context parallelism on one server, in process: a sequence split into segments (CreateSequence
base_position), the tail decoding with return_lse and the others attend_only, merged with
`merge_states`, equals the unsplit sequence's Decode (fp32) with fused RoPE, a sliding window
crossing segment boundaries, sinks, S = 1 and 4; plus the wire's refusals and base positions
through export/import."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support.service import Aborted, FakeContext, make_service

from tkg import codec
from tkg.client.merge import merge_states
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb

HQ, HKV, D, N = 4, 2, 16, 8  # N: tokens per segment (an S-token step may overrun it by S - 1)


def _started(tmp_path: Path, backend: str = "reference") -> DecodeAttentionService:
    """A started service of `_spec` (call inside the test's event loop: the batcher runs on it)."""
    svc = make_service(_spec(tmp_path), backend=backend)
    svc.start()
    return svc


def _spec(tmp_path: Path) -> dict[str, Any]:
    sinks = np.random.default_rng(3).standard_normal((2, HQ)).astype(np.float32)
    np.save(tmp_path / "sinks.npy", sinks)
    return {"num_layers": 2, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "num_blocks": 64,
            "block_len": 4, "kv_dtype": "float32", "fuse_rope": True, "max_s_active": 4, "max_context": 256,
            "sliding_window": [6, None], "sinks": str(tmp_path / "sinks.npy")}  # fmt: skip




def _t(a: np.ndarray) -> pb.Tensor:
    return codec.encode(np.ascontiguousarray(a, np.float32))


async def _decode(svc: DecodeAttentionService, req: pb.DecodeRequest) -> pb.DecodeResponse:
    return pb.DecodeResponse.FromString(await svc.Decode(req, FakeContext()))


async def _dec(svc: DecodeAttentionService, sid: str, position: int, q: np.ndarray, **kw: Any) -> pb.DecodeResponse:
    """Decode of one sequence; `k`, `v` arrays when given, other fields as keywords."""
    tensors = {name: _t(kw.pop(name)) for name in ("k", "v") if name in kw}
    req = pb.DecodeRequest(sequence_ids=[sid], positions=[position], q=_t(q), **tensors, **kw)
    return pb.DecodeResponse.FromString(await svc.Decode(req, FakeContext()))


class Segmented:
    """The client's side of the scheme, by hand: segments "id#j" on one server, the tail appends."""

    def __init__(self, svc: DecodeAttentionService, sid: str) -> None:
        self.svc, self.sid, self.bases = svc, sid, [0]

    async def create(self) -> None:
        await self.svc.CreateSequence(pb.CreateSequenceRequest(sequence_id=f"{self.sid}#0"), FakeContext())

    async def end(self, layer: int) -> int:
        info = (await self.svc.GetSequence(pb.GetSequenceRequest(sequence_id=f"{self.sid}#{len(self.bases) - 1}"),
                                          FakeContext()))  # fmt: skip
        assert info.base_position == self.bases[-1]
        return info.base_position + info.lengths[layer]

    async def step(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        pos = await self.end(layer)
        if layer == 0 and pos - self.bases[-1] >= N:  # the tail is full: the next segment starts here
            self.bases.append(pos)
            req = pb.CreateSequenceRequest(sequence_id=f"{self.sid}#{len(self.bases) - 1}", base_position=pos)
            assert (await self.svc.CreateSequence(req, FakeContext())).base_position == pos
        tail = len(self.bases) - 1
        outs, lses = [], []
        for j in range(len(self.bases)):
            req = pb.DecodeRequest(layer=layer, sequence_ids=[f"{self.sid}#{j}"], positions=[pos], q=_t(q),
                                   return_lse=True, attend_only=j != tail)  # fmt: skip
            if j == tail:
                req.k.CopyFrom(_t(k))
                req.v.CopyFrom(_t(v))
            resp = await _decode(self.svc, req)
            out, lse = codec.decode(resp.out), codec.decode(resp.lse)
            assert out.dtype == np.float32 and lse.shape == q.shape[:3]
            outs.append(out)
            lses.append(lse)
        return merge_states(outs, lses)[0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("S", [1, 4])
def test_segments_merge_to_the_unsplit_sequence(tmp_path: Path, backend: str, S: int) -> None:
    async def body() -> None:
        svc = _started(tmp_path, backend)
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="whole"), FakeContext())
        seg = Segmented(svc, "split")
        await seg.create()
        rng = np.random.default_rng(S)
        for _ in range(28 // S):
            for layer in range(2):
                q, k, v = (rng.standard_normal((1, h, S, D)).astype(np.float32) for h in (HQ, HKV, HKV))
                pos = (await svc.GetSequence(pb.GetSequenceRequest(sequence_id="whole"), FakeContext())).lengths[layer]
                want = codec.decode((await _dec(svc, "whole", pos, q, k=k, v=v, layer=layer)).out)
                got = await seg.step(layer, q, k, v)
                np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
        assert len(seg.bases) >= 3  # the window (6) crossed segment boundaries on layer 0

    asyncio.run(body())


def test_attend_only_appends_nothing_and_checks_its_fields(tmp_path: Path) -> None:
    async def body() -> None:
        svc = _started(tmp_path)
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s", base_position=10), FakeContext())
        q = np.ones((1, HQ, 1, D), np.float32)
        kv = np.ones((1, HKV, 1, D), np.float32)
        # Positions are absolute: the first append of a sequence based at 10 sits at 10.
        with pytest.raises(Aborted) as err:
            await _dec(svc, "s", 0, q, k=kv, v=kv)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "expected 10" in err.value.details
        await _dec(svc, "s", 10, q, k=kv, v=kv)
        with pytest.raises(Aborted) as err:
            await _dec(svc, "s", 11, q, k=kv, attend_only=True)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.details.startswith("k: present")
        with pytest.raises(Aborted) as err:
            await _dec(svc, "s", 10, q, attend_only=True)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "expected at least 11" in err.value.details
        resp = await _dec(svc, "s", 40, q, attend_only=True, return_lse=True)
        # Window 6 at layer 0: queries at 40 see nothing of a sequence ending at 11.
        assert np.all(np.isneginf(codec.decode(resp.lse))) and np.all(codec.decode(resp.out) == 0)
        resp = await _dec(svc, "s", 40, q, attend_only=True, layer=1)
        assert codec.decode(resp.out).shape == (1, HQ, 1, D)  # layer 1 holds nothing: out 0, no error
        info = (await svc.GetSequence(pb.GetSequenceRequest(sequence_id="s"), FakeContext()))
        assert list(info.lengths) == [1, 0] and info.base_position == 10

    asyncio.run(body())


def test_backends_without_partial_support_refuse_naming_the_field(tmp_path: Path, monkeypatch: Any) -> None:
    async def body() -> None:
        svc = _started(tmp_path)
        monkeypatch.setattr(type(svc.cache.store), "supports_partial", property(lambda self: False))
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext())
        q = np.ones((1, HQ, 1, D), np.float32)
        for flag in ("return_lse", "attend_only"):
            req = pb.DecodeRequest(layer=0, sequence_ids=["s"], positions=[0], q=_t(q), **{flag: True})
            with pytest.raises(Aborted) as err:
                await _decode(svc, req)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details.startswith(f"{flag}: the backend reference does not support it;")

    asyncio.run(body())


def test_base_position_survives_export_and_import(tmp_path: Path) -> None:
    async def body() -> None:
        a, b = _started(tmp_path), _started(tmp_path)
        await a.CreateSequence(pb.CreateSequenceRequest(sequence_id="s", base_position=16), FakeContext())
        rng = np.random.default_rng(0)
        for layer in range(2):
            q, k, v = (rng.standard_normal((1, h, 3, D)).astype(np.float32) for h in (HQ, HKV, HKV))
            await _dec(a, "s", 16, q, k=k, v=v, layer=layer)

        async def move() -> pb.SequenceInfo:
            msgs = [m async for m in a.ExportSequence(pb.ExportSequenceRequest(sequence_id="s"), FakeContext())]
            assert msgs[0].header.base_position == 16 and msgs[1].position == 16

            async def stream() -> Any:
                for m in msgs:
                    yield m

            return await b.ImportSequence(stream(), FakeContext())

        info = await move()
        assert info.base_position == 16 and list(info.lengths) == [3, 3]
        q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
        outs = [codec.decode((await _dec(s, "s", 19, q, attend_only=True, layer=1)).out) for s in (a, b)]
        np.testing.assert_array_equal(outs[0], outs[1])

    asyncio.run(body())
