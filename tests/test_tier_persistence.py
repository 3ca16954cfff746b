"""KV state that outlives the process: `tkg serve --spill-dir` writes every sequence at a SIGTERM
drain without peers and serves them again after a restart (ids and tenants kept); a spec mismatch
refuses the directory naming the field; a corrupted file costs only its own sequence."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from support.server_proc import start_server

from tkg.client import Client
from tkg.client.errors import NotFound
from tkg.server import spill_files

GEOMETRY = ("--preset", "tiny", "--num-layers", "2", "--num-q-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
            "--block-len", "4", "--num-blocks", "16", "--max-context", "64", "--kv-dtype", "float32",
            "--backend", "reference")  # fmt: skip
N_SEQ, TOKENS = 6, 7


def _fill(client: Client, n: int = N_SEQ) -> None:
    rng = np.random.default_rng(3)
    for i in range(n):
        client.create_sequence(f"s{i}")
        for layer in range(2):
            k, v = (rng.standard_normal((TOKENS, 2, 16)).astype(np.float32) for _ in range(2))
            client.append_kv(f"s{i}", layer, k, v, position=0)


def _step(client: Client, sids: list[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = len(sids)
    q = rng.standard_normal((B, 4, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((B, 2, 1, 16)).astype(np.float32) for _ in range(2))
    return client.decode(0, sids, [TOKENS] * B, q, k, v).out


def _exports(client: Client) -> dict[str, list]:
    """Each sequence's ExportSequence stream (header first)."""
    return {f"s{i}": client.export_sequence(f"s{i}") for i in range(N_SEQ)}


def _kv(stream: list) -> list[bytes]:
    """A stream's K/V messages as bytes (the header carries the instance id: left out)."""
    return [m.SerializeToString() for m in stream[1:]]


def test_sigterm_without_peers_writes_every_sequence_and_a_restart_serves_them(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    # 16 blocks, 2 per sequence, a host tier of 4 sequences: some live on each tier at the SIGTERM
    flags = ("--spill-dir", str(spill), "--host-cache-bytes", str(4 * 2 * 2 * 2 * 2 * 4 * 16 * 4))
    first = start_server(*GEOMETRY, *flags, "--num-blocks", "6")
    request.addfinalizer(lambda s=first: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    with Client(first.target) as c:
        _fill(c)
        tiers = {c.get_sequence(f"s{i}").tier for i in range(N_SEQ)}
        want = _exports(c)  # restores them all, spilling others: every tier was used
        old_instance = c.server_info().instance_id
    assert {"device", "host"} <= tiers
    assert first.stop(signal.SIGTERM) == 0
    assert len(list(spill.glob("*.kv"))) == N_SEQ
    second = start_server(*GEOMETRY, *flags, "--num-blocks", "6")
    request.addfinalizer(lambda s=second: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    try:
        with Client(second.target) as c:
            assert c.server_info().instance_id != old_instance
            infos = [c.get_sequence(f"s{i}") for i in range(N_SEQ)]
            assert {i.tier for i in infos} == {"disk"} and all(list(i.lengths) == [TOKENS] * 2 for i in infos)
            assert {s: _kv(m) for s, m in _exports(c).items()} == {s: _kv(m) for s, m in want.items()}
            got = _step(c, ["s0", "s3", "s5"], seed=11)
        fresh = start_server(*GEOMETRY, "--num-blocks", "64")
        request.addfinalizer(lambda s=fresh: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
        try:
            with Client(fresh.target) as c:  # the same K/V that never left a process: the same numbers
                for sid in ("s0", "s3", "s5"):
                    c.import_sequence(want[sid])
                np.testing.assert_array_equal(_step(c, ["s0", "s3", "s5"], seed=11), got)
        finally:
            fresh.stop()
    finally:
        second.stop()


@pytest.mark.parametrize(("flag", "value", "field"), [("--block-len", "8", "block_len"), ("--kv-dtype", "bfloat16",
                                                        "kv_dtype")])  # fmt: skip
def test_a_spill_dir_of_another_spec_is_refused_naming_the_field(
    request: pytest.FixtureRequest, tmp_path: Path, flag: str, value: str, field: str
) -> None:
    spill = tmp_path / "spill"
    spill_files.check_spec(spill, {"probe": 1})  # the directory exists and has a spec
    spill.joinpath(spill_files.SPEC_FILE).unlink()
    first = start_server(*GEOMETRY, "--spill-dir", str(spill))
    request.addfinalizer(lambda s=first: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    first.stop()
    with pytest.raises(RuntimeError) as err:
        start_server(*GEOMETRY, flag, value, "--spill-dir", str(spill), timeout=30)
    text = str(err.value)
    assert f"field '{field}'" in text and "--spill-dir" in text


def test_a_corrupted_file_costs_only_its_own_sequence(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    flags = ("--spill-dir", str(spill))
    first = start_server(*GEOMETRY, *flags)
    request.addfinalizer(lambda s=first: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    with Client(first.target) as c:
        _fill(c)
        want = _exports(c)
    first.stop(signal.SIGTERM)
    files = {spill_files.read_header(p).sequence_id: p for p in spill.glob("*.kv")}
    payload = files["s1"]  # a flipped byte in the payload: found at restore, by its checksum
    raw = bytearray(payload.read_bytes())
    raw[spill_files.PAYLOAD_OFFSET + 3] ^= 0x40  # the header is under a page: this is payload
    payload.write_bytes(bytes(raw))
    header = files["s2"]  # a torn header: found at start, the file not loaded
    header.write_bytes(header.read_bytes()[:20])
    second = start_server(*GEOMETRY, *flags)
    request.addfinalizer(lambda s=second: s.stop(signal.SIGKILL))  # idempotent: no leak on failure
    try:
        with Client(second.target) as c:
            with pytest.raises(NotFound, match="checksum"):
                c.export_sequence("s1")
            for sid in ("s1", "s2"):
                with pytest.raises(NotFound):
                    c.get_sequence(sid)
            for i in (0, 3, 4, 5):
                assert _kv(c.export_sequence(f"s{i}")) == _kv(want[f"s{i}"])
    finally:
        second.stop()
    log = second.proc.stdout.read()  # type: ignore[union-attr]  # after the start-up line
    assert "sequence 's1' dropped" in log and "payload chunk 0 checksum mismatch" in log
    assert not header.exists() and not payload.exists()  # neither is loaded again at the next start
