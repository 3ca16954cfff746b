"""Sequence migration: the ExportSequence stream, its all-or-nothing import, and the drain push.

Stream (`tkg.v1.SequenceChunk`, ExportSequence produces exactly what ImportSequence accepts):
message 0 carries `header` (lengths per layer, the geometry and KV dtype the values are stored
in, whether they are RoPE'd, how many K/V messages follow); then one message per run of at most
`chunk_tokens` tokens of one layer, layers in order, positions contiguous. K/V travel as cached
(after RoPE when the server fuses it), so an import stores them as they are.

Import checks the header's declared size against the tenant's quotas and the free blocks and
reserves those blocks before any K/V arrives; it validates every message as it arrives and
writes it into the reserved blocks (which no sequence names yet), then installs the sequence in
one step on the event loop by adopting them: a stream that is cut short, malformed, or does not
fit leaves nothing behind (the reservation is returned). K/V messages come layer by layer (each
layer complete before the next), positions contiguous: anything else is INVALID_ARGUMENT.

Drain (`push_all`): a stopping replica sends each resident sequence to the peer that rendezvous
hashing (`tkg.placement`, the clients' routing) picks among the peers, i.e. where clients routed
over the remaining replicas will look for it, and releases it locally once the peer has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from tkg import codec
from tkg.placement import pick
from tkg.server.errors import AlreadyExists, InvalidArgument, OutOfRange, pool_full
from tkg.server.kv_cache import KVCache, SequenceState
from tkg.v1 import decode_attention_pb2 as pb
from tkg.v1 import decode_attention_pb2_grpc as pb_grpc

log = logging.getLogger("tkg.server")

CHUNK_BYTES = 1 << 20  # K+V bytes per stream message (well under any message limit)


def chunk_tokens(cache: KVCache, max_message_bytes: int) -> int:
    """Tokens per K/V message: ~CHUNK_BYTES, at most a quarter of the message limit, >= 1."""
    per_token = 2 * cache.num_kv_heads * cache.head_dim * cache.dtype.itemsize
    return max(1, min(CHUNK_BYTES, max_message_bytes // 4) // per_token)


Source = tuple[SequenceState, Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]]


def export_messages(
    cache: KVCache, seq_id: str, dtype_code: int, fuse_rope: bool, instance_id: str, tokens: int,
    source: Source | None = None,
) -> Iterator[pb.SequenceChunk]:
    """The stream for `seq_id`: the header at once (lengths snapshot), K/V read lazily per message.

    `source`: (state, read(layer, start, end) -> k, v) of a sequence outside the cache (a KV tier's
    host run, `Tiers.host_source`); None: the cache's own. The caller keeps the sequence from being
    truncated or released while it iterates (appends past the snapshot are harmless: they write
    only later positions)."""
    if source is None:
        state = cache.get(seq_id)
        source = state, lambda layer, start, end: cache.read_tokens(seq_id, layer, start, end)
    state, read = source
    lengths, base = state.lengths, state.base_position
    runs = [(layer, start, min(start + tokens, n)) for layer, n in enumerate(lengths) for start in range(0, n, tokens)]
    header = pb.SequenceHeader(
        lengths=lengths, num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim,
        kv_dtype=dtype_code, fuse_rope=fuse_rope, chunks=len(runs), instance_id=instance_id, base_position=base,
    )  # fmt: skip
    yield pb.SequenceChunk(sequence_id=seq_id, header=header)
    for layer, start, end in runs:
        k, v = read(layer, start, end)
        msg = pb.SequenceChunk(sequence_id=seq_id, layer=layer, position=base + start)  # positions are absolute
        codec.encode(np.ascontiguousarray(k), msg.k)
        codec.encode(np.ascontiguousarray(v), msg.v)
        yield msg


def header_blocks(header: pb.SequenceHeader, block_len: int) -> int:
    """Blocks an import of `header` takes (its longest layer's)."""
    return -(-max(header.lengths, default=0) // block_len)


TensorCheck = Callable[[pb.Tensor, str, tuple, str], np.ndarray]
Write = Callable[[], None]


class Importer:
    """Checks an ImportSequence stream message by message and writes it into blocks reserved for it.

    The header's declared size is checked (`admit(blocks)`: the tenant's quotas, raising
    RESOURCE_EXHAUSTED) and the blocks it needs reserved from the pool (charged to the tenant like
    any other blocks) before any K/V is taken; each K/V message then goes straight into those
    blocks (`add` returns the write, for the caller to run on the loop or off it), so an import
    holds no memory beyond the blocks it was allowed and the message in hand. `install` adopts the
    blocks as the new sequence; until then nothing names them, and `abandon` returns them.

    `tensor(t, field, shape, names)` decodes a Tensor and checks dtype, shape and finiteness (the
    service's own check, so import errors read like every other RPC's)."""

    def __init__(
        self, cache: KVCache, dtype_code: int, fuse_rope: bool, tensor: TensorCheck,
        admit: Callable[[int], None] = lambda blocks: None,
    ) -> None:  # fmt: skip
        self.cache = cache
        self.dtype_code = dtype_code
        self.fuse_rope = fuse_rope
        self.tensor = tensor
        self.admit = admit
        self.header: pb.SequenceHeader | None = None
        self.seq_id = ""
        self.messages = 0
        self.lengths: list[int] = []
        self.filled: list[int] = []
        self.blocks: np.ndarray | None = None  # reserved for the sequence; None once adopted or returned

    def add(self, msg: pb.SequenceChunk) -> tuple[Write, int] | None:
        """Check message `msg`; for a K/V message, the write of its tokens into the reserved
        blocks and its size in bytes (the caller runs it before the next `add` or `install`)."""
        n = self.messages
        self.messages += 1
        if self.header is None:
            self._start(msg)
            return None
        if msg.HasField("header"):
            raise InvalidArgument(f"header: set in message {n}; expected it in message 0 only")
        if msg.sequence_id != self.seq_id:
            raise InvalidArgument(f"sequence_id: {msg.sequence_id!r} in message {n}; expected {self.seq_id!r}")
        if n > self.header.chunks:
            raise InvalidArgument(f"message {n}: more K/V messages than header.chunks = {self.header.chunks}")
        layer, L = msg.layer, self.cache.num_layers
        if not 0 <= layer < L:
            raise InvalidArgument(f"layer: {layer} in message {n}; expected 0 <= layer < {L}")
        # Layers in order: the first layer not yet complete (an empty layer is complete).
        due = next((i for i, (f, want) in enumerate(zip(self.filled, self.lengths, strict=True)) if f < want), L)
        if layer != due:
            expected = f"{due} (layers in order, each complete before the next)" if due < L else "none (all complete)"
            raise InvalidArgument(f"layer: {layer} in message {n}; expected {expected}")
        base = self.header.base_position  # positions are absolute: base + index
        if msg.position != base + self.filled[layer]:
            raise InvalidArgument(
                f"position: {msg.position} in message {n}; expected {base + self.filled[layer]} "
                "(contiguous runs per layer from header.base_position)"
            )
        hkv, d = self.cache.num_kv_heads, self.cache.head_dim
        k = self.tensor(msg.k, "k", (None, hkv, d), "[T, num_kv_heads, head_dim]")
        T = k.shape[0]
        v = self.tensor(msg.v, "v", (T, hkv, d), "[T, num_kv_heads, head_dim]")
        room = self.lengths[layer] - self.filled[layer]
        if not 1 <= T <= room:
            raise InvalidArgument(
                f"k.shape[0]: {T} tokens in message {n}; expected 1..{room} (up to header.lengths[{layer}])"
            )
        self.filled[layer] += T
        blocks, position = self.blocks, msg.position - base  # the index within the sequence
        assert blocks is not None  # reserved by the header; returned only when the import ends

        def write() -> None:  # the reserved blocks only: safe off the loop (see KVCache.write_reserved)
            self.cache.write_reserved(blocks, layer, position, k, v)

        return write, k.nbytes + v.nbytes

    def check_header(self, msg: pb.SequenceChunk) -> int:
        """Check message 0 (header, ids, the tenant's quotas) without taking anything; returns the
        blocks the import needs (the service makes that much room before `add` reserves them)."""
        if not msg.HasField("header"):
            raise InvalidArgument("header: missing in message 0; expected the stream ExportSequence produces")
        if msg.HasField("k") or msg.HasField("v"):
            raise InvalidArgument("k: set in the header message; expected K/V in the messages after it")
        h, c = msg.header, self.cache
        for name, got, want in (
            ("num_layers", h.num_layers, c.num_layers), ("num_kv_heads", h.num_kv_heads, c.num_kv_heads),
            ("head_dim", h.head_dim, c.head_dim), ("kv_dtype", h.kv_dtype, self.dtype_code),
            ("fuse_rope", h.fuse_rope, self.fuse_rope), ("lengths", len(h.lengths), c.num_layers),
        ):  # fmt: skip
            if got != want:
                raise InvalidArgument(f"header.{name}: {got}; expected {want} (this server's)")
        if h.chunks < 0:
            raise InvalidArgument(f"header.chunks: {h.chunks}; expected >= 0")
        if not 0 <= h.base_position < c.max_context:
            raise OutOfRange(f"header.base_position: {h.base_position}; expected 0..{c.max_context - 1} (max_context)")
        for layer, n in enumerate(h.lengths):
            if not 0 <= n <= c.max_context - h.base_position:
                raise OutOfRange(
                    f"header.lengths[{layer}]: {n}; expected 0..{c.max_context - h.base_position} "
                    "(max_context - header.base_position)"
                )
        if not msg.sequence_id:
            raise InvalidArgument("sequence_id: empty; expected the exported sequence's id")
        if c.id_in_use(msg.sequence_id):  # a spilled sequence's id is taken too
            raise AlreadyExists(f"sequence_id: {msg.sequence_id!r} is already in use; expected an unused id")
        need = header_blocks(h, c.block_len)
        self.admit(need)  # the tenant's quotas, before a single block or buffer is taken
        return need

    def _start(self, msg: pb.SequenceChunk) -> None:
        need = self.check_header(msg)
        h, c = msg.header, self.cache
        if need > c.free_blocks:  # never the pool's free count: that is other tenants' usage
            raise pool_full(need, " (header.lengths)")
        self.blocks = c.reserve(msg.sequence_id, need)
        self.header, self.seq_id = h, msg.sequence_id
        self.lengths = list(h.lengths)
        self.filled = [0] * c.num_layers

    def install(self) -> SequenceState:
        """Create the sequence with every layer's tokens, or raise with nothing changed (the
        reservation stays for `abandon`)."""
        if self.header is None:
            raise InvalidArgument("ImportSequence: empty stream; expected the stream ExportSequence produces")
        missing = [layer for layer, (f, n) in enumerate(zip(self.filled, self.lengths, strict=True)) if f != n]
        if self.messages - 1 != self.header.chunks or missing:
            raise InvalidArgument(
                f"ImportSequence: stream ended after {self.messages - 1} of header.chunks = {self.header.chunks} "
                f"K/V messages (layers short: {missing}); expected the whole stream"
            )
        assert self.blocks is not None
        state = self.cache.adopt(self.seq_id, self.blocks, self.lengths, self.header.base_position)
        self.blocks = None
        return state

    def abandon(self) -> None:
        """The import ended without `install`: its reserved blocks go back (uncharged). Call only
        once no write of `add` is running."""
        if self.blocks is not None:
            self.cache.unreserve(self.seq_id, self.blocks)
            self.blocks = None


@dataclass
class PushReport:
    moved: list[str]
    failed: dict[str, str]  # sequence id -> why


async def push_all(
    seq_ids: Sequence[str],
    messages: Callable[[str], Iterator[pb.SequenceChunk]],
    release: Callable[[str], object],
    peers: Sequence[str],
    deadline: float,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    channel_options: Sequence[tuple[str, object]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    concurrency: int = 4,
    owner: Callable[[str], tuple[str, str | None]] = lambda seq_id: (seq_id, None),
) -> PushReport:
    """Send each of `seq_ids` to `peers[pick(peers, id)]` with ImportSequence, release it here once
    the peer has it; give up at `deadline` (loop time). Never raises for one sequence.

    `owner(cache id)` gives the id its tenant's clients use (what routing hashes and the stream
    carries) and the tenant's name, sent as `tkg-tenant` metadata (None: send none) so that a peer
    credential imports it into that tenant's namespace.

    `peers` must not name this replica (`tkg.server.peers.SelfFinder` leaves it out): a draining
    server refuses every call, so a push to itself would fail and the sequence be lost. With no
    peer left every sequence is reported failed."""
    if not peers:
        return PushReport([], {s: "no other replica: --peers names only this one" for s in seq_ids})
    loop = asyncio.get_running_loop()
    channels = {
        p: grpc.aio.secure_channel(p, credentials, options=list(channel_options)) if credentials
        else grpc.aio.insecure_channel(p, options=list(channel_options))
        for p in peers
    }  # fmt: skip
    stubs = {p: pb_grpc.DecodeAttentionStub(ch) for p, ch in channels.items()}
    report = PushReport([], {})
    gate = asyncio.Semaphore(concurrency)

    async def one(seq_id: str) -> None:
        their_id, tenant = owner(seq_id)
        target = peers[pick(peers, their_id)]
        md = (*metadata, ("tkg-tenant", tenant)) if tenant is not None else tuple(metadata)
        async with gate:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError("the grace period ran out before its turn")

                async def stream() -> AsyncIterator[pb.SequenceChunk]:
                    for msg in messages(seq_id):
                        if msg.sequence_id:
                            msg.sequence_id = their_id
                        yield msg

                await stubs[target].ImportSequence(stream(), timeout=left, metadata=md)
            except Exception as exc:
                why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                report.failed[seq_id] = f"to {target}: {why}"
                return
            release(seq_id)
            report.moved.append(seq_id)

    try:
        await asyncio.gather(*(one(s) for s in seq_ids))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels.values()))
    return report
