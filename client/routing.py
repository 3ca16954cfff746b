"""Sequence-affine routing over replicas: rendezvous (highest-random-weight) hashing.

A sequence's KV cache lives on one replica, so every call about it must reach that replica.
Rendezvous hashing picks, for each sequence id, the replica with the highest hash(replica, id):
stable across processes (blake2b, not Python's salted `hash`), and adding or removing one replica
moves only the sequences that hash to it (about 1/n of them). The hash lives in `tkg.placement`,
shared with the server's drain (which pushes sequences where this routing will look for them).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from tkg.placement import pick, score

__all__ = ["group", "pick", "resolve_targets", "score"]


def group(replicas: Sequence[str], seq_ids: Sequence[str]) -> dict[int, list[int]]:
    """Replica index -> positions in `seq_ids` it owns (in the caller's order)."""
    groups: dict[int, list[int]] = {}
    for pos, sid in enumerate(seq_ids):
        groups.setdefault(pick(replicas, sid), []).append(pos)
    return groups


def resolve_targets(target: str | Sequence[str]) -> list[str]:
    """Expand targets: a list, a comma list, or `dns:///name:port` (every A/AAAA record,
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
        raise ValueError(f"target: {target!r}; expected host:port, a list of them, or dns:///name:port")
    return out
