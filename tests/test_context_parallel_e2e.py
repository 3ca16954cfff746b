"""Context parallelism end to end: three `tkg serve` replicas whose pools each hold 2048 tokens per
layer serve a ~5k-token sequence through `Client(targets, segment_tokens=1800)` and answer what
one replica large enough for it answers (fp32: max abs error <= 1e-5 of the largest output
magnitude), with S = 1 and 4, fused RoPE, sinks, a sliding window (1500 on layer 0) reaching back
across a segment boundary, truncation back across a boundary and forward again (an S = 4 step
overrunning the tail), a batch mixing a segmented and a single-segment sequence, and the
asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from support.fakes import sent
from support.server_proc import ServerProc, free_port, start_server
from support.strategies import assert_close

from tkg.client import AsyncClient, Client, DecodeInput, errors
from tkg.dtypes import BF16
from tkg.placement import ranking

LAYERS, HQ, HKV, D, BL, N = 2, 4, 2, 16, 16, 1800
PROMPT = 4990


def _args(num_blocks: int, sinks: Path, kv_dtype: str = "float32") -> tuple[str, ...]:
    return ("--preset", "tiny", "--num-layers", str(LAYERS), "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
            "--head-dim", str(D), "--block-len", str(BL), "--num-blocks", str(num_blocks), "--max-context", "8192",
            "--kv-dtype", kv_dtype, "--fuse-rope", "true", "--sliding-window", "1500,none", "--sinks", str(sinks),
            "--max-s-active", "4", "--backend", "cpu", "--batch-delay-us", "0")  # fmt: skip


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, list[ServerProc]]]:
    path = tmp_path_factory.mktemp("cp") / "sinks.npy"
    np.save(path, np.random.default_rng(9).standard_normal((LAYERS, HQ)).astype(np.float32))
    big = start_server(*_args(512, path))  # 8192 tokens per layer
    small = [start_server(*_args(128, path)) for _ in range(3)]  # 2048 tokens per layer each
    yield big, small
    for s in (big, *small):
        assert s.stop() == 0


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * float(np.abs(want).max()), err


def _ingest(clients: list[Client], sid: str, start: int, T: int, rng: np.random.Generator) -> None:
    for layer in range(LAYERS):
        k, v = _rand(rng, T, HKV, D), _rand(rng, T, HKV, D)
        for c in clients:
            assert c.append_kv(sid, layer, k, v, position=start, chunk_tokens=700).lengths[layer] == start + T


def _steps(clients: list[Client], sids: list[str], S: int, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        for layer in range(LAYERS):
            pos = [clients[0].get_sequence(s).lengths[layer] for s in sids]
            B = len(sids)
            q, k, v = _rand(rng, B, HQ, S, D), _rand(rng, B, HKV, S, D), _rand(rng, B, HKV, S, D)
            want, got = (c.decode(layer, sids, pos, q, k, v).out for c in clients)
            _same(got, want)


def test_three_small_replicas_serve_what_one_big_one_does(servers: tuple[ServerProc, list[ServerProc]]) -> None:
    big, small = servers
    rng = np.random.default_rng(0)
    with Client(big.target) as one, Client([s.target for s in small], segment_tokens=N) as seg:
        for c in (one, seg):
            c.create_sequence("long")
            c.create_sequence("short")
        _ingest([one, seg], "long", 0, PROMPT, rng)
        _ingest([one, seg], "short", 0, 100, rng)
        bases = seg._segments.bases["long"]
        assert bases == [0, N, 2 * N]
        # Each segment on its own replica (the id's ranking), each within its 2048 tokens.
        homes = {seg._core.router.home(f"long#{j}") for j in range(3)}
        assert len(homes) == 3
        info = seg.get_sequence("long")
        assert list(info.lengths) == [PROMPT] * LAYERS and info.sequence_id == "long"
        _steps([one, seg], ["long"], 1, 3, rng)
        _steps([one, seg], ["long", "short"], 4, 2, rng)  # a batch mixing segmented and single-segment
        # Back across the 3600 boundary (segment 2 released), then forward over it again with S = 4.
        for c in (one, seg):
            assert list(c.truncate("long", 3500).lengths) == [3500] * LAYERS
        assert seg._segments.bases["long"] == [0, N]
        _ingest([one, seg], "long", 3500, 94, rng)  # the tail now holds 1794 of its 1800
        # Steps at 3594 and 3598 stay in the tail (it ends at 3602: 1802 tokens, an overrun of
        # S - 2), the step at 3602 starts a new segment there.
        _steps([one, seg], ["long"], 4, 3, rng)
        assert seg._segments.bases["long"] == [0, N, 3602]
        _steps([one, seg], ["long"], 1, 2, rng)
        # A fresh client finds the segments on the replicas; errors name the sequence.
        with Client([s.target for s in small], segment_tokens=N) as other:
            assert list(other.get_sequence("long").lengths) == [3606 + 2] * LAYERS
            with pytest.raises(errors.OutOfRange) as err:
                other.truncate("long", 99999)
            assert "long#" not in err.value.details and "'long'" in err.value.details
            with pytest.raises(errors.FailedPrecondition, match="segmented"):
                other.fork("long")
        freed = seg.release("long")
        assert freed > 0 and one.release("long") > 0
        seg.release("short"), one.release("short")  # the pools are shared with the tests below


def test_async_client_merges_alike(servers: tuple[ServerProc, list[ServerProc]]) -> None:
    big, small = servers
    rng = np.random.default_rng(1)

    async def main() -> None:
        async with AsyncClient(big.target) as one, AsyncClient([s.target for s in small], segment_tokens=N) as seg:
            for c in (one, seg):
                await c.create_sequence("a")
            for layer in range(LAYERS):
                k, v = _rand(rng, 4000, HKV, D), _rand(rng, 4000, HKV, D)
                for c in (one, seg):
                    await c.append_kv("a", layer, k, v, position=0, chunk_tokens=1000)
            for layer in range(LAYERS):
                q, k, v = _rand(rng, 1, HQ, 4, D), _rand(rng, 1, HKV, 4, D), _rand(rng, 1, HKV, 4, D)
                want, got = [(await c.decode(layer, ["a"], [4000], q, k, v)).out for c in (one, seg)]
                _same(got, want)
            assert len(seg._segments.bases["a"]) == 3
            await seg.release("a")
            await one.release("a")

    asyncio.run(main())


def _stream_steps(sids: list[str], starts: list[int], S: int, n: int, rng: np.random.Generator) -> list[DecodeInput]:
    """n steps of S tokens over both layers for `sids` from positions `starts` (request ids "i/layer")."""
    B, out = len(sids), []
    for i in range(n):
        for layer in range(LAYERS):
            q, k, v = _rand(rng, B, HQ, S, D), _rand(rng, B, HKV, S, D), _rand(rng, B, HKV, S, D)
            out.append(DecodeInput(layer, sids, [p + S * i for p in starts], q, k, v, request_id=f"{i}/{layer}"))
    return out


def _counting(client: Client) -> list[list[tuple[int, bool, int]]]:
    """Record each Decode batch `client` makes: (replica, attend_only, rows) per call."""
    batches: list[list[tuple[int, bool, int]]] = []
    inner = client._decode_batch

    def batch(calls: dict, timeout: float | None) -> object:
        if all(c.method == "Decode" for c in calls.values()):
            asked = [(c.replica, sent(c.request)) for c in calls.values()]
            batches.append([(r, m.attend_only, len(m.sequence_ids)) for r, m in asked])
        return inner(calls, timeout)

    client._decode_batch = batch  # type: ignore[method-assign]
    return batches


def test_decode_stream_answers_what_decode_does(servers: tuple[ServerProc, list[ServerProc]]) -> None:
    """A segmented decode_stream over a batch of a 3-segment and a 1-segment sequence, S = 4,
    crossing into a new tail segment mid-stream, with a stale request among them: answers in
    request order, each equal to decode()'s for the same step (replayed after truncating back)
    and to one big replica's; the stale one answers an error naming the sequence and the stream
    goes on. Each step makes at most two Decodes per replica (tails, attend-only rows)."""
    big, small = servers
    rng = np.random.default_rng(3)
    # st2 fits next to a full segment of st on whichever replica its id ranks first (128 blocks each).
    sids, prompts = ["st", "st2"], [3590, 40]
    with Client(big.target) as one, Client([s.target for s in small], segment_tokens=N) as seg:
        for c in (one, seg):
            for sid in sids:
                c.create_sequence(sid)
        for sid, T in zip(sids, prompts, strict=True):
            _ingest([one, seg], sid, 0, T, rng)
        reqs = _stream_steps(sids, prompts, 4, 4, rng)  # st: 3590 .. 3606, a new segment at 3602
        stale = DecodeInput(1, ["st"], [3590], *(x[:1] for x in (reqs[0].q, reqs[0].k, reqs[0].v)), request_id="stale")
        batches = _counting(seg)
        got = list(seg.decode_stream([*reqs[:3], stale, *reqs[3:]]))
        assert [r.request_id for r in got] == ["0/0", "0/1", "1/0", "stale", "1/1", "2/0", "2/1", "3/0", "3/1"]
        err = got.pop(3).error
        assert isinstance(err, errors.FailedPrecondition) and "'st'" in err.details and "st#" not in err.details
        assert seg._segments.bases["st"] == [0, N, 3602]
        for r, d in zip(got, reqs, strict=True):
            assert r.error is None
            _same(r.out, one.decode(d.layer, d.sequence_ids, d.positions, d.q, d.k, d.v).out)
        # At most two Decodes per replica per step, each carrying every row of its kind there.
        assert all(len(b) == len({(r, a) for r, a, _ in b}) <= 2 * len(small) for b in batches)
        assert max(sum(n for _, _, n in b) for b in batches) == 4  # st's 3 segments + st2's 1
        for sid, T in zip(sids, prompts, strict=True):
            seg.truncate(sid, T)
        for r, d in zip(got, reqs, strict=True):
            np.testing.assert_array_equal(r.out, seg.decode(d.layer, d.sequence_ids, d.positions, d.q, d.k, d.v).out)
        for c in (one, seg):
            for sid in sids:
                c.release(sid)


def test_async_decode_stream_from_an_async_source(servers: tuple[ServerProc, list[ServerProc]]) -> None:
    big, small = servers
    rng = np.random.default_rng(4)

    async def main() -> None:
        async with AsyncClient(big.target) as one, AsyncClient([s.target for s in small], segment_tokens=N) as seg:
            for c in (one, seg):
                await c.create_sequence("as")
            for layer in range(LAYERS):
                k, v = _rand(rng, 3596, HKV, D), _rand(rng, 3596, HKV, D)
                for c in (one, seg):
                    await c.append_kv("as", layer, k, v, position=0, chunk_tokens=1000)
            reqs = _stream_steps(["as"], [3596], 4, 3, rng)  # a new segment at 3600

            async def source() -> AsyncIterator[DecodeInput]:
                for d in reqs:
                    yield d

            got = [r async for r in seg.decode_stream(source())]
            assert [r.request_id for r in got] == [d.request_id for d in reqs]
            assert seg._segments.bases["as"] == [0, N, 2 * N]
            for r, d in zip(got, reqs, strict=True):
                _same(r.out, (await one.decode(d.layer, d.sequence_ids, d.positions, d.q, d.k, d.v)).out)
            await seg.release("as")
            await one.release("as")

    asyncio.run(main())


def test_bf16_io_merges_within_the_kernel_tolerance(tmp_path: Path) -> None:
    """bf16 K/V and I/O (q, k, v and out in bf16; the segments answer float32 out and lse): the
    segmented answer is within the kernel tests' cross-backend bf16 tolerance of one big replica's
    (`support.strategies.assert_close`, rtol 2e-2 as tests/test_kernel_properties.py's RTOL_PAGED),
    with the window reaching back across a boundary, sinks and S = 1 and 4."""
    path = tmp_path / "sinks.npy"
    np.save(path, np.random.default_rng(5).standard_normal((LAYERS, HQ)).astype(np.float32))
    big = start_server(*_args(512, path, "bfloat16"))
    small = [start_server(*_args(128, path, "bfloat16")) for _ in range(3)]
    rng = np.random.default_rng(6)

    def bf16(*shape: int) -> np.ndarray:
        return _rand(rng, *shape).astype(BF16)

    try:
        with Client(big.target) as one, Client([s.target for s in small], segment_tokens=N) as seg:
            for c in (one, seg):
                c.create_sequence("b")
            for layer in range(LAYERS):
                k, v = bf16(PROMPT, HKV, D), bf16(PROMPT, HKV, D)
                for c in (one, seg):
                    c.append_kv("b", layer, k, v, position=0, chunk_tokens=1000)
            assert seg._segments.bases["b"] == [0, N, 2 * N]
            for S in (1, 4, 1):
                for layer in range(LAYERS):
                    pos = [one.get_sequence("b").lengths[layer]]
                    q, k, v = bf16(1, HQ, S, D), bf16(1, HKV, S, D), bf16(1, HKV, S, D)
                    want, got = (c.decode(layer, ["b"], pos, q, k, v).out for c in (one, seg))
                    assert got.dtype == BF16 and want.dtype == BF16
                    assert_close(got.astype(np.float64), want.astype(np.float64), 2e-2, "segmented bf16 out")
    finally:
        for s in (big, *small):
            s.stop()


# tests/test_migration.py's geometry (reference backend): 512 tokens per layer per replica.
DRAIN_GEOMETRY = ("--backend", "reference", "--num-layers", "2", "--num-q-heads", str(HQ), "--num-kv-heads",
                  str(HKV), "--head-dim", str(D), "--block-len", "8", "--num-blocks", "64", "--max-context", "1024",
                  "--kv-dtype", "float32", "--fuse-rope", "true")  # fmt: skip


def test_a_drained_segment_keeps_its_base_and_the_next_decode_is_unsplit(tmp_path: Path) -> None:
    """Three replicas with `--peers` naming all three hold a 3-segment sequence (bases 0, 100,
    200); the one holding the tail (base 200) drains on SIGTERM: the segment lands on a peer with
    its base position, and both the client that placed it and a fresh one (which never saw the
    segments) decode the next steps, the tail's appends at absolute positions on the peer, to what
    one unsplit replica answers. The drained replica is replica 0, the one a client asked for the
    layers' windows (the fresh client must ask another)."""
    ports = [free_port() for _ in range(3)]
    targets = [f"127.0.0.1:{p}" for p in ports]
    doc = next(f"doc{i}" for i in range(100) if ranking(targets, f"doc{i}")[2] == 0)  # its tail on replica 0
    procs = [start_server(*DRAIN_GEOMETRY, "--peers", ",".join(targets), "--grace-s", "30", "--port", str(p))
             for p in ports]  # fmt: skip
    big = start_server(*DRAIN_GEOMETRY)
    rng = np.random.default_rng(7)
    T, n = 250, 100

    def step(clients: list[Client], S: int) -> None:
        for layer in range(2):
            pos = [clients[0].get_sequence(doc).lengths[layer]]
            q, k, v = _rand(rng, 1, HQ, S, D), _rand(rng, 1, HKV, S, D), _rand(rng, 1, HKV, S, D)
            want, *got = (c.decode(layer, [doc], pos, q, k, v).out for c in clients)
            for g in got:
                _same(g, want)

    try:
        with Client(big.target) as one, Client(targets, segment_tokens=n) as seg:
            for c in (one, seg):
                c.create_sequence(doc)
            for layer in range(2):
                k, v = _rand(rng, T, HKV, D), _rand(rng, T, HKV, D)
                for c in (one, seg):
                    c.append_kv(doc, layer, k, v, position=0, chunk_tokens=64)
            step([one, seg], 1)
            assert seg._segments.bases[doc] == [0, n, 2 * n]
            assert procs[0].stop(signal.SIGTERM, timeout=60) == 0  # the tail's replica drains
            out = procs[0].proc.stdout.read()
            assert "drain moved 1 sequences, 0 could not move" in out, out
            found = {}
            for i in (1, 2):
                with Client(targets[i]) as raw, contextlib.suppress(errors.NotFound):
                    found[i] = raw.get_sequence(f"{doc}#2")
            ((peer, info),) = found.items()
            assert info.base_position == 2 * n and list(info.lengths) == [T + 1 - 2 * n] * 2
            step([one, seg], 4)  # the placing client meets UNAVAILABLE at the tail's old replica and follows
            assert seg._core.router.home(f"{doc}#2") == peer
            with Client(targets, segment_tokens=n) as fresh:  # finds the segments by asking, the moved one too
                assert list(fresh.get_sequence(doc).lengths) == [T + 5] * 2
                step([one, fresh], 1)
                assert fresh._segments.bases[doc] == [0, n, 2 * n]
            step([one, seg], 1)
    finally:
        for pr in (*procs, big):
            pr.stop(signal.SIGKILL)
