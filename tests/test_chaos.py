"""Chaos: three replicas (each started with `--peers` naming the other two) under `tkg loadtest`.

While the load runs: one replica is SIGKILLed (only its sequences fail: UNAVAILABLE while it is
down, then `ServerRestarted` once it is back on its port, empty); then another is drained with
SIGTERM and moves every resident sequence (ours and the load test's) to the replica that the
client's routing over the remaining two picks: none is lost, and each of ours decodes there to
exactly what it gave before. The load test itself never sees INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from support.mirror import scrape
from support.server_proc import free_port, start_server
from support.wait import wait_for

from tkg.client import Client, errors, routing

HQ, HKV, D = 4, 2, 16
GEOMETRY = ("--backend", "cpu", "--num-layers", "2", "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
            "--head-dim", str(D), "--block-len", "8", "--num-blocks", "512", "--max-context", "256",
            "--kv-dtype", "float32", "--fuse-rope", "true", "--grace-s", "30")  # fmt: skip


def rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ids_per_replica(targets: list[str], n: int) -> dict[str, int]:
    """`n` sequence ids homed on each replica (id -> replica index), by the client's own routing:
    the first names chaos-0, chaos-1, ... that fill each replica's share, so every replica (the
    killed, the drained and the survivor) always holds some."""
    homes: dict[str, int] = {}
    count = [0] * len(targets)
    names = (f"chaos-{i}" for i in itertools.count())
    while min(count) < n:
        sid = next(names)
        home = routing.pick(targets, sid)
        if count[home] < n:
            homes[sid] = home
            count[home] += 1
    return homes


def test_kill_one_replica_and_drain_another_under_load(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    targets = [f"127.0.0.1:{p}" for p in ports]

    def replica(i: int) -> object:
        peers = ",".join(t for j, t in enumerate(targets) if j != i)
        return start_server(*GEOMETRY, "--port", str(ports[i]), "--peers", peers)

    servers = [replica(i) for i in range(3)]
    load = None
    try:
        c = Client(targets, timeout=30)
        homes = ids_per_replica(targets, 6)
        sids = [c.create_sequence(s).sequence_id for s in homes]
        for s in sids:
            c.append_kv(s, 0, rand((20, HKV, D), 1), rand((20, HKV, D), 2))
            c.append_kv(s, 1, rand((7, HKV, D), 3), rand((7, HKV, D), 4))
        q, k, v = rand((1, HQ, 1, D), 5), rand((1, HKV, 1, D), 6), rand((1, HKV, 1, D), 7)
        expect = {}
        for s in sids:  # each one's next answer, taken from a fork (then released)
            f = c.fork(s).sequence_id
            expect[s] = c.decode(0, [f], [20], q, k, v).out
            c.release(f)
        def decodes(i: int) -> float:
            m = scrape(servers[i].metrics_port)
            return m.get('tkg_request_duration_seconds_count{code="OK",method="Decode"}', 0.0)

        ours = [decodes(i) for i in range(3)]
        report = tmp_path / "load.json"
        tkg = Path(sys.executable).parent / "tkg"
        load = subprocess.Popen(
            [str(tkg), "loadtest", *(a for t in targets for a in ("--target", t)), "--insecure", "-c", "3",
             "--duration", "15", "--context", "16", "--layers", "2", "--max-new-tokens", "32", "--warmup", "3",
             "--timeout", "5", "--progress", "off", "--json", str(report)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        victim, drained, survivor = 0, 1, 2

        for i in range(3):
            wait_for(lambda i=i: decodes(i) > ours[i], timeout=60, what=f"the load to reach replica {i}")
        # 1. SIGKILL: only the victim's sequences fail.
        servers[victim].stop(signal.SIGKILL)
        for s in sids:
            if homes[s] == victim:
                try:
                    c.get_sequence(s)
                    raise AssertionError(f"{s} answered from a killed replica")
                except errors.Unavailable:
                    pass
            else:
                assert list(c.get_sequence(s).lengths) == [20, 7]
        servers[victim] = replica(victim)  # back on its port, empty
        seen: list[errors.TkgError] = []

        def answered(s: str) -> bool:
            try:
                c.get_sequence(s)
            except errors.Unavailable:
                return False  # until the channel reconnects
            except errors.TkgError as exc:
                seen.append(exc)
            return True

        lost = [s for s in sids if homes[s] == victim]
        wait_for(lambda: answered(lost[0]), timeout=30, what="the restarted replica to answer")
        assert isinstance(seen[-1], errors.ServerRestarted), seen[-1]
        # 2. SIGTERM with --peers: everything on `drained` moves; nothing is lost.
        assert servers[drained].stop(signal.SIGTERM, timeout=60) == 0
        out = servers[drained].proc.stdout.read()
        moved = [line for line in out.splitlines() if "drain moved" in line]
        assert moved and moved[0].endswith(" 0 could not move"), out
        n_moved = int(moved[0].split("drain moved ")[1].split()[0])
        assert n_moved >= sum(homes[s] == drained for s in sids)
        rest = [targets[victim], targets[survivor]]
        after = Client(rest, timeout=30)
        for s in sids:
            if homes[s] == victim:
                continue  # lost with the SIGKILL (the client was told: ServerRestarted)
            assert list(after.get_sequence(s).lengths) == [20, 7], s
            np.testing.assert_array_equal(after.decode(0, [s], [20], q, k, v).out, expect[s])
        # 3. The load test saw the failures as UNAVAILABLE / NOT_FOUND, never as a server bug.
        rc, text = load.wait(timeout=120), load.stdout.read()
        assert rc in (0, 1) and report.exists(), f"loadtest exit {rc}: {text}"
        codes = json.loads(report.read_text())["statusCodeDistribution"]
        assert codes.get("OK", 0) > 0 and not {"INTERNAL", "UNKNOWN"} & set(codes), codes
        print(f"chaos: drain moved {n_moved} sequences; loadtest codes {codes}")
        c.close()
        after.close()
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        for srv in servers:
            srv.stop(signal.SIGKILL)
