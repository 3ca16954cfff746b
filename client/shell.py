"""`Shell`: what the two client shells (`Client`, `AsyncClient`) hold alike: the replicas' targets,
one channel and stub per replica, the metadata every call carries, and the `Core` that decides.
The shells differ only in how they make the calls the core asks for (blocking or awaited)."""

from __future__ import annotations

from collections.abc import Sequence

from tkg.client import routing
from tkg.client.core import Core
from tkg.client.messages import DEFAULT_MAX_MESSAGE, auth_metadata, open_channels, stub, uses_tls


class Shell:
    """A client's connections and core; `AIO` says which gRPC stack its channels use (the
    arguments are documented on `tkg.client.Client`)."""

    AIO = False

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        segment_tokens: int | None = None,
    ) -> None:
        self.targets = routing.resolve_targets(target)
        self.timeout = timeout
        self._metadata = auth_metadata(metadata, token)
        self._channels = open_channels(
            self.targets, aio=self.AIO, tls=tls, root_certificates=root_certificates,
            certificate_chain=certificate_chain, private_key=private_key,
            max_message_bytes=max_message_bytes,
        )  # fmt: skip
        self._stubs = [stub(c) for c in self._channels]
        self._core = Core(
            self.targets, segment_tokens, plaintext=not uses_tls(tls, root_certificates, certificate_chain)
        )
        self._segments = self._core.segments  # None unless segment_tokens: then every sequence is segmented

    def _replica(self, seq_id: str) -> int:
        return self._core.replica(seq_id)
