"""The model-attention spec the service serves: geometry, KV capacity, RoPE, windows, sinks.

One `ModelSpec` comes from a preset (`tkg.server.presets`), a JSON/YAML file, and overrides (the
command line), in that order. Every key is checked at start; a bad value is a `ConfigError` naming
the key and the expected value, never a crash later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from tkg import dtypes
from tkg.server import rope

MAX_HEAD_DIM = 128  # the kernel's d_head limit
MAX_S_ACTIVE = 8


class ConfigError(ValueError):
    """A configuration key with a bad value; the message names the key and what is expected."""


@dataclass(frozen=True)
class ModelSpec:
    """What the service serves. Shapes are per layer; times in seconds."""

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str  # float32 | bfloat16 | float16 | float8_e4m3 (what the cache stores)
    block_len: int  # tokens per KV block
    num_blocks: int  # blocks per layer (block ids are shared by all layers)
    fuse_rope: bool  # the server rotates q and k (rotate-half) at absolute positions
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    softmax_scale: float  # multiplies q.k (YaRN's attention factor already folded in)
    sliding_window: tuple[int | None, ...]  # per layer: query at t sees keys j with t - j < W
    sinks: np.ndarray | None  # float32 [num_layers, num_q_heads], gpt-oss learned sink logits
    max_s_active: int
    max_batch: int  # sequences per kernel launch
    max_context: int  # tokens per sequence
    idle_ttl_s: float  # idle sequences are released after this long
    io_dtype: str = ""  # what q/k/v/out travel in: float32 | bfloat16 | float16 ("" = kv_dtype)
    k_scale: tuple[float, ...] = ()  # per layer: the cache holds k / k_scale (fp8); () = all 1.0
    v_scale: tuple[float, ...] = ()

    @property
    def kv_numpy_dtype(self) -> np.dtype:
        return dtypes.BY_NAME[self.kv_dtype].numpy

    @property
    def wire_dtype(self) -> str:
        """The I/O dtype's name (io_dtype, defaulting to kv_dtype)."""
        return self.io_dtype or self.kv_dtype

    @property
    def io_numpy_dtype(self) -> np.dtype:
        return dtypes.BY_NAME[self.wire_dtype].numpy

    def scales(self, layer: int) -> tuple[float, float]:
        """(k_scale, v_scale) of `layer`: stored = value / scale (1.0 unless configured)."""
        ks = self.k_scale[layer] if self.k_scale else 1.0
        vs = self.v_scale[layer] if self.v_scale else 1.0
        return ks, vs

    def window(self, layer: int) -> int | None:
        return self.sliding_window[layer]

    def layer_sinks(self, layer: int) -> np.ndarray | None:
        """`[num_q_heads]` float32 sink logits of `layer`, or None."""
        return None if self.sinks is None else self.sinks[layer]

    def inv_freqs(self) -> np.ndarray:
        """RoPE inverse frequencies `[head_dim/2]` float32, scaling applied."""
        return rope.inv_freqs(self.head_dim, self.rope_theta, self.rope_scaling)

    def bytes_per_block(self) -> int:
        """KV bytes one block id costs across all layers (K and V)."""
        itemsize = self.kv_numpy_dtype.itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.block_len * self.head_dim * itemsize

    def kv_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block()

    def windows_text(self) -> str:
        """Every layer's window for the start line: one value when all layers agree ("none", "128"),
        else the per-layer list ("[128, none, 128, none]")."""
        text = ["none" if w is None else str(w) for w in self.sliding_window]
        return text[0] if len(set(text)) == 1 else "[" + ", ".join(text) + "]"

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_layers} layers, {self.num_q_heads} q / {self.num_kv_heads} kv heads, "
            f"d={self.head_dim}, {self.kv_dtype} KV ({self.wire_dtype} I/O), "
            f"{self.num_blocks} blocks x {self.block_len} tokens "
            f"(KV {_bytes(self.kv_bytes())}), fuse_rope={self.fuse_rope}, "
            f"sliding_window={self.windows_text()}, sinks={'yes' if self.sinks is not None else 'no'}"
        )


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# Keys a config file (or preset) may set; `num_blocks` or `kv_cache_bytes` sizes the cache.
KEYS = {f.name for f in fields(ModelSpec)} | {"kv_cache_bytes"}
# Values of the keys a spec may leave out. The geometry (num_layers, num_q_heads, num_kv_heads,
# head_dim) and the capacity (num_blocks or kv_cache_bytes) have none. softmax_scale defaults to
# 1/sqrt(head_dim); sliding_window and sinks to none.
DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "kv_dtype": "bfloat16",
    "block_len": 16,
    "fuse_rope": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_s_active": 7,
    "max_batch": 64,
    "max_context": 8192,
    "idle_ttl_s": 600.0,
}


def _int(raw: dict[str, Any], key: str, lo: int = 1, hi: int | None = None) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: {_show(raw, key)}; expected an integer {rng}")
    return int(v)


def _float(raw: dict[str, Any], key: str, name: str | None = None) -> float:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name or key}: {_show(raw, key)}; expected a positive number")
    return float(v)


def _bool(raw: dict[str, Any], key: str, name: str | None = None) -> bool:
    v = raw.get(key)
    if not isinstance(v, bool):
        raise ConfigError(f"{name or key}: {_show(raw, key)}; expected true or false")
    return v


def _show(raw: dict[str, Any], key: str) -> str:
    return repr(raw[key]) if key in raw else "missing"


def _windows(raw: dict[str, Any], num_layers: int, max_s_active: int) -> tuple[int | None, ...]:
    v = raw.get("sliding_window")
    if v is None:
        return (None,) * num_layers
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v] * num_layers
    if not isinstance(v, (list, tuple)) or len(v) != num_layers:
        raise ConfigError(f"sliding_window: {v!r}; expected a list of {num_layers} entries (int or null)")
    for i, w in enumerate(v):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < max_s_active):
            raise ConfigError(f"sliding_window[{i}]: {w!r}; expected null or an integer >= max_s_active={max_s_active}")
    return tuple(v)


def _scales(raw: dict[str, Any], key: str, num_layers: int) -> tuple[float, ...]:
    """k_scale / v_scale: a positive number for every layer, or a list of one per layer."""
    v = raw.get(key)
    if v is None:
        return ()
    vals = [v] * num_layers if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if not isinstance(vals, (list, tuple)) or len(vals) != num_layers:
        raise ConfigError(f"{key}: {v!r}; expected a positive number or a list of {num_layers} (one per layer)")
    for i, x in enumerate(vals):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise ConfigError(f"{key}[{i}]: {x!r}; expected a positive number (the cache holds value / {key})")
    return tuple(float(x) for x in vals)


def _sinks(raw: dict[str, Any], num_layers: int, num_q_heads: int, base: Path | None) -> np.ndarray | None:
    v = raw.get("sinks")
    if v is None or v is False:
        return None
    shape = (num_layers, num_q_heads)
    if isinstance(v, str) and v == "zeros":  # a placeholder for geometry tests and benchmarks
        return np.zeros(shape, dtype=np.float32)
    if isinstance(v, (np.ndarray, list)):
        arr = np.asarray(v)
    elif isinstance(v, str):
        path = Path(v)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            msg = f"sinks: cannot load {str(path)!r} as .npy ({exc}); expected a {list(shape)} array"
            raise ConfigError(msg) from None
    else:
        raise ConfigError(f"sinks: {v!r}; expected a path to a .npy of shape {list(shape)}, 'zeros' or null")
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise ConfigError(f"sinks: array {arr.dtype} {list(arr.shape)}; expected finite floats of shape {list(shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# Parameters each RoPE scaling type takes (Hugging Face config names); `type` or `rope_type` names it.
SCALING_PARAMS: dict[str, dict[str, bool]] = {  # name -> required
    "linear": {"factor": True},
    "llama3": {"factor": True, "low_freq_factor": True, "high_freq_factor": True,
               "original_max_position_embeddings": True},
    "yarn": {"factor": True, "original_max_position_embeddings": True, "beta_fast": False, "beta_slow": False,
             "attention_factor": False, "truncate": False},
}  # fmt: skip


def _scaling(raw: dict[str, Any]) -> dict[str, Any] | None:
    v = raw.get("rope_scaling")
    if v is None:
        return None
    kinds = ", ".join(SCALING_PARAMS)
    if not isinstance(v, dict):
        raise ConfigError(f"rope_scaling: {v!r}; expected null or a mapping with type one of {kinds}")
    params = dict(v)
    kind = params.pop("type", None) or params.pop("rope_type", None)
    params.pop("rope_type", None)
    if kind not in SCALING_PARAMS:
        raise ConfigError(f"rope_scaling.type: {kind!r}; expected one of {kinds}")
    allowed = SCALING_PARAMS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"rope_scaling: unknown key(s) {unknown} for type {kind}; expected some of {sorted(allowed)}")
    for key, required in allowed.items():
        if key not in params:
            if required:
                raise ConfigError(f"rope_scaling.{key}: missing; expected a positive number (type {kind})")
            continue
        if key == "truncate":
            _bool(params, "truncate", "rope_scaling.truncate")
        else:
            _float(params, key, f"rope_scaling.{key}")
    if kind == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ConfigError(
            f"rope_scaling.high_freq_factor: {params['high_freq_factor']}; expected more than "
            f"low_freq_factor={params['low_freq_factor']}"
        )
    return {"type": kind, **params}


def build_spec(raw: dict[str, Any], base: Path | None = None) -> ModelSpec:
    """Check every key of `raw` and build the spec (`base`: folder for relative paths)."""
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; expected some of {sorted(KEYS)}")
    raw = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k not in DEFAULTS}}
    num_layers = _int(raw, "num_layers")
    num_q = _int(raw, "num_q_heads")
    num_kv = _int(raw, "num_kv_heads")
    if num_q % num_kv:
        raise ConfigError(f"num_q_heads: {num_q}; expected a multiple of num_kv_heads={num_kv}")
    head_dim = _int(raw, "head_dim", 2, MAX_HEAD_DIM)
    if head_dim % 2:
        raise ConfigError(f"head_dim: {head_dim}; expected an even number (RoPE rotates halves)")
    kv = raw.get("kv_dtype")
    if kv not in dtypes.BY_NAME:
        raise ConfigError(f"kv_dtype: {kv!r}; expected one of {sorted(dtypes.BY_NAME)}")
    # A storage-only KV dtype (fp8) travels as bfloat16 unless io_dtype says otherwise.
    io = raw.get("io_dtype") or (kv if dtypes.BY_NAME[kv].io else "bfloat16")
    if io not in dtypes.BY_NAME or not dtypes.BY_NAME[io].io:
        io_names = sorted(d.name for d in dtypes.IO)
        raise ConfigError(f"io_dtype: {io!r}; expected one of {io_names} (fp8 is a storage dtype only)")
    block_len = _int(raw, "block_len", 1, 1024)
    max_s = _int(raw, "max_s_active", 1, MAX_S_ACTIVE)
    max_context = _int(raw, "max_context", max_s)
    partial = dict(num_layers=num_layers, num_kv_heads=num_kv, block_len=block_len, head_dim=head_dim)
    per_block = 2 * num_layers * num_kv * block_len * head_dim * dtypes.BY_NAME[kv].itemsize
    if raw.get("num_blocks") is not None:
        num_blocks = _int(raw, "num_blocks")
    elif raw.get("kv_cache_bytes") is not None:
        num_blocks = _int(raw, "kv_cache_bytes", per_block) // per_block
    else:
        raise ConfigError(f"num_blocks or kv_cache_bytes: neither is set; expected one ({partial})")
    fuse = _bool(raw, "fuse_rope")
    theta = _float(raw, "rope_theta")
    scaling = _scaling(raw)
    scale = raw.get("softmax_scale")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else _float(raw, "softmax_scale")
    # YaRN multiplies q and k by m each; folding m^2 into the logit scale keeps the cache unscaled.
    scale *= rope.yarn_attention_factor(scaling) ** 2 if fuse else 1.0
    return ModelSpec(
        name=str(raw["name"]),
        num_layers=num_layers,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        kv_dtype=kv,
        block_len=block_len,
        num_blocks=num_blocks,
        fuse_rope=fuse,
        rope_theta=theta,
        rope_scaling=scaling,
        softmax_scale=scale,
        sliding_window=_windows(raw, num_layers, max_s),
        sinks=_sinks(raw, num_layers, num_q, base),
        max_s_active=max_s,
        max_batch=_int(raw, "max_batch"),
        max_context=max_context,
        idle_ttl_s=_float(raw, "idle_ttl_s"),
        io_dtype=io,
        k_scale=_scales(raw, "k_scale", num_layers),
        v_scale=_scales(raw, "v_scale", num_layers),
    )


def read_file(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A config file's mapping (JSON, or YAML by extension .yaml/.yml); errors name `what`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(p)!r}: {exc.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"{what}: {str(p)!r} is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {str(p)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_spec(
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    hf_config: str | Path | None = None,
) -> ModelSpec:
    """Preset (default `presets.DEFAULT_PRESET` when no file is given), then a transformers
    `config.json` (`tkg.server.hf_config`), then the spec file, then overrides."""
    from tkg.server.presets import DEFAULT_PRESET, PRESETS

    raw: dict[str, Any] = {}
    if preset is None and config is None and hf_config is None:
        preset = DEFAULT_PRESET
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: {preset!r}; expected one of {sorted(PRESETS)}")
        raw.update(PRESETS[preset])  # nested values (rope_scaling) are only ever read
    if hf_config is not None:
        from tkg.server import hf_config as hf

        _merge(raw, hf.spec_keys(hf.read_hf_config(hf_config)))
    base = None
    if config is not None:
        _merge(raw, read_file(config))
        base = Path(config).resolve().parent
    _merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})
    return build_spec(raw, base)


def _merge(raw: dict[str, Any], later: dict[str, Any]) -> None:
    """Overlay `later` on `raw`; capacity given one way replaces capacity given the other way."""
    for a, b in (("num_blocks", "kv_cache_bytes"), ("kv_cache_bytes", "num_blocks")):
        if later.get(a) is not None and b not in later:
            raw.pop(b, None)
    raw.update(later)
