from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT8_E4M3: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_us", "kernel_us", "total_us", "batch_size", "batch_requests", "attention_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    KERNEL_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    kernel_us: int
    total_us: int
    batch_size: int
    batch_requests: int
    attention_us: int
    def __init__(self, queue_us: _Optional[int] = ..., kernel_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ..., batch_requests: _Optional[int] = ..., attention_us: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "kv_dtype", "block_len", "num_blocks", "free_blocks", "max_s_active", "max_batch", "fuse_rope", "backend", "version", "max_context", "softmax_scale", "sliding_window", "has_sinks", "max_message_bytes", "model", "active_sequences", "instance_id", "started_at", "io_dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_Q_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_S_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    FUSE_ROPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    HAS_SINKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    IO_DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: DType
    block_len: int
    num_blocks: int
    free_blocks: int
    max_s_active: int
    max_batch: int
    fuse_rope: bool
    backend: str
    version: str
    max_context: int
    softmax_scale: float
    sliding_window: _containers.RepeatedScalarFieldContainer[int]
    has_sinks: bool
    max_message_bytes: int
    model: str
    active_sequences: int
    instance_id: str
    started_at: float
    io_dtype: DType
    def __init__(self, num_layers: _Optional[int] = ..., num_q_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., kv_dtype: _Optional[_Union[DType, str]] = ..., block_len: _Optional[int] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., max_s_active: _Optional[int] = ..., max_batch: _Optional[int] = ..., fuse_rope: _Optional[bool] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ..., max_context: _Optional[int] = ..., softmax_scale: _Optional[float] = ..., sliding_window: _Optional[_Iterable[int]] = ..., has_sinks: _Optional[bool] = ..., max_message_bytes: _Optional[int] = ..., model: _Optional[str] = ..., active_sequences: _Optional[int] = ..., instance_id: _Optional[str] = ..., started_at: _Optional[float] = ..., io_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class SequenceInfo(_message.Message):
    __slots__ = ("sequence_id", "lengths", "num_blocks", "tier", "base_position", "instance_id")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BASE_POSITION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    lengths: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    tier: str
    base_position: int
    instance_id: str
    def __init__(self, sequence_id: _Optional[str] = ..., lengths: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ..., tier: _Optional[str] = ..., base_position: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class CreateSequenceRequest(_message.Message):
    __slots__ = ("sequence_id", "base_position")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_POSITION_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    base_position: int
    def __init__(self, sequence_id: _Optional[str] = ..., base_position: _Optional[int] = ...) -> None: ...

class AppendKVRequest(_message.Message):
    __slots__ = ("sequence_id", "layer", "position", "k", "v")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    layer: int
    position: int
    k: Tensor
    v: Tensor
    def __init__(self, sequence_id: _Optional[str] = ..., layer: _Optional[int] = ..., position: _Optional[int] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "layer", "sequence_ids", "positions", "q", "k", "v", "return_lse", "attend_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    RETURN_LSE_FIELD_NUMBER: _ClassVar[int]
    ATTEND_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    positions: _containers.RepeatedScalarFieldContainer[int]
    q: Tensor
    k: Tensor
    v: Tensor
    return_lse: bool
    attend_only: bool
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., sequence_ids: _Optional[_Iterable[str]] = ..., positions: _Optional[_Iterable[int]] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ..., return_lse: _Optional[bool] = ..., attend_only: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("request_id", "layer", "out", "timing", "error", "lse")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    out: Tensor
    timing: Timing
    error: Error
    lse: Tensor
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., out: _Optional[_Union[Tensor, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TruncateSequenceRequest(_message.Message):
    __slots__ = ("sequence_id", "length")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    length: int
    def __init__(self, sequence_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class ForkSequenceRequest(_message.Message):
    __slots__ = ("source_id", "sequence_id")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    sequence_id: str
    def __init__(self, source_id: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class ReleaseSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    def __init__(self, sequence_id: _Optional[str] = ...) -> None: ...

class ReleaseSequenceResponse(_message.Message):
    __slots__ = ("freed_blocks",)
    FREED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    freed_blocks: int
    def __init__(self, freed_blocks: _Optional[int] = ...) -> None: ...

class GetSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    def __init__(self, sequence_id: _Optional[str] = ...) -> None: ...

class PrefetchSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    def __init__(self, sequence_id: _Optional[str] = ...) -> None: ...

class ExportSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    def __init__(self, sequence_id: _Optional[str] = ...) -> None: ...

class SequenceChunk(_message.Message):
    __slots__ = ("sequence_id", "header", "layer", "position", "k", "v")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    header: SequenceHeader
    layer: int
    position: int
    k: Tensor
    v: Tensor
    def __init__(self, sequence_id: _Optional[str] = ..., header: _Optional[_Union[SequenceHeader, _Mapping]] = ..., layer: _Optional[int] = ..., position: _Optional[int] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SequenceHeader(_message.Message):
    __slots__ = ("lengths", "num_layers", "num_kv_heads", "head_dim", "kv_dtype", "fuse_rope", "chunks", "instance_id", "base_position")
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    FUSE_ROPE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_POSITION_FIELD_NUMBER: _ClassVar[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: DType
    fuse_rope: bool
    chunks: int
    instance_id: str
    base_position: int
    def __init__(self, lengths: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., kv_dtype: _Optional[_Union[DType, str]] = ..., fuse_rope: _Optional[bool] = ..., chunks: _Optional[int] = ..., instance_id: _Optional[str] = ..., base_position: _Optional[int] = ...) -> None: ...
