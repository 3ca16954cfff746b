"""transformers models through a context-parallel client: tiny Llama 3 and gpt-oss (fp32) generate
the same greedy tokens through `Client(3 replicas, segment_tokens=16)` as with their own attention,
on a 40-token prompt, longer than one replica holds (4 blocks of 8 tokens per layer)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from support.server_proc import start_server  # noqa: E402

from tkg.client import Client  # noqa: E402
from tkg.integrations.transformers import remote, server_spec  # noqa: E402
from tkg.integrations.transformers.tiny import VOCAB, tiny_model  # noqa: E402

NEW_TOKENS, PROMPT, SEGMENT = 24, 40, 16


@pytest.mark.parametrize("family", ["llama3", "gpt-oss"])
def test_segmented_greedy_matches_local_attention(tmp_path, family) -> None:
    torch.set_num_threads(1)
    model = tiny_model(family, torch.float32)
    path = tmp_path / "spec.json"
    server_spec(model, num_blocks=4, block_len=8).write(path)  # 32 tokens per layer: less than the prompt
    servers = [start_server("--config", str(path), "--backend", "cpu") for _ in range(3)]
    try:
        ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
        want = model.generate(input_ids=ids, attention_mask=mask, **kw)
        targets = [s.target for s in servers]
        with Client(targets, segment_tokens=SEGMENT) as client, remote.remote_attention(model, client) as session:
            got = model.generate(input_ids=ids, attention_mask=mask, **kw)
            (seq,) = session.caches[-1].sequence_ids
            assert len(client._segments.bases[seq]) == -(-(PROMPT + NEW_TOKENS - 1) // SEGMENT)
        assert torch.equal(got, want)
    finally:
        for s in servers:
            s.stop()
