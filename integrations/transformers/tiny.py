"""Tiny randomly initialised models of the supported families (no download), for tests and the demo.

Each has 2 layers, hidden size 64, 4 query / 2 KV heads of 16 and a 128-token vocabulary, and keeps
its family's attention features: Llama 3 (llama3 RoPE scaling), Qwen2 (q/k/v biases, a sliding
window of 8 from layer 1 on, as `max_window_layers` puts it), Qwen3 (q/k norms, default RoPE),
gpt-oss (learned sinks, a sliding window of 8 on layer 0, YaRN, mixture of experts).
"""

from __future__ import annotations

import torch

VOCAB = 128
FAMILIES = ("llama3", "qwen2", "qwen3", "gpt-oss")
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")  # fmt: skip


def tiny_model(family: str, dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A `*ForCausalLM` of `family` with random weights (seeded), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {**_COMMON, "num_hidden_layers": layers}
    if family == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}  # fmt: skip
        config = tf.LlamaConfig(intermediate_size=128, max_position_embeddings=512, rope_theta=500000.0,
                                rope_scaling=scaling, **common)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = tf.Qwen2Config(intermediate_size=128, max_position_embeddings=512, rope_theta=1000000.0,
                                use_sliding_window=True, sliding_window=8, max_window_layers=1, **common)  # fmt: skip
        model = tf.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        config = tf.Qwen3Config(intermediate_size=128, max_position_embeddings=512, rope_theta=1000000.0, **common)
        model = tf.Qwen3ForCausalLM(config)
    elif family == "gpt-oss":
        scaling = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                   "original_max_position_embeddings": 64}  # fmt: skip
        types = ["sliding_attention", "full_attention"] * layers
        config = tf.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                 max_position_embeddings=2048, rope_scaling=scaling, layer_types=types[:layers],
                                 **common)  # fmt: skip
        model = tf.GptOssForCausalLM(config)
        with torch.no_grad():  # real sinks are far from the init's zeros
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()
    else:
        raise ValueError(f"family: {family!r}; expected one of {FAMILIES}")
    return model.to(dtype).eval()


def draft_of(target: torch.nn.Module) -> torch.nn.Module:
    """A smaller draft for assisted generation: `target`'s first layer, embeddings and head (so its
    guesses are often right and sometimes wrong)."""
    keys = {**target.config.to_dict(), "num_hidden_layers": 1}
    if keys.get("layer_types") is not None:
        keys["layer_types"] = keys["layer_types"][:1]
    config = target.config.__class__(**keys)
    draft = target.__class__(config).to(target.dtype).eval()
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft
