"""Tenants, quotas and auth on a real loopback server (in-process): one tenant can neither read
nor starve another, and an unauthenticated caller learns nothing but UNAUTHENTICATED."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.inproc import InProcServer
from support.mirror import append_request, decode_request, status_of
from support.wait import wait_for

from tkg.server import cli, credentials, identity
from tkg.server.config import ConfigError
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

Code = grpc.StatusCode
TA, TA_RO, TB, TDEF = "team-a-token-0123456789", "team-a-readonly-0123456", "team-b-token-0123456789", "d" * 20
HQ, HKV, D, BL = 2, 1, 8, 4


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_file(path: Path, entries: list[dict]) -> str:
    path.write_text(json.dumps({"tenants": entries}))
    return str(path)


ENTRIES = [
    {"name": "team-a", "token_sha256": sha(TA)},
    {"name": "team-a", "role": "read-only", "token_sha256": sha(TA_RO)},
    {"name": "team-b", "token_sha256": sha(TB),
     "quota": {"max_sequences": 3, "max_blocks": 3, "max_pending": 1, "max_streams": 1}},
]  # fmt: skip


def serve_args(*extra: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *extra]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcServer]:
    path = auth_file(tmp_path_factory.mktemp("auth") / "auth.json", ENTRIES)
    args = cli.build_parser().parse_args(serve_args("--auth-file", path, "--auth-token", TDEF, "--max-pending", "4",
                                                    "--batch-delay-us", "0"))  # fmt: skip
    s = InProcServer(cli.settings_from_args(args, "reference"))
    yield s
    s.stop()


def stub_for(target: str, token: str | None) -> tuple[pb_grpc.DecodeAttentionStub, grpc.Channel, list]:
    channel = grpc.insecure_channel(target)
    md = [("authorization", f"Bearer {token}")] if token else []
    return pb_grpc.DecodeAttentionStub(channel), channel, md


class Caller:
    """A tenant's stub with its token on every call."""

    def __init__(self, target: str, token: str | None) -> None:
        self.stub, self.channel, self.md = stub_for(target, token)

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)
        return lambda req, **kw: method(req, metadata=self.md, timeout=20, **kw)


def qkv(B: int = 1, S: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(B * 10 + S)
    return (rng.standard_normal((B, HQ, S, D)).astype(np.float32),
            rng.standard_normal((B, HKV, S, D)).astype(np.float32),
            rng.standard_normal((B, HKV, S, D)).astype(np.float32))  # fmt: skip


def kv(T: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(T)
    return rng.standard_normal((T, HKV, D)).astype(np.float32), rng.standard_normal((T, HKV, D)).astype(np.float32)


def test_another_tenants_id_is_not_found_on_every_rpc(server: InProcServer) -> None:
    a, b = Caller(server.target, TA), Caller(server.target, TB)
    a.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"))
    k, v = kv(5)
    for layer in (0, 1):
        a.AppendKV(iter([append_request("s", layer, 0, k, v)]))
    before = a.GetSequence(pb.GetSequenceRequest(sequence_id="s"))
    assert list(before.lengths) == [5, 5] and before.sequence_id == "s"

    def never(call_for_id) -> tuple[Code, str]:  # the same call on an id nobody ever created
        return status_of(lambda: call_for_id("never-made"))

    q, k1, v1 = qkv()
    calls = {
        "GetSequence": lambda sid: b.GetSequence(pb.GetSequenceRequest(sequence_id=sid)),
        "TruncateSequence": lambda sid: b.TruncateSequence(pb.TruncateSequenceRequest(sequence_id=sid, length=0)),
        "ForkSequence": lambda sid: b.ForkSequence(pb.ForkSequenceRequest(source_id=sid, sequence_id="mine")),
        "ReleaseSequence": lambda sid: b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid)),
        "Decode": lambda sid: b.Decode(decode_request(0, [sid], [5], q, k1, v1)),
        "AppendKV": lambda sid: b.AppendKV(iter([append_request(sid, 0, 5, *kv(1))])),
        "ExportSequence": lambda sid: list(b.ExportSequence(pb.ExportSequenceRequest(sequence_id=sid))),
    }
    for name, call in calls.items():
        code, details = status_of(lambda call=call: call("s"))
        assert code == Code.NOT_FOUND, (name, code, details)
        # Word for word what a never-created id gets: nothing confirms that "s" exists elsewhere.
        assert details == never(call)[1].replace("never-made", "s"), name
        assert "team-a" not in details and "\\x1f" not in details
    replies = list(b.DecodeStream(iter([decode_request(0, ["s"], [5], q, k1, v1, rid="r1")])))
    assert replies[0].error.code == Code.NOT_FOUND.value[0] and replies[0].request_id == "r1"
    # What team-a exports carries its own id (no prefix); imported by team-b, it is team-b's copy.
    exported = list(a.ExportSequence(pb.ExportSequenceRequest(sequence_id="s")))
    assert {m.sequence_id for m in exported} == {"s"}
    for m in exported:
        m.sequence_id = "copy"
    assert list(b.ImportSequence(iter(exported)).lengths) == [5, 5]
    assert status_of(lambda: a.GetSequence(pb.GetSequenceRequest(sequence_id="copy")))[0] == Code.NOT_FOUND
    b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="copy"))
    # team-a's sequence is untouched; team-b may use the same id for its own sequence.
    assert a.GetSequence(pb.GetSequenceRequest(sequence_id="s")) == before
    mine = b.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"))
    assert mine.sequence_id == "s" and list(mine.lengths) == [0, 0]
    assert list(a.GetSequence(pb.GetSequenceRequest(sequence_id="s")).lengths) == [5, 5]
    # Read-only tokens see only their own tenant; the default tenant (--auth-token) is a tenant too.
    ro = Caller(server.target, TA_RO)
    assert list(ro.GetSequence(pb.GetSequenceRequest(sequence_id="s")).lengths) == [5, 5]
    assert status_of(lambda: Caller(server.target, TDEF).GetSequence(pb.GetSequenceRequest(sequence_id="s")))[0] \
        == Code.NOT_FOUND
    # A generated id lives in the caller's namespace and comes back without any prefix.
    gen = a.CreateSequence(pb.CreateSequenceRequest()).sequence_id
    assert len(gen) == 32 and a.GetSequence(pb.GetSequenceRequest(sequence_id=gen)).sequence_id == gen
    # ServerInfo counts the caller's own sequences only.
    assert a.GetServerInfo(pb.GetServerInfoRequest()).active_sequences == 2
    for sid in (gen, "s"):
        a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid))
    b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="s"))


def test_ids_and_request_ids_are_capped_and_may_not_hold_the_separator(server: InProcServer) -> None:
    a = Caller(server.target, TA)
    cases = [("é" * 129, "258 bytes; expected at most 256 bytes"), ("team-b\x1fs", "U+001F")]
    for sid, needle in cases:
        code, details = status_of(lambda sid=sid: a.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid)))
        assert code == Code.INVALID_ARGUMENT and needle in details, details
    assert a.CreateSequence(pb.CreateSequenceRequest(sequence_id="x" * 256)).sequence_id == "x" * 256
    q, k, v = qkv()
    code, details = status_of(lambda: a.Decode(decode_request(0, ["x" * 256], [0], q, k, v, rid="r" * 257)))
    assert code == Code.INVALID_ARGUMENT and details.startswith("request_id: 257 bytes")
    code, details = status_of(lambda: a.Decode(decode_request(0, ["x" * 256], [0], q, k, v, rid="r\x1f1")))
    assert code == Code.INVALID_ARGUMENT and details.startswith("request_id: contains the control character U+001F")
    assert a.GetSequence(pb.GetSequenceRequest(sequence_id="x" * 256)).lengths[0] == 0  # nothing appended
    # A batched Decode names the bad id by its index (the usual id passes without being encoded).
    q2, k2, v2 = (np.concatenate([x, x]) for x in (q, k, v))
    for sid, needle in [*cases, ("", "empty; expected a sequence id")]:
        code, details = status_of(lambda sid=sid: a.Decode(decode_request(0, ["x" * 256, sid], [0, 0], q2, k2, v2)))
        assert code == Code.INVALID_ARGUMENT and details.startswith("sequence_ids[1]: ") and needle in details, details
    a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="x" * 256))


@pytest.mark.parametrize("method", ["Decode", "AppendKV"])
def test_overflowing_shapes_are_invalid_argument(server: InProcServer, method: str) -> None:
    a = Caller(server.target, TA)
    a.CreateSequence(pb.CreateSequenceRequest(sequence_id=f"ovf-{method}"))
    for shape, data in (([2**32, 2**32], b""), ([2**62 + 1, 4, 1, 1], b"\0" * 8), ([2**62 + 1, 1, 8], b"\0" * 8)):
        if method == "Decode":
            q, k, v = qkv()
            req = decode_request(0, [f"ovf-{method}"], [0], q, k, v)
            for t in (req.q, req.k):
                del t.shape[:]
                t.shape.extend(shape)
                t.data = data
            code, details = status_of(lambda req=req: a.Decode(req))
        else:
            req = append_request(f"ovf-{method}", 0, 0, *kv(1))
            del req.k.shape[:]
            req.k.shape.extend(shape)
            req.k.data = data
            code, details = status_of(lambda req=req: a.AppendKV(iter([req])))
        assert code == Code.INVALID_ARGUMENT, (shape, code, details)
        assert "shape" in details or "data" in details
    a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=f"ovf-{method}"))


def test_quotas_name_the_quota_and_leave_other_tenants_alone(server: InProcServer) -> None:
    a, b = Caller(server.target, TA), Caller(server.target, TB)
    # max_blocks 3 (block_len 4): 12 tokens fit, the 13th needs a fourth block.
    b.CreateSequence(pb.CreateSequenceRequest(sequence_id="q1"))
    b.AppendKV(iter([append_request("q1", 0, 0, *kv(12))]))
    code, details = status_of(lambda: b.AppendKV(iter([append_request("q1", 0, 12, *kv(1))])))
    assert code == Code.RESOURCE_EXHAUSTED and "quota max_blocks of tenant 'team-b': 3 KV blocks in use" in details
    q, k, v = qkv()
    code, details = status_of(lambda: b.Decode(decode_request(0, ["q1"], [12], q, k, v)))
    assert code == Code.RESOURCE_EXHAUSTED and "max_blocks" in details
    # A fork of a 13-token sequence would copy its partial block: past the quota, nothing created.
    b.AppendKV(iter([append_request("q1", 1, 0, *kv(12))]))
    b.TruncateSequence(pb.TruncateSequenceRequest(sequence_id="q1", length=10))  # 3 blocks, last partial
    code, details = status_of(lambda: b.ForkSequence(pb.ForkSequenceRequest(source_id="q1", sequence_id="f")))
    assert code == Code.RESOURCE_EXHAUSTED and "max_blocks" in details
    assert status_of(lambda: b.GetSequence(pb.GetSequenceRequest(sequence_id="f")))[0] == Code.NOT_FOUND
    assert b.GetSequence(pb.GetSequenceRequest(sequence_id="q1")).num_blocks == 3
    # team-a, with no quota, still appends 40 tokens meanwhile.
    a.CreateSequence(pb.CreateSequenceRequest(sequence_id="big"))
    assert a.AppendKV(iter([append_request("big", 0, 0, *kv(40))])).num_blocks == 10
    # max_sequences 3.
    for sid in ("q2", "q3"):
        b.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
    code, details = status_of(lambda: b.CreateSequence(pb.CreateSequenceRequest(sequence_id="q4")))
    assert code == Code.RESOURCE_EXHAUSTED and "quota max_sequences of tenant 'team-b': 3 sequences" in details
    a.CreateSequence(pb.CreateSequenceRequest(sequence_id="a2"))
    # Releasing gives the quota back.
    b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="q1"))
    assert server.app.service.ledger.of(server.app.settings.auth.tenant("team-b")).blocks == 0
    b.CreateSequence(pb.CreateSequenceRequest(sequence_id="q4"))
    assert b.AppendKV(iter([append_request("q4", 0, 0, *kv(12))])).num_blocks == 3
    for sid in ("q2", "q3", "q4"):
        b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid))
    for sid in ("big", "a2"):
        a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid))


def test_streams_and_pending_quota_and_the_queue_share(server: InProcServer) -> None:
    a, b = Caller(server.target, TA), Caller(server.target, TB)
    ledger = server.app.service.ledger
    team_b = server.app.settings.auth.tenant("team-b")
    release = threading.Event()

    def held_open() -> Iterator[pb.DecodeRequest]:
        release.wait(30)
        return
        yield

    first = b.DecodeStream(held_open())
    wait_for(lambda: ledger.of(team_b).streams == 1, what="team-b's first stream to open")
    code, details = status_of(lambda: list(b.DecodeStream(iter([]))))
    assert code == Code.RESOURCE_EXHAUSTED and "quota max_streams of tenant 'team-b': 1 streams" in details
    code, details = status_of(lambda: b.AppendKV(iter([append_request("x", 0, 0, *kv(1))])))
    assert code == Code.RESOURCE_EXHAUSTED and "max_streams" in details
    assert list(a.DecodeStream(iter([]))) == []  # another tenant is not affected
    release.set()
    assert list(first) == []
    wait_for(lambda: ledger.of(team_b).streams == 0, what="team-b's stream to close")
    # Pending: --max-pending 4 shared by 3 tenants is 1 each (team-b's own quota is 1 as well).
    share = server.app.service
    assert share.settings.max_pending // share.tenant_count() == 1
    for c, sid in ((a, "pa"), (b, "pb")):
        c.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
    gate = threading.Event()
    service = server.app.service
    real = service.engine.run

    async def held(batch):
        import asyncio

        while not gate.is_set():
            await asyncio.sleep(0.005)
        await real(batch)

    service.batcher._run_batch = held
    try:
        q, k, v = qkv()
        fut = a.stub.Decode.future(decode_request(0, ["pa"], [0], q, k, v), metadata=a.md, timeout=20)
        team_a = server.app.settings.auth.tenant("team-a")
        wait_for(lambda: ledger.of(team_a).pending == 1, what="team-a's decode to be pending")
        code, details = status_of(lambda: a.Decode(decode_request(0, ["pa"], [0], q, k, v)))
        assert code == Code.RESOURCE_EXHAUSTED and "quota max_pending of tenant 'team-a'" in details
        fut_b = b.stub.Decode.future(decode_request(0, ["pb"], [0], q, k, v), metadata=b.md, timeout=20)
        wait_for(lambda: ledger.of(team_b).pending == 1, what="team-b's decode to be pending")
        gate.set()
        assert fut.result().out.shape == [1, HQ, 1, D] and fut_b.result().out.shape == [1, HQ, 1, D]
    finally:
        gate.set()
        service.batcher._run_batch = real
    a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="pa"))
    b.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="pb"))


def test_unauthenticated_callers_learn_nothing_else(server: InProcServer) -> None:
    channel = grpc.insecure_channel(server.target)
    st = pb_grpc.DecodeAttentionStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    hreq = health_pb2.HealthCheckRequest()
    for md, needle in (([], "missing"), ([("authorization", "Bearer " + "x" * 20)], "unknown token"),
                       ([("authorization", "Basic " + TA)], "scheme"), ([("authorization", "Bearer ")], "scheme")):
        code, details = status_of(lambda md=md: st.GetServerInfo(pb.GetServerInfoRequest(), metadata=md))
        assert code == Code.UNAUTHENTICATED and needle in details, details
        assert status_of(lambda md=md: health.Check(hreq, metadata=md))[0] == Code.UNAUTHENTICATED
    # Scheme case does not matter; health and reflection answer an authenticated caller.
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert st.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", f"{scheme} {TA}")]).head_dim == D
    ok = health.Check(hreq, metadata=[("authorization", f"Bearer {TA_RO}")])
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(hreq, metadata=[("authorization", f"Bearer {TA_RO}")], timeout=20)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a handler that writes via context
    watch.cancel()
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    assert status_of(lambda: list(refl.ServerReflectionInfo(iter([ask]))))[0] == Code.UNAUTHENTICATED
    names = list(refl.ServerReflectionInfo(iter([ask]), metadata=[("authorization", f"Bearer {TA}")]))
    assert "tkg.v1.DecodeAttention" in str(names[0])
    # Checked before the body is parsed: garbage bytes are UNAUTHENTICATED without a token and
    # INVALID_ARGUMENT (never INTERNAL) with one.
    raw = channel.unary_unary("/tkg.v1.DecodeAttention/CreateSequence")
    garbage = b"\xff\xff\xff\xff"
    assert status_of(lambda: raw(garbage))[0] == Code.UNAUTHENTICATED
    code, details = status_of(lambda: raw(garbage, metadata=[("authorization", f"Bearer {TA}")]))
    assert code == Code.INVALID_ARGUMENT and "not a valid message" in details
    # Draining is news only for the authenticated.
    server.app.service.draining = True
    try:
        assert status_of(lambda: st.GetServerInfo(pb.GetServerInfoRequest()))[0] == Code.UNAUTHENTICATED
        code, _ = status_of(lambda: st.GetSequence(pb.GetSequenceRequest(sequence_id="s"),
                                                   metadata=[("authorization", f"Bearer {TA}")]))  # fmt: skip
        assert code == Code.UNAVAILABLE
    finally:
        server.app.service.draining = False
    # Read-only: reading RPCs only.
    code, details = status_of(lambda: st.CreateSequence(pb.CreateSequenceRequest(),
                                                        metadata=[("authorization", f"Bearer {TA_RO}")]))  # fmt: skip
    assert code == Code.PERMISSION_DENIED and "read-only" in details
    channel.close()


def test_metrics_count_requests_per_tenant_never_ids_or_tokens(server: InProcServer) -> None:
    a = Caller(server.target, TA)
    a.CreateSequence(pb.CreateSequenceRequest(sequence_id="metric-secret-id"))
    a.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="metric-secret-id"))
    from prometheus_client import generate_latest

    reg = server.app.metrics.registry
    labels = {"tenant": "team-a", "method": "CreateSequence", "code": "OK"}
    assert reg.get_sample_value("tkg_tenant_requests_total", labels) >= 1
    status_of(lambda: pb_grpc.DecodeAttentionStub(grpc.insecure_channel(server.target)).GetServerInfo(
        pb.GetServerInfoRequest()))  # fmt: skip
    assert reg.get_sample_value("tkg_tenant_requests_total",
                                {"tenant": "", "method": "GetServerInfo", "code": "UNAUTHENTICATED"}) >= 1  # fmt: skip
    text = generate_latest(reg).decode()
    assert "metric-secret-id" not in text and TA not in text and sha(TA) not in text


def test_constant_time_lookup_compares_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    table = credentials.build_table([TDEF], [], ENTRIES)
    seen = []
    real = credentials.hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        seen.append(y)
        return real(x, y)

    monkeypatch.setattr(credentials.hmac, "compare_digest", spy)
    assert table.by_token(TDEF).tenant.name == "default"  # the first entry matches...
    assert len(seen) == len(table.tokens) == 4  # ...and every other digest is compared all the same
    seen.clear()
    assert table.by_token("z" * 20) is None and len(seen) == 4


def test_sighup_reload_swaps_credentials_and_keeps_them_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(f"tenants:\n  - name: team-a\n    token_sha256: {sha(TA)}\n")
    args = cli.build_parser().parse_args(serve_args("--auth-file", str(path)))
    s = InProcServer(cli.settings_from_args(args, "reference"))
    try:
        assert Caller(s.target, TA).GetServerInfo(pb.GetServerInfoRequest()).head_dim == D
        path.write_text(f"tenants:\n  - name: team-b\n    token_sha256: {sha(TB)}\n")
        s.run(lambda: cli.reload_auth(s.app, args))
        assert status_of(lambda: Caller(s.target, TA).GetServerInfo(pb.GetServerInfoRequest()))[0] \
            == Code.UNAUTHENTICATED
        assert Caller(s.target, TB).GetServerInfo(pb.GetServerInfoRequest()).head_dim == D
        path.write_text("tenants: [{name: 'bad name!', token_sha256: x}]\n")
        s.run(lambda: cli.reload_auth(s.app, args))  # logged, not applied
        assert Caller(s.target, TB).GetServerInfo(pb.GetServerInfoRequest()).head_dim == D
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--auth-token", ""], {}, "--auth-token: token is empty; expected at least 16 characters"),
        (["--auth-token", "short"], {}, "--auth-token: token is 5 characters"),
        ([], {"TKG_AUTH_TOKEN": ""}, "TKG_AUTH_TOKEN: token is empty"),
        (["--read-only-token", "ro"], {}, "--read-only-token: token is 2 characters"),
        (["--auth-token-file", "/nonexistent/t"], {}, "--auth-token-file: cannot read"),
        (["--tls-client-ca", "/nonexistent/ca.pem"], {}, "--tls-client-ca: given without --tls-cert"),
        (["--quota-max-blocks", "-1"], {}, "--quota-max-blocks: -1"),
    ],
)
def test_bad_credentials_config_exits_2_with_one_line(
    argv: list[str], env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("TKG_AUTH_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--backend", "reference", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_token_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"{TA}\n\n{TB}\n")
    monkeypatch.setenv("TKG_AUTH_TOKEN", TDEF)
    tokens = credentials.tokens_from([], str(f))
    assert tokens == [TA, TB, TDEF]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"name": "a", "role": "admin", "token_sha256": "0" * 64}, "tenants[0].role: 'admin'"),
        ({"name": "a", "token_sha256": "xyz"}, "tenants[0].token_sha256: expected 64 hex digits"),
        ({"name": "a"}, "exactly one of token_sha256 and client_subject"),
        ({"name": "a b", "token_sha256": "0" * 64}, "tenants[0].name"),
        ({"name": "a", "token_sha256": "0" * 64, "quota": {"max_blocks": 0}}, "quota.max_blocks: 0"),
        ({"name": "a", "token_sha256": "0" * 64, "token": "plain"}, "unknown key(s) ['token']"),
    ],
)
def test_auth_file_errors_name_the_entry(entry: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        credentials.build_table([], [], [entry])
    assert needle in str(err.value)


def test_mtls_handshakes_and_tenant_from_the_certificate_subject(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="the dev extra 'cryptography' makes the test certificates")
    from support.inproc import make_pki, settings

    from tkg.client import Client, errors

    pki = make_pki("team-b")
    entries = [{"name": "team-b", "client_subject": "CN=team-b"}, {"name": "team-a", "token_sha256": sha(TA)}]
    table = credentials.build_table([], [], entries)
    tls = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    # TLS only: the client verifies the server against the test CA.
    s = InProcServer(settings(**tls, auth=table, auth_file="auth.json"))
    try:
        with Client(s.target, root_certificates=pki["ca"], token=TA, timeout=20) as c:
            assert c.create_sequence("t").sequence_id == "t"
        with Client(s.target, root_certificates=pki["stranger_cert"], token=TA, timeout=5) as c, \
                pytest.raises(errors.Unavailable):  # fmt: skip
            c.server_info()  # a server certificate the client does not trust
    finally:
        s.stop()
    s = InProcServer(settings(**tls, tls_client_ca=pki["ca"], auth=table, auth_file="auth.json"))
    try:
        assert "tls=on+mtls" in s.app.describe()
        mine = dict(root_certificates=pki["ca"], certificate_chain=pki["client_cert"], private_key=pki["client_key"])
        with Client(s.target, timeout=20, **mine) as c:  # no token: the certificate names the tenant
            c.create_sequence("t")
            assert c.get_sequence("t").sequence_id == "t"
        with Client(s.target, root_certificates=pki["ca"], certificate_chain=pki["client_cert"],
                    private_key=pki["client_key"], token=TA, timeout=20) as c:  # fmt: skip
            # The certificate wins over the token: still team-b.
            assert c.get_sequence("t").sequence_id == "t"
        for other in (dict(root_certificates=pki["ca"], token=TA),  # no client certificate: handshake fails
                      dict(root_certificates=pki["ca"], certificate_chain=pki["stranger_cert"],
                           private_key=pki["stranger_key"], token=TA)):  # fmt: skip
            with Client(s.target, timeout=5, **other) as c, pytest.raises(errors.Unavailable):
                c.server_info()
    finally:
        s.stop()


def test_malformed_messages_are_invalid_argument_without_auth_too() -> None:
    from support.inproc import settings

    s = InProcServer(settings())
    try:
        channel = grpc.insecure_channel(s.target)
        garbage = b"\xff\xff\xff"
        calls = {
            "unary": lambda: channel.unary_unary("/tkg.v1.DecodeAttention/CreateSequence")(garbage),
            "stream": lambda: list(channel.stream_stream("/tkg.v1.DecodeAttention/DecodeStream")(iter([garbage]))),
            "client stream": lambda: channel.stream_unary("/tkg.v1.DecodeAttention/AppendKV")(iter([garbage])),
        }
        for name, call in calls.items():
            code, details = status_of(call)
            assert code == Code.INVALID_ARGUMENT and "not a valid message" in details, (name, code, details)
        channel.close()
    finally:
        s.stop()


def test_idle_expiry_gives_the_quota_back() -> None:
    import asyncio

    from support.service import make_service

    now = [0.0]
    svc = make_service({"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "num_blocks": 8,
                        "block_len": 4, "kv_dtype": "float32", "idle_ttl_s": 10.0, "max_batch": 4},
                       clock=lambda: now[0], max_pending=4, max_message_bytes=2**20)  # fmt: skip
    table = credentials.build_table([], [], [{"name": "t", "token_sha256": sha(TA), "quota": {"max_sequences": 1}}])
    ident = table.tokens[0][1]

    class Ctx:
        async def abort(self, code: Code, details: str) -> None:
            raise AssertionError(details)

    async def main() -> list[str]:
        identity.CURRENT.set(ident)
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="old"), Ctx())
        k, v = kv(6)

        async def chunks():
            yield append_request("old", 0, 0, k, v)

        await svc.AppendKV(chunks(), Ctx())
        assert svc.ledger.of(ident.tenant).blocks == 2
        now[0] = 100.0
        expired = svc.expire_idle()
        await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="new"), Ctx())  # the quota is free again
        return expired

    assert asyncio.run(main()) == ["old"]
    assert svc.ledger.of(ident.tenant).sequences == 1 and svc.ledger.of(ident.tenant).blocks == 0


def test_ledger_matches_the_cache_after_every_kind_of_step() -> None:
    """Random creates, appends, decodes (some with a failing kernel), forks, truncates and
    releases by two tenants: after each, the ledger's per-tenant sequences and KV blocks equal a
    recount from the cache itself (blocks shared by forks counted once)."""
    import asyncio

    from support.service import Aborted, FakeContext, make_service

    from tkg.server.tenants import Ledger

    svc = make_service({"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "num_blocks": 40,
                        "block_len": 4, "kv_dtype": "float32", "max_context": 32, "max_batch": 4},
                       max_pending=8, max_message_bytes=2**20)  # fmt: skip
    cache = svc.cache
    table = credentials.build_table([], [], [{"name": "a", "token_sha256": sha(TA)},
                                      {"name": "b", "token_sha256": sha(TB), "quota": {"max_blocks": 12}}])  # fmt: skip
    idents = [ident for _, ident in table.tokens]
    rng = np.random.default_rng(7)
    real_decode = cache.store.decode

    def failing(*args, **kw):
        raise RuntimeError("injected kernel failure")

    async def main() -> None:
        svc.start()
        ids: dict[str, list[str]] = {"a": [], "b": []}
        ctx = FakeContext()
        for step in range(160):
            ident = idents[int(rng.integers(2))]
            identity.CURRENT.set(ident)
            mine = ids[ident.tenant.name]
            op = rng.choice(["create", "append", "decode", "fail", "fork", "truncate", "release"])
            sid = mine[int(rng.integers(len(mine)))] if mine else "none"
            try:
                if op == "create" or not mine:
                    new = (await svc.CreateSequence(pb.CreateSequenceRequest(), ctx)).sequence_id
                    mine.append(new)
                elif op == "append":
                    layer = int(rng.integers(2))
                    pos = cache.get(tenants_inward(ident, sid)).lengths[layer]
                    T = int(rng.integers(1, 7))

                    async def chunk(sid=sid, layer=layer, pos=pos, T=T):
                        yield append_request(sid, layer, pos, *kv(T))

                    await svc.AppendKV(chunk(), ctx)
                elif op in ("decode", "fail"):
                    layer = int(rng.integers(2))
                    pos = cache.get(tenants_inward(ident, sid)).lengths[layer]
                    q, k, v = qkv()
                    cache.store.decode = failing if op == "fail" else real_decode
                    try:
                        await svc.Decode(decode_request(layer, [sid], [pos], q, k, v), ctx)
                    finally:
                        cache.store.decode = real_decode
                elif op == "fork":
                    mine.append((await svc.ForkSequence(pb.ForkSequenceRequest(source_id=sid), ctx)).sequence_id)
                elif op == "truncate":
                    length = int(min(cache.get(tenants_inward(ident, sid)).lengths))
                    await svc.TruncateSequence(
                        pb.TruncateSequenceRequest(sequence_id=sid, length=int(rng.integers(length + 1))), ctx
                    )
                else:
                    await svc.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id=sid), ctx)
                    mine.remove(sid)
            except Aborted as err:
                assert err.code != Code.INTERNAL or "injected" in err.details, (step, op, err)
            fresh = Ledger()
            fresh.recount((s.seq_id, s.block_ids) for s in cache.snapshot())
            for t in ("a", "b"):
                got, want = svc.ledger.usage.get(t), fresh.usage.get(t)
                got_pair = (got.sequences, got.blocks) if got else (0, 0)
                want_pair = (want.sequences, want.blocks) if want else (0, 0)
                assert got_pair == want_pair, (step, op, t, got_pair, want_pair)
            assert svc.ledger.of(idents[1].tenant).blocks <= 12
        await svc.close()

    asyncio.run(main())


def tenants_inward(ident: identity.Identity, sid: str) -> str:
    from tkg.server.tenants import inward

    return inward(ident.tenant, sid)


def test_quota_flags_apply_to_every_tenant_without_an_auth_file() -> None:
    args = cli.build_parser().parse_args(serve_args("--quota-max-sequences", "2", "--max-sequences", "5"))
    settings = cli.settings_from_args(args, "reference")
    assert settings.auth.tenant("default").quota.max_sequences == 2 and settings.max_sequences == 5
    s = InProcServer(settings)
    try:
        anon = Caller(s.target, None)
        for sid in ("x", "y"):
            anon.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
        code, details = status_of(lambda: anon.CreateSequence(pb.CreateSequenceRequest(sequence_id="z")))
        assert code == Code.RESOURCE_EXHAUSTED and "quota max_sequences of tenant 'default': 2" in details
    finally:
        s.stop()


def test_a_server_started_without_auth_checks_credentials_once_a_reload_adds_them() -> None:
    """The guard reads the table in force per call: off at start (every call the `default`
    tenant, its quota defaults in force, counted under its name), on after a reload, off again."""
    from support.inproc import settings

    defaults = identity.Quota(max_sequences=1)
    s = InProcServer(settings(auth=credentials.build_table(defaults=defaults), quota_defaults=defaults))
    try:
        anon = Caller(s.target, None)
        anon.CreateSequence(pb.CreateSequenceRequest(sequence_id="x"))
        code, details = status_of(lambda: anon.CreateSequence(pb.CreateSequenceRequest(sequence_id="y")))
        assert code == Code.RESOURCE_EXHAUSTED and "quota max_sequences of tenant 'default': 1" in details
        reg = s.app.metrics.registry
        labels = {"tenant": "default", "method": "CreateSequence", "code": "OK"}
        assert reg.get_sample_value("tkg_tenant_requests_total", labels) == 1
        s.app.reload_auth(credentials.build_table([TDEF], defaults=defaults))
        code, details = status_of(lambda: anon.GetSequence(pb.GetSequenceRequest(sequence_id="x")))
        assert code == Code.UNAUTHENTICATED and "missing" in details
        assert Caller(s.target, TDEF).GetSequence(pb.GetSequenceRequest(sequence_id="x")).sequence_id == "x"
        s.app.reload_auth(credentials.build_table(defaults=defaults))
        assert anon.GetSequence(pb.GetSequenceRequest(sequence_id="x")).sequence_id == "x"
    finally:
        s.stop()


def test_sighup_reloads_the_auth_file_of_a_running_server(tmp_path: Path) -> None:
    import signal

    from support.server_proc import start_server

    path = tmp_path / "auth.json"
    auth_file(path, [{"name": "team-a", "token_sha256": sha(TA)}])
    srv = start_server("--backend", "reference", "--num-layers", "1", "--num-q-heads", "2", "--num-kv-heads", "1",
                       "--head-dim", "8", "--num-blocks", "8", "--auth-file", str(path))  # fmt: skip
    try:
        assert "auth=on tenants=1" in srv.line
        assert Caller(srv.target, TA).GetServerInfo(pb.GetServerInfoRequest()).head_dim == 8
        auth_file(path, [{"name": "team-b", "token_sha256": sha(TB)}])
        srv.proc.send_signal(signal.SIGHUP)

        def swapped() -> bool:
            try:
                Caller(srv.target, TB).GetServerInfo(pb.GetServerInfoRequest())
                return True
            except grpc.RpcError:
                return False

        wait_for(swapped, what="the reloaded auth file to take effect")
        assert status_of(lambda: Caller(srv.target, TA).GetServerInfo(pb.GetServerInfoRequest()))[0] \
            == Code.UNAUTHENTICATED
    finally:
        assert srv.stop() == 0
