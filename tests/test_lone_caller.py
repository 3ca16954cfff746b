"""Where a launch runs: the scheduling decision (`launch_inline`) as a pure function, the kernel
speed `LoneCaller` keeps, and a lone caller's large launch on the event loop of a service."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from support.service import make_service

from tkg import codec
from tkg.kernel.kv_store import HostKVStore
from tkg.server.batcher import LONE_STALL_S, LONE_STREAK, LoneCaller, launch_inline
from tkg.v1 import decode_attention_pb2 as pb

MIB = 2**20


def test_tiny_launches_run_on_the_loop_whoever_calls() -> None:
    for lone in (False, True):
        for speed in (None, 1.0):  # even at a second per byte: the hand-off costs more
            assert launch_inline(1000, lone, speed, inline_kernel_bytes=1000, lone_inline_bytes=0)
    assert not launch_inline(1001, False, 1e-12, inline_kernel_bytes=1000, lone_inline_bytes=2**40)


def test_a_lone_callers_launch_runs_on_the_loop_while_its_expected_time_is_within_the_stall_bound() -> None:
    speed = 1e-9  # 1 GB/s: 100 MiB take ~0.105 s
    decide = lambda mib, **kw: launch_inline(mib * MIB, True, speed, 256 * 1024, 2**40, **kw)  # noqa: E731
    assert decide(32, stall_s=0.1) and decide(95, stall_s=0.1)
    assert not decide(96, stall_s=0.1) and not decide(1024, stall_s=0.1)
    assert decide(1024, stall_s=2.0)
    assert not launch_inline(32 * MIB, True, None, 256 * 1024, 2**40)  # no speed measured yet: the worker
    assert not launch_inline(32 * MIB, True, speed, 256 * 1024, 16 * MIB)  # the operator's byte cap
    assert not launch_inline(32 * MIB, False, speed, 256 * 1024, 2**40)  # other callers: the worker


def test_the_lone_record_keeps_the_last_large_kernels_speed() -> None:
    lone = LoneCaller(lambda: 1, inline_kernel_bytes=1000)
    lone.kernel_ran(1000, 1.0)  # within the tiny bound: its fixed cost says nothing of its speed
    assert lone.seconds_per_byte is None
    lone.kernel_ran(4000, 0.002)
    assert lone.seconds_per_byte == pytest.approx(5e-7)
    lone.kernel_ran(2000, 0.004)
    assert lone.seconds_per_byte == pytest.approx(2e-6)
    assert lone.stall_s == LONE_STALL_S and not lone.inline(2000)  # no streak: not alone
    lone.streak = LONE_STREAK + 1
    assert lone.inline(LONE_STALL_S / 2e-6 // 1) and not lone.inline(LONE_STALL_S / 2e-6 + 1)


def test_a_windowed_layer_counts_only_the_window_it_reads() -> None:
    """The speed the decision learns is per byte read: a window layer's launch counts `window`
    tokens per sequence, a full layer's all of them (else a full layer's launch would be credited
    with the window layer's speed and kept on the loop far beyond the stall bound)."""
    spec = {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "block_len": 16,
            "num_blocks": 16, "kv_dtype": "float32", "max_context": 256, "sliding_window": [64, None]}  # fmt: skip
    engine = make_service(spec).engine
    lens = np.array([10, 100, 200], np.int32)
    token = 2 * 1 * 8 * 4  # K + V, 1 kv head, d=8, float32
    assert engine._read_bytes(0, lens) == (10 + 64 + 64) * token
    assert engine._read_bytes(1, lens) == 310 * token


HQ, HKV, D, T = 8, 8, 128, 1100  # float32 K+V: 8 KiB per token, 1100 tokens: 8.6 MiB per launch


def _service() -> Any:
    spec = {"num_layers": 1, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_len": 16,
            "num_blocks": 80, "kv_dtype": "float32", "max_context": 1280, "max_batch": 4}  # fmt: skip
    return make_service(spec)  # the default inline bounds


def _request(pos: int) -> pb.DecodeRequest:
    rng = np.random.default_rng(pos)
    req = pb.DecodeRequest(layer=0, sequence_ids=["a"], positions=[pos])
    for name, heads in (("q", HQ), ("k", HKV), ("v", HKV)):
        codec.encode(rng.standard_normal((1, heads, 1, D)).astype(np.float32), getattr(req, name))
    return req


@pytest.mark.parametrize("stall_s", [60.0, 0.0])
def test_a_lone_callers_launch_above_8_mib_runs_on_the_loop_when_quick_enough(stall_s: float) -> None:
    """A lone caller's launches of 8.6 MiB of K+V (more than the old fixed 8 MiB bound) run on the
    event loop once the streak makes it alone, as long as their measured speed promises at most
    `stall_s`; with a bound no kernel meets they stay on the worker thread."""

    async def main() -> None:
        svc = _service()
        svc.batcher.lone.stall_s = stall_s
        svc.start()
        svc.cache.create("a")
        prompt = np.random.default_rng(1).standard_normal((T, HKV, D)).astype(np.float32)
        svc.cache.append("a", 0, 0, prompt, prompt)
        real, on_loop = HostKVStore.decode, []

        def spy(*args: Any, **kwargs: Any) -> Any:
            on_loop.append(threading.current_thread() is threading.main_thread())
            return real(*args, **kwargs)

        HostKVStore.decode = spy  # type: ignore[method-assign]
        try:
            for i in range(LONE_STREAK + 3):
                resp = await svc.decode(_request(T + i))
                assert list(resp.out.shape) == [1, HQ, 1, D]
        finally:
            HostKVStore.decode = real  # type: ignore[method-assign]
            await svc.close()
        assert on_loop[:LONE_STREAK] == [False] * LONE_STREAK  # not alone yet: the worker thread
        assert on_loop[LONE_STREAK:] == [stall_s > 0] * 3  # alone: the loop, if quick enough

    asyncio.run(main())
