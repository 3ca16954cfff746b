"""Telling a restarted replica from an expired sequence (`ServerRestarted`), for `tkg.client.core`.

Every `SequenceInfo` carries the answering server's `instance_id` (random per process start).
The client remembers, per sequence it created/forked/imported/appended to, the instance that
answered, and per replica the last instance seen. A NOT_FOUND about a sequence is then checked
with one GetServerInfo (error paths only): a different instance id means the replica restarted
and the error becomes `ServerRestarted` (a `NotFound` subclass); the same id means the sequence
really is unknown, released or expired.
"""

from __future__ import annotations

from tkg.client.errors import NotFound, ServerRestarted, TkgError


class Instances:
    """Per sequence: the instance it was last seen on; per replica: the last instance seen."""

    def __init__(self) -> None:
        self.of_sequence: dict[str, str] = {}
        self.of_replica: dict[int, str] = {}

    def note(self, replica: int, instance_id: str, seq_id: str | None = None) -> None:
        if not instance_id:  # a server from before instance ids
            return
        self.of_replica.setdefault(replica, instance_id)
        if seq_id:
            self.of_sequence[seq_id] = instance_id

    def forget(self, seq_id: str) -> None:
        self.of_sequence.pop(seq_id, None)

    def expected(self, replica: int, seq_ids: list[str]) -> str | None:
        """The instance the caller's sequences should be on (None: nothing known)."""
        for sid in seq_ids:
            if sid in self.of_sequence:
                return self.of_sequence[sid]
        return self.of_replica.get(replica)

    def verdict(self, err: TkgError, replica: int, seq_ids: list[str], current: str | None) -> TkgError:
        """`err` (a NotFound) as ServerRestarted when `current` differs from what was expected."""
        expected = self.expected(replica, seq_ids)
        if current:
            self.of_replica[replica] = current
        if not isinstance(err, NotFound) or not expected or not current or current == expected:
            return err
        for sid in seq_ids:
            self.of_sequence.pop(sid, None)
        return ServerRestarted(err.details, err.replica, expected, current)

