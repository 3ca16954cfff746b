"""The race harness: a small in-process service whose launches run on the worker thread, and a
`GatedKernel` that parks a launch inside the kernel until the test opens the gate (see
tests/test_races.py). Shared by the race, launch and migration tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from support import service as support_service
from support.fakes import FakeClock
from support.service import FakeContext
from tkg import codec
from tkg.kernel import paged_decode
from tkg.kernel.kv_store import HostKVStore
from tkg.server.service import DecodeAttentionService
from tkg.v1 import decode_attention_pb2 as pb

HQ, HKV, D, BL = 2, 1, 8, 16


def make_service(num_blocks: int = 8, clock: FakeClock | None = None, **settings: Any) -> DecodeAttentionService:
    spec = {"num_layers": 2, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_len": BL,
            "num_blocks": num_blocks, "kv_dtype": "float32", "max_context": 256, "idle_ttl_s": 10.0,
            "max_batch": 4}  # fmt: skip
    # Every launch on the worker thread (the race window this file is about), unless a test says otherwise.
    settings = {"inline_kernel_bytes": -1, "lone_inline_bytes": -1, "max_pending": 16, "max_message_bytes": 2**22,
                **settings}  # fmt: skip
    return support_service.make_service(spec, clock=clock or FakeClock(), **settings)


class GatedKernel:
    """Stands in for `HostKVStore.decode` (see the module docstring)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.real = HostKVStore.decode
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail = fail
        self.expected: np.ndarray | None = None
        self.thread: str | None = None

    def __get__(self, store: HostKVStore, owner: type) -> Any:  # bound like the method it replaces
        return lambda *args, **kwargs: self(store, *args, **kwargs)

    def __call__(self, store: HostKVStore, layer: int, q: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        self.thread = threading.current_thread().name
        tables, lens = args[2:4]
        options = {k: v for k, v in kwargs.items() if k != "trusted"}  # the cache's own tables: not a kernel option
        self.expected = paged_decode(
            q, store.k[layer].copy(), store.v[layer].copy(), tables, lens, backend=store.backend, **options
        )
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return self.real(store, layer, q, *args, **kwargs)

    async def wait_started(self) -> None:
        assert await asyncio.get_running_loop().run_in_executor(None, self.started.wait, 30)

    def __enter__(self) -> GatedKernel:
        HostKVStore.decode = self  # type: ignore[assignment,method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        HostKVStore.decode = self.real  # type: ignore[method-assign]


def rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def decode_req(sid: str, pos: int, seed: int = 0, layer: int = 0) -> pb.DecodeRequest:
    req = pb.DecodeRequest(layer=layer, sequence_ids=[sid], positions=[pos], request_id=sid)
    for i, (name, heads) in enumerate((("q", HQ), ("k", HKV), ("v", HKV))):
        codec.encode(rand((1, heads, 1, D), seed * 10 + i), getattr(req, name))
    return req


def append_msgs(sid: str, layer: int, pos: int, T: int, seed: int) -> list[pb.AppendKVRequest]:
    msg = pb.AppendKVRequest(sequence_id=sid, layer=layer, position=pos)
    codec.encode(rand((T, HKV, D), seed), msg.k)
    codec.encode(rand((T, HKV, D), seed + 1), msg.v)
    return [msg]


async def stream(msgs: list) -> Any:
    for m in msgs:
        yield m


async def rpc(svc: DecodeAttentionService, method: str, request: Any) -> Any:
    return await getattr(svc, method)(request, FakeContext())


async def appendkv(svc: DecodeAttentionService, sid: str, layer: int, pos: int, T: int, seed: int) -> pb.SequenceInfo:
    return await svc.AppendKV(stream(append_msgs(sid, layer, pos, T, seed)), FakeContext())


async def started_decode(svc: DecodeAttentionService, kernel: GatedKernel, sid: str, pos: int) -> asyncio.Task:
    task = asyncio.ensure_future(svc.decode(decode_req(sid, pos)))
    await kernel.wait_started()
    return task
