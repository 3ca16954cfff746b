"""Every status code of docs/operations.md ("Status codes") provoked over real gRPC, each with the KV cache unchanged
afterwards (sequence lengths and free blocks); auth tokens and TLS; SIGTERM drain; idle expiry."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.mirror import Mirror, append_request, decode_request, rand, scrape, status_of, stub, tol
from support.server_proc import ServerProc, start_server
from support.wait import wait_for

from tkg.client import Client, errors
from tkg.v1 import decode_attention_pb2 as pb

F32 = np.dtype(np.float32)
HQ, HKV, D, BL = 4, 2, 16, 4
GEOMETRY = ("--preset", "tiny", "--num-layers", "2", "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
            "--head-dim", str(D), "--block-len", str(BL), "--kv-dtype", "float32", "--fuse-rope", "false")  # fmt: skip
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    s = start_server(*GEOMETRY, "--num-blocks", "64", "--max-context", "16", "--max-batch", "4")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def small() -> Iterator[ServerProc]:
    """6 blocks, a one-request queue held open 0.5 s per batch, 64 KiB messages."""
    s = start_server(*GEOMETRY, "--num-blocks", "6", "--max-context", "16", "--max-pending", "1",
                     "--batch-delay-us", "500000", "--max-message-bytes", "65536")  # fmt: skip
    yield s
    assert s.stop() == 0


def _qkv(B: int, S: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rand(rng, (B, HQ, S, D), F32), rand(rng, (B, HKV, S, D), F32), rand(rng, (B, HKV, S, D), F32)


def _kv(T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rand(rng, (T, HKV, D), F32), rand(rng, (T, HKV, D), F32)


def _fill(st: object, sid: str, T: int) -> None:
    """Create `sid` with T tokens on both layers."""
    st.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
    for layer in range(2):
        st.AppendKV(iter([append_request(sid, layer, 0, *_kv(T, layer))]))


def _snapshot(st: object, sids: list[str]) -> tuple:
    info = st.GetServerInfo(pb.GetServerInfoRequest())
    return (
        info.free_blocks,
        info.active_sequences,
        [tuple(st.GetSequence(pb.GetSequenceRequest(sequence_id=s)).lengths) for s in sids],
    )


def _with(req: pb.DecodeRequest, change: Callable[[pb.DecodeRequest], None]) -> pb.DecodeRequest:
    out = pb.DecodeRequest()
    out.CopyFrom(req)
    change(out)
    return out


def test_every_decode_and_sequence_error_leaves_the_cache_unchanged(srv: ServerProc) -> None:
    st = stub(srv.target)
    _fill(st, "a", 5)  # 2 blocks
    _fill(st, "b", 3)  # 1 block
    _fill(st, "c", 15)  # 4 blocks, one token from max_context=16
    sids = ["a", "b", "c"]
    before = _snapshot(st, sids)
    q, k, v = _qkv(2)
    good = decode_request(0, ["a", "b"], [5, 3], q, k, v)
    nan_q, inf_v = q.copy(), v.copy()
    nan_q[1, 2, 0, 3] = np.nan
    inf_v[0, 1, 0, 0] = np.inf
    q8, k8, v8 = _qkv(2, S=8)
    q0, k0, v0 = _qkv(2, S=0)
    q5, k5, v5 = _qkv(5)
    qc, kc, vc = _qkv(1, S=2)
    k_bad, v_bad = _kv(2)
    IA, NF, AE, FP, OR = (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                          Code.OUT_OF_RANGE)  # fmt: skip

    def dec(
        q: np.ndarray = q, k: np.ndarray = k, v: np.ndarray = v, sids: Sequence[str] = ("a", "b"),
        pos: Sequence[int] = (5, 3),
    ) -> Callable[[], object]:  # fmt: skip
        return lambda: st.Decode(decode_request(0, list(sids), list(pos), q, k, v))

    def mod(change: Callable[[pb.DecodeRequest], object]) -> Callable[[], object]:
        return lambda: st.Decode(_with(good, change))

    def app(sid: str, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> Callable[[], object]:
        return lambda: st.AppendKV(iter([append_request(sid, layer, pos, k, v)]))

    def seq(method: str, **fields: object) -> Callable[[], object]:
        return lambda: getattr(st, method)(getattr(pb, f"{method}Request")(**fields))

    cases: list[tuple[str, Callable[[], object], Code, str]] = [
        ("layer too big", mod(lambda r: setattr(r, "layer", 2)), IA, "layer: 2"),
        ("layer negative", mod(lambda r: setattr(r, "layer", -1)), IA, "layer: -1"),
        ("q dtype", dec(q=q.astype(np.float16)), IA, "q.dtype"),
        ("q dtype unset", mod(lambda r: setattr(r.q, "dtype", 0)), IA, "q.dtype"),
        ("q byte length", mod(lambda r: setattr(r.q, "data", r.q.data[:-4])), IA, "q.data"),
        ("q heads", dec(q=q[:, :3]), IA, "q.shape"),
        ("k heads", dec(k=k[:, :1]), IA, "k.shape"),
        ("v S", dec(v=np.concatenate([v, v], 2)), IA, "v.shape"),
        ("S = 0", dec(q0, k0, v0), IA, "S=0"),
        ("S = 8", dec(q8, k8, v8), IA, "S=8"),
        ("positions count", mod(lambda r: r.positions.pop()), IA, "positions: 1 entries"),
        ("no sequences", dec(q[:0], k[:0], v[:0], sids=(), pos=()), IA, "sequence_ids: 0"),
        ("over max_batch", dec(q5, k5, v5, sids="abcab", pos=[0] * 5), IA, "sequence_ids: 5"),
        ("same sequence twice", dec(sids=("a", "a"), pos=(5, 5)), IA, "sequence_ids[1]"),
        ("NaN in q", dec(q=nan_q), IA, "q: contains NaN"),
        ("inf in v", dec(v=inf_v), IA, "v: contains NaN or inf"),
        ("id too long", mod(lambda r: r.sequence_ids.__setitem__(0, "x" * 300)), IA, "sequence_ids[0]"),
        ("unknown sequence", mod(lambda r: r.sequence_ids.__setitem__(1, "nope")), NF, "sequence_ids[1]: no sequence"),
        ("wrong position", mod(lambda r: r.positions.__setitem__(1, 2)), FP, "positions[1]: 2"),
        ("past max_context", dec(qc, kc, vc, sids=["c"], pos=[15]), OR, "max_context"),
        ("append unknown", app("nope", 0, 0, k_bad, v_bad), NF, "'nope'"),
        ("append gap", app("a", 0, 7, k_bad, v_bad), FP, "position: 7"),
        ("append past max", app("c", 1, 15, k_bad, v_bad), OR, "max_context"),
        ("append layer", app("a", 5, 5, k_bad, v_bad), IA, "layer: 5"),
        ("append k heads", app("a", 0, 5, k_bad[:, :1], v_bad), IA, "k.shape"),
        ("append v T", app("a", 0, 5, k_bad, v_bad[:1]), IA, "v.shape"),
        ("append NaN", app("a", 0, 5, k_bad * np.nan, v_bad), IA, "k: contains NaN"),
        ("append empty", lambda: st.AppendKV(iter([])), IA, "empty stream"),
        ("create existing", seq("CreateSequence", sequence_id="a"), AE, "'a'"),
        ("create long id", seq("CreateSequence", sequence_id="y" * 300), IA, "sequence_id"),
        ("fork unknown", seq("ForkSequence", source_id="nope"), NF, "source_id"),
        ("fork onto existing", seq("ForkSequence", source_id="a", sequence_id="b"), AE, "'b'"),
        ("truncate past", seq("TruncateSequence", sequence_id="a", length=6), OR, "length: 6"),
        ("truncate negative", seq("TruncateSequence", sequence_id="a", length=-1), IA, "length"),
        ("truncate unknown", seq("TruncateSequence", sequence_id="nope"), NF, "'nope'"),
        ("release unknown", seq("ReleaseSequence", sequence_id="nope"), NF, "'nope'"),
        ("get unknown", seq("GetSequence", sequence_id="nope"), NF, "'nope'"),
    ]
    for name, call, code, needle in cases:
        got, details = status_of(call)
        assert (got, needle in details, "expected" in details) == (code, True, True), (name, got, details)
        assert _snapshot(st, sids) == before, name
    # The good request still works afterwards (nothing was left half-appended or reserved).
    assert st.Decode(good).out.shape == [2, HQ, 1, D]
    for sid in sids:
        st.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid))


def test_append_stream_keeps_the_chunks_before_a_failing_one(srv: ServerProc) -> None:
    """Documented AppendKV choice: each chunk is all-or-nothing; earlier chunks stay appended."""
    st = stub(srv.target)
    st.CreateSequence(pb.CreateSequenceRequest(sequence_id="chunks"))
    k, v = _kv(3)
    msgs = [append_request("chunks", 0, 0, k, v), append_request("chunks", 0, 3, k[:2], v[:2]),
            append_request("other", 0, 5, k, v)]  # fmt: skip
    code, details = status_of(lambda: st.AppendKV(iter(msgs)))
    assert code == Code.INVALID_ARGUMENT and "sequence_id: 'other'" in details and "expected 'chunks'" in details
    assert list(st.GetSequence(pb.GetSequenceRequest(sequence_id="chunks")).lengths) == [5, 0]
    st.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="chunks"))


def test_resource_exhausted_blocks_queue_and_message_size(small: ServerProc) -> None:
    st = stub(small.target)
    _fill(st, "full", 16)  # 4 of 6 blocks
    _fill(st, "part", 7)  # 2 blocks, the second one partial: none free now
    sids = ["full", "part"]
    before = _snapshot(st, sids)
    assert before[0] == 0
    q2, k2, v2 = _qkv(1, S=2)
    k_new, v_new = _kv(2)
    cases = [
        ("decode needs a block", lambda: st.Decode(decode_request(0, ["part"], [7], q2, k2, v2)), "KV cache"),
        ("append needs a block", lambda: st.AppendKV(iter([append_request("part", 1, 7, k_new, v_new)])), "KV cache"),
        ("fork copies the partial block", lambda: st.ForkSequence(pb.ForkSequenceRequest(source_id="part")), "free"),
    ]
    for name, call, needle in cases:
        code, details = status_of(call)
        assert code == Code.RESOURCE_EXHAUSTED and needle in details, (name, code, details)
        assert _snapshot(st, sids) == before, name
    # A message over --max-message-bytes (64 KiB) is refused by gRPC itself.
    big = np.zeros((1, HQ, 1, 5000), np.float32)
    code, details = status_of(lambda: st.Decode(decode_request(0, ["part"], [7], big, big, big)))
    assert code == Code.RESOURCE_EXHAUSTED, details
    # Queue bound (--max-pending 1): a request waits 0.5 s for its batch; a second one is refused.
    q1, k1, v1 = _qkv(1)
    first = st.Decode.future(decode_request(0, ["part"], [7], q1, k1, v1))
    wait_for(lambda: scrape(small.metrics_port)["tkg_requests_pending"] >= 1, what="the first request to queue")
    code, details = status_of(lambda: st.Decode(decode_request(0, ["full"], [16], q1, k1, v1)))
    assert code == Code.RESOURCE_EXHAUSTED and "queue: 1 decode requests pending; expected fewer than 1" in details
    assert first.result(timeout=30).out.shape == [1, HQ, 1, D]  # fits in the partial block
    for sid in sids:
        st.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid))
    assert st.GetServerInfo(pb.GetServerInfoRequest()).free_blocks == 6


# ---- auth and TLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, bytes]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (needed to make a test certificate)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    s = start_server(*GEOMETRY, "--num-blocks", "16", "--max-context", "16", "--auth-token", "full-secret-0123456789",
                     "--read-only-token", "ro-secret-0123456789", "--tls-cert", str(d / "cert.pem"),
                     "--tls-key", str(d / "key.pem"))  # fmt: skip
    yield s, (d / "cert.pem").read_bytes()
    assert s.stop() == 0


def test_tokens_and_tls(secure: tuple[ServerProc, bytes]) -> None:
    srv, cert = secure
    assert "tls=on auth=on" in srv.line and " loop=uvloop " in srv.line  # the server extra installs uvloop

    def client(token: str | None) -> Client:
        return Client(srv.target, token=token, root_certificates=cert, timeout=20)

    with client(None) as c, pytest.raises(errors.Unauthenticated, match="authorization: missing"):
        c.server_info()
    with client("guess") as c, pytest.raises(errors.Unauthenticated, match="unknown token"):
        c.server_info()
    q, k, v = _qkv(1)
    with client("ro-secret-0123456789") as ro:
        assert ro.server_info().num_q_heads == HQ
        with pytest.raises(errors.NotFound):  # allowed to ask; the sequence just does not exist
            ro.get_sequence("absent")
        with pytest.raises(errors.NotFound):  # PrefetchSequence too (KV tiers): a read-only method
            ro.prefetch_sequence("absent")
        for call in (lambda: ro.create_sequence("x"), lambda: ro.decode(0, ["x"], [0], q, k, v)):
            with pytest.raises(errors.PermissionDenied, match="read-only") as info:
                call()
            assert "expected a full-access token" in info.value.details
        channel = grpc.secure_channel(srv.target, grpc.ssl_channel_credentials(cert))
        stream = pb_grpc_stub(channel).DecodeStream(
            iter([decode_request(0, ["x"], [0], q, k, v)]), metadata=[("authorization", "Bearer ro-secret-0123456789")]
        )
        with pytest.raises(grpc.RpcError) as rpc:
            list(stream)
        assert rpc.value.code() == Code.PERMISSION_DENIED
        channel.close()
    with client("full-secret-0123456789") as c:
        sid = c.create_sequence().sequence_id
        kk, vv = _kv(3)
        c.append_kv(sid, 0, kk, vv)
        m = Mirror(c.server_info())
        m.append(sid, 0, kk, vv)
        res = c.decode(0, [sid], [3], q, k, v)
        np.testing.assert_allclose(res.out, m.decode(0, [sid], q, k, v), **tol(F32))
        c.release(sid)
    # Plaintext against the TLS port never gets an answer.
    code, _ = status_of(lambda: stub(srv.target).GetServerInfo(pb.GetServerInfoRequest(), timeout=5))
    assert code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


def pb_grpc_stub(channel: grpc.Channel) -> object:
    from tkg.v1 import decode_attention_pb2_grpc

    return decode_attention_pb2_grpc.DecodeAttentionStub(channel)


# ---- shutdown and expiry --------------------------------------------------------------------


def test_sigterm_drains_in_flight_calls_and_exits_0() -> None:
    # Each batch waits 2.5 s for company, so a decode is reliably in flight when SIGTERM lands.
    srv = start_server(*GEOMETRY, "--num-blocks", "16", "--max-context", "16", "--batch-delay-us", "2500000",
                       "--grace-s", "20")  # fmt: skip
    try:
        channel = grpc.insecure_channel(srv.target)
        st, health = pb_grpc_stub(channel), health_pb2_grpc.HealthStub(channel)
        _fill(st, "d", 3)
        m = Mirror(st.GetServerInfo(pb.GetServerInfoRequest()))
        for layer in range(2):
            m.append("d", layer, *_kv(3, layer))
        q, k, v = _qkv(1)
        in_flight = st.Decode.future(decode_request(1, ["d"], [3], q, k, v))
        wait_for(lambda: scrape(srv.metrics_port)["tkg_requests_pending"] >= 1, what="the decode to queue")
        srv.proc.send_signal(signal.SIGTERM)

        def not_serving() -> bool:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            return status == health_pb2.HealthCheckResponse.NOT_SERVING

        wait_for(not_serving, what="health NOT_SERVING")
        code, details = status_of(lambda: st.GetServerInfo(pb.GetServerInfoRequest(), timeout=5))
        assert code == Code.UNAVAILABLE and "draining" in details
        res = in_flight.result(timeout=30)  # finished, and right
        out = np.frombuffer(res.out.data, np.float32).reshape(tuple(res.out.shape))
        np.testing.assert_allclose(out, m.decode(1, ["d"], q, k, v), **tol(F32))
        channel.close()
        assert srv.proc.wait(30) == 0
        assert "tkg serve: stopped" in srv.proc.stdout.read()
    finally:
        srv.stop()


def test_idle_sequences_expire_and_are_counted() -> None:
    srv = start_server(*GEOMETRY, "--num-blocks", "16", "--max-context", "16", "--idle-ttl-s", "0.3")
    try:
        st = stub(srv.target)
        _fill(st, "idle-1", 5)
        _fill(st, "idle-2", 1)

        # Poll ServerInfo, not GetSequence: reading a sequence counts as using it.
        wait_for(lambda: st.GetServerInfo(pb.GetServerInfoRequest()).active_sequences == 0, what="expiry")
        for sid in ("idle-1", "idle-2"):
            code, details = status_of(lambda sid=sid: st.GetSequence(pb.GetSequenceRequest(sequence_id=sid)))
            assert code == Code.NOT_FOUND and "expired" in details
        assert st.GetServerInfo(pb.GetServerInfoRequest()).free_blocks == 16
        samples = scrape(srv.metrics_port)
        assert samples['tkg_sequences_evicted_total{reason="idle_ttl"}'] == 2
        assert samples["tkg_sequences_active"] == 0 and samples["tkg_kv_blocks_used"] == 0
    finally:
        assert srv.stop() == 0


def test_tls_files_that_are_not_pem_exit_2(tmp_path: Path) -> None:
    """A TLS key that is not PEM is a start-up error naming the flag (exit 2), not a crash."""
    (tmp_path / "c.pem").write_text("not a certificate")
    proc = subprocess.run(
        [*start_cmd(), "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "c.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--tls-cert" in proc.stderr and "expected a PEM file" in proc.stderr


def start_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "tkg.server", "--port", "0", "--metrics-port", "0"]
