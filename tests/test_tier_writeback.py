"""`--persist write-back`: after a SIGKILL, every sequence comes back at or below what the client
sent, its K/V exactly the client's, and decodes from there; a truncation is persisted before it
is acknowledged; a torn log tail is cut back to the last whole block."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from support.oracle import naive_decode
from support.server_proc import start_server
from support.wait import wait_for

from tkg.client import Client
from tkg.client.errors import TkgError
from tkg.server import spill_files

HQ, HKV, D, BL = 4, 2, 16, 4
GEOMETRY = ("--preset", "tiny", "--num-layers", "2", "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
            "--head-dim", str(D), "--block-len", str(BL), "--max-context", "64", "--kv-dtype", "float32",
            "--fuse-rope", "false", "--backend", "reference")  # fmt: skip
SCALE = 1.0 / np.sqrt(D)


class Mirror:
    """What the client sent: per sequence and layer, K and V `[T, Hkv, d]` in order."""

    def __init__(self, sids: list[str]) -> None:
        self.k = {s: [np.zeros((0, HKV, D), np.float32)] * 2 for s in sids}
        self.v = {s: [np.zeros((0, HKV, D), np.float32)] * 2 for s in sids}

    def add(self, sid: str, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        self.k[sid][layer] = np.concatenate([self.k[sid][layer], k])
        self.v[sid][layer] = np.concatenate([self.v[sid][layer], v])

    def cut(self, sid: str, length: int) -> None:
        for layer in range(2):
            self.k[sid][layer] = self.k[sid][layer][:length]
            self.v[sid][layer] = self.v[sid][layer][:length]


def _kv_of(client: Client, sid: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The server's K and V per layer `[T, Hkv, d]`, from its export stream."""
    from tkg import codec

    ks: list[list[np.ndarray]] = [[], []]
    vs: list[list[np.ndarray]] = [[], []]
    for m in client.export_sequence(sid)[1:]:
        ks[m.layer].append(codec.decode(m.k, "k"))
        vs[m.layer].append(codec.decode(m.v, "v"))
    empty = np.zeros((0, HKV, D), np.float32)
    return [np.concatenate(k) if k else empty for k in ks], [np.concatenate(v) if v else empty for v in vs]


def _check_comes_back(client: Client, mirror: Mirror, sid: str, rng: np.random.Generator) -> int:
    """`sid` is back at a length within what was sent, K/V exactly the client's, and
    a step from there decodes like the oracle; returns that length."""
    lengths = list(client.get_sequence(sid).lengths)
    n = lengths[0]
    # Its last whole block, or all of it when it rested in the disk tier at the kill (a spill file
    # is written whole, and removed the moment the sequence comes back and can change).
    assert lengths == [n, n], lengths
    assert all(n <= len(mirror.k[sid][layer]) for layer in range(2)), (sid, n)
    k, v = _kv_of(client, sid)
    for layer in range(2):
        np.testing.assert_array_equal(k[layer], mirror.k[sid][layer][:n])
        np.testing.assert_array_equal(v[layer], mirror.v[sid][layer][:n])
    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
    kn, vn = (rng.standard_normal((1, HKV, 1, D)).astype(np.float32) for _ in range(2))
    out = client.decode(0, [sid], [n], q, kn, vn).out
    K = np.concatenate([mirror.k[sid][0][:n], kn[0].transpose(1, 0, 2)])
    V = np.concatenate([mirror.v[sid][0][:n], vn[0].transpose(1, 0, 2)])
    np.testing.assert_allclose(out[0], naive_decode(q[0], K, V, SCALE), rtol=1e-5, atol=1e-5)
    return n


def test_sigkill_under_load_comes_back_at_the_last_written_block(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    # 12 device blocks for 6 sequences growing past 2 blocks each: spills to disk happen under load too
    flags = (*GEOMETRY, "--num-blocks", "12", "--spill-dir", str(spill), "--persist", "write-back")
    sids = [f"s{i}" for i in range(6)]
    mirror = Mirror(sids)
    server = start_server(*flags)
    request.addfinalizer(lambda s=server: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    stop = threading.Event()
    rng = np.random.default_rng(5)
    with Client(server.target) as c:
        for s in sids:
            c.create_sequence(s)
        for s in sids:  # a prompt of 6 tokens at both layers
            for layer in range(2):
                k, v = (rng.standard_normal((6, HKV, D)).astype(np.float32) for _ in range(2))
                mirror.add(s, layer, k, v)
                c.append_kv(s, layer, k, v, position=0)
        c.truncate("s2", 5)
        mirror.cut("s2", 5)

        def load() -> None:  # decode steps of every sequence, both layers, until the kill
            while not stop.is_set():
                for s in sids:
                    n = len(mirror.k[s][0])
                    if n >= 60:
                        continue
                    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
                    for layer in range(2):
                        k, v = (rng.standard_normal((1, HKV, 1, D)).astype(np.float32) for _ in range(2))
                        mirror.add(s, layer, k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2))  # sent: counted
                        try:
                            c.decode(layer, [s], [n], q, k, v)
                        except TkgError as exc:
                            errors.append(exc)
                            return  # killed

        errors: list[TkgError] = []
        worker = threading.Thread(target=load)
        worker.start()
        try:  # the kill lands once write-back has logged whole blocks of every sequence, mid-load
            wait_for(lambda: len(list(spill.glob("*.wb"))) == len(sids), what="a log per sequence", proc=server.proc)
            wait_for(lambda: errors or min(len(mirror.k[s][1]) for s in sids) >= 3 * BL, what="load", proc=server.proc)
            assert not errors, errors
            server.stop(signal.SIGKILL)
        finally:
            stop.set()
            worker.join(30)
    second = start_server(*flags)
    request.addfinalizer(lambda s=second: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    try:
        with Client(second.target) as c:
            back = {s: _check_comes_back(c, mirror, s, np.random.default_rng(9)) for s in sids}
        assert sum(back.values()) > 0, back  # some blocks were written before the kill
    finally:
        second.stop()


def test_a_truncation_is_persisted_before_it_is_acknowledged(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    flags = (*GEOMETRY, "--num-blocks", "16", "--spill-dir", str(spill), "--persist", "write-back")
    mirror = Mirror(["a"])
    rng = np.random.default_rng(2)
    server = start_server(*flags)
    request.addfinalizer(lambda s=server: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    with Client(server.target) as c:
        c.create_sequence("a")
        for layer in range(2):
            k, v = (rng.standard_normal((12, HKV, D)).astype(np.float32) for _ in range(2))
            mirror.add("a", layer, k, v)
            c.append_kv("a", layer, k, v, position=0)
        def logged_blocks() -> int:
            logs = list(spill.glob("*.wb"))
            return len(spill_files.read_log(logs[0])[1]) if logs else 0

        wait_for(lambda: logged_blocks() == 3, what="three blocks in the log", proc=server.proc)
        c.truncate("a", 5)  # acknowledged: the log holds one block now
        server.stop(signal.SIGKILL)
    mirror.cut("a", 5)
    second = start_server(*flags)
    request.addfinalizer(lambda s=second: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    try:
        with Client(second.target) as c:
            assert _check_comes_back(c, mirror, "a", rng) == BL  # never the 12 tokens rolled back
    finally:
        second.stop()


def test_a_torn_log_tail_is_cut_back_to_the_last_whole_block(tmp_path: Path) -> None:
    header = spill_files.FileHeader("a", (), 0, 0.0, 0, "float32", (2, 2, HKV, BL, D), 0)
    path = tmp_path / "a.wb"
    spill_files.create_log(path, header)
    blocks = np.random.default_rng(0).standard_normal((3, 2, 2, HKV, BL, D)).astype(np.float32)
    spill_files.append_blocks(path, 0, blocks)
    whole = path.stat().st_size
    path.write_bytes(path.read_bytes()[: whole - 100])  # a kill mid-write of the third block
    _, got = spill_files.read_log(path)
    np.testing.assert_array_equal(got, blocks[:2])
    spill_files.append_blocks(path, 2, blocks[2:])  # the file was cut back: appending goes on cleanly
    np.testing.assert_array_equal(spill_files.read_log(path)[1], blocks)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # a flipped bit in the last block: its crc fails, it is cut off too
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(spill_files.read_log(path)[1], blocks[:2])
