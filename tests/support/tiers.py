"""KV tier test helpers: a small service with tiers, sequence filling, and `Gated`, which parks
a spill or a restore inside its copy (on the tiers' thread) until the test opens the gate, so a
racing RPC runs while the sequence is half-moved (tests/test_tier_races.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np

from support import service as support_service
from support.fakes import FakeClock
from support.races import append_msgs, rpc, stream
from support.service import FakeContext
from tkg import codec
from tkg.kernel.kv_store import HostKVStore
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb

# Small enough that thousands of sequences fit in a test; one block's bytes: 2 * L * Hkv * BL * d * 4.
SPEC = {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "block_len": 4,
        "num_blocks": 64, "kv_dtype": "float32", "max_context": 64, "idle_ttl_s": 1000.0, "max_batch": 8}  # fmt: skip
BLOCK_BYTES = 2 * 2 * 1 * 4 * 8 * 4


def tier_service(
    spill_dir: Path | None = None, *, num_blocks: int = 64, host_blocks: int = 0, disk_blocks: int | None = None,
    clock: FakeClock | None = None, wall: Any = None, spec: dict[str, Any] | None = None, **settings: Any,
) -> DecodeAttentionService:  # fmt: skip
    """A started-ready service over `SPEC` with a host tier of `host_blocks` blocks and, with
    `spill_dir`, a disk tier of `disk_blocks` blocks (None: the default bound)."""
    s = {**SPEC, **(spec or {}), "num_blocks": num_blocks}
    block = 2 * s["num_layers"] * s["num_kv_heads"] * s["block_len"] * s["head_dim"] * 4
    extra: dict[str, Any] = {"host_cache_bytes": host_blocks * block}
    if spill_dir is not None:
        extra["spill_dir"] = str(spill_dir)
        if disk_blocks is not None:
            extra["spill_bytes"] = disk_blocks * block
    if wall is not None:
        extra["wall"] = wall
    return support_service.make_service(s, clock=clock, **extra, **settings)


async def fill(svc: DecodeAttentionService, sid: str, tokens: int, seed: int, layers: int = 2) -> pb.SequenceInfo:
    """Create `sid` with `tokens` random tokens at every layer."""
    await rpc(svc, "CreateSequence", pb.CreateSequenceRequest(sequence_id=sid))
    info = None
    for layer in range(layers):
        info = await svc.AppendKV(stream(append_msgs(sid, layer, 0, tokens, seed * 31 + layer)), FakeContext())
    assert info is not None
    return info


def decode_batch(sids: list[str], positions: list[int], seed: int, spec: dict[str, Any] = SPEC, layer: int = 0
                 ) -> pb.DecodeRequest:  # fmt: skip
    """One S=1 Decode of `sids` at `positions`, random q/k/v from `seed`."""
    rng = np.random.default_rng(seed)
    req = pb.DecodeRequest(layer=layer, sequence_ids=sids, positions=positions, request_id=f"r{seed}")
    B, d = len(sids), spec["head_dim"]
    for name, heads in (("q", spec["num_q_heads"]), ("k", spec["num_kv_heads"]), ("v", spec["num_kv_heads"])):
        codec.encode(rng.standard_normal((B, heads, 1, d)).astype(np.float32), getattr(req, name))
    return req


async def tier(svc: DecodeAttentionService, sid: str) -> str:
    return (await rpc(svc, "GetSequence", pb.GetSequenceRequest(sequence_id=sid))).tier


class Gated:
    """Stands in for a `HostKVStore` method on the tiers' thread (`read_sequence`: a spill's copy;
    `write_sequence`: a restore's): signals `started`, blocks until `gate` opens, then runs it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.real = getattr(HostKVStore, name)
        self.started = threading.Event()
        self.gate = threading.Event()

    def __get__(self, store: HostKVStore, owner: type) -> Any:
        return lambda *args, **kwargs: self(store, *args, **kwargs)

    def __call__(self, store: HostKVStore, *args: Any) -> None:
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.real(store, *args)

    async def wait_started(self) -> None:
        ok = await asyncio.get_running_loop().run_in_executor(None, self.started.wait, 30)
        assert ok, f"no {self.name} started"

    def __enter__(self) -> Gated:
        setattr(HostKVStore, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        setattr(HostKVStore, self.name, self.real)


def move_waits(svc: DecodeAttentionService) -> asyncio.Event:
    """An event set once a call waits for a spill or restore of a sequence it names."""
    tiers, real = svc.tiers, svc.tiers._await_move
    waiting = asyncio.Event()

    async def wait(seq_id: str, moving: asyncio.Future[None]) -> None:
        waiting.set()
        await real(seq_id, moving)

    tiers._await_move = wait  # type: ignore[method-assign]
    return waiting
