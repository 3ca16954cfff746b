"""The served model-attention spec: presets, files, overrides, RoPE frequencies, and config errors
that name the key and the expected value (at start, before anything is bound)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tkg.server import cli
from tkg.server.config import ConfigError, build_spec, load_spec
from tkg.server.presets import PRESETS
from tkg.server.rope import angles, inv_freqs, rotate

GiB = 2**30
SMALL: dict[str, Any] = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "num_blocks": 8}


# ---- presets --------------------------------------------------------------------------------


def test_default_is_a_small_cpu_geometry() -> None:
    spec = load_spec()
    assert spec.name == "tiny" and spec.kv_bytes() <= GiB
    assert spec.max_s_active == 7 and spec.softmax_scale == pytest.approx(1 / math.sqrt(spec.head_dim))


def test_llama_3_8b_preset() -> None:
    s = load_spec(preset="llama-3-8b")
    assert (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim) == (32, 32, 8, 128)
    assert s.rope_theta == 500000.0 and s.rope_scaling["type"] == "llama3" and s.fuse_rope
    assert s.sinks is None and set(s.sliding_window) == {None}
    assert s.softmax_scale == pytest.approx(128**-0.5)


def test_gpt_oss_20b_preset() -> None:
    s = load_spec(preset="gpt-oss-20b")
    assert (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim) == (24, 64, 8, 64)
    assert s.sliding_window == tuple(128 if i % 2 == 0 else None for i in range(24))
    assert s.sinks is not None and s.sinks.shape == (24, 64) and not s.sinks.any()  # zeros without a file
    # YaRN's attention factor m = 0.1 ln(32) + 1 multiplies q and k, i.e. the logits by m^2.
    m = 0.1 * math.log(32) + 1
    assert s.softmax_scale == pytest.approx(m * m / 8)
    assert s.rope_theta == 150000.0 and s.rope_scaling["truncate"] is False


def test_preset_real_sinks_from_file(tmp_path: Path) -> None:
    sinks = np.arange(24 * 64, dtype=np.float32).reshape(24, 64) / 100
    np.save(tmp_path / "sinks.npy", sinks)
    s = load_spec(preset="gpt-oss-20b", overrides={"sinks": str(tmp_path / "sinks.npy"), "num_blocks": 4})
    np.testing.assert_array_equal(s.sinks, sinks)
    assert s.num_blocks == 4


# ---- files and overrides --------------------------------------------------------------------


def test_json_and_yaml_files_with_defaults(tmp_path: Path) -> None:
    raw = {**SMALL, "sliding_window": [None, 8], "sinks": "sinks.npy", "name": "mine"}
    np.save(tmp_path / "sinks.npy", np.ones((2, 4), np.float32))
    (tmp_path / "a.json").write_text(json.dumps(raw))
    yaml_text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in raw.items())  # JSON values are YAML
    (tmp_path / "a.yaml").write_text(yaml_text)
    for name in ("a.json", "a.yaml"):
        s = load_spec(config=tmp_path / name)
        assert s.name == "mine" and s.sliding_window == (None, 8) and s.sinks.shape == (2, 4)  # relative path
        assert (s.kv_dtype, s.block_len, s.max_s_active, s.fuse_rope) == ("bfloat16", 16, 7, False)
        assert s.idle_ttl_s >= 60  # minutes, not Triton's one second


def test_precedence_preset_then_file_then_flags(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"num_layers": 3, "kv_cache_bytes": 2**20}))
    s = load_spec(config=tmp_path / "c.json", preset="tiny", overrides={"head_dim": 32, "num_blocks": None})
    tiny = PRESETS["tiny"]
    assert (s.num_layers, s.head_dim, s.num_q_heads) == (3, 32, tiny["num_q_heads"])
    # kv_cache_bytes from the file replaces the preset's num_blocks: whole blocks that fit.
    per_block = 2 * 3 * tiny["num_kv_heads"] * tiny["block_len"] * 32 * 2
    assert s.num_blocks == 2**20 // per_block and s.kv_bytes() <= 2**20


def test_cli_flags_reach_the_spec() -> None:
    args = cli.build_parser().parse_args(
        ["--preset", "tiny", "--num-layers", "3", "--sliding-window", "8,none,16", "--fuse-rope", "false",
         "--rope-scaling", '{"rope_type": "linear", "factor": 2}', "--max-batch", "5", "--kv-dtype", "float32"]
    )  # fmt: skip
    s = cli.spec_from_args(args)
    assert s.sliding_window == (8, None, 16) and not s.fuse_rope and s.max_batch == 5 and s.kv_dtype == "float32"
    assert s.rope_scaling == {"type": "linear", "factor": 2}


LLAMA3_ARGS = {"type": "llama3", "factor": 8, "original_max_position_embeddings": 8192}
BAD_SPECS: list[tuple[dict[str, Any], str, str]] = [
    ({"num_heads": 4}, "num_heads", "expected some of"),
    ({"num_layers": None}, "num_layers: missing", "expected an integer >= 1"),
    ({"num_layers": 0}, "num_layers: 0", "expected an integer >= 1"),
    ({"num_layers": "2"}, "num_layers: '2'", "expected an integer"),
    ({"num_q_heads": 3}, "num_q_heads: 3", "multiple of num_kv_heads=2"),
    ({"head_dim": 15}, "head_dim: 15", "even"),
    ({"head_dim": 256}, "head_dim: 256", "[2, 128]"),
    ({"kv_dtype": "float8"}, "kv_dtype: 'float8'", "bfloat16"),
    ({"num_blocks": None}, "num_blocks or kv_cache_bytes", "expected one"),
    ({"num_blocks": None, "kv_cache_bytes": 100}, "kv_cache_bytes: 100", "expected an integer >="),
    ({"max_s_active": 9}, "max_s_active: 9", "[1, 8]"),
    ({"kv_dtype": "float8_e4m3", "io_dtype": "float8_e4m3"}, "io_dtype: 'float8_e4m3'", "storage dtype only"),
    ({"io_dtype": "int8"}, "io_dtype: 'int8'", "bfloat16"),
    ({"k_scale": 0}, "k_scale[0]: 0", "positive number"),
    ({"v_scale": [1.0]}, "v_scale: [1.0]", "list of 2 (one per layer)"),
    ({"max_context": 3}, "max_context: 3", ">= 7"),
    ({"max_batch": 0}, "max_batch: 0", ">= 1"),
    ({"fuse_rope": "yes"}, "fuse_rope: 'yes'", "true or false"),
    ({"rope_theta": -1}, "rope_theta: -1", "positive"),
    ({"softmax_scale": float("nan")}, "softmax_scale: nan", "positive"),
    ({"idle_ttl_s": 0}, "idle_ttl_s: 0", "positive"),
    ({"sliding_window": [8]}, "sliding_window", "list of 2 entries"),
    ({"sliding_window": [8, 2]}, "sliding_window[1]: 2", "max_s_active=7"),
    ({"sinks": [[0.0] * 4]}, "sinks: array", "shape [2, 4]"),
    ({"sinks": "missing.npy"}, "sinks: cannot load", "[2, 4]"),
    ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling.type: 'ntk'", "llama3"),
    ({"rope_scaling": {"type": "llama3", "factor": 8}}, "rope_scaling.low_freq_factor: missing", "positive"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor: 0", "positive"),
    ({"rope_scaling": {"type": "linear", "factor": 2, "beta": 1}}, "unknown key(s) ['beta']", "expected some of"),
    (
        {"rope_scaling": {**LLAMA3_ARGS, "low_freq_factor": 4, "high_freq_factor": 1}},
        "rope_scaling.high_freq_factor: 1",
        "low_freq_factor=4",
    ),
]


@pytest.mark.parametrize(("change", "names", "expects"), BAD_SPECS)
def test_bad_spec_names_key_and_expected_value(change: dict[str, Any], names: str, expects: str) -> None:
    raw = {**SMALL, **change}
    with pytest.raises(ConfigError) as info:
        build_spec({k: v for k, v in raw.items() if v is not None}, base=Path("/nonexistent"))
    assert names in str(info.value) and expects in str(info.value), str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for path, needle in ((tmp_path / "bad.json", "not valid json"), (tmp_path / "list.yaml", "must hold a mapping"),
                         (tmp_path / "absent.json", "cannot read")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            load_spec(config=path)
    with pytest.raises(ConfigError, match="preset: 'llama-9'; expected one of"):
        load_spec(preset="llama-9")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--num-q-heads", "3"], "num_q_heads: 3"),
        (["--port", "70000"], "--port: 70000; expected an integer in [0, 65535]"),
        (["--max-pending", "0"], "--max-pending: 0"),
        (["--batch-delay-us", "-5"], "--batch-delay-us: -5"),
        (["--tls-cert", "x.pem"], "--tls-cert/--tls-key: only one given"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "--tls-cert: cannot read"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--sliding-window", "8,x"], "--sliding-window: 'x'"),
        (["--rope-scaling", "{bad"], "--rope-scaling: not JSON"),
        (["--peers", "a:1,b:1", "--advertise", "c:1"], "--advertise: 'c:1' is not one of --peers; expected one of a:1"),
    ],
)
def test_serve_exits_2_on_bad_config(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Free ports first (a later flag wins): a case that wrongly passed would not take real ports.
    assert cli.main(["--port", "0", "--metrics-port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tkg serve: error:") and needle in err, err


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop by default when installed (the server extra), asyncio's own on request; asking for
    uvloop without it is a config error (exit 2), auto then falls back to asyncio."""
    import asyncio
    import sys

    from tkg.server import app

    uvloop = pytest.importorskip("uvloop")
    assert app.loop_runner("auto") is uvloop.run and app.loop_runner("uvloop") is uvloop.run
    assert app.loop_runner("asyncio") is asyncio.run
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert app.loop_runner("auto") is asyncio.run
    with pytest.raises(ConfigError, match="--event-loop: uvloop is not installed"):
        app.loop_runner("uvloop")


def test_advertise_leaves_this_replica_out_of_its_peers() -> None:
    """Every replica of a StatefulSet gets the same --peers list; --advertise drops its own entry."""
    args = cli.build_parser().parse_args(["--peers", "a:1, b:1,c:1", "--advertise", "b:1"])
    assert cli.settings_from_args(args, "reference").peers == ("a:1", "c:1")
    args = cli.build_parser().parse_args(["--peers", "a:1,c:1"])
    assert cli.settings_from_args(args, "reference").peers == ("a:1", "c:1")


# ---- RoPE -----------------------------------------------------------------------------------


def _llama3_by_hand(d: int, theta: float, factor: float, low: float, high: float, orig: float) -> list[float]:
    """Llama 3.1's frequency rule, one frequency at a time."""
    out = []
    for i in range(0, d, 2):
        f = theta ** (-i / d)
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def test_llama3_inv_freqs() -> None:
    p = PRESETS["llama-3-8b"]["rope_scaling"]
    got = load_spec(preset="llama-3-8b").inv_freqs()
    exp = _llama3_by_hand(128, 500000.0, 8.0, 1.0, 4.0, 8192.0)
    np.testing.assert_allclose(got, exp, rtol=1e-6)
    assert got[0] == 1.0 and got[-1] == pytest.approx(500000.0 ** (-126 / 128) / p["factor"], rel=1e-6)
    smooth = [i for i, (a, b) in enumerate(zip(got, _llama3_by_hand(128, 5e5, 1, 1, 4, 8192), strict=True))
              if not (a == pytest.approx(b, rel=1e-6) or a == pytest.approx(b / 8, rel=1e-6))]  # fmt: skip
    assert smooth, "no frequency fell in the blended band; the test would not check it"


def test_linear_and_yarn_inv_freqs() -> None:
    base = inv_freqs(64, 150000.0)
    np.testing.assert_allclose(inv_freqs(64, 150000.0, {"type": "linear", "factor": 4}), base / 4, rtol=1e-6)
    yarn = {"type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096}  # fmt: skip
    for truncate in (True, False):
        got = inv_freqs(64, 150000.0, {**yarn, "truncate": truncate})
        # Fast-rotating dims keep their frequency, slow ones are interpolated by the factor.
        assert got[0] == pytest.approx(base[0]) and got[-1] == pytest.approx(base[-1] / 32, rel=1e-5)
        assert np.all(got <= base * (1 + 1e-6)) and np.all(got >= base / 32 * (1 - 1e-6))
    assert not np.allclose(inv_freqs(64, 150000.0, {**yarn, "truncate": False}), inv_freqs(64, 150000.0, yarn))


def test_rotate_is_a_complex_rotation_at_absolute_positions() -> None:
    rng = np.random.default_rng(0)
    d = 16
    x = rng.standard_normal((2, 3, 4, d)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3], [1000, 1001, 1002, 131071]])
    inv = inv_freqs(d, 10000.0)
    got = rotate(x, *angles(pos, inv))
    z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * np.exp(1j * pos[:, None, :, None] * inv.astype(np.float64))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=2e-5)
    np.testing.assert_array_equal(got[0, :, 0], x[0, :, 0])  # position 0 is the identity


def test_docs_config_example_is_valid(tmp_path: Path) -> None:
    """The spec example in docs/configuration.md loads (the first yaml block under "## The spec")."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    section = doc[doc.index("## The spec") :]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "model.yaml").write_text(example)
    np.save(tmp_path / "sinks.npy", np.zeros((4, 64), np.float32))
    s = load_spec(config=tmp_path / "model.yaml")
    assert s.name == "my-model" and s.sliding_window == (128, None, 128, None) and s.rope_scaling["type"] == "yarn"


def test_fp8_kv_spec_io_dtype_scales_and_bytes() -> None:
    """fp8 KV: 1 byte per element (twice the blocks of bf16 for the same bytes), bf16 I/O unless
    io_dtype says otherwise, scales per layer (a number applies to every layer), 1.0 by default."""
    base = {k: v for k, v in SMALL.items() if k != "num_blocks"}
    bf16 = build_spec({**base, "kv_cache_bytes": 2**20})
    fp8 = build_spec({**base, "kv_cache_bytes": 2**20, "kv_dtype": "float8_e4m3", "k_scale": 0.5,
                      "v_scale": [2.0, 0.25]})  # fmt: skip
    assert fp8.num_blocks == 2 * bf16.num_blocks and fp8.bytes_per_block() * 2 == bf16.bytes_per_block()
    assert fp8.kv_bytes() <= 2**20 and fp8.wire_dtype == "bfloat16" and bf16.wire_dtype == "bfloat16"
    assert fp8.scales(0) == (0.5, 2.0) and fp8.scales(1) == (0.5, 0.25) and bf16.scales(1) == (1.0, 1.0)
    assert build_spec({**SMALL, "kv_dtype": "float8_e4m3", "io_dtype": "float32"}).wire_dtype == "float32"
    assert build_spec({**SMALL, "kv_dtype": "float16"}).wire_dtype == "float16"
