"""Wire validation: a request's fields checked against the model spec before anything changes.

Owns every check that names an RPC field (`sequence_ids[3]`, `q.shape`, `positions[0]`, ...) and
turns valid tensors into read-only numpy views through the codec (`tkg.codec`, which also holds
the finiteness check of the wire bytes). Errors are `InvalidArgument` with the field and the
expected value. No numpy here beyond what the codec returns: on a request's path numpy's call
machinery, cold after the kernel, cost ~20 us per request on the build machine.
"""

from __future__ import annotations

import numpy as np

from tkg import codec, dtypes
from tkg.kernel.kv_store import KVStore, StepOutOfBuckets
from tkg.protowire import DecodeRequestView, tensor_bytes
from tkg.server.batcher import DecodeWork
from tkg.server.config import ModelSpec
from tkg.server.errors import InvalidArgument
from tkg.server.identity import Tenant
from tkg.server.sequences import MAX_SEQUENCE_ID_LEN
from tkg.server.tenants import SEP, inward
from tkg.v1 import decode_attention_pb2 as pb

_SURE_ID_CHARS = MAX_SEQUENCE_ID_LEN // 4  # an id of at most this many characters fits in UTF-8


def check_id(field: str, seq_id: str, index: int | None = None) -> None:
    """INVALID_ARGUMENT naming `field` (`field[index]` with an index) for a bad sequence id.
    The usual id passes on its character count alone: no encoding, no field name formatted."""
    fits = len(seq_id) <= _SURE_ID_CHARS or len(seq_id.encode()) <= MAX_SEQUENCE_ID_LEN
    if seq_id and fits and SEP not in seq_id:
        return
    field = field if index is None else f"{field}[{index}]"
    if not seq_id:
        raise InvalidArgument(f"{field}: empty; expected a sequence id")
    size = len(seq_id.encode())
    if size > MAX_SEQUENCE_ID_LEN:
        raise InvalidArgument(f"{field}: {size} bytes; expected at most {MAX_SEQUENCE_ID_LEN} bytes (UTF-8)")
    # SEP is the tenant namespace separator: an id holding it could name another tenant's.
    raise InvalidArgument(f"{field}: contains the control character U+001F; expected an id without it")


def _unbounded(field: str, a: np.ndarray) -> str:
    """Why `a` (a tensor that failed `codec.bounded_bytes`) was refused: NaN or infinity, or the
    first value at or past the magnitude bound (the refusal path only: numpy is fine here)."""
    bound = codec.magnitude_bound(a.dtype)
    if not codec.all_finite(a):
        return f"{field}: contains NaN or infinity; expected {bound}"
    flat = a.reshape(-1).astype(np.float32)
    i = int(np.argmax(np.abs(flat) >= 2.0 ** codec.MAGNITUDE_LOG2[a.dtype]))
    return (f"{field}: value {float(flat[i]):.3g} at flat index {i} ({a.dtype.name}); expected {bound}: "
            "larger values overflow in attention")  # fmt: skip


class WireChecks:
    """The checks of one server's requests (its spec, batch limit and store's compiled buckets).

    Args:
        spec: the model spec (geometry, dtypes, limits).
        max_batch: sequences per Decode request.
        store: the backend's KV store (its compiled s_active/context limits, if any).
    """

    def __init__(self, spec: ModelSpec, max_batch: int, store: KVStore) -> None:
        self.spec = spec
        self.max_batch = max_batch
        self.store = store
        self.io_code = dtypes.BY_NAME[spec.wire_dtype].code  # q/k/v/out on the wire
        self.kv_code = dtypes.BY_NAME[spec.kv_dtype].code  # what the cache stores (and exports)

    def layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.num_layers:
            raise InvalidArgument(f"layer: {layer}; expected 0 <= layer < {self.spec.num_layers}")

    def tensor(
        self,
        t: pb.Tensor,
        field: str,
        shape: tuple[int | None, ...],
        names: str,
        code: int | None = None,
        data: bytes | memoryview | None = None,
    ) -> np.ndarray:
        """Check dtype (the I/O dtype, or `code`), rank and known dims on the message's Python
        ints, then decode (byte length checked in Python ints too) and check finiteness.
        `data`: `t`'s data when read apart from it (`protowire.tensor_bytes`), else `t.data`."""
        code = self.io_code if code is None else code
        if t.dtype != code:
            what = "KV dtype" if code == self.kv_code else "I/O dtype"
            raise InvalidArgument(
                f"{field}.dtype: {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}; "
                f"expected {pb.DType.Name(code)} (the server's {what})"
            )
        dims = tuple(t.shape)
        if len(dims) != len(shape) or any(e is not None and e != d for e, d in zip(shape, dims, strict=True)):
            want = [("?" if e is None else e) for e in shape]
            raise InvalidArgument(f"{field}.shape: {list(dims)}; expected {names} = {want}")
        if data is None:
            data = t.data  # one copy out of the message, shared by the array and the finiteness check
        try:
            a = codec.decode(t, field, dims, data)
        except codec.TensorError as exc:
            raise InvalidArgument(str(exc)) from None
        if not codec.bounded_bytes(data, a.dtype):  # every path of q/k/v: Decode, AppendKV, ImportSequence
            raise InvalidArgument(_unbounded(field, a))
        return a

    def kv_tensor(self, t: pb.Tensor, field: str, shape: tuple[int | None, ...], names: str) -> np.ndarray:
        """A tensor travelling as the cache stores it (exported K/V: the KV dtype)."""
        return self.tensor(t, field, shape, names, self.kv_code)

    def decode(self, req: pb.DecodeRequest | DecodeRequestView, tenant: Tenant) -> DecodeWork:
        """A Decode request as validated work for the batcher (ids in `tenant`'s namespace): a
        message (in-process callers) or the RPCs' view of the wire bytes (q/k/v not copied)."""
        s = self.spec
        rid = req.request_id
        if len(rid) > _SURE_ID_CHARS and len(rid.encode()) > MAX_SEQUENCE_ID_LEN:
            raise InvalidArgument(
                f"request_id: {len(rid.encode())} bytes; expected at most {MAX_SEQUENCE_ID_LEN} bytes"
            )
        if SEP in rid:  # the README's contract, as for sequence ids: logs and ids never carry it
            raise InvalidArgument("request_id: contains the control character U+001F; expected an id without it")
        self.layer(req.layer)
        B = len(req.sequence_ids)
        if B < 1 or self.max_batch < B:
            raise InvalidArgument(f"sequence_ids: {B} sequences; expected 1..{self.max_batch} (max_batch)")
        if len(req.positions) != B:
            raise InvalidArgument(f"positions: {len(req.positions)} entries; expected {B} (one per sequence_ids)")
        for b, sid in enumerate(req.sequence_ids):
            check_id("sequence_ids", sid, b)
        q_names = "[B, num_q_heads, S, head_dim]"
        q = self.tensor(req.q, "q", (B, s.num_q_heads, None, s.head_dim), q_names, data=tensor_bytes(req, "q"))
        S = q.shape[2]
        if not 1 <= S <= s.max_s_active:
            raise InvalidArgument(f"q.shape[2]: S={S}; expected 1..{s.max_s_active} (max_s_active)")
        self.partial(req)
        kv_shape = (B, s.num_kv_heads, S, s.head_dim)
        if req.attend_only:
            k = v = None
        else:
            names = "[B, num_kv_heads, S, head_dim]"
            k = self.tensor(req.k, "k", kv_shape, names, data=tensor_bytes(req, "k"))
            v = self.tensor(req.v, "v", kv_shape, names, data=tensor_bytes(req, "v"))
        self.buckets(S, req.positions)
        ids = [inward(tenant, sid) for sid in req.sequence_ids] if tenant.namespace else list(req.sequence_ids)
        return DecodeWork(
            req.layer, S, ids, codec.int64s(req.positions, B), q, k, v, tenant=tenant,
            return_lse=req.return_lse, attend_only=req.attend_only,
        )  # fmt: skip

    def partial(self, req: pb.DecodeRequest | DecodeRequestView) -> None:
        """The context-parallel flags: supported by the backend's store, and attend_only without k/v."""
        for name in ("return_lse", "attend_only"):
            if getattr(req, name) and not self.store.supports_partial:
                raise InvalidArgument(
                    f"{name}: the backend {self.store.backend} does not support it; expected false "
                    "(backends reference, cpu and nki-emu support it; nki when its store is made with partial=True)"
                )
        if req.attend_only:
            for name in ("k", "v"):
                if req.HasField(name):
                    raise InvalidArgument(f"{name}: present in an attend_only request; expected absent (no new tokens)")

    def buckets(self, S: int, positions: list[int]) -> None:
        """INVALID_ARGUMENT for a step no compiled shape bucket covers (device backends compile
        only at start: `KVStore.check_step` holds the limits); past max_context the cache answers
        OUT_OF_RANGE instead, so such a step is left to it."""
        store = self.store
        if store.max_s_active is None and store.max_context is None:
            return
        b = max(range(len(positions)), key=positions.__getitem__) if positions else 0
        end = positions[b] + S if positions else S
        try:
            store.check_step(S, end if end <= self.spec.max_context else 0)
        except StepOutOfBuckets as exc:
            field = "q.shape[2]" if exc.dimension == "s_active" else f"positions[{b}]"
            raise InvalidArgument(f"{field}: {exc}") from None

    def append_chunk(self, chunk: pb.AppendKVRequest) -> tuple[np.ndarray, np.ndarray]:
        """An AppendKV chunk's k, v `[T, num_kv_heads, head_dim]` (its layer checked too)."""
        s = self.spec
        self.layer(chunk.layer)
        k = self.tensor(chunk.k, "k", (None, s.num_kv_heads, s.head_dim), "[T, num_kv_heads, head_dim]")
        T = k.shape[0]
        if T < 1:
            raise InvalidArgument("k.shape[0]: 0 tokens; expected at least 1")
        v = self.tensor(chunk.v, "v", (T, s.num_kv_heads, s.head_dim), "[T, num_kv_heads, head_dim]")
        return k, v
