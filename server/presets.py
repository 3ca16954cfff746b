"""Built-in model geometries (`tkg serve --preset NAME`); file keys as in `tkg.server.config`."""

from __future__ import annotations

from typing import Any

GiB = 2**30

DEFAULT_PRESET = "tiny"

PRESETS: dict[str, dict[str, Any]] = {
    # What `tkg serve` serves with no flags: small enough for any laptop (128 MiB of KV,
    # 4096 blocks x 16 tokens = 64K cached tokens across all sequences).
    "tiny": {
        "name": "tiny",
        "num_layers": 4,
        "num_q_heads": 8,
        "num_kv_heads": 2,
        "head_dim": 64,
        "kv_dtype": "bfloat16",
        "block_len": 16,
        "num_blocks": 4096,
        "fuse_rope": True,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_s_active": 7,
        "max_batch": 64,
        "max_context": 8192,
        "idle_ttl_s": 600.0,
    },
    # Llama-3 8B / 3.1 8B attention: GQA 32/8, d=128, Llama-3.1 RoPE scaling.
    "llama-3-8b": {
        "name": "llama-3-8b",
        "num_layers": 32,
        "num_q_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "kv_dtype": "bfloat16",
        "block_len": 16,
        "kv_cache_bytes": 4 * GiB,
        "fuse_rope": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_s_active": 7,
        "max_batch": 64,
        "max_context": 131072,
        "idle_ttl_s": 600.0,
    },
    # gpt-oss-20b attention: 64 q / 8 kv heads, d=64, learned sinks, sliding window 128 on every
    # other layer (even layers, as its layer_types begin with sliding_attention), YaRN RoPE
    # (factor 32 over 4096 positions, untruncated correction range; the attention factor
    # 0.1 ln 32 + 1 is folded into the softmax scale). Sinks default to zeros (a sink logit of 0
    # still adds exp(0 - max) to every softmax denominator): pass the model's `[24, 64]` sink
    # logits with `sinks: path.npy` (or `--sinks`) to serve real weights.
    "gpt-oss-20b": {
        "name": "gpt-oss-20b",
        "num_layers": 24,
        "num_q_heads": 64,
        "num_kv_heads": 8,
        "head_dim": 64,
        "kv_dtype": "bfloat16",
        "block_len": 16,
        "kv_cache_bytes": 2 * GiB,
        "fuse_rope": True,
        "rope_theta": 150000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        "sliding_window": [128 if layer % 2 == 0 else None for layer in range(24)],
        "sinks": "zeros",
        "max_s_active": 7,
        "max_batch": 64,
        "max_context": 131072,
        "idle_ttl_s": 600.0,
    },
}
