"""Spec keys from a Hugging Face transformers model config (`config.json`), for `tkg serve --hf-config`.

A pure function of the config mapping (no transformers or torch import), shared with
`tkg.integrations.transformers.server_spec`, which feeds it a loaded model's `config.to_dict()`.
Both layouts are read: transformers 5 (`rope_parameters` holding `rope_theta`, `dtype`,
`layer_types`) and the 4.x files on the Hub (`rope_theta` + `rope_scaling`, `torch_dtype`,
`use_sliding_window` / `max_window_layers`). What the server cannot serve (partial rotary, per-layer
RoPE, chunked or linear attention layers) is a `ConfigError` naming the config key.

Learned sinks (gpt-oss) are weights, not config: they come from `--sinks` or from `server_spec(model)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tkg import dtypes
from tkg.server.config import SCALING_PARAMS, ConfigError

GiB = 2**30
# A config has no KV capacity; this default is overridden with --kv-cache-bytes / --num-blocks.
DEFAULT_KV_CACHE_BYTES = 1 * GiB
# A config's `dtype` ("bfloat16" or "torch.bfloat16": torch's name) -> the KV dtype name; fp8 is no model dtype.
DTYPES = {d.torch_name: d.name for d in dtypes.IO}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The JSON mapping of a transformers `config.json` (a folder holding one is accepted)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"--hf-config: cannot read {str(p)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--hf-config: {str(p)!r} is not JSON ({exc}); expected a transformers config.json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--hf-config: {str(p)!r} holds {type(data).__name__}; expected a mapping")
    return data


def spec_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Spec keys (`tkg.server.config`) for the attention of the model `cfg` describes.

    Geometry: `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads` (default: the q heads),
    `head_dim` (default `hidden_size // num_attention_heads`). Windows: `layer_types` with
    `sliding_window`, else Qwen2's `use_sliding_window` + `max_window_layers`, else a
    `sliding_window` alone applies to every layer (Mistral). RoPE: theta and scaling (default,
    linear, llama3, yarn); `fuse_rope` stays false (the model rotates q and k itself).
    `max_context` = `max_position_embeddings`; KV dtype = the config's dtype (bfloat16 if unset).
    """
    if isinstance(cfg.get("text_config"), Mapping):  # multimodal wrappers keep the decoder's config here
        cfg = cfg["text_config"]
    layers = _need(cfg, "num_hidden_layers")
    q_heads = _need(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or q_heads
    head_dim = cfg.get("head_dim") or _need(cfg, "hidden_size") // q_heads
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor: {cfg['partial_rotary_factor']}; expected 1.0 (full rotary)")
    keys: dict[str, Any] = {
        "name": str(cfg.get("_name_or_path") or cfg.get("model_type") or "hf-model"),
        "num_layers": layers,
        "num_q_heads": q_heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "fuse_rope": False,
        "sliding_window": windows(cfg, layers),
        "kv_cache_bytes": DEFAULT_KV_CACHE_BYTES,
        **rope_keys(cfg),
    }
    if cfg.get("max_position_embeddings"):
        keys["max_context"] = int(cfg["max_position_embeddings"])
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype is not None:
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise ConfigError(f"dtype: {dtype!r}; expected one of {sorted(DTYPES)}")
        keys["kv_dtype"] = DTYPES[str(dtype).removeprefix("torch.")]
    return keys


def windows(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Per-layer sliding window (None = full attention); HF's window W: query t sees key j when t - j < W."""
    w = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise ConfigError(f"layer_types: {len(types)} entries; expected num_hidden_layers={num_layers}")
        out: list[int | None] = []
        for i, t in enumerate(types):
            if t == "full_attention":
                out.append(None)
            elif t == "sliding_attention":
                if not isinstance(w, int) or isinstance(w, bool):
                    raise ConfigError(f"sliding_window: {w!r}; expected an integer (layer_types[{i}] is sliding)")
                out.append(w)
            else:
                raise ConfigError(f"layer_types[{i}]: {t!r}; expected full_attention or sliding_attention")
        return out
    if w is None or cfg.get("use_sliding_window") is False:
        return [None] * num_layers
    if "use_sliding_window" in cfg:  # Qwen2/Qwen3: layers from max_window_layers on use the window
        first = cfg.get("max_window_layers", 0)
        return [w if i >= first else None for i in range(num_layers)]
    return [w] * num_layers


def rope_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` (None for the default RoPE) from either config layout."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = {**(cfg.get("rope_scaling") or {"rope_type": "default"})}
        if "rope_theta" in cfg:
            params["rope_theta"] = cfg["rope_theta"]
    if not isinstance(params, Mapping) or ("rope_theta" not in params and "rope_type" not in params
                                           and "type" not in params):
        raise ConfigError(f"rope_parameters: {params!r}; expected one mapping for all layers (per-layer RoPE "
                          "is not served)")  # fmt: skip
    params = dict(params)
    theta = float(params.pop("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind not in SCALING_PARAMS:
        raise ConfigError(f"rope_parameters.rope_type: {kind!r}; expected default or one of {sorted(SCALING_PARAMS)}")
    # transformers fills YaRN's original length from max_position_embeddings when the file omits it.
    if kind == "yarn" and "original_max_position_embeddings" not in params and cfg.get("max_position_embeddings"):
        params["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    # Keys transformers writes at their neutral value are dropped; any other unknown key is checked
    # (and rejected by name) by tkg.server.config.
    for key, neutral in (("mscale", 1.0), ("mscale_all_dim", 0.0), ("attention_factor", None)):
        if key in params and params[key] in (neutral, None):
            params.pop(key)
    return {"rope_theta": theta, "rope_scaling": {"type": kind, **params}}


def _need(cfg: Mapping[str, Any], key: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}: {v!r}; expected a positive integer in the transformers config")
    return v
