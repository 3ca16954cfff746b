"""End to end over real gRPC on loopback: `tkg serve` in a subprocess, driven by `tkg.client`.

Expected outputs come from an independent numpy model of the contract (api.md): each sequence's
keys/values per layer kept client-side, RoPE applied here (rotate-half), softmax with the layer's
window and sink computed token by token. The server never sees this code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from support.oracle import naive_decode, rope
from support.server_proc import ServerProc, start_server

from tkg.client import AsyncClient, Client, DecodeInput, errors
from tkg.dtypes import BF16
from tkg.server.rope import inv_freqs

LAYERS, HQ, HKV, D, BL = 2, 4, 2, 64, 4
THETA = 10000.0


def rotate(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return rope(x, pos, inv_freqs(D, THETA))


class Model:
    """What the server should hold: per (sequence, layer) the K (rotated) and V rows `[T, Hkv, d]`."""

    def __init__(self, fuse_rope: bool, window: int | None = None, sinks: np.ndarray | None = None) -> None:
        self.kv: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.fuse, self.window, self.sinks = fuse_rope, window, sinks

    def append(self, sid: str, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        K, V = self.kv.get((sid, layer), (np.zeros((0, HKV, D)), np.zeros((0, HKV, D))))
        if self.fuse:
            pos = np.arange(len(K), len(K) + len(k))
            k = rotate(k.astype(np.float32).transpose(1, 0, 2), pos).transpose(1, 0, 2)
        self.kv[(sid, layer)] = (np.concatenate([K, k]), np.concatenate([V, v.astype(np.float64)]))

    def truncate(self, sid: str, length: int) -> None:
        for layer in range(LAYERS):
            K, V = self.kv[(sid, layer)]
            self.kv[(sid, layer)] = (K[:length], V[:length])

    def fork(self, src: str, dst: str) -> None:
        for layer in range(LAYERS):
            self.kv[(dst, layer)] = self.kv[(src, layer)]

    def decode(self, sid: str, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q `[Hq, S, d]`, k/v `[Hkv, S, d]` -> expected out `[Hq, S, d]` (appends k/v)."""
        S = q.shape[1]
        start = len(self.kv.get((sid, layer), (np.zeros((0,)),))[0])
        self.append(sid, layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        K, V = self.kv[(sid, layer)]
        qf = q.astype(np.float64)
        if self.fuse:
            qf = rotate(qf, np.arange(start, start + S))
        return naive_decode(qf, K, V, 1 / np.sqrt(D), self.window, None if self.sinks is None else self.sinks[layer])


def _spec(*extra: str) -> tuple[str, ...]:
    return ("--preset", "tiny", "--num-layers", str(LAYERS), "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
            "--head-dim", str(D), "--block-len", str(BL), "--num-blocks", "256", "--max-context", "512",
            "--rope-theta", str(THETA), "--backend", "auto", "--batch-delay-us", "2000", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def fp32_server() -> Iterator[ServerProc]:
    srv = start_server(*_spec("--kv-dtype", "float32", "--fuse-rope", "true"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def bf16_window_sink_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, np.ndarray]]:
    sinks = np.random.default_rng(7).standard_normal((LAYERS, HQ)).astype(np.float32)
    path = tmp_path_factory.mktemp("sinks") / "sinks.npy"
    np.save(path, sinks)
    srv = start_server(*_spec("--kv-dtype", "bfloat16", "--fuse-rope", "false", "--sliding-window", "8",
                              "--sinks", str(path)))  # fmt: skip
    yield srv, sinks
    assert srv.stop() == 0


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _tol(dtype: np.dtype) -> dict[str, float]:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == BF16 else {"rtol": 1e-4, "atol": 1e-4}


def _ingest(c: Client, model: Model, sid: str, T: int, rng: np.random.Generator, dtype: np.dtype) -> None:
    for layer in range(LAYERS):
        k, v = _rand(rng, (T, HKV, D), dtype), _rand(rng, (T, HKV, D), dtype)
        info = c.append_kv(sid, layer, k, v, position=0, chunk_tokens=3)  # several chunks per layer
        assert info.lengths[layer] == T
        model.append(sid, layer, k, v)


def _step(c: Client, model: Model, sids: list[str], S: int, rng: np.random.Generator, dtype: np.dtype) -> None:
    """One decode step for every layer; checks each output against the model."""
    for layer in range(LAYERS):
        pos = [c.get_sequence(s).lengths[layer] for s in sids]
        q, k, v = (_rand(rng, (len(sids), h, S, D), dtype) for h in (HQ, HKV, HKV))
        res = c.decode(layer, sids, pos, q, k, v, request_id=f"L{layer}")
        assert res.request_id == f"L{layer}" and res.out.shape == (len(sids), HQ, S, D) and res.out.dtype == dtype
        for b, sid in enumerate(sids):
            exp = model.decode(sid, layer, q[b], k[b], v[b])
            np.testing.assert_allclose(res.out[b].astype(np.float32), exp, **_tol(dtype))


def test_ingest_ragged_batch_truncate_fork_fp32(fp32_server: ServerProc) -> None:
    rng = np.random.default_rng(0)
    model = Model(fuse_rope=True)
    with Client(fp32_server.target) as c:
        free0 = c.server_info().free_blocks
        sids = [c.create_sequence().sequence_id for _ in range(3)]
        for sid, T in zip(sids, (3, 9, 14), strict=True):  # ragged, crossing block boundaries (BL=4)
            _ingest(c, model, sid, T, rng, np.dtype(np.float32))
        _step(c, model, sids, 1, rng, np.dtype(np.float32))
        _step(c, model, sids, 4, rng, np.dtype(np.float32))  # speculative S=4
        # Reject the 4 speculative tokens of sequence 1, then continue from there.
        c.truncate(sids[1], 10)
        model.truncate(sids[1], 10)
        assert list(c.get_sequence(sids[1]).lengths) == [10] * LAYERS
        # Fork sequence 2 and let both diverge.
        child = c.fork(sids[2]).sequence_id
        model.fork(sids[2], child)
        _step(c, model, [sids[2], child, sids[1]], 2, rng, np.dtype(np.float32))
        _step(c, model, [child], 1, rng, np.dtype(np.float32))
        for sid in [*sids, child]:
            c.release(sid)
        assert c.server_info().free_blocks == free0  # nothing leaked


def test_window_and_sinks_bf16_stream(bf16_window_sink_server: tuple[ServerProc, np.ndarray]) -> None:
    srv, sinks = bf16_window_sink_server
    rng = np.random.default_rng(1)
    model = Model(fuse_rope=False, window=8, sinks=sinks)
    with Client(srv.target) as c:
        sid = c.create_sequence("win-seq").sequence_id
        _ingest(c, model, sid, 13, rng, BF16)
        _step(c, model, [sid], 3, rng, BF16)
        # DecodeStream: both layers pipelined, plus one bad message in the middle that must not
        # end the stream; responses carry the request ids.
        q, k, v = (_rand(rng, (1, h, 1, D), BF16) for h in (HQ, HKV, HKV))
        reqs = [
            DecodeInput(0, [sid], [16], q, k, v, request_id="a"),
            DecodeInput(1, [sid], [99], q, k, v, request_id="bad"),  # wrong position
            DecodeInput(1, [sid], [16], q, k, v, request_id="b"),
        ]
        results = list(c.decode_stream(reqs))
        assert [r.request_id for r in results] == ["a", "bad", "b"]
        assert isinstance(results[1].error, errors.FailedPrecondition) and "positions[0]" in results[1].error.details
        for r, layer in ((results[0], 0), (results[2], 1)):
            assert r.error is None
            exp = model.decode(sid, layer, q[0], k[0], v[0])
            np.testing.assert_allclose(r.out[0].astype(np.float32), exp, **_tol(BF16))
        c.release(sid)


def test_concurrent_async_callers_are_coalesced(fp32_server: ServerProc) -> None:
    """Many callers at once: every output right, and some launches carried several requests."""
    rng = np.random.default_rng(2)
    model = Model(fuse_rope=True)
    n = 12
    with Client(fp32_server.target) as c:
        sids = [c.create_sequence().sequence_id for _ in range(n)]
        for i, sid in enumerate(sids):
            _ingest(c, model, sid, 2 + i, rng, np.dtype(np.float32))
    q, k, v = (_rand(rng, (n, h, 1, D), np.dtype(np.float32)) for h in (HQ, HKV, HKV))

    async def run() -> list:
        async with AsyncClient(fp32_server.target) as ac:
            return await asyncio.gather(
                *(ac.decode(0, [sid], [2 + i], q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i, sid in enumerate(sids))
            )

    results = asyncio.run(run())
    for i, (sid, res) in enumerate(zip(sids, results, strict=True)):
        np.testing.assert_allclose(res.out[0], model.decode(sid, 0, q[i], k[i], v[i]), rtol=1e-4, atol=1e-4)
    assert max(r.timing.batch_size for r in results) > 1, [r.timing for r in results]
    with Client(fp32_server.target) as c:
        for sid in sids:
            c.release(sid)


def test_async_client_fork_export_import_and_stream(fp32_server: ServerProc) -> None:
    """The asyncio client over a real server: ingest, fork, export/import (the copy answers as its
    source did), and a pipelined DecodeStream fed by an async iterable; each output checked against
    the model."""
    rng = np.random.default_rng(4)
    f32 = np.dtype(np.float32)
    model = Model(fuse_rope=True)

    async def run() -> None:
        async with AsyncClient(fp32_server.target) as ac:
            free0 = (await ac.server_info()).free_blocks
            sid = (await ac.create_sequence()).sequence_id
            for layer in range(LAYERS):
                k, v = _rand(rng, (6, HKV, D), f32), _rand(rng, (6, HKV, D), f32)
                assert (await ac.append_kv(sid, layer, k, v, chunk_tokens=4)).lengths[layer] == 6
                model.append(sid, layer, k, v)
            child = (await ac.fork(sid, "async-child")).sequence_id
            model.fork(sid, child)
            chunks = await ac.export_sequence(child)
            assert chunks[0].HasField("header") and list(chunks[0].header.lengths) == [6] * LAYERS
            await ac.release(child)
            assert list((await ac.import_sequence(chunks)).lengths) == [6] * LAYERS

            q, k, v = (_rand(rng, (1, h, 1, D), f32) for h in (HQ, HKV, HKV))

            async def requests() -> AsyncIterator[DecodeInput]:
                for layer in range(LAYERS):
                    for s in (sid, child):
                        yield DecodeInput(layer, [s], [6], q, k, v, request_id=f"{s}/{layer}")

            results = [r async for r in ac.decode_stream(requests())]
            assert [r.request_id for r in results] == [f"{s}/{layer}" for layer in range(LAYERS) for s in (sid, child)]
            for r in results:
                s, layer = r.request_id.rsplit("/", 1)
                assert r.error is None, r.error
                np.testing.assert_allclose(r.out[0], model.decode(s, int(layer), q[0], k[0], v[0]), **_tol(f32))
            for s in (sid, child):
                await ac.release(s)
            assert (await ac.server_info()).free_blocks == free0

    asyncio.run(run())


@pytest.fixture(scope="module")
def tier_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A device pool of 16 blocks (5 sequences of 12 tokens), a small host tier and a spill directory."""
    spill = tmp_path_factory.mktemp("spill")
    srv = start_server(*_spec("--kv-dtype", "float32", "--fuse-rope", "true", "--num-blocks", "16",
                              "--host-cache-bytes", "40000", "--spill-dir", str(spill)))  # fmt: skip
    yield srv
    assert srv.stop() == 0


def test_prefetch_brings_spilled_sequences_back_intact_with_both_clients(tier_server: ServerProc) -> None:
    rng = np.random.default_rng(3)
    model = Model(fuse_rope=True)
    f32 = np.dtype(np.float32)
    with Client(tier_server.target) as c:
        free0 = c.server_info().free_blocks
        sids = [c.create_sequence().sequence_id for _ in range(6)]
        for sid in sids:  # the sixth does not fit on the device: the least recently used one moves down
            _ingest(c, model, sid, 12, rng, f32)
        tiers = {s: c.get_sequence(s).tier for s in sids}
        spilled = [s for s in sids if tiers[s] != "device"]
        assert spilled and {tiers[s] for s in spilled} <= {"host", "disk"}, tiers
        assert {s: c.get_sequence(s).tier for s in sids} == tiers  # GetSequence reports, never restores
        info = c.prefetch_sequence(spilled[0])
        assert (info.sequence_id, info.tier, list(info.lengths)) == (spilled[0], "device", [12] * LAYERS)
        moved_down = [s for s in sids if s != spilled[0] and c.get_sequence(s).tier != "device"]
        assert moved_down, "room on the device was made by spilling another sequence"

        async def prefetch_async() -> str:
            async with AsyncClient(tier_server.target) as ac:
                return (await ac.prefetch_sequence(moved_down[0])).tier

        assert asyncio.run(prefetch_async()) == "device"
        _step(c, model, [spilled[0], moved_down[0]], 1, rng, f32)  # their K/V came back exactly
        for sid in sids:
            c.release(sid)
        assert c.server_info().free_blocks == free0


def test_errors_are_typed_and_change_nothing(fp32_server: ServerProc) -> None:
    rng = np.random.default_rng(3)
    f32 = np.dtype(np.float32)
    with Client(fp32_server.target) as c:
        sid = c.create_sequence("typed-errors").sequence_id
        before = (list(c.get_sequence(sid).lengths), c.server_info().free_blocks)
        q, k, v = (_rand(rng, (1, h, 1, D), f32) for h in (HQ, HKV, HKV))
        cases = [
            (errors.NotFound, lambda: c.decode(0, ["nope"], [0], q, k, v), "nope"),
            (errors.FailedPrecondition, lambda: c.decode(0, [sid], [5], q, k, v), "positions[0]"),
            (errors.InvalidArgument, lambda: c.decode(7, [sid], [0], q, k, v), "layer"),
            (errors.InvalidArgument, lambda: c.decode(0, [sid], [0], q.astype(BF16), k, v), "q.dtype"),
            (errors.InvalidArgument, lambda: c.decode(0, [sid], [0], q[:, :2], k, v), "q.shape"),
            (errors.InvalidArgument, lambda: c.decode(0, [sid], [0], q * np.nan, k, v), "NaN"),
            (errors.AlreadyExists, lambda: c.create_sequence(sid), sid),
            (errors.OutOfRange, lambda: c.truncate(sid, 3), "length"),
        ]
        for cls, call, needle in cases:
            with pytest.raises(cls) as info:
                call()
            assert needle in info.value.details, info.value.details
        assert (list(c.get_sequence(sid).lengths), c.server_info().free_blocks) == before
        c.release(sid)
        with pytest.raises(errors.NotFound):
            c.get_sequence(sid)


# Run in a fresh interpreter: which of the modules a client-only install must not need are loaded
# after importing the client and the codec ({prelude} lets the test show the check can fail).
IMPORT_CHECK = """
import sys
{prelude}
import tkg.client, tkg.client.aio, tkg.client.core, tkg.client.routing, tkg.codec
banned = ("torch", "tkg.server", "tkg.bench")
print(" ".join(sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned))) or "clean")
"""


def loaded_after_client_import(prelude: str = "") -> list[str]:
    """The banned modules (torch, tkg.server, tkg.bench) loaded once `tkg.client` is imported."""
    import subprocess
    import sys

    code = IMPORT_CHECK.format(prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_client_imports_without_torch_server_or_bench() -> None:
    assert loaded_after_client_import() == ["clean"]
    # The same check reports them when something does load them (a stand-in: torch may be absent).
    assert "torch" in loaded_after_client_import("sys.modules['torch'] = type(sys)('torch')")
    assert "tkg.server" in loaded_after_client_import("import tkg.server")
