"""ImportSequence under the tenant's quotas (issue #21 items 2 and 6): its streams count toward
max_streams (a peer's drain does not), its declared size is checked and reserved when the header
arrives, it holds no buffers for declared lengths, and K/V layers come in order."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.service import Aborted, FakeContext, make_service

from tkg import codec
from tkg.server import credentials
from tkg.server.identity import CURRENT, Identity, current
from tkg.server.service import DecodeAttentionService
from tkg.server.tenants import inward
from tkg.v1 import decode_attention_pb2 as pb

L, HKV, D, BL = 2, 2, 16, 8
TOKEN = "import-quota-token-0123456789"


def service(num_blocks: int = 64, max_context: int = 512) -> DecodeAttentionService:
    raw = {"num_layers": L, "num_q_heads": 2, "num_kv_heads": HKV, "head_dim": D, "block_len": BL,
           "num_blocks": num_blocks, "kv_dtype": "float32", "max_context": max_context, "max_batch": 4}  # fmt: skip
    return make_service(raw, max_pending=8, max_message_bytes=2**22)


def identity(quota: dict[str, int], peer: bool = False) -> Identity:
    entry = {"name": "team", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "quota": quota}
    tenant = credentials.build_table([], [], [entry]).tokens[0][1].tenant
    return Identity(tenant, peer=peer)


def header(sid: str, lengths: list[int], chunks: int) -> pb.SequenceChunk:
    h = pb.SequenceHeader(lengths=lengths, num_layers=L, num_kv_heads=HKV, head_dim=D,
                          kv_dtype=pb.DTYPE_FLOAT32, chunks=chunks)  # fmt: skip
    return pb.SequenceChunk(sequence_id=sid, header=h)


def kv_message(sid: str, layer: int, position: int, T: int, seed: int = 0) -> pb.SequenceChunk:
    rng = np.random.default_rng(seed)
    msg = pb.SequenceChunk(sequence_id=sid, layer=layer, position=position)
    codec.encode(rng.standard_normal((T, HKV, D), dtype=np.float32), msg.k)
    codec.encode(rng.standard_normal((T, HKV, D), dtype=np.float32), msg.v)
    return msg


class Parked:
    """An import stream that sends `messages`, then waits for `go` before sending `rest` and
    ending (`park=False`: ends right after `messages`)."""

    def __init__(self, messages: list[pb.SequenceChunk], rest: list[pb.SequenceChunk] = (), park: bool = True) -> None:
        self.messages, self.rest = messages, list(rest)
        self.sent, self.go = asyncio.Event(), asyncio.Event()
        if not park:
            self.go.set()

    async def __call__(self) -> AsyncIterator[pb.SequenceChunk]:
        for m in self.messages:
            yield m
        self.sent.set()
        await self.go.wait()
        for m in self.rest:
            yield m


async def status(coro: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except Aborted as exc:
        return exc.code, exc.details
    return grpc.StatusCode.OK, ""


def run(main: Any) -> Any:
    return asyncio.run(main())


# ---- max_streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["AppendKV", "ImportSequence", "ExportSequence"])
def test_an_open_import_counts_toward_max_streams(other: str) -> None:
    """max_streams 1: while one import is open, the tenant's next stream is RESOURCE_EXHAUSTED
    naming max_streams; once it ends, the stream opens."""
    svc = service()

    async def main() -> None:
        CURRENT.set(identity({"max_streams": 1}))
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext())
        parked = Parked([header("imp", [0, 0], 0)])
        first = asyncio.ensure_future(svc.ImportSequence(parked(), FakeContext()))
        await asyncio.wait_for(parked.sent.wait(), 10)

        async def append() -> AsyncIterator[pb.AppendKVRequest]:
            msg = pb.AppendKVRequest(sequence_id="s", layer=0, position=0)
            m = kv_message("s", 0, 0, 1)
            msg.k.CopyFrom(m.k)
            msg.v.CopyFrom(m.v)
            yield msg

        async def export() -> None:
            async for _ in svc.ExportSequence(pb.ExportSequenceRequest(sequence_id="s"), FakeContext()):
                pass

        async def imp() -> None:
            await svc.ImportSequence(Parked([header("imp2", [0, 0], 0)])(), FakeContext())

        calls = {"AppendKV": lambda: svc.AppendKV(append(), FakeContext()), "ExportSequence": export,
                 "ImportSequence": imp}  # fmt: skip
        code, details = await status(calls[other]())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams" in details, details
        parked.go.set()
        assert (await first).sequence_id == "imp"
        if other != "ImportSequence":  # (a parked import would never end: the others complete)
            assert (await status(calls[other]()))[0] == grpc.StatusCode.OK
        assert svc.ledger.of(current().tenant).streams == 0

    run(main)


def test_an_open_export_counts_toward_max_streams() -> None:
    svc = service()

    async def main() -> None:
        CURRENT.set(identity({"max_streams": 1}))
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext())
        stream = svc.ExportSequence(pb.ExportSequenceRequest(sequence_id="s"), FakeContext())
        await stream.__anext__()  # the header: the export is open
        code, details = await status(svc.ImportSequence(Parked([header("imp", [0, 0], 0)])(), FakeContext()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams" in details, details
        async for _ in stream:
            pass
        assert svc.ledger.of(current().tenant).streams == 0

    run(main)


def test_a_peer_drain_import_is_not_counted_toward_the_tenant_streams() -> None:
    """A replica's drain (peer credential) imports into a tenant whose streams are all in use."""
    svc = service()

    async def main() -> None:
        tenant_ident = identity({"max_streams": 1})
        CURRENT.set(tenant_ident)
        parked = Parked([header("mine", [0, 0], 0)])
        first = asyncio.ensure_future(svc.ImportSequence(parked(), FakeContext()))
        await asyncio.wait_for(parked.sent.wait(), 10)
        CURRENT.set(Identity(tenant_ident.tenant, peer=True))
        msgs = [header("moved", [3, 3], 2), kv_message("moved", 0, 0, 3), kv_message("moved", 1, 0, 3)]
        info = await svc.ImportSequence(Parked(msgs, park=False)(), FakeContext())
        assert info.lengths == [3, 3]
        parked.go.set()
        await first

    run(main)


# ---- the declared size ---------------------------------------------------------------------------


def test_a_header_past_max_blocks_is_refused_when_it_arrives() -> None:
    """RESOURCE_EXHAUSTED naming max_blocks as soon as the header is read: the stream is parked
    after it (no K/V sent), yet the call ends; nothing is held afterwards."""
    svc = service()

    async def main() -> None:
        CURRENT.set(identity({"max_blocks": 4}))
        parked = Parked([header("big", [40, 40], 2)])  # 5 blocks of 8 tokens
        code, details = await asyncio.wait_for(status(svc.ImportSequence(parked(), FakeContext())), 10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "quota max_blocks of tenant 'team'" in details and "5 more requested" in details, details
        assert not parked.go.is_set()
        assert svc.cache.free_blocks == 64 and svc.ledger.of(current().tenant).blocks == 0

    run(main)


def test_concurrent_imports_share_the_quota_they_reserved() -> None:
    """Two imports of 3 blocks each under max_blocks 4: the first reserves its blocks at its
    header, so the second is refused at its own header (8 concurrent imports of a 64-block
    tenant used to hold +677 MiB between them)."""
    svc = service()

    async def main() -> None:
        ident = identity({"max_blocks": 4})
        CURRENT.set(ident)
        msgs = [kv_message("a", 0, 0, 24), kv_message("a", 1, 0, 24)]
        parked = Parked([header("a", [24, 24], 2)], msgs)
        first = asyncio.ensure_future(svc.ImportSequence(parked(), FakeContext()))
        await asyncio.wait_for(parked.sent.wait(), 10)
        assert svc.ledger.of(ident.tenant).blocks == 3  # reserved and charged at the header
        code, details = await status(svc.ImportSequence(Parked([header("b", [24, 0], 1)])(), FakeContext()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_blocks" in details, details
        parked.go.set()
        assert list((await first).lengths) == [24, 24]
        assert svc.ledger.of(ident.tenant).blocks == 3 and svc.cache.free_blocks == 61

    run(main)


def test_a_header_past_the_free_blocks_is_refused_when_it_arrives() -> None:
    svc = service(num_blocks=4)

    async def main() -> None:
        CURRENT.set(identity({}))
        code, details = await status(svc.ImportSequence(Parked([header("big", [40, 0], 1)])(), FakeContext()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "5 more blocks needed" in details, details
        assert svc.cache.free_blocks == 4

    run(main)


def test_an_import_holds_no_buffer_for_its_declared_lengths() -> None:
    """A header declaring 2 x 4096 tokens (1 MiB of K+V), then nothing: the import holds its
    reserved blocks (the pool, allocated at start) and no buffer of the declared size."""
    svc = service(num_blocks=1024, max_context=4096)

    async def main() -> None:
        CURRENT.set(identity({}))
        parked = Parked([header("big", [4096, 4096], 2)])
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            task = asyncio.ensure_future(svc.ImportSequence(parked(), FakeContext()))
            await asyncio.wait_for(parked.sent.wait(), 10)
            await asyncio.sleep(0)  # the header is in the importer once the stream asked for more
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert svc.cache.free_blocks == 1024 - 512  # reserved
        declared = 2 * 2 * 4096 * HKV * D * 4
        assert held < declared // 8, f"{held} bytes held by an import that declared {declared}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert svc.cache.free_blocks == 1024 and svc.ledger.of(current().tenant).blocks == 0

    run(main)


# ---- order (item 6) ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [[1, 0], [0, 1, 0]])
def test_kv_layers_out_of_order_are_invalid_argument(order: list[int]) -> None:
    """Layers in order, each complete before the next: layer 1 before layer 0, or layer 0 again
    after layer 1 began, is INVALID_ARGUMENT naming the layer expected; nothing is left behind."""
    svc = service()

    async def main() -> None:
        CURRENT.set(identity({}))
        if order == [1, 0]:
            msgs = [header("x", [8, 8], 2), kv_message("x", 1, 0, 8), kv_message("x", 0, 0, 8)]
            want = "layer: 1 in message 1; expected 0"
        else:
            msgs = [header("x", [8, 8], 3), kv_message("x", 0, 0, 4), kv_message("x", 1, 0, 8),
                    kv_message("x", 0, 4, 4)]  # fmt: skip
            want = "layer: 1 in message 2; expected 0"
        code, details = await status(svc.ImportSequence(Parked(msgs)(), FakeContext()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and want in details, details
        assert "x" not in svc.cache and inward(current().tenant, "x") not in svc.cache
        assert svc.cache.free_blocks == 64 and svc.ledger.of(current().tenant).blocks == 0

    run(main)
