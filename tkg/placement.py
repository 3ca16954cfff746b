"""Which replica owns a sequence: rendezvous (highest-random-weight) hashing, shared by the client
(routing every call) and the server (a draining replica pushing its sequences to the replica the
clients will pick once it is gone), so both always agree.

A replica is named by the exact target string clients use ("host:port"): the hash covers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def score(replica: str, seq_id: str) -> int:
    """Stable across processes (blake2b, not Python's salted `hash`)."""
    h = hashlib.blake2b(f"{replica}\x00{seq_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def pick(replicas: Sequence[str], seq_id: str) -> int:
    """Index of the replica that owns `seq_id`."""
    if not replicas:
        raise ValueError("replicas: empty; expected at least one target")
    return max(range(len(replicas)), key=lambda i: score(replicas[i], seq_id))


def ranking(replicas: Sequence[str], seq_id: str) -> list[int]:
    """Replica indices by descending score for `seq_id`: `ranking(...)[0] == pick(...)`. The
    client's context-parallel segments of `seq_id` live on its first, second, ... replica."""
    if not replicas:
        raise ValueError("replicas: empty; expected at least one target")
    return sorted(range(len(replicas)), key=lambda i: score(replicas[i], seq_id), reverse=True)
