"""`tkg serve --hf-config`: spec keys from transformers config.json files (both layouts), no
transformers import; bad configs are one ConfigError naming the key."""

from __future__ import annotations

import json

import pytest

from tkg.server import cli
from tkg.server.config import ConfigError, load_spec
from tkg.server.hf_config import spec_keys

# As on the Hub (transformers 4.x layout): Llama 3.1 8B, Qwen2.5 7B, gpt-oss-20b.
LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN25 = {
    "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
    "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28, "torch_dtype": "bfloat16",
}  # fmt: skip
GPT_OSS = {
    "model_type": "gpt_oss", "hidden_size": 2880, "head_dim": 64, "num_hidden_layers": 4, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "max_position_embeddings": 131072, "rope_theta": 150000,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
}  # fmt: skip


def test_llama3_layout_4x():
    k = spec_keys(LLAMA_31)
    assert (k["num_layers"], k["num_q_heads"], k["num_kv_heads"], k["head_dim"]) == (32, 32, 8, 128)
    assert k["rope_theta"] == 500000.0 and k["kv_dtype"] == "bfloat16" and k["fuse_rope"] is False
    assert k["rope_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}  # fmt: skip
    assert k["sliding_window"] == [None] * 32 and k["max_context"] == 131072


def test_qwen2_windows():
    assert spec_keys(QWEN25)["sliding_window"] == [None] * 28  # use_sliding_window false
    on = spec_keys({**QWEN25, "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 4096,
                    "max_window_layers": 2})  # fmt: skip
    assert on["sliding_window"] == [None, None, 4096, 4096]
    mistral = {k: v for k, v in QWEN25.items() if k not in ("use_sliding_window", "max_window_layers")}
    assert spec_keys({**mistral, "num_hidden_layers": 2, "sliding_window": 4096})["sliding_window"] == [4096, 4096]


def test_gpt_oss_and_v5_layout():
    k = spec_keys(GPT_OSS)
    assert k["sliding_window"] == [128, None, 128, None] and k["head_dim"] == 64
    assert k["rope_scaling"]["type"] == "yarn" and k["rope_scaling"]["truncate"] is False
    assert "kv_dtype" not in k  # no dtype in the file: the spec default
    v5 = {**GPT_OSS, "dtype": "float32", "rope_parameters": {**GPT_OSS["rope_scaling"], "rope_theta": 150000.0}}
    del v5["rope_scaling"], v5["rope_theta"]
    assert spec_keys(v5) == {**k, "kv_dtype": "float32"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor: 0.5"),
        ({"layer_types": ["chunked_attention", "full_attention"] * 2}, "layer_types[0]: 'chunked_attention'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type: 'dynamic'"),
        ({"num_attention_heads": None}, "num_attention_heads: None"),
        ({"torch_dtype": "int8"}, "dtype: 'int8'"),
        ({"layer_types": ["sliding_attention"] * 4, "sliding_window": None}, "sliding_window: None"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        spec_keys({**GPT_OSS, **change})


def test_serve_flag(tmp_path):
    """--hf-config feeds load_spec; flags still override; a bad file is a ConfigError naming the flag
    (which `tkg serve` prints as one line, exit 2; main() is not called here: it configures logging
    for the whole test process)."""
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS))
    args = cli.build_parser().parse_args(["--hf-config", str(tmp_path), "--num-blocks", "32", "--sinks", "zeros"])
    spec = cli.spec_from_args(args)
    assert spec.sliding_window == (128, None, 128, None) and spec.num_blocks == 32 and spec.sinks.shape == (4, 64)
    assert spec.fuse_rope is False and spec.rope_scaling["factor"] == 32.0
    assert load_spec(hf_config=tmp_path / "config.json").kv_bytes() <= 2**30  # the default capacity
    (tmp_path / "bad.json").write_text("[1]")
    bad = cli.build_parser().parse_args(["--hf-config", str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match=r"--hf-config: .*bad.json' holds list; expected a mapping"):
        cli.spec_from_args(bad)
