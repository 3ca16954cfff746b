"""Sequence-affine routing over replicas: rendezvous (highest-random-weight) hashing.

A sequence's KV cache lives on one replica, so every call about it must reach that replica.
Rendezvous hashing picks, for each sequence id, the replica with the highest hash(replica, id):
stable across processes (blake2b, not Python's salted `hash`), and adding or removing one replica
moves only the sequences that hash to it (about 1/n of them). The hash lives in `tkg.placement`,
shared with the server's drain (which pushes sequences where this routing will look for them).

A drained replica's sequences live on another replica from then on, also once it is back (a rolling
update restarts it under the same name). `Router` therefore remembers the sequences found away from
their owner: a call that meets NOT_FOUND or UNAVAILABLE at a sequence's replica looks for it on the
others (`Router.candidates`, the order a drain picks from) and, found, follows it there.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from tkg.placement import pick, score

__all__ = ["Lookup", "Router", "group", "pick", "resolve_targets", "score"]


def group(replicas: Sequence[str], seq_ids: Sequence[str]) -> dict[int, list[int]]:
    """Replica index -> positions in `seq_ids` it owns (in the caller's order)."""
    groups: dict[int, list[int]] = {}
    for pos, sid in enumerate(seq_ids):
        groups.setdefault(pick(replicas, sid), []).append(pos)
    return groups


class Router:
    """Which replica each sequence is on: its rendezvous owner, unless it was found on another.

    Only sequences found away from their owner are remembered (`moved`), until `forget`."""

    def __init__(self, targets: Sequence[str]) -> None:
        self.targets = list(targets)
        self._moved: dict[str, int] = {}
        self._placed: dict[str, int] = {}  # context-parallel segments: placed by their sequence's ranking

    def owner(self, seq_id: str) -> int:
        """The replica `seq_id` belongs on: where it was placed (`place`), else its rendezvous pick."""
        where = self._placed.get(seq_id)
        return pick(self.targets, seq_id) if where is None else where

    def place(self, seq_id: str, replica: int) -> None:
        """`seq_id` belongs on `replica` rather than on its own pick (a segment, `tkg.client.segments`)."""
        if len(self.targets) > 1:
            self._placed[seq_id] = replica

    def home(self, seq_id: str) -> int:
        """Index of the replica to call about `seq_id`."""
        if len(self.targets) == 1:
            return 0
        where = self._moved.get(seq_id)
        return self.owner(seq_id) if where is None else where

    def group(self, seq_ids: Sequence[str]) -> dict[int, list[int]]:
        """Replica index -> positions in `seq_ids` it holds (in the caller's order)."""
        if not self._moved and not self._placed:
            return group(self.targets, seq_ids) if len(self.targets) > 1 else {0: list(range(len(seq_ids)))}
        groups: dict[int, list[int]] = {}
        for pos, sid in enumerate(seq_ids):
            groups.setdefault(self.home(sid), []).append(pos)
        return groups

    def candidates(self, seq_id: str, failed: int) -> list[int]:
        """Where else `seq_id` may be, most likely first: every other replica by descending
        rendezvous score. A replica draining with --peers pushes each sequence to the highest
        scoring one of the others, so the first candidate is where a drain put it."""
        others = [i for i in range(len(self.targets)) if i != failed]
        return sorted(others, key=lambda i: score(self.targets[i], seq_id), reverse=True)

    def moved(self, seq_id: str, replica: int) -> None:
        """`seq_id` was found on `replica`."""
        if len(self.targets) > 1 and replica == self.owner(seq_id):
            self._moved.pop(seq_id, None)
        elif len(self.targets) > 1:
            self._moved[seq_id] = replica

    def forget(self, seq_id: str) -> None:
        self._moved.pop(seq_id, None)
        self._placed.pop(seq_id, None)

    def __len__(self) -> int:
        """How many sequences are remembered away from their owner."""
        return len(self._moved)


T = TypeVar("T")


class Lookup(NamedTuple):
    """A lookup a search asks for: GetSequence of `sequence_id` at replica index `replica`; what it
    found is sent back (the `SequenceInfo`, or None: not there or no answer)."""

    replica: int
    sequence_id: str


Search = Generator[Lookup, Any, T]


def locate(
    router: Router, seq_ids: Sequence[str], failed: int, found: Callable[[int, str, Any], None]
) -> Search[set[int] | None]:
    """Look for each of `seq_ids` on the replicas other than `failed`, in the order a drain
    picks, without doing any I/O: yields `Lookup`s, is sent what each found (a `SequenceInfo`, or
    None), records every find in `router` and calls `found(replica, id, info)`. Returns the
    replicas holding them, or None when one was found nowhere. `tkg.client.core` runs it inside
    its verdict on a failed call; the sync and the asyncio client answer the lookups."""
    where: set[int] = set()
    for sid in seq_ids:
        for r in router.candidates(sid, failed):
            info = yield Lookup(r, sid)
            if info is None:
                continue
            router.moved(sid, r)
            found(r, sid, info)
            where.add(r)
            break
        else:
            return None
    return where


def resolve_targets(target: str | Sequence[str]) -> list[str]:
    """Expand targets (`host:port`, `unix:PATH`): a list, a comma list, or `dns:///name:port` (every A/AAAA record,
    e.g. a Kubernetes headless Service resolving to the StatefulSet's pods)."""
    items = [target] if isinstance(target, str) else list(target)
    out: list[str] = []
    for item in items:
        for t in (s.strip() for s in item.split(",")):
            if not t:
                continue
            if t.startswith("dns:///"):
                host, _, port = t[len("dns:///") :].rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"target: {t!r}; expected dns:///name:port")
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                addrs = sorted({(i[4][0]) for i in infos})
                out.extend(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs)
            else:
                out.append(t)
    if not out:
        raise ValueError(f"target: {target!r}; expected host:port, unix:PATH, a list of them, or dns:///name:port")
    return out
