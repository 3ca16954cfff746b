"""Soak: several clients race create / append / decode / fork / truncate / release / cancel /
deadline-expiry on shared and private sequences of one server, for a bounded time (45 s;
`TKG_SOAK_S` for longer), checked against a numpy model.

The model is exact although the clients race:
- a *private* sequence has one writer, which keeps its K/V per layer. A decode that was cancelled
  or ran out of time may or may not have been applied: it is kept as *uncertain* and settled by
  the next write at that layer, which names its position: it succeeds (the lost step can never
  apply any more: its position is gone) or fails FAILED_PRECONDITION (it did apply, with the
  tokens the model holds for it);
- a *shared* sequence (any client may write, truncate, fork or release it) only ever holds
  `token(root, layer, position)`: every writer derives the K/V of a position from its family's
  root id, so whoever wins a race wrote the same values, and each successful decode at position p
  must equal attention over exactly those first p tokens plus the new one.
Every successful decode is checked against the model at once; at the end every surviving
sequence is decoded once more at every layer, nothing got INTERNAL/UNKNOWN, and after releasing
everything the free block count is back where it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.oracle import naive_decode
from support.server_proc import start_server

from tkg.client import AsyncClient, errors

SOAK_S = float(os.environ.get("TKG_SOAK_S", "45"))
CLIENTS = 4
L, HQ, HKV, D, BL, MAX_CONTEXT, BLOCKS = 2, 4, 2, 16, 8, 96, 512
ARGS = ("--backend", "cpu", "--num-layers", str(L), "--num-q-heads", str(HQ), "--num-kv-heads", str(HKV),
        "--head-dim", str(D), "--block-len", str(BL), "--num-blocks", str(BLOCKS), "--max-context", str(MAX_CONTEXT),
        "--kv-dtype", "float32", "--fuse-rope", "false", "--max-batch", "8", "--batch-delay-us", "300",
        "--inline-kernel-bytes", "0")  # every launch on the kernel thread, where it could race  # fmt: skip
# Codes a racing client may legitimately get (anything else fails the test).
EXPECTED = {
    grpc.StatusCode.FAILED_PRECONDITION,  # lost a race for a position
    grpc.StatusCode.NOT_FOUND,  # a shared sequence released by someone else
    grpc.StatusCode.OUT_OF_RANGE,  # truncating past a length someone else just shortened
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # blocks or queue full
    grpc.StatusCode.DEADLINE_EXCEEDED,  # on purpose
    grpc.StatusCode.CANCELLED,  # on purpose
}


def token(root: str, layer: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """The k, v `[Hkv, D]` every writer of a shared family puts at (layer, pos)."""
    seed = int.from_bytes(hashlib.blake2b(f"{root}/{layer}/{pos}".encode(), digest_size=8).digest(), "big")
    r = np.random.default_rng(seed).standard_normal((2, HKV, D)).astype(np.float32)
    return r[0], r[1]


def attention(q: np.ndarray, K: np.ndarray, V: np.ndarray) -> np.ndarray:
    """q `[HQ, D]` (the newest token's query), K/V `[T, HKV, D]` -> `[HQ, D]`, by the test oracle."""
    return naive_decode(q[:, None], K, V, 1 / np.sqrt(D))[:, 0]


@dataclass
class Private:
    k: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in range(L)])  # per layer [HKV, D] rows
    v: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in range(L)])
    uncertain: dict[int, tuple[int, np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (pos, k, v)
    log: list[str] = field(default_factory=list)

    def length(self, layer: int) -> int:
        return len(self.k[layer])


@dataclass
class World:
    shared: dict[str, str] = field(default_factory=dict)  # shared sequence id -> family root
    codes: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # unexpected codes and wrong answers
    checked: int = 0
    created: set[str] = field(default_factory=set)

    def count(self, what: str) -> None:
        self.codes[what] = self.codes.get(what, 0) + 1


class Worker:
    def __init__(self, n: int, client: AsyncClient, world: World, stop_at: float) -> None:
        self.n, self.c, self.w, self.stop_at = n, client, world, stop_at
        self.rng = random.Random(n)
        self.nrng = np.random.default_rng(n)
        self.private: dict[str, Private] = {}

    async def call(self, coro: object) -> object:
        """Await an RPC; expected failures return the error, anything else is recorded as bad."""
        try:
            result = await coro
        except errors.TkgError as exc:
            self.w.count(exc.code.name)
            if exc.code not in EXPECTED:
                self.w.bad.append(f"client {self.n}: {exc}")
            return exc
        self.w.count("OK")
        return result

    # ---- private sequences ---------------------------------------------------------------

    async def p_create(self) -> None:
        info = await self.call(self.c.create_sequence())
        if not isinstance(info, errors.TkgError):
            self.private[info.sequence_id] = Private()
            self.w.created.add(info.sequence_id)

    async def p_decode(self, sid: str, layer: int, how: str = "plain") -> None:
        m = self.private[sid]
        if layer in m.uncertain:  # one unknown at a time: this write settles it (see the module docstring)
            how = "plain"
        pos = m.length(layer)
        q = self.nrng.standard_normal((1, HQ, 1, D)).astype(np.float32)
        k = self.nrng.standard_normal((1, HKV, 1, D)).astype(np.float32)
        v = self.nrng.standard_normal((1, HKV, 1, D)).astype(np.float32)
        coro = self.c.decode(layer, [sid], [pos], q, k, v, timeout=1e-4 if how == "deadline" else None)
        if how == "cancel":
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(self.rng.random() * 2e-3)
            task.cancel()
            try:
                res = await task
            except asyncio.CancelledError:
                self.w.count("CANCELLED")
                res = None
            except errors.TkgError as exc:
                res = exc
                self.w.count(exc.code.name)
                if exc.code not in EXPECTED:
                    self.w.bad.append(f"client {self.n}: {exc}")
        else:
            res = await self.call(coro)
        m.log.append(f"decode@{layer} pos {pos} {how}: {type(res).__name__} {getattr(res, 'details', '')[:90]}")
        if isinstance(res, errors.FailedPrecondition) and layer in m.uncertain:
            # The lost step did apply: it holds the tokens the model kept for it.
            upos, uk, uv = m.uncertain.pop(layer)
            assert upos == pos, (upos, pos)
            m.k[layer].append(uk)
            m.v[layer].append(uv)
            return await self.p_decode(sid, layer)
        if res is None or isinstance(res, (errors.DeadlineExceeded, errors.Cancelled)):
            m.uncertain[layer] = (pos, k[0, :, 0], v[0, :, 0])
            return
        if isinstance(res, errors.FailedPrecondition):  # one writer, nothing uncertain: the model is right
            self.w.bad.append(f"client {self.n}: private {sid} refused at layer {layer} position {pos}: {res}")
        if isinstance(res, errors.TkgError):
            return
        m.uncertain.pop(layer, None)  # its position is taken now: it can never apply
        m.k[layer].append(k[0, :, 0])
        m.v[layer].append(v[0, :, 0])
        self.check(res.out[0, :, 0], q[0, :, 0], np.stack(m.k[layer]), np.stack(m.v[layer]), f"private {sid}@{layer}",
                   m.log)

    async def p_settle(self, sid: str) -> None:
        for layer in list(self.private[sid].uncertain):
            await self.p_decode(sid, layer)

    async def p_append(self, sid: str) -> None:
        m = self.private[sid]
        layer = self.rng.randrange(L)
        if layer in m.uncertain:
            return await self.p_decode(sid, layer)
        T = self.rng.randint(1, 12)
        if m.length(layer) + T > MAX_CONTEXT - 4:
            return
        k = self.nrng.standard_normal((T, HKV, D)).astype(np.float32)
        v = self.nrng.standard_normal((T, HKV, D)).astype(np.float32)
        res = await self.call(self.c.append_kv(sid, layer, k, v, position=m.length(layer), chunk_tokens=5))
        m.log.append(f"append@{layer} pos {m.length(layer)} T {T}: {type(res).__name__}")
        if isinstance(res, errors.TkgError):
            # Chunks before the failing one stay appended (AppendKV's contract): resync the length.
            info = await self.call(self.c.get_sequence(sid))
            got = info.lengths[layer] - m.length(layer)
            m.k[layer].extend(k[:got])
            m.v[layer].extend(v[:got])
            return
        m.k[layer].extend(k)
        m.v[layer].extend(v)

    async def p_truncate(self, sid: str) -> None:
        await self.p_settle(sid)
        m = self.private[sid]
        length = self.rng.randint(0, min(m.length(layer) for layer in range(L)))
        res = await self.call(self.c.truncate(sid, length))
        m.log.append(f"truncate {length}: {type(res).__name__}")
        if not isinstance(res, errors.TkgError):
            for layer in range(L):
                del m.k[layer][length:], m.v[layer][length:]

    async def p_fork(self, sid: str) -> None:
        await self.p_settle(sid)
        res = await self.call(self.c.fork(sid))
        if not isinstance(res, errors.TkgError):
            m = self.private[sid]
            copy = Private([list(x) for x in m.k], [list(x) for x in m.v], log=[*m.log, "fork"])
            self.private[res.sequence_id] = copy
            self.w.created.add(res.sequence_id)

    async def p_release(self, sid: str) -> None:
        await self.p_settle(sid)
        res = await self.call(self.c.release(sid))
        if not isinstance(res, errors.TkgError):
            del self.private[sid]

    # ---- shared sequences ----------------------------------------------------------------

    async def s_create(self) -> None:
        info = await self.call(self.c.create_sequence())
        if not isinstance(info, errors.TkgError):
            self.w.shared[info.sequence_id] = info.sequence_id
            self.w.created.add(info.sequence_id)

    async def s_decode(self, sid: str) -> None:
        root = self.w.shared.get(sid)
        info = await self.call(self.c.get_sequence(sid))
        if root is None or isinstance(info, errors.TkgError):
            return
        layer = self.rng.randrange(L)
        pos = info.lengths[layer]
        if pos >= MAX_CONTEXT - 4:
            await self.call(self.c.truncate(sid, self.rng.randint(0, 20)))
            return
        q = self.nrng.standard_normal((1, HQ, 1, D)).astype(np.float32)
        k, v = token(root, layer, pos)
        res = await self.call(self.c.decode(layer, [sid], [pos], q, k[None, :, None], v[None, :, None]))
        if isinstance(res, errors.TkgError):
            return
        K, V = zip(*(token(root, layer, p) for p in range(pos + 1)), strict=True)
        self.check(res.out[0, :, 0], q[0, :, 0], np.stack(K), np.stack(V), f"shared {sid}@{layer}")

    async def s_truncate(self, sid: str) -> None:
        info = await self.call(self.c.get_sequence(sid))
        if not isinstance(info, errors.TkgError):
            await self.call(self.c.truncate(sid, self.rng.randint(0, min(info.lengths))))

    async def s_fork(self, sid: str) -> None:
        root = self.w.shared.get(sid)
        res = await self.call(self.c.fork(sid))
        if root is not None and not isinstance(res, errors.TkgError):
            self.w.shared[res.sequence_id] = root
            self.w.created.add(res.sequence_id)

    async def s_release(self, sid: str) -> None:
        if len(self.w.shared) > 3:
            self.w.shared.pop(sid, None)
            await self.call(self.c.release(sid))

    # ---- the loop ------------------------------------------------------------------------

    def check(
        self, got: np.ndarray, q: np.ndarray, K: np.ndarray, V: np.ndarray, sid: str, log: list[str] = ()
    ) -> None:
        want = attention(q, K, V)
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            self.w.bad.append(f"client {self.n}: wrong output for {sid} at length {len(K)}: "
                              f"max error {np.abs(got - want).max():.3g}; history {log[-12:]}")  # fmt: skip
        self.w.checked += 1

    async def run(self) -> None:
        while time.monotonic() < self.stop_at:
            r = self.rng.random()
            if r < 0.45 and self.w.shared:
                sid = self.rng.choice(list(self.w.shared))
                op = self.rng.choices([self.s_decode, self.s_truncate, self.s_fork, self.s_release], [8, 2, 1, 1])[0]
                await op(sid)
            elif r < 0.5 and len(self.w.shared) < 8:
                await self.s_create()
            elif not self.private or (r < 0.55 and len(self.private) < 6):
                await self.p_create()
            else:
                sid = self.rng.choice(list(self.private))
                layer = self.rng.randrange(L)
                if self.private[sid].length(layer) >= MAX_CONTEXT - 4:
                    await self.p_truncate(sid)
                    continue
                how = self.rng.choices(["plain", "cancel", "deadline"], [8, 1, 1])[0]
                op = self.rng.choices(["decode", "append", "truncate", "fork", "release"], [10, 3, 2, 1, 1])[0]
                if op == "decode":
                    await self.p_decode(sid, layer, how)
                else:
                    await getattr(self, f"p_{op}")(sid)
            if self.w.bad:
                return

    async def final_check(self) -> None:
        """Every surviving private sequence decodes to the model at every layer."""
        for sid, m in list(self.private.items()):
            await self.p_settle(sid)
            for layer in range(L):
                await self.p_decode(sid, layer)
            assert list((await self.c.get_sequence(sid)).lengths) == [m.length(x) for x in range(L)], sid


# pytest-timeout's 300 s (pyproject) would kill a longer soak (`TKG_SOAK_S=600`): the bound is the
# soak's own length plus those 300 s for start-up and the final checks.
TIER_BLOCKS = 48  # with tiers: a device pool far below what the clients hold, so spills and restores never stop


def _spills(metrics_port: int) -> float:
    """`tkg_kv_spills_total`, summed over tiers, from the server's metrics endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("tkg_kv_spills_total{"))


@pytest.mark.timeout(SOAK_S + 300)
@pytest.mark.parametrize("tiers", [False, True], ids=["device", "tiers"])
def test_soak_racing_clients_match_the_numpy_model(tiers: bool, tmp_path: Path) -> None:
    """With `tiers`: a 48-block device pool, a host tier and a disk tier, for two thirds of the
    soak's time; every rule above holds, and spills happened."""
    args = ARGS
    soak_s = SOAK_S
    if tiers:
        block = 2 * L * HKV * BL * D * 4
        args = (*ARGS, "--num-blocks", str(TIER_BLOCKS), "--host-cache-bytes", str(64 * block),
                "--spill-dir", str(tmp_path / "spill"))  # fmt: skip
        soak_s = SOAK_S * 2 / 3
    srv = start_server(*args)
    blocks = TIER_BLOCKS if tiers else BLOCKS
    try:
        async def main() -> World:
            world = World()
            clients = [AsyncClient(srv.target, timeout=30) for _ in range(CLIENTS)]
            start = (await clients[0].server_info()).free_blocks
            assert start == blocks
            stop_at = time.monotonic() + soak_s
            workers = [Worker(n, c, world, stop_at) for n, c in enumerate(clients)]
            await asyncio.gather(*(w.run() for w in workers))
            assert not world.bad, world.bad[:5]
            for w in workers:
                await w.final_check()
            for sid in list(world.shared):  # shared: one more checked step each, then out
                await workers[0].s_decode(sid)
            assert not world.bad, world.bad[:5]
            for sid in world.created:
                with contextlib.suppress(errors.NotFound):
                    await clients[0].release(sid)
            info = await clients[0].server_info()
            assert (info.free_blocks, info.active_sequences) == (start, 0)
            for c in clients:
                await c.close()
            return world

        world = asyncio.run(main())
        print(f"soak {soak_s:.0f}s: {world.checked} outputs checked, codes {world.codes}")
        if tiers:
            assert srv.metrics_port is not None
            spills = _spills(srv.metrics_port)
            print(f"soak with tiers: {spills:.0f} spills")
            assert spills > 10
        assert world.checked > 50 and "INTERNAL" not in world.codes and "UNKNOWN" not in world.codes
        assert world.codes.get("CANCELLED", 0) + world.codes.get("DEADLINE_EXCEEDED", 0) > 0
    finally:
        srv.stop(signal.SIGKILL)
