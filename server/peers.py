"""The other replicas: how this one reaches them (`PeerLink`) and which `--peers` entries are
this replica itself (`SelfFinder`), so that every replica can be started with one shared list.

Without `--advertise` a shared `--peers a,b,c` names this replica too, and a drain that pushed a
sequence to its own entry would meet its own refusal (a draining server answers UNAVAILABLE) and
lose the sequence. `SelfFinder` asks each entry for `ServerInfo.instance_id` and compares it with
this instance's (random per process start, so only this process can answer with it): an entry
that answers with ours is this replica, and the drain leaves it out. It asks while this instance
still serves, since a draining one refuses its own calls too: in the background from the moment
it is SERVING until every entry has answered once (replicas start in any order, so it asks again
with a growing pause), then once more, briefly, at the start of a drain for the entries still
unknown. An entry never reached counts as another replica: a list naming only the other
replicas (or one with `--advertise`, which drops its own entry before this runs) works as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")

ASK_TIMEOUT_S = 2.0  # one round of asks in the background (a replica that is up answers in ms)
FIRST_PAUSE_S = 0.2  # between background rounds while some entry has not answered: doubling ...
MAX_PAUSE_S = 5.0  # ... up to this


@dataclass(frozen=True)
class PeerLink:
    """How this replica calls the others: channel credentials (None: plaintext), the gRPC channel
    options, and the metadata every call carries (the peer token)."""

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, object], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(target, self.credentials, options=list(self.options))
        return grpc.aio.insecure_channel(target, options=list(self.options))


class SelfFinder:
    """Which of `entries` (the `--peers` list) answer with `instance_id`, i.e. are this replica.

    Runs on the instance's event loop (`start`, `settle`, `close` from that loop)."""

    def __init__(self, entries: Sequence[str], instance_id: str, link: PeerLink) -> None:
        self.entries = tuple(entries)
        self.instance_id = instance_id
        self.link = link
        self.known: dict[str, bool] = {}  # entry -> it is this replica (entries that answered)
        self._task: asyncio.Task | None = None

    @property
    def unknown(self) -> list[str]:
        """Entries that have not answered yet."""
        return [e for e in self.entries if e not in self.known]

    def others(self) -> tuple[str, ...]:
        """The entries a drain may push to: all but those known to be this replica, in list order."""
        return tuple(e for e in self.entries if not self.known.get(e, False))

    def start(self) -> None:
        """Ask in the background until every entry has answered once."""
        if self._task is None and self.unknown:
            self._task = asyncio.get_running_loop().create_task(self._ask_until_known(), name="tkg-peers")

    async def settle(self, timeout_s: float) -> None:
        """Before a drain (this instance still serving): stop the background asks and ask the
        entries still unknown once more, waiting at most `timeout_s`."""
        await self.close()
        if self.unknown and timeout_s > 0:
            await self.ask(self.unknown, timeout_s)
        if self.unknown:
            log.warning("peers: %s never answered; a drain counts them as other replicas", ", ".join(self.unknown))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def ask(self, entries: Sequence[str], timeout_s: float) -> None:
        """Ask each of `entries` for its instance id at once; record those that answer."""
        channels = {e: self.link.channel(e) for e in entries}
        try:
            answers = await asyncio.gather(
                *(self._instance_of(ch, timeout_s) for ch in channels.values()), return_exceptions=True
            )
        finally:
            await asyncio.gather(*(ch.close() for ch in channels.values()), return_exceptions=True)
        for entry, answer in zip(entries, answers, strict=True):
            if isinstance(answer, str) and answer:
                self.known[entry] = answer == self.instance_id
                if self.known[entry]:
                    log.info("peers: %s is this replica (its instance id); a drain never pushes to it", entry)
            elif isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancelled: not an answer

    async def _instance_of(self, channel: grpc.aio.Channel, timeout_s: float) -> str:
        stub = pb_grpc.DecodeAttentionStub(channel)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout_s, metadata=self.link.metadata)
        return str(info.instance_id)

    async def _ask_until_known(self) -> None:
        pause = FIRST_PAUSE_S
        while True:
            await self.ask(self.unknown, ASK_TIMEOUT_S)
            if not self.unknown:
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)
