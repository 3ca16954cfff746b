"""`remote_attention(model, client)`: a transformers model decodes with its attention on a tkg server.

How it hooks in, through transformers' own extension points (no model code is patched):
- an attention function registered as `"tkg"` in `AttentionInterface`, and a mask function of the
  same name in `AttentionMaskInterface`; the context switches the model to it with
  `set_attn_implementation("tkg")` and back on exit;
- `RemoteCache`, a `Cache` whose layers record lengths only. Its `update` hands the new k/v straight
  back, so the attention function sees exactly the step's new q/k/v: `[B, H, S, d]`, RoPE applied by
  the model (the server must run with `fuse_rope: false`);
- `generate()` gets a `RemoteCache` when the caller passes none: the context shadows the model
  instance's `_prepare_cache_for_generation` (the hook generate uses to build its cache) and
  removes it on exit. Plain forward calls pass `cache=session.new_cache()`.

Per layer call: on an empty cache (prefill) the model's own eager attention runs locally and the
new k/v of each row's real tokens (left padding dropped) go to the server with `AppendKV`, chunked;
otherwise one `Decode` per layer carries the whole batch (split into steps of at most the server's
`max_s_active` new tokens). Assisted generation's `cache.crop(-n)` becomes one `TruncateSequence`
per row. Rows are server sequences created at the first prefill and released when the context exits,
also on an exception.

Server positions count real tokens only; transformers counts the left padding too. With left padding
the distance between two real tokens is the same in both, so causal order and sliding windows agree.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, eager_mask, prepare_padding_mask

from tkg import dtypes
from tkg.client import Client, errors
from tkg.codec import dtype_to_numpy
from tkg.dtypes import BF16

ATTN_IMPLEMENTATION = "tkg"
APPEND_CHUNK_TOKENS = 512  # tokens per AppendKV message

# The (cache, layer, key) of the latest RemoteCache.update on this thread: the attention function
# that follows it in the same layer knows by identity that `key` came from a RemoteCache.
_last_update = threading.local()


# ---- torch <-> numpy in the server's dtype ------------------------------------------------------


def to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """`t` as a C-contiguous numpy array of `dtype` (bfloat16 = `ml_dtypes.bfloat16`)."""
    t = t.detach().to("cpu")
    if dtype == BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(BF16)
    return t.to(dtypes.BY_NUMPY[np.dtype(dtype)].torch).contiguous().numpy()


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """`a` (server dtype) as a tensor with `like`'s dtype and device."""
    if a.dtype == BF16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(a))
    return t.to(dtype=like.dtype, device=like.device)


# ---- statistics -------------------------------------------------------------------------------


@dataclass
class RemoteStats:
    """Counters of one `remote_attention` context; times in microseconds."""

    decode_steps: int = 0  # model forwards that decoded on the server (counted at layer 0)
    decode_calls: int = 0  # Decode RPCs (one per layer per step, more when S > max_s_active)
    decode_rows: int = 0  # sequence-steps carried (batch rows x calls)
    queue_us: int = 0  # server Timing: waiting for a batch slot
    kernel_us: int = 0  # server Timing: the step (KV prepare, RoPE, append, attention kernel, finish)
    server_us: int = 0  # server Timing: receipt to response
    rpc_us: float = 0.0  # client wall time of the Decode calls (includes the above)
    append_calls: int = 0  # AppendKV streams (one per row per layer)
    append_tokens: int = 0
    append_us: float = 0.0
    truncations: int = 0  # TruncateSequence calls (rejected draft tokens)
    truncated_tokens: int = 0
    sequences_created: int = 0
    sequences_released: int = 0

    def split(self) -> str:
        """One line: where the Decode time went (means per call)."""
        n = max(self.decode_calls, 1)
        rest = self.rpc_us - self.server_us
        return (
            f"{self.decode_calls} Decode calls: mean rpc {self.rpc_us / n:.0f} us = server {self.server_us / n:.0f} us "
            f"(queue {self.queue_us / n:.0f}, kernel {self.kernel_us / n:.0f}) + network/client {rest / n:.0f} us; "
            f"{self.append_tokens} prompt tokens appended in {self.append_calls} AppendKV calls "
            f"({self.append_us / 1e3:.1f} ms); {self.truncations} truncations ({self.truncated_tokens} tokens)"
        )


# ---- masks and the attention function -----------------------------------------------------------


@dataclass
class RemoteMask:
    """What the `tkg` mask function gives each layer: the 2D padding (False = padding) and, built
    only when a layer runs locally, the eager additive mask transformers would have used."""

    padding: torch.Tensor | None  # bool [B, kv_length]
    mask_kwargs: dict[str, Any]
    _local: torch.Tensor | None = None
    _built: bool = False

    def local(self) -> torch.Tensor | None:
        if not self._built:
            self._local, self._built = eager_mask(**self.mask_kwargs), True
        return self._local


def remote_mask(**kwargs: Any) -> RemoteMask:
    """Mask function registered as `tkg` in `AttentionMaskInterface` (same keywords as `eager_mask`)."""
    padding = prepare_padding_mask(kwargs.get("attention_mask"), kwargs["kv_length"], kwargs.get("kv_offset", 0))
    return RemoteMask(padding=padding, mask_kwargs=kwargs)


def _eager(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The model's own eager attention (its modeling file's `eager_attention_forward`: gpt-oss's
    handles sinks there)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: its module has no eager_attention_forward; expected a "
                        "transformers decoder attention module")  # fmt: skip
    return fn


def remote_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: RemoteMask | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as `tkg` in `AttentionInterface`.

    query `[B, Hq, S, d]`, key/value `[B, Hkv, S_kv, d]` (RoPE applied) -> (`[B, S, Hq, d]`, None).
    Without a `RemoteCache` (no cache, or the caller's own) it is the model's eager attention.
    """
    record = getattr(_last_update, "record", None)
    _last_update.record = None  # never keep a reference to the step's k
    if record is None or record[2] is not key:
        mask = attention_mask.local() if isinstance(attention_mask, RemoteMask) else attention_mask
        return _eager(module)(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, layer, _ = record
    return cache.attend(module, layer, query, key, value, attention_mask, scaling, dropout, kwargs)


def register() -> None:
    """Register the `tkg` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, remote_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, remote_mask)


# ---- the cache -----------------------------------------------------------------------------------


class RemoteLayer(CacheLayerMixin):
    """One layer's length as transformers counts it (left padding included); no tensors."""

    is_croppable = True
    supports_early_init = False

    def __init__(self, sliding: bool) -> None:
        super().__init__()
        self.is_sliding = sliding
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.is_initialized = True
        self.length += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.length:
            raise ValueError(f"crop: {tokens_to_remove}; expected a count in [-{self.length}, 0] of tokens to remove")
        self.length += tokens_to_remove

    def reset(self) -> None:
        raise NotImplementedError("RemoteCache.reset: the server holds the K/V; expected a new cache instead")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("RemoteCache: beam search is not supported; expected greedy, sampling or assisted")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("RemoteCache: expanding the batch is not supported; expected one row per sequence")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("RemoteCache: selecting batch rows is not supported; expected one row per sequence")


class RemoteCache(Cache):
    """A transformers `Cache` whose K/V live on the tkg server: it records per-layer lengths, each
    row's server sequence id and its left padding. Create it with `RemoteSession.new_cache()`."""

    def __init__(self, session: RemoteSession) -> None:
        super().__init__(layers=[RemoteLayer(w > 0) for w in session.info.sliding_window])
        self.session = session
        self.sequence_ids: list[str] = []
        self.pads: list[int] = []  # per row: left-padding tokens that transformers counts and the server never saw

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        key_states, value_states = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _last_update.record = (self, layer_idx, key_states)
        return key_states, value_states

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens here and on the server (one TruncateSequence per row)."""
        if tokens_to_remove == 0:
            return
        super().crop(tokens_to_remove)
        lengths = {layer.length for layer in self.layers}
        if len(lengths) != 1:
            raise RuntimeError(f"RemoteCache.crop: layers hold {sorted(lengths)} tokens; expected one length")
        (length,) = lengths
        for seq, pad in zip(self.sequence_ids, self.pads, strict=True):
            self.session.truncate(seq, length - pad, -tokens_to_remove)

    def server_lengths(self, layer: int, new_tokens: int = 0) -> list[int]:
        """Each row's server length at `layer` before the `new_tokens` just recorded by update."""
        return [self.layers[layer].length - new_tokens - pad for pad in self.pads]

    def attend(
        self,
        module: torch.nn.Module,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: RemoteMask | torch.Tensor | None,
        scaling: float,
        dropout: float,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, _, steps, _ = query.shape
        if dropout and module.training:
            raise RuntimeError("remote_attention: the module is in training mode; expected model.eval()")
        padding = mask.padding if isinstance(mask, RemoteMask) else None
        if self.layers[layer].length == steps:  # empty before this call: prefill
            local_mask = mask.local() if isinstance(mask, RemoteMask) else mask
            out = _eager(module)(module, query, key, value, local_mask, scaling=scaling, dropout=0.0, **kwargs)
            self._prefill(layer, key, value, _left_pads(padding, batch, steps))
            return out
        if not self.sequence_ids:
            raise RuntimeError("RemoteCache: decode before prefill; expected the first forward on an empty cache")
        if padding is not None and not bool(padding[:, -steps:].all()):
            raise ValueError(
                "attention_mask: padding among the new tokens; expected 1 for every token after the prompt"
            )
        out = self.session.decode(self, layer, query, key, value)
        return out.transpose(1, 2).contiguous(), None

    def _prefill(self, layer: int, key: torch.Tensor, value: torch.Tensor, pads: list[int]) -> None:
        if not self.sequence_ids:
            self.pads = pads
            self.sequence_ids = [self.session.create_sequence() for _ in pads]
        elif pads != self.pads:
            raise ValueError(
                f"attention_mask: left padding {pads} at layer {layer}; expected {self.pads} as at layer 0"
            )
        for b, (seq, pad) in enumerate(zip(self.sequence_ids, pads, strict=True)):
            if key.shape[-2] > pad:
                self.session.append(seq, layer, key[b, :, pad:], value[b, :, pad:])


def _left_pads(padding: torch.Tensor | None, batch: int, steps: int) -> list[int]:
    """Left-padding tokens per row of a prefill's 2D mask (None: no padding); anything but left
    padding is a ValueError, since the server stores each row's real tokens contiguously."""
    if padding is None:
        return [0] * batch
    real = padding[:, :steps]
    pads = (steps - real.sum(dim=1)).tolist()
    expect = torch.arange(steps, device=real.device)[None, :] >= torch.tensor(pads, device=real.device)[:, None]
    if not torch.equal(real, expect):
        raise ValueError("attention_mask: not left padding; expected 0s before 1s in every row (padding_side='left')")
    return [int(p) for p in pads]


# ---- the session ----------------------------------------------------------------------------------


@dataclass
class RemoteSession:
    """What `remote_attention` yields: the client, the server's info, counters, and `new_cache()`."""

    client: Client
    info: Any  # tkg.v1 ServerInfo
    io_dtype: np.dtype
    chunk_tokens: int = APPEND_CHUNK_TOKENS
    stats: RemoteStats = field(default_factory=RemoteStats)
    caches: list[RemoteCache] = field(default_factory=list)

    def new_cache(self) -> RemoteCache:
        cache = RemoteCache(self)
        self.caches.append(cache)
        return cache

    def create_sequence(self) -> str:
        seq = self.client.create_sequence().sequence_id
        self.stats.sequences_created += 1
        return seq

    def append(self, seq: str, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Prompt k/v `[Hkv, T, d]` of one row at `layer`, position 0, in AppendKV chunks."""
        t0 = time.perf_counter()
        k = to_numpy(key.transpose(0, 1), self.io_dtype)
        v = to_numpy(value.transpose(0, 1), self.io_dtype)
        self.client.append_kv(seq, layer, k, v, position=0, chunk_tokens=self.chunk_tokens)
        self.stats.append_us += (time.perf_counter() - t0) * 1e6
        self.stats.append_calls += 1
        self.stats.append_tokens += k.shape[0]

    def decode(
        self, cache: RemoteCache, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """q `[B, Hq, S, d]`, k/v `[B, Hkv, S, d]` -> out `[B, Hq, S, d]`; one Decode per `max_s_active` tokens."""
        steps = query.shape[2]
        positions = cache.server_lengths(layer, steps)
        self.stats.decode_steps += int(layer == 0)
        outs = []
        for s0 in range(0, steps, self.info.max_s_active):
            s1 = min(steps, s0 + self.info.max_s_active)
            t0 = time.perf_counter()
            res = self.client.decode(
                layer, cache.sequence_ids, [p + s0 for p in positions],
                to_numpy(query[:, :, s0:s1], self.io_dtype), to_numpy(key[:, :, s0:s1], self.io_dtype),
                to_numpy(value[:, :, s0:s1], self.io_dtype),
            )  # fmt: skip
            st = self.stats
            st.rpc_us += (time.perf_counter() - t0) * 1e6
            st.decode_calls += 1
            st.decode_rows += len(positions)
            st.queue_us += res.timing.queue_us
            st.kernel_us += res.timing.kernel_us
            st.server_us += res.timing.total_us
            outs.append(from_numpy(res.out, query))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def truncate(self, seq: str, length: int, dropped: int) -> None:
        self.client.truncate(seq, length)
        self.stats.truncations += 1
        self.stats.truncated_tokens += dropped

    def release_all(self) -> None:
        """Release every sequence this session created (unknown ones, e.g. expired, are skipped)."""
        for cache in self.caches:
            for seq in cache.sequence_ids:
                with contextlib.suppress(errors.NotFound):
                    self.client.release(seq)
                    self.stats.sequences_released += 1
            cache.sequence_ids = []


# ---- the context manager ---------------------------------------------------------------------------


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's attention modules in layer order (modules with `layer_idx`, `scaling` and
    `num_key_value_groups`, as every transformers decoder attention has)."""
    mods = [m for m in model.modules() if all(hasattr(m, a) for a in ("layer_idx", "scaling", "num_key_value_groups"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def check_compatible(model: torch.nn.Module, info: Any) -> None:
    """Raise ValueError naming the first server property that does not match the model."""
    from tkg.integrations.transformers.spec import server_spec

    spec = server_spec(model)
    keys = spec.keys
    windows = [w or 0 for w in keys["sliding_window"]]
    checks = [
        ("num_layers", info.num_layers, keys["num_layers"]),
        ("num_q_heads", info.num_q_heads, keys["num_q_heads"]),
        ("num_kv_heads", info.num_kv_heads, keys["num_kv_heads"]),
        ("head_dim", info.head_dim, keys["head_dim"]),
        ("fuse_rope", info.fuse_rope, False),
        ("sliding_window", list(info.sliding_window), windows),
        ("has_sinks", info.has_sinks, spec.sinks is not None),
    ]
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"server {name}: {got}; expected {want} for this model (serve it with the spec from "
                             "server_spec(model).write(path): tkg serve --config path)")  # fmt: skip
    scale = keys.get("softmax_scale", keys["head_dim"] ** -0.5)
    if not np.isclose(info.softmax_scale, scale, rtol=1e-6):
        raise ValueError(f"server softmax_scale: {info.softmax_scale}; expected {scale} for this model")


@contextlib.contextmanager
def remote_attention(model: torch.nn.Module, client: Client, *, chunk_tokens: int = APPEND_CHUNK_TOKENS
                     ) -> Iterator[RemoteSession]:  # fmt: skip
    """Run `model`'s decode attention on the tkg server behind `client` inside the `with` block.

    The server must serve this model's attention (`server_spec(model)`; checked against
    `GetServerInfo`, ValueError naming the first mismatch) with `fuse_rope: false`. Inside,
    `model.generate(...)` uses a `RemoteCache` unless given a cache; plain forward calls take
    `cache=session.new_cache()`. Batches must be left-padded. On exit (also on an exception) the
    attention implementation is restored and every sequence created inside is released.
    """
    register()
    info = client.server_info()
    check_compatible(model, info)
    io_code = getattr(info, "io_dtype", 0) or info.kv_dtype  # io_dtype once the server reports one
    session = RemoteSession(client, info, dtype_to_numpy(io_code), chunk_tokens)
    if "_prepare_cache_for_generation" in vars(model):
        raise RuntimeError("remote_attention: the model is already inside a remote_attention block")
    previous = model.config._attn_implementation
    original_prepare = model._prepare_cache_for_generation

    def prepare_cache(generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None and (
            generation_config.use_cache is not False
        ):
            model_kwargs["cache"] = session.new_cache()
        return original_prepare(generation_config, model_kwargs, *args, **kwargs)

    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model._prepare_cache_for_generation = prepare_cache
    try:
        yield session
    finally:
        del model._prepare_cache_for_generation
        model.set_attn_implementation(previous)
        session.release_all()
