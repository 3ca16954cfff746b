"""transformers models decode with their attention on a real `tkg serve` (loopback subprocess).

Tiny random Llama 3, Qwen3 and gpt-oss models (and Qwen2, fp32) (`tkg.integrations.transformers.tiny`, no download):
greedy `generate` of 32 tokens for 3 left-padded prompts gives the same ids as the model with its
own (eager) attention, fp32 and bf16; assisted generation with a smaller draft gives plain greedy's
ids; the local process holds no K/V; sequences are released on exit, also on an exception.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from support.server_proc import start_server  # noqa: E402
from transformers import DynamicCache, StoppingCriteria  # noqa: E402

from tkg.client import Client, errors  # noqa: E402
from tkg.integrations.transformers import remote, server_spec  # noqa: E402
from tkg.integrations.transformers.tiny import VOCAB, draft_of, tiny_model  # noqa: E402

NEW_TOKENS = 32
PROMPT_LENS = (12, 8, 3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning ones stall on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`get(family, dtype)`: the model and a server started from `server_spec(model)` (one each, reused)."""
    started: dict = {}

    def get(family: str, dtype: torch.dtype):
        if (family, dtype) not in started:
            model = tiny_model(family, dtype)
            path = tmp_path_factory.mktemp("spec") / "spec.json"
            server_spec(model, num_blocks=128).write(path)
            started[family, dtype] = model, start_server("--config", str(path), "--backend", "cpu")
        return started[family, dtype]

    yield get
    for _, srv in started.values():
        srv.stop()


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids `[3, 12]` and mask for prompts of PROMPT_LENS tokens."""
    g = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENS)
    ids = torch.randint(3, VOCAB, (len(PROMPT_LENS), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENS):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)  # fmt: skip


def tensors_in(obj, skip: tuple[type, ...] = ()) -> list:
    """Every torch.Tensor held by `obj`'s attributes, through lists/tuples/dicts and nested objects
    (not through objects of the `skip` types)."""
    found, seen, todo = [], set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            todo.extend(o)
        elif hasattr(o, "__dict__"):
            todo.extend(vars(o).values())
    return found


def bf16_ulp(x: float) -> float:
    """One unit in the last place of bfloat16 (8 significant bits) at magnitude |x|."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


@pytest.mark.parametrize(
    ("family", "dtype"),
    [(f, d) for f in ("llama3", "qwen3", "gpt-oss") for d in (torch.float32, torch.bfloat16)]
    + [("qwen2", torch.float32)],  # Qwen2's window layers (max_window_layers), fp32 only: budget
    ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(v, v),
)
def test_greedy_matches_local_attention(servers, family, dtype):
    model, srv = servers(family, dtype)
    ids, mask = prompts()
    local = greedy(model, ids, mask, cache=DynamicCache(config=model.config))
    local_kv_bytes = sum(t.numel() * t.element_size() for t in tensors_in(local.cache))
    assert local_kv_bytes > 0  # the walker finds a local cache's K/V, so finding none below means none

    with Client(srv.target) as client:
        with remote.remote_attention(model, client, chunk_tokens=5) as session:  # 12 tokens: 3 AppendKV chunks
            out = greedy(model, ids, mask)
            # The local process keeps no K/V: the cache generate used holds lengths only ...
            assert isinstance(out.cache, remote.RemoteCache)
            assert tensors_in(out.cache, skip=(remote.RemoteSession,)) == []
            assert getattr(remote._last_update, "record", None) is None  # ... and no step's k lingers
            # ... and the server holds every real token: prompt + 31 fed-back tokens per row, each layer.
            for seq, n in zip(out.cache.sequence_ids, PROMPT_LENS, strict=True):
                assert list(client.get_sequence(seq).lengths) == [n + NEW_TOKENS - 1] * 2
            seqs = list(out.cache.sequence_ids)
            # One Decode per layer per step for the whole batch.
            assert session.stats.decode_calls == (NEW_TOKENS - 1) * 2
            assert session.stats.decode_rows == (NEW_TOKENS - 1) * 2 * len(PROMPT_LENS)
            assert session.stats.append_tokens == sum(PROMPT_LENS) * 2
        for seq in seqs:  # released on exit
            with pytest.raises(errors.NotFound):
                client.get_sequence(seq)
    assert model.config._attn_implementation == "eager"  # restored

    want, got = local.sequences[:, -NEW_TOKENS:], out.sequences[:, -NEW_TOKENS:]
    if dtype == torch.float32:
        assert torch.equal(got, want)
        return
    # bf16: same ids, or the first divergence is a tie within bf16 rounding in BOTH runs (identical
    # prefixes up to there): each run's pick beats the other's by at most 2 ulps of the logit.
    for row in range(len(PROMPT_LENS)):
        diff = (got[row] != want[row]).nonzero()
        if len(diff) == 0:
            continue
        t = int(diff[0])
        a, r = int(want[row, t]), int(got[row, t])
        lo, ro = local.logits[t][row].float(), out.logits[t][row].float()
        tol = 2 * bf16_ulp(max(abs(float(lo[a])), abs(float(lo[r])), abs(float(ro[a])), abs(float(ro[r]))))
        assert float(lo[a] - lo[r]) <= tol, f"row {row} step {t}: local margin {float(lo[a] - lo[r])} > {tol}"
        assert float(ro[r] - ro[a]) <= tol, f"row {row} step {t}: remote margin {float(ro[r] - ro[a])} > {tol}"


@pytest.mark.parametrize("family", ["llama3", "gpt-oss"])
def test_assisted_generation_equals_greedy(servers, family):
    """Speculative decoding (1-layer draft, local) with the target on tkg: plain greedy's ids; drafts
    were both accepted (fewer target steps than tokens) and rejected (TruncateSequence). gpt-oss:
    verifying several tokens in one Decode applies the sliding window per query."""
    model, srv = servers(family, torch.float32)
    draft = draft_of(model)
    draft.generation_config.num_assistant_tokens = 10  # > max_s_active: verification spans 2 Decodes
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # never stop drafting early
    ids, mask = prompts(seed=1)
    ids, mask = ids[:1], mask[:1]  # transformers' assisted generation takes one row
    want = greedy(model, ids, mask).sequences
    with Client(srv.target) as client, remote.remote_attention(model, client) as session:
        got = greedy(model, ids, mask, assistant_model=draft)
        (seq,) = got.cache.sequence_ids
        assert list(client.get_sequence(seq).lengths) == [got.cache.get_seq_length()] * 2
        stats = session.stats
    assert torch.equal(got.sequences, want)
    assert stats.truncations > 0 and stats.truncated_tokens > 0
    assert stats.decode_steps < NEW_TOKENS - 1
    assert stats.decode_calls > 2 * stats.decode_steps  # some verifications were split by max_s_active


class _Boom(StoppingCriteria):
    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_sequences_released_on_exception(servers):
    model, srv = servers("llama3", torch.float32)
    ids, mask = prompts()
    with Client(srv.target) as client:
        before = client.server_info()
        with pytest.raises(RuntimeError, match="boom"), remote.remote_attention(model, client) as session:
            greedy(model, ids, mask, stopping_criteria=[_Boom(3)])
        assert session.stats.decode_steps == 3  # it failed mid-generation, with sequences on the server
        assert session.stats.sequences_created == len(PROMPT_LENS) == session.stats.sequences_released
        after = client.server_info()
        assert (after.free_blocks, after.active_sequences) == (before.free_blocks, before.active_sequences)
    assert model.config._attn_implementation == "eager"
    assert "_prepare_cache_for_generation" not in vars(model)


def test_mismatched_server_is_refused(servers):
    """A server whose spec is not the model's is refused before anything is created."""
    model, _ = servers("llama3", torch.float32)
    _, srv = servers("gpt-oss", torch.float32)
    with (
        Client(srv.target) as client,
        pytest.raises(ValueError, match="server sliding_window"),
        remote.remote_attention(model, client),
    ):
        pass
    assert model.config._attn_implementation == "eager"


def test_server_spec_equals_hf_config(tmp_path):
    """server_spec(model).write() and `--hf-config config.json --sinks` give the same served spec."""
    from tkg.server.config import load_spec

    model = tiny_model("gpt-oss", torch.bfloat16)
    spec = server_spec(model, num_blocks=64)
    assert spec.keys["sliding_window"] == [8, None]
    assert spec.keys["rope_scaling"]["type"] == "yarn" and spec.keys["kv_dtype"] == "bfloat16"
    want_sinks = np.stack([layer.self_attn.sinks.float().detach().numpy() for layer in model.model.layers])
    np.testing.assert_array_equal(spec.sinks, want_sinks)
    from_file = load_spec(config=spec.write(tmp_path / "spec.json"))
    model.config.save_pretrained(tmp_path)
    np.save(tmp_path / "sinks.npy", want_sinks)
    from_hf = load_spec(hf_config=tmp_path / "config.json",
                        overrides={"sinks": str(tmp_path / "sinks.npy"), "num_blocks": 64})  # fmt: skip
    for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "kv_dtype", "sliding_window", "rope_theta",
                  "rope_scaling", "softmax_scale", "fuse_rope", "max_context", "num_blocks"):  # fmt: skip
        assert getattr(from_file, field) == getattr(from_hf, field), field
    np.testing.assert_array_equal(from_file.sinks, from_hf.sinks)
    assert from_file.fuse_rope is False
