"""The kernel backends' KV stores: host numpy pools and device-resident pools (nki-emu; nki on Trn).

The device store is checked against the host store (same writes, copies, reads and decode
outputs), its own transfer counts against the emulator's, and through the service: a steady
decode loop moves per step only the request's q, new k/v, block tables and positions host ->
device, the same at context 256 as at 2048, and builds no kernel specialisation after warm-up.
The service's nki-emu store runs at LNC 2 (trn2's default, what `tkg serve` reads from
NEURON_LOGICAL_NC_CONFIG): every launch, warm-up included, is a two-core launch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from support.service import make_service

from tkg.dtypes import BF16
from tkg.kernel.backends import unavailable_reason
from tkg.kernel.kv_store import HostKVStore, KVGeometry, LayerVariant, StepOutOfBuckets, create_kv_store

needs_emu = pytest.mark.skipif(unavailable_reason("nki-emu") is not None, reason="the NKI emulator cannot run here")

HQ, HKV, D, BL = 8, 2, 64, 16


def geometry(num_blocks: int = 64, layers: int = 2, dtype: Any = BF16) -> KVGeometry:
    return KVGeometry(layers, HKV, num_blocks, BL, D, np.dtype(dtype))


# ---- buckets ----------------------------------------------------------------------------------


def test_buckets_round_up_and_name_the_limit() -> None:
    from tkg.kernel.backends.nki_store import Buckets

    b = Buckets.default(5000, 48, 7, block_len=16, lnc=2)
    assert b.contexts == (256, 512, 1024, 2048, 4096, 5120)
    assert b.batches == (1, 2, 4, 8, 16, 32, 48) and b.s_actives == (1, 2, 4, 7)
    assert b.context_for(1) == 256 and b.context_for(4097) == 5120 and b.batch_for(33) == 48
    assert b.s_active_for(5) == 7 and b.count() == 6 * 7 * 4
    with pytest.raises(StepOutOfBuckets, match="context: 5121 exceeds the largest compiled context bucket 5120"):
        b.context_for(5121)
    with pytest.raises(StepOutOfBuckets, match="batch: 49 exceeds the largest compiled batch bucket 48"):
        b.batch_for(49)
    with pytest.raises(ValueError, match="contexts: 384 must be a positive multiple of 256"):
        Buckets((384,), (1,), (1,), align=256)
    # block_len 48 and 128 keys per core: contexts are multiples of lcm(48, 128) = 384
    assert Buckets.default(1000, 1, 1, block_len=48, contexts=[100, 700]).contexts == (384, 768)


# ---- host store -------------------------------------------------------------------------------


def test_host_store_pools_are_allocated_once_zeroed_and_read_as_copies() -> None:
    store = HostKVStore(geometry(num_blocks=5), "reference")
    assert len(store.k) == 2 and store.k[1].shape == (HKV, 5, BL, D) and not store.k[1].any()
    store.write(1, np.array([3, 3]), np.array([0, 15]), np.ones((HKV, 2, D)), -np.ones((HKV, 2, D)))
    k, v = store.read_blocks(1, np.array([3]))
    assert k.shape == (HKV, 1, BL, D) and k[:, 0, 0].all() and k[:, 0, 15].all() and not k[:, 0, 1:15].any()
    k[...] = 7  # a copy: the pool is unchanged
    assert store.k[1][:, 3, 1].sum() == 0 and (v[:, 0, 15] == -1).all()
    assert store.transfer_bytes() == {"h2d": 0, "d2h": 0} and store.compilations == 0


# ---- device store (nki-emu) against the host store --------------------------------------------


def _twin_stores(buckets: dict[str, Any]) -> tuple[Any, HostKVStore]:
    geo = geometry()
    return create_kv_store("nki-emu", geo, **buckets), HostKVStore(geo, "reference")


def _fill(stores: tuple[Any, ...], rng: np.random.Generator, tables: np.ndarray, length: int) -> np.ndarray:
    """Write `length` random tokens per row of `tables` at layer 0 of every store; k, v `[2, B, Hkv, L, d]`."""
    B = tables.shape[0]
    pos = np.arange(length)
    blocks, offsets = tables[:, pos // BL], np.broadcast_to(pos % BL, (B, length))
    kv = rng.standard_normal((2, B, HKV, length, D)).astype(BF16)
    for s in stores:
        s.write(0, blocks, offsets, kv[0].transpose(1, 0, 2, 3), kv[1].transpose(1, 0, 2, 3))
    return kv


@needs_emu
def test_device_store_reads_copies_and_decodes_like_the_host_store() -> None:
    """Batch 3 padded to bucket 4, S=3 padded to 4, sinks (one launch per kv head) and a window."""
    rng = np.random.default_rng(0)
    dev, host = _twin_stores({"max_context": 512, "max_batch": 4, "max_s_active": 4})
    assert dev.buckets.batches == (1, 2, 4) and dev.buckets.s_actives == (1, 2, 4)
    tables = rng.permutation(64)[:3 * 12].reshape(3, 12)
    lens = np.array([150, 37, 190], np.int32)
    kv = _fill((dev, host), rng, tables, 190)
    S = 3
    q = rng.standard_normal((3, HQ, S, D)).astype(BF16)
    new = (lens[:, None] - S + np.arange(S))  # [B, S] positions of the new tokens
    k_new = np.stack([kv[0][b][:, new[b]] for b in range(3)])  # [B, Hkv, S, d]
    v_new = np.stack([kv[1][b][:, new[b]] for b in range(3)])
    sinks = rng.standard_normal(HQ).astype(np.float32)
    for window, sk in ((None, None), (40, sinks)):
        got = dev.decode(0, q, k_new, v_new, tables, lens, scale=0.125, window=window, sinks=sk)
        want = host.decode(0, q, None, None, tables, lens, scale=0.125, window=window, sinks=sk)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)
    ids = np.array([tables[0, 0], tables[2, 11], 5])
    dev.copy_blocks(ids[:2], np.array([60, 61]))
    host.copy_blocks(ids[:2], np.array([60, 61]))
    for a, b in zip(dev.read_blocks(0, np.r_[ids, 60, 61]), host.read_blocks(0, np.r_[ids, 60, 61]), strict=True):
        assert a.shape == (HKV, 5, BL, D)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StepOutOfBuckets, match="exceeds the largest compiled context bucket 512"):
        dev.decode(0, q, k_new, v_new, np.zeros((3, 40), np.int32), np.full(3, 513, np.int32), scale=0.1)


@needs_emu
def test_device_store_counts_what_the_emulator_sees_crossing() -> None:
    """Every byte the store says it moved, the emulator moved (no NumPy pool sneaks into a launch),
    and each new launch shape is one specialisation in both counts."""
    from tkg.kernel.nki_emu.device import device_counters

    rng = np.random.default_rng(1)
    dev, _ = _twin_stores({"max_context": 256, "max_batch": 2, "max_s_active": 1})
    tables = rng.permutation(64)[:2 * 16].reshape(2, 16)
    kv = _fill((dev,), rng, tables, 100)
    dev.sync()  # writes are posted to the store's device thread: let them land before counting
    q = rng.standard_normal((2, HQ, 1, D)).astype(BF16)
    lens = np.array([100, 60], np.int32)
    k_new = np.stack([kv[0][b][:, [lens[b] - 1]] for b in range(2)])
    before, own = device_counters(), dict(dev.transfer_bytes())
    for _ in range(2):
        dev.decode(0, q, k_new, k_new, tables, lens, scale=0.1)
    dev.read_blocks(1, np.array([1, 2]))
    after, moved = device_counters(), dev.transfer_bytes()
    assert moved["h2d"] - own["h2d"] == after["h2d_bytes"] - before["h2d_bytes"] > 0
    assert moved["d2h"] - own["d2h"] == after["d2h_bytes"] - before["d2h_bytes"] > 0
    assert dev.compilations == 1 and after["specialisations"] - before["specialisations"] <= 1
    # One layer's K pool is 64 blocks x 16 x 2 heads x 64 x 2 B = 256 KiB; two steps move ~10 KiB.
    assert moved["h2d"] - own["h2d"] < 16 * 1024


# ---- the service on nki-emu: a steady decode loop ------------------------------------------------


def _service(backend: str, max_context: int) -> Any:
    from tkg.server.app import ServeSettings, make_store, warm_up
    from tkg.server.config import build_spec

    spec = build_spec({
        "num_layers": 1, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "kv_dtype": "bfloat16",
        "block_len": BL, "num_blocks": 300, "max_context": max_context, "max_batch": 1, "max_s_active": 1,
        "fuse_rope": False,
    })  # fmt: skip
    store = make_store(spec, ServeSettings(backend=backend))
    svc = make_service(spec, backend=backend, store=store, max_pending=4, max_message_bytes=2**22)
    cache = svc.cache
    report = warm_up(spec, cache)
    return svc, report


def _decode_request(sid: str, pos: int, rng: np.random.Generator) -> Any:
    from tkg import codec
    from tkg.v1 import decode_attention_pb2 as pb

    req = pb.DecodeRequest(layer=0, sequence_ids=[sid], positions=[pos])
    for name, heads in (("q", HQ), ("k", HKV), ("v", HKV)):
        codec.encode(rng.standard_normal((1, heads, 1, D)).astype(BF16), getattr(req, name))
    return req


@needs_emu
def test_a_steady_decode_loop_moves_only_the_step_inputs_and_compiles_nothing() -> None:
    from tkg.kernel.nki_emu.device import device_counters

    rng = np.random.default_rng(2)
    svc, report = _service("nki-emu", 2048)
    built = device_counters()["specialisations"]
    store = svc.cache.store
    assert store.lnc == 2 and store.buckets.align == 256  # LNC 2: contexts tile 128 keys x 2 cores
    assert store.buckets.contexts == (256, 512, 1024, 2048) and store.buckets.batches == (1,)
    # 4 contexts x 3 launch kinds (decode, decode with lse, attend-only: `nki_store.launch_kinds`)
    assert report.launches == report.compiled == store.compilations == 12
    launched: list[int] = []  # the LNC of every launch while serving
    device_launch = store.device.launch
    store.device.launch = lambda lnc, args: (launched.append(lnc), device_launch(lnc, args))[1]
    per_step, steps = {}, 4
    q_kv = (HQ + 2 * HKV) * D * 2  # the request's own q + new k/v bytes (bf16, B=1, S=1)

    async def loop() -> None:
        svc.start()
        for context in (256, 2048):
            sid = f"s{context}"
            svc.cache.create(sid)
            n = context - steps - 2
            svc.cache.append(sid, 0, 0, np.zeros((n, HKV, D), BF16), np.zeros((n, HKV, D), BF16))
            await svc.decode(_decode_request(sid, n, rng))  # reach the steady state
            h2d = store.transfer_bytes()["h2d"]
            for i in range(steps):
                resp = await svc.decode(_decode_request(sid, n + 1 + i, rng))
                assert list(resp.out.shape) == [1, HQ, 1, D]
            per_step[context] = (store.transfer_bytes()["h2d"] - h2d) / steps
        await svc.close()

    asyncio.run(loop())
    # What the launch takes besides q/k/v: the folded block table (one row per kv head, padded to
    # the context bucket, uint32) and the positions (float32 per row).
    tables = {c: HKV * (c // BL) * 4 for c in per_step}
    positions = HKV * 4
    print(f"h2d bytes per step: {per_step} (q+k+v {q_kv}, tables {tables}, positions {positions})")
    for c, moved in per_step.items():
        assert moved <= 2 * q_kv + tables[c] + positions, (c, moved)
    assert per_step[256] - tables[256] == per_step[2048] - tables[2048]
    assert launched and set(launched) == {2}, launched
    assert store.compilations == 12  # nothing built after warm-up ...
    assert device_counters()["specialisations"] == built  # ... and the emulator launched no new signature
    sample = svc.metrics.registry.get_sample_value
    for direction in ("h2d", "d2h"):
        value = sample("tkg_device_transfer_bytes_total", {"direction": direction})
        assert value == store.transfer_bytes()[direction] > 0
    assert sample("tkg_kernel_compilations_total") == 12


def test_host_backends_report_zero_transfers_and_compilations() -> None:
    from prometheus_client import generate_latest

    svc, report = _service("reference", 256)
    assert report.compiled == 0 and svc.cache.store.compilations == 0
    text = generate_latest(svc.metrics.registry).decode()
    assert 'tkg_device_transfer_bytes_total{direction="h2d"} 0.0' in text
    assert 'tkg_device_transfer_bytes_total{direction="d2h"} 0.0' in text
    assert "tkg_kernel_compilations_total 0.0" in text
    asyncio.run(svc.close())


@needs_emu
def test_a_step_past_the_compiled_context_buckets_is_invalid_argument_and_changes_nothing() -> None:
    from tkg.server.app import ServeSettings, make_store
    from tkg.server.config import build_spec
    from tkg.server.errors import InvalidArgument
    from tkg.server.identity import ANONYMOUS

    spec = build_spec({
        "num_layers": 1, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "kv_dtype": "bfloat16",
        "block_len": BL, "num_blocks": 40, "max_context": 512, "max_batch": 1, "max_s_active": 1,
    })  # fmt: skip
    store = make_store(spec, ServeSettings(backend="nki-emu", context_buckets=(256,)))
    svc = make_service(spec, backend="nki-emu", store=store, max_pending=4, max_message_bytes=2**22)
    cache = svc.cache
    cache.create("a")
    cache.append("a", 0, 0, np.zeros((256, HKV, D), BF16), np.zeros((256, HKV, D), BF16))
    before = (cache.get("a"), cache.free_blocks, store.compilations)
    with pytest.raises(InvalidArgument, match=r"positions\[0\]: 257 tokens exceeds the largest compiled "
                       r"context bucket 256 \(backend nki-emu, --context-buckets\); expected at most 256"):
        svc.wire.decode(_decode_request("a", 256, np.random.default_rng(0)), ANONYMOUS.tenant)
    assert (cache.get("a"), cache.free_blocks, store.compilations) == before


def test_auto_picks_nki_only_where_a_neuron_device_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    from tkg.kernel import backends
    from tkg.kernel.backends import nki

    monkeypatch.setattr(nki, "available", lambda: None)  # as if the Neuron SDK were installed
    monkeypatch.setattr(nki, "on_device", lambda: False)
    assert backends.resolve("auto") != "nki"
    assert "no Neuron device" in (nki.auto_reason() or "")
    monkeypatch.setattr(nki, "on_device", lambda: True)
    assert backends.resolve("auto") == "nki"


# ---- Trn only -----------------------------------------------------------------------------------


@pytest.mark.neuron
@pytest.mark.trn
def test_neuron_device_store_matches_the_host_store_on_trn() -> None:
    """On a trn2 host: pools on the NeuronCore; writes, copies, reads and decode agree with the
    host store, and a step's h2d bytes do not depend on the context."""
    rng = np.random.default_rng(3)
    geo = geometry()
    dev = create_kv_store("nki", geo, max_context=2048, max_batch=2, max_s_active=1)
    host = HostKVStore(geo, "reference")
    assert type(dev.device).__name__ == "NeuronDevice"
    dev.warm_up({LayerVariant()}, HQ)
    tables = rng.permutation(64)[:2 * 32].reshape(2, 32)
    kv = _fill((dev, host), rng, tables, 500)
    moved = {}
    for length in (200, 500):
        lens = np.full(2, length, np.int32)
        q = rng.standard_normal((2, HQ, 1, D)).astype(BF16)
        k_new = np.stack([kv[0][b][:, [length - 1]] for b in range(2)])
        v_new = np.stack([kv[1][b][:, [length - 1]] for b in range(2)])
        h2d = dev.transfer_bytes()["h2d"]
        got = dev.decode(0, q, k_new, v_new, tables, lens, scale=0.125)
        moved[length] = dev.transfer_bytes()["h2d"] - h2d - 2 * HKV * (dev.buckets.context_for(length) // BL) * 4
        want = host.decode(0, q, None, None, tables, lens, scale=0.125)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)
    assert moved[200] == moved[500]
    for a, b in zip(dev.read_blocks(0, tables[0, :3]), host.read_blocks(0, tables[0, :3]), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- tkg serve --backend nki-emu, end to end ------------------------------------------------------


@needs_emu
def test_serve_nki_emu_warms_every_bucket_answers_like_the_reference_and_refuses_past_the_buckets() -> None:
    """A real `tkg serve --backend nki-emu` process: the start line reports the warm-up, decode
    outputs (fused RoPE, batches padded to a bucket) match the independent mirror, a step past the
    compiled context bucket is INVALID_ARGUMENT naming it, and the metrics show the traffic and the
    compilations, which do not move while serving. It runs at LNC 2 (NEURON_LOGICAL_NC_CONFIG unset:
    trn2's default), which the start line reports and which makes contexts multiples of 256."""
    from support.mirror import Mirror, rand, scrape, tol
    from support.server_proc import start_server

    from tkg.client import Client
    from tkg.client.errors import InvalidArgument

    srv = start_server(
        "--backend", "nki-emu", "--num-layers", "1", "--num-q-heads", "4", "--num-kv-heads", "2", "--head-dim", "32",
        "--block-len", "4", "--num-blocks", "120", "--max-context", "512", "--max-batch", "3", "--max-s-active", "2",
        "--kv-dtype", "bfloat16", "--fuse-rope", "true", "--rope-theta", "10000", "--context-buckets", "256",
        "--batch-buckets", "2,3", env={"NEURON_LOGICAL_NC_CONFIG": "", "NEURON_PLATFORM_TARGET_OVERRIDE": ""},
    )  # fmt: skip
    try:
        # contexts (256,) x batches (2, 3) x s_active (1, 2) x 3 launch kinds (decode, decode with
        # lse, attend-only: `nki_store.launch_kinds`): 12 launches, 12 specialisations
        assert " warm_up=12 launches/12 compiled in " in srv.line, srv.line
        assert "backend=nki-emu lnc=2 " in srv.line, srv.line
        assert srv.backend == "nki-emu"
        rng = np.random.default_rng(4)
        dt = np.dtype(BF16)
        with Client(srv.target) as c:
            m = Mirror(c.server_info(), rope={"theta": 10000.0, "scaling": None})
            sids = [c.create_sequence(f"e{i}").sequence_id for i in range(3)]
            for i, sid in enumerate(sids):
                k, v = rand(rng, (20 + 30 * i, 2, 32), dt), rand(rng, (20 + 30 * i, 2, 32), dt)
                c.append_kv(sid, 0, k, v, position=0)
                m.append(sid, 0, k, v)
            before = scrape(srv.metrics_port)
            for S, batch in ((1, sids), (2, sids[:1])):  # batch 3 and 1 (padded to bucket 2)
                pos = [m.length(s, 0) for s in batch]
                q, k, v = (rand(rng, (len(batch), h, S, 32), dt) for h in (4, 2, 2))
                res = c.decode(0, batch, pos, q, k, v)
                np.testing.assert_allclose(res.out.astype(np.float32), m.decode(0, batch, q, k, v), **tol(dt))
            c.append_kv(sids[0], 0, *(rand(rng, (256 - m.length(sids[0], 0), 2, 32), dt) for _ in range(2)))
            with pytest.raises(InvalidArgument, match=r"positions\[0\]: 257 tokens exceeds the largest "
                               r"compiled context bucket 256 \(backend nki-emu"):  # fmt: skip
                c.decode(0, sids[:1], [256], *(rand(rng, (1, h, 1, 32), dt) for h in (4, 2, 2)))
            after = scrape(srv.metrics_port)
        assert before["tkg_kernel_compilations_total"] == after["tkg_kernel_compilations_total"] == 12
        h2d = 'tkg_device_transfer_bytes_total{direction="h2d"}'
        assert after[h2d] > before[h2d] > 0 and after['tkg_device_transfer_bytes_total{direction="d2h"}'] > 0
    finally:
        assert srv.stop() == 0


# ---- a whole sequence as one run (KV tiers' spill and restore) ---------------------------------


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_read_and_write_sequence_move_every_block_of_every_layer(order: str) -> None:
    g = geometry(num_blocks=40, layers=3)
    store = HostKVStore(g)
    rng = np.random.default_rng(3)
    for pools in (store.k, store.v):
        for a in pools:
            a[...] = rng.standard_normal(a.shape).astype(BF16)
    ids = np.arange(5, 17) if order == "ascending" else rng.permutation(40)[:12]
    out = np.empty(store.sequence_shape(ids.size), BF16)
    store.read_sequence(ids, out)
    for layer in range(3):
        for i, b in enumerate(ids):  # the oracle: block by block
            np.testing.assert_array_equal(out[layer, 0][:, i], store.k[layer][:, b])
            np.testing.assert_array_equal(out[layer, 1][:, i], store.v[layer][:, b])
    dst = rng.permutation([b for b in range(40) if b not in set(ids.tolist())])[: ids.size]
    store.write_sequence(dst, out)
    for layer in range(3):
        np.testing.assert_array_equal(store.k[layer][:, dst], store.k[layer][:, ids])
        np.testing.assert_array_equal(store.v[layer][:, dst], store.v[layer][:, ids])


def test_read_sequence_copies_once_without_a_buffer_the_size_of_its_output() -> None:
    """np.take's default mode ("raise") buffers `out`: a second copy of every tensor moved."""
    import tracemalloc

    store = HostKVStore(geometry(num_blocks=80, layers=1))
    ids = np.random.default_rng(0).permutation(80)[:64]
    out = np.empty(store.sequence_shape(ids.size), BF16)
    tracemalloc.start()
    try:
        store.read_sequence(ids, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < out[0, 0].nbytes // 4, f"{peak} bytes allocated to read {out[0, 0].nbytes}-byte tensors"
