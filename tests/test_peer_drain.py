"""A drain with auth on moves every tenant's sequences: the draining replica presents a `peer`
credential, each import names its tenant (`tkg-tenant`), and only a peer may name one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.inproc import InProcServer
from support.mirror import append_request, decode_request, status_of

from tkg import codec
from tkg.server import cli, credentials, tenants
from tkg.server.config import ConfigError
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

Code = grpc.StatusCode
TA, TB, PEER = "team-a-token-0123456789", "team-b-token-0123456789", "replica-peer-token-0123"
HQ, HKV, D = 2, 1, 8  # tests/support/inproc.py's TINY geometry (float32, 2 layers)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ENTRIES = [
    {"name": "team-a", "token_sha256": sha(TA)},
    {"name": "team-b", "token_sha256": sha(TB)},
    {"name": "replicas", "role": "peer", "token_sha256": sha(PEER)},
]


class Caller:
    def __init__(self, target: str, token: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.DecodeAttentionStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")]

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)
        return lambda req, md=(), **kw: method(req, metadata=[*self.md, *md], timeout=20, **kw)


def serve(tmp_path: Path, *extra: str) -> InProcServer:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"tenants": ENTRIES}))
    args = cli.build_parser().parse_args(
        ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--auth-file", str(path), *extra]
    )
    return InProcServer(cli.settings_from_args(args, "reference"))


def fill(c: Caller, sid: str, T: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c.CreateSequence(pb.CreateSequenceRequest(sequence_id=sid))
    for layer in (0, 1):
        k, v = (rng.standard_normal((T, HKV, D)).astype(np.float32) for _ in range(2))
        c.AppendKV(iter([append_request(sid, layer, 0, k, v)]))


def step(c: Caller, sid: str, T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, HKV, 1, D)).astype(np.float32) for _ in range(2))
    return codec.decode(c.Decode(decode_request(0, [sid], [T], q, k, v)).out)


def test_drain_moves_every_tenants_sequences_with_a_peer_credential(tmp_path: Path) -> None:
    peer = serve(tmp_path)
    token_file = tmp_path / "peer-token"
    token_file.write_text(PEER + "\n")
    draining = serve(tmp_path, "--peers", peer.target, "--peer-token-file", str(token_file))
    try:
        a, b = Caller(draining.target, TA), Caller(draining.target, TB)
        # The same id in both tenants, plus one of each alone: namespaces must survive the move.
        fill(a, "s", 9, seed=1), fill(b, "s", 5, seed=2), fill(a, "a-only", 3, seed=3), fill(b, "b-only", 7, seed=4)
        want = {}
        for c, name, sid, T in ((a, "a", "s", 9), (b, "b", "s", 5), (a, "a", "a-only", 3), (b, "b", "b-only", 7)):
            want[name, sid] = step(c, sid, T, seed=T)
            c.TruncateSequence(pb.TruncateSequenceRequest(sequence_id=sid, length=T))  # undo the step's append
        report = draining.run(lambda: draining.app.shutdown(10.0))
        assert report.failed == {} and len(report.moved) == 4, report
        pa, pb_ = Caller(peer.target, TA), Caller(peer.target, TB)
        for c, name, sid, T in ((pa, "a", "s", 9), (pb_, "b", "s", 5), (pa, "a", "a-only", 3), (pb_, "b", "b-only", 7)):
            assert list(c.GetSequence(pb.GetSequenceRequest(sequence_id=sid)).lengths) == [T, T]
            np.testing.assert_array_equal(step(c, sid, T, seed=T), want[name, sid])
        # Still two tenants on the peer: neither sees the other's.
        assert status_of(lambda: pa.GetSequence(pb.GetSequenceRequest(sequence_id="b-only")))[0] == Code.NOT_FOUND
        assert status_of(lambda: pb_.GetSequence(pb.GetSequenceRequest(sequence_id="a-only")))[0] == Code.NOT_FOUND
    finally:
        draining.loop.call_soon_threadsafe(draining.loop.stop)
        peer.stop()


def _import_stream(sid: str) -> list[pb.SequenceChunk]:
    header = pb.SequenceHeader(lengths=[0, 0], num_layers=2, num_kv_heads=HKV, head_dim=D,
                               kv_dtype=pb.DTYPE_FLOAT32, chunks=0)  # fmt: skip
    return [pb.SequenceChunk(sequence_id=sid, header=header)]


def test_only_a_peer_credential_may_name_a_tenant(tmp_path: Path) -> None:
    s = serve(tmp_path)
    try:
        a, p = Caller(s.target, TA), Caller(s.target, PEER)
        into_b = [("tkg-tenant", "team-b")]
        # An ordinary tenant naming another tenant (existing or not) is refused, and nothing lands.
        for name in ("team-b", "no-such-tenant"):
            code, msg = status_of(lambda n=name: a.ImportSequence(iter(_import_stream("x")), md=[("tkg-tenant", n)]))
            assert code == Code.PERMISSION_DENIED and "tkg-tenant" in msg, (code, msg)
        code, _ = status_of(lambda: a.CreateSequence(pb.CreateSequenceRequest(sequence_id="y"), md=into_b))
        assert code == Code.PERMISSION_DENIED
        # Naming its own tenant changes nothing.
        a.ImportSequence(iter(_import_stream("own")), md=[("tkg-tenant", "team-a")])
        a.GetSequence(pb.GetSequenceRequest(sequence_id="own"))
        # The peer imports into the tenant it names, and only there.
        p.ImportSequence(iter(_import_stream("x")), md=into_b)
        Caller(s.target, TB).GetSequence(pb.GetSequenceRequest(sequence_id="x"))
        assert status_of(lambda: a.GetSequence(pb.GetSequenceRequest(sequence_id="x")))[0] == Code.NOT_FOUND
        # A peer cannot act as a tenant otherwise, nor import without naming one, nor into a stranger.
        for call in (lambda: p.CreateSequence(pb.CreateSequenceRequest(sequence_id="z"), md=into_b),
                     lambda: p.GetSequence(pb.GetSequenceRequest(sequence_id="x"), md=into_b),
                     lambda: p.ImportSequence(iter(_import_stream("w"))),
                     lambda: p.ImportSequence(iter(_import_stream("w")), md=[("tkg-tenant", "nobody")])):  # fmt: skip
            assert status_of(call)[0] == Code.PERMISSION_DENIED
        p.GetServerInfo(pb.GetServerInfoRequest())
    finally:
        s.stop()


@pytest.mark.parametrize(
    "entries, needle",
    [([{"name": "team-a", "token_sha256": sha(TA)}, {"name": "team-a", "role": "peer", "token_sha256": sha(PEER)}],
      "names both a peer and a tenant"),
     ([{"name": "r", "role": "peer", "token_sha256": sha(PEER), "quota": {"max_sequences": 1}}], "tenants[0].quota")],
)  # fmt: skip
def test_peer_entries_are_checked(entries: list[dict], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        credentials.build_table([], [], entries)


def test_a_drain_recognises_its_own_peers_entry_and_never_pushes_to_it(tmp_path: Path) -> None:
    """`--peers` naming this replica too, no `--advertise` (auth on, the peer token asks): its own
    entry answers with its instance id and is left out, the other entry gets the sequences. A list
    naming only this replica moves nothing and keeps everything (reported, not lost)."""
    from support.server_proc import free_port

    peer = serve(tmp_path)
    token_file = tmp_path / "peer-token"
    token_file.write_text(PEER + "\n")
    port = free_port()
    me = f"127.0.0.1:{port}"
    draining = serve(tmp_path, "--port", str(port), "--peers", f"{me},{peer.target}", "--peer-token-file",
                     str(token_file))  # fmt: skip
    alone = serve(tmp_path, "--port", str(alone_port := free_port()), "--peers", f"127.0.0.1:{alone_port}",
                  "--peer-token-file", str(token_file))  # fmt: skip
    try:
        a = Caller(draining.target, TA)
        for i in range(6):
            fill(a, f"s{i}", 3, seed=i)
        report = draining.run(lambda: draining.app.shutdown(10.0))
        assert report.failed == {} and len(report.moved) == 6, report
        assert draining.app.finder.known == {me: True, peer.target: False}
        pa = Caller(peer.target, TA)
        assert all(list(pa.GetSequence(pb.GetSequenceRequest(sequence_id=f"s{i}")).lengths) == [3, 3] for i in range(6))
        fill(Caller(alone.target, TA), "kept", 3, seed=9)
        lone = alone.run(lambda: alone.app.shutdown(10.0))
        kept = "team-a" + tenants.SEP + "kept"  # the cache's id of team-a's "kept"
        assert lone.moved == [] and "--peers names only this one" in lone.failed[kept], lone
        assert kept in alone.app.service.cache.sequence_ids()  # not released: nothing was lost here
    finally:
        for s in (draining, alone):
            s.loop.call_soon_threadsafe(s.loop.stop)
        peer.stop()


def test_a_drain_moves_the_host_tier_too(tmp_path: Path) -> None:
    """Sequences spilled to the host tier go to the peer like resident ones (read from their host
    runs, not restored first); the peer holds every one, byte for byte."""
    from support.inproc import TINY

    from tkg.server.config import build_spec

    peer = serve(tmp_path)
    token_file = tmp_path / "peer-token"
    token_file.write_text(PEER + "\n")
    path = tmp_path / "auth.json"
    args = cli.build_parser().parse_args(
        ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--auth-file", str(path), "--peers", peer.target,
         "--peer-token-file", str(token_file), "--host-cache-bytes", str(16 * 2 * 2 * HKV * 4 * D * 4)]
    )  # fmt: skip
    draining = InProcServer(cli.settings_from_args(args, "reference"), build_spec({**TINY, "num_blocks": 6}))
    try:
        a = Caller(draining.target, TA)
        for i in range(5):  # 2 blocks each: the 6-block pool holds 3, the host tier the rest
            fill(a, f"s{i}", 7, seed=i)
        tiers = {a.GetSequence(pb.GetSequenceRequest(sequence_id=f"s{i}")).tier for i in range(5)}
        assert tiers == {"device", "host"}
        want = {f"s{i}": [m.SerializeToString() for m in list(a.ExportSequence(pb.ExportSequenceRequest(
            sequence_id=f"s{i}")))[1:]] for i in range(5)}  # fmt: skip
        report = draining.run(lambda: draining.app.shutdown(10.0))
        assert report.failed == {} and len(report.moved) == 5, report
        pa = Caller(peer.target, TA)
        for sid, kv in want.items():
            stream = list(pa.ExportSequence(pb.ExportSequenceRequest(sequence_id=sid)))
            assert [m.SerializeToString() for m in stream[1:]] == kv, sid
    finally:
        draining.loop.call_soon_threadsafe(draining.loop.stop)
        peer.stop()
