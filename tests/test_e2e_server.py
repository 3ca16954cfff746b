"""`tkg serve` end to end over real gRPC on loopback (server in a subprocess): outputs against the
reference kernel computed independently (`support.mirror.Mirror`), coalescing under concurrent
clients, metrics, health and reflection, the default start-up."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.mirror import Mirror, decode_request, rand, scrape, stub, tol
from support.server_proc import ServerProc, start_server

from tkg.client import Client
from tkg.dtypes import BF16
from tkg.kernel.backends import resolve
from tkg.v1 import decode_attention_pb2 as pb

F32 = np.dtype(np.float32)
GEOMETRY = ("--preset", "tiny", "--num-layers", "2", "--num-q-heads", "4", "--num-kv-heads", "2", "--head-dim", "32",
            "--block-len", "4", "--num-blocks", "64", "--max-context", "64", "--batch-delay-us", "3000")  # fmt: skip
LLAMA3 = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
YARN = {"type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 16,
        "truncate": False}  # fmt: skip


@pytest.fixture(scope="module")
def fp32() -> Iterator[ServerProc]:
    """float32 KV, fused RoPE with Llama-3 scaling, full attention; every launch on the kernel thread
    (the bf16 server runs these small launches on the event loop, the default below 256 KiB)."""
    srv = start_server(*GEOMETRY, "--kv-dtype", "float32", "--fuse-rope", "true", "--rope-theta", "10000",
                       "--rope-scaling", json.dumps(LLAMA3), "--max-batch", "16",
                       "--inline-kernel-bytes", "0")  # fmt: skip
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, np.ndarray]]:
    """bfloat16 KV, fused YaRN RoPE, window 5 on layer 0 (full on layer 1), sinks, gateway gauges."""
    sinks = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    path = tmp_path_factory.mktemp("sinks") / "sinks.npy"
    np.save(path, sinks)
    srv = start_server(*GEOMETRY, "--kv-dtype", "bfloat16", "--max-s-active", "4", "--sliding-window", "5,none",
                       "--sinks", str(path), "--fuse-rope", "true", "--rope-theta", "150000",
                       "--rope-scaling", json.dumps(YARN), "--gateway-metrics")  # fmt: skip
    yield srv, sinks
    assert srv.stop() == 0


def _ingest(c: Client, mirror: Mirror, sid: str, T: int, rng: np.random.Generator, dtype: np.dtype) -> None:
    """Prompt K/V for every layer, in chunks of 3 tokens (several AppendKV messages)."""
    for layer in range(mirror.info.num_layers):
        k, v = rand(rng, (T, mirror.hkv, mirror.d), dtype), rand(rng, (T, mirror.hkv, mirror.d), dtype)
        info = c.append_kv(sid, layer, k, v, position=0, chunk_tokens=3)
        assert info.lengths[layer] == T
        mirror.append(sid, layer, k, v)


def _step(c: Client, m: Mirror, sids: list[str], S: int, rng: np.random.Generator, dtype: np.dtype) -> None:
    """One decode step on every layer for `sids` (one request per layer), checked against the mirror."""
    for layer in range(m.info.num_layers):
        pos = [m.length(s, layer) for s in sids]
        q, k, v = (rand(rng, (len(sids), h, S, m.d), dtype) for h in (m.hq, m.hkv, m.hkv))
        res = c.decode(layer, sids, pos, q, k, v, request_id=f"step-{layer}")
        assert res.out.dtype == dtype and res.out.shape == (len(sids), m.hq, S, m.d)
        assert res.timing.batch_size >= len(sids) and res.timing.total_us >= res.timing.queue_us
        np.testing.assert_allclose(res.out.astype(np.float32), m.decode(layer, sids, q, k, v), **tol(dtype))


def test_fp32_ingest_ragged_batches_truncate_fork(fp32: ServerProc) -> None:
    rng = np.random.default_rng(0)
    with Client(fp32.target) as c:
        info = c.server_info()
        assert info.kv_dtype == pb.DTYPE_FLOAT32 and info.fuse_rope and info.block_len == 4
        m = Mirror(info, rope={"theta": 10000.0, "scaling": LLAMA3})
        free0 = info.free_blocks
        sids = [c.create_sequence(f"fp32-{i}").sequence_id for i in range(3)]
        for sid, T in zip(sids, (3, 9, 14), strict=True):  # ragged; 9 and 14 end inside a block
            _ingest(c, m, sid, T, rng, F32)
        _step(c, m, sids, 1, rng, F32)  # 3 -> 4 fills a block; others cross nothing / cross
        _step(c, m, sids, 4, rng, F32)  # speculative S=4 crosses block boundaries
        # Reject sequence 1's 4 speculative tokens on every layer, then go on from there.
        assert list(c.truncate(sids[1], 10).lengths) == [10, 10]
        m.truncate(sids[1], 10)
        _step(c, m, [sids[1]], 1, rng, F32)
        # Fork sequence 2 (15+4 = 19 tokens: 4 full blocks shared, the partial one copied) and diverge.
        child = c.fork(sids[2], "fp32-child").sequence_id
        m.fork(sids[2], child)
        _step(c, m, [sids[2], child], 2, rng, F32)  # both write into the formerly shared tail
        _step(c, m, [child, sids[0], sids[2]], 3, rng, F32)
        assert list(c.get_sequence(child).lengths) == [m.length(child, 0)] * 2
        for sid in [*sids, child]:
            c.release(sid)
        assert c.server_info().free_blocks == free0  # every block came back


def test_bf16_window_sinks_yarn_over_decode_stream(bf16: tuple[ServerProc, np.ndarray]) -> None:
    srv, sinks = bf16
    rng = np.random.default_rng(1)
    with Client(srv.target) as c:
        info = c.server_info()
        assert list(info.sliding_window) == [5, 0] and info.has_sinks and info.kv_dtype == pb.DTYPE_BFLOAT16
        m = Mirror(info, rope={"theta": 150000.0, "scaling": YARN}, sinks=sinks)
        sids = ["bf-a", "bf-b"]
        for sid, T in zip(sids, (11, 6), strict=True):
            c.create_sequence(sid)
            _ingest(c, m, sid, T, rng, BF16)
        _step(c, m, sids, 3, rng, BF16)
    # Pipelined on one stream: 3 steps x 2 layers sent at once, with bad messages between them.
    msgs, expected = [], {}
    for step in range(3):
        for layer in range(2):
            pos = [m.length(s, layer) for s in sids]
            q, k, v = (rand(rng, (2, h, 1, m.d), BF16) for h in (m.hq, m.hkv, m.hkv))
            rid = f"s{step}-l{layer}"
            msgs.append(decode_request(layer, sids, pos, q, k, v, rid))
            expected[rid] = m.decode(layer, sids, q, k, v)
            if layer == 0:
                bad = decode_request(layer, sids, pos, q.astype(np.float32), k, v, f"bad-dtype-{step}")
                msgs.append(bad)
        msgs.append(decode_request(1, sids, [0, 0], q, k, v, f"bad-pos-{step}"))
    responses = list(stub(srv.target).DecodeStream(iter(msgs)))
    assert [r.request_id for r in responses] == [r.request_id for r in msgs]  # in order, none lost
    for r in responses:
        if r.request_id.startswith("bad-dtype"):
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "q.dtype" in r.error.message
        elif r.request_id.startswith("bad-pos"):
            assert r.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "positions[0]" in r.error.message
        else:
            assert not r.HasField("error") and r.out.dtype == pb.DTYPE_BFLOAT16
            out = np.frombuffer(r.out.data, BF16).reshape(tuple(r.out.shape)).astype(np.float32)
            np.testing.assert_allclose(out, expected[r.request_id], **tol(BF16))
    with Client(srv.target) as c:
        for sid in sids:
            assert list(c.get_sequence(sid).lengths) == [m.length(sid, 0), m.length(sid, 1)]
            c.release(sid)


def test_concurrent_clients_are_coalesced_and_blocks_come_back(fp32: ServerProc) -> None:
    n, steps = 12, 3
    rng = np.random.default_rng(2)
    with Client(fp32.target) as c:
        info = c.server_info()
        free0 = info.free_blocks
        m = Mirror(info, rope={"theta": 10000.0, "scaling": LLAMA3})
        sids = [c.create_sequence(f"conc-{i}").sequence_id for i in range(n)]
        for i, sid in enumerate(sids):
            _ingest(c, m, sid, 1 + i, rng, F32)
    # Inputs and expected outputs prepared up front (the mirror is not thread-safe).
    plan = {}
    for i, sid in enumerate(sids):
        for step in range(steps):
            for layer in range(2):
                q, k, v = (rand(rng, (1, h, 1, m.d), F32) for h in (m.hq, m.hkv, m.hkv))
                pos = m.length(sid, layer)
                plan[(i, step, layer)] = (pos, q, k, v, m.decode(layer, [sid], q, k, v))
    results: dict[tuple[int, int, int], object] = {}
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        with Client(fp32.target) as wc:
            barrier.wait()
            for step in range(steps):
                for layer in range(2):
                    pos, q, k, v, _ = plan[(i, step, layer)]
                    results[(i, step, layer)] = wc.decode(layer, [sids[i]], [pos], q, k, v)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n * steps * 2
    for key, res in results.items():
        np.testing.assert_allclose(res.out, plan[key][4], **tol(F32))
    sizes = [r.timing.batch_size for r in results.values()]
    assert max(sizes) > 1, sizes  # several callers shared one kernel launch
    assert all(r.timing.batch_requests <= r.timing.batch_size for r in results.values())
    with Client(fp32.target) as c:
        for sid in sids:
            c.release(sid)
        assert c.server_info().free_blocks == free0


API_METRICS = [
    "tkg_request_duration_seconds", "tkg_queue_duration_seconds", "tkg_kernel_duration_seconds", "tkg_batch_size",
    "tkg_kv_blocks_total", "tkg_kv_blocks_used", "tkg_kv_cache_usage_ratio", "tkg_sequences_active",
    "tkg_requests_pending", "tkg_requests_running", "tkg_tokens_appended_total", "tkg_sequences_evicted_total",
]  # fmt: skip
GATEWAY = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"]


def _has(samples: dict[str, float], name: str) -> bool:
    return any(k == name or k.startswith(name + "{") or k.startswith(name + "_") for k in samples)


def test_metrics_move(fp32: ServerProc, bf16: tuple[ServerProc, np.ndarray]) -> None:
    rng = np.random.default_rng(3)
    before = scrape(fp32.metrics_port)
    assert not any(_has(before, g) for g in GATEWAY)  # opt-in only
    ok_decodes = 'tkg_request_duration_seconds_count{code="OK",method="Decode"}'
    with Client(fp32.target) as c:
        m = Mirror(c.server_info(), rope={"theta": 10000.0, "scaling": LLAMA3})
        sid = c.create_sequence("metrics-seq").sequence_id
        _ingest(c, m, sid, 5, rng, F32)
        _step(c, m, [sid], 2, rng, F32)  # 2 Decode calls, 2 new tokens (counted once, not per layer)
        mid = scrape(fp32.metrics_port)
        c.release(sid)
    after = scrape(fp32.metrics_port)
    for name in API_METRICS:
        assert _has(mid, name), name
    assert mid.get(ok_decodes, 0) - before.get(ok_decodes, 0) == 2
    assert mid["tkg_tokens_appended_total"] - before["tkg_tokens_appended_total"] == 5 + 2
    assert mid["tkg_batch_size_count"] - before["tkg_batch_size_count"] == 2
    kernel_count = "tkg_kernel_duration_seconds_count{backend=" + f'"{fp32.backend}"' + "}"
    assert mid[kernel_count] >= 2
    assert mid["tkg_queue_duration_seconds_count"] - before["tkg_queue_duration_seconds_count"] == 2
    # 7 tokens in blocks of 4, on the shared block ids: 2 blocks held by the one live sequence.
    assert mid["tkg_kv_blocks_used"] - before["tkg_kv_blocks_used"] == 2 and mid["tkg_kv_blocks_total"] == 64
    assert mid["tkg_kv_cache_usage_ratio"] == pytest.approx(mid["tkg_kv_blocks_used"] / 64)
    assert mid["tkg_sequences_active"] - before["tkg_sequences_active"] == 1
    assert after["tkg_kv_blocks_used"] == before["tkg_kv_blocks_used"]
    # Buckets resolve tens of microseconds; no label carries a sequence id.
    assert 'tkg_request_duration_seconds_bucket{code="OK",le="2.5e-05",method="Decode"}' in after
    assert not any("metrics-seq" in key for key in after)
    gw = scrape(bf16[0].metrics_port)
    assert all(_has(gw, g) for g in GATEWAY)
    assert gw["vllm:kv_cache_usage_perc"] == gw["tkg_kv_cache_usage_ratio"]


def test_health_and_reflection(fp32: ServerProc) -> None:
    channel = grpc.insecure_channel(fp32.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tkg.v1.DecodeAttention"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tkg.v1.DecodeAttention")]  # fmt: skip
    listed, found = list(refl.ServerReflectionInfo(iter(asks), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"tkg.v1.DecodeAttention", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(found.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "tkg.v1" and "Decode" in [mm.name for mm in fd.service[0].method]
    channel.close()


def test_serve_without_geometry_flags_uses_the_small_default() -> None:
    srv = start_server()
    try:
        with Client(srv.target) as c:
            info = c.server_info()
        kv_bytes = 2 * info.num_layers * info.num_kv_heads * info.head_dim * info.block_len * info.num_blocks * 2
        assert info.model == "tiny" and kv_bytes <= 2**30 and info.backend == resolve("auto") == srv.backend
        assert info.max_s_active == 7 and info.free_blocks == info.num_blocks
        # The one start-up line: geometry, backend, ports and KV size.
        for needle in ("backend=", "metrics_port=", "tiny: 4 layers", "KV 128.0 MiB"):
            assert needle in srv.line, srv.line
    finally:
        assert srv.stop() == 0


def test_python_m_and_tkg_serve_help_agree() -> None:
    import subprocess
    import sys

    root = Path(sys.executable).parent
    a = subprocess.run([sys.executable, "-m", "tkg.server", "--help"], capture_output=True, text=True, timeout=60)
    b = subprocess.run([str(root / "tkg"), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "--metrics-port" in a.stdout


def test_float16_kv_without_rope() -> None:
    srv = start_server(*GEOMETRY, "--kv-dtype", "float16", "--fuse-rope", "false")
    try:
        rng = np.random.default_rng(4)
        f16 = np.dtype(np.float16)
        with Client(srv.target) as c:
            info = c.server_info()
            assert info.kv_dtype == pb.DTYPE_FLOAT16 and not info.fuse_rope
            m = Mirror(info)
            sids = [c.create_sequence().sequence_id for _ in range(2)]
            for sid, T in zip(sids, (7, 2), strict=True):
                _ingest(c, m, sid, T, rng, f16)
            _step(c, m, sids, 2, rng, f16)
    finally:
        assert srv.stop() == 0


def test_fp8_kv_ingest_decode_fork_truncate(tmp_path: Path) -> None:
    """float8_e4m3 KV (1 byte per element) with bf16 I/O, per-layer scales (one layer's values
    saturate at +-240 after scaling), against the mirror that stores round(value / scale)."""
    k_scale, v_scale = [0.5, 0.25], [2.0, 0.004]  # layer 1: |v| / 0.004 passes 240 for |v| > 0.96
    cfg = tmp_path / "scales.json"
    cfg.write_text(json.dumps({"k_scale": k_scale, "v_scale": v_scale}))
    srv = start_server(*GEOMETRY, "--config", str(cfg), "--kv-dtype", "float8_e4m3", "--fuse-rope", "false",
                       "--max-s-active", "4", "--sliding-window", "6,none")  # fmt: skip
    try:
        rng = np.random.default_rng(8)
        with Client(srv.target) as c:
            info = c.server_info()
            assert info.kv_dtype == pb.DTYPE_FLOAT8_E4M3 and info.io_dtype == pb.DTYPE_BFLOAT16
            # 1 byte per element: 64 blocks x 4 tokens x 2 kv heads x 32 x (K+V) x 2 layers.
            m = Mirror(info, fp8_scales=(k_scale, v_scale))
            sids = [c.create_sequence(f"fp8-{i}").sequence_id for i in range(2)]
            for sid, T in zip(sids, (6, 11), strict=True):
                _ingest(c, m, sid, T, rng, BF16)
            _step(c, m, sids, 1, rng, BF16)
            _step(c, m, sids, 3, rng, BF16)
            assert list(c.truncate(sids[1], 9).lengths) == [9, 9]
            m.truncate(sids[1], 9)
            child = c.fork(sids[1], "fp8-child").sequence_id
            m.fork(sids[1], child)
            _step(c, m, [sids[1], child, sids[0]], 2, rng, BF16)
            # Export streams the stored fp8 bytes; importing them as a new sequence changes nothing.
            chunks = c.export_sequence(child)
            assert chunks[0].header.kv_dtype == pb.DTYPE_FLOAT8_E4M3 and chunks[1].k.dtype == pb.DTYPE_FLOAT8_E4M3
            for msg in chunks:
                msg.sequence_id = "fp8-copy" if msg.sequence_id else ""
            c.import_sequence(chunks)
            m.fork(child, "fp8-copy")
            _step(c, m, ["fp8-copy", child], 1, rng, BF16)
            # NaN/inf input is still refused (before any rounding to fp8).
            bad = rand(rng, (1, m.hkv, m.d), BF16)
            bad[0, 0, 0] = np.inf
            with pytest.raises(Exception, match="NaN or infinity"):
                c.append_kv(sids[0], 0, bad, bad, position=m.length(sids[0], 0))
    finally:
        assert srv.stop() == 0
