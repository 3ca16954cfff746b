"""The step's host passes on the `cpu` backend: RoPE of q and k done in the commit's store write
(`StepEngine._commit_rotated`, `HostKVStore.write_rope`) and answers encoded from the kernel's
`codec.output_array` answer and store exactly what the unfused passes (`rotate_qk`, then
`commit`'s store write; `tobytes`) do, on the scalar and the general append path, launched on the
event loop or held on the worker thread, and with a window layer."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from support.service import make_service

from tkg import codec
from tkg.client.messages import DecodeInput, decode_request
from tkg.dtypes import BF16
from tkg.kernel.backends import host_ops
from tkg.kernel.kv_store import HostKVStore

pytestmark = pytest.mark.skipif(not host_ops.host_ops_available(), reason="native extension not built")

SPEC = {
    "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "block_len": 4, "num_blocks": 96,
    "kv_dtype": "bfloat16", "max_context": 64, "max_batch": 12, "fuse_rope": True, "sliding_window": [None, 8],
    "max_s_active": 1,
}  # fmt: skip


async def _run(fused: bool, inline: bool, batches: list[int], monkeypatch: pytest.MonkeyPatch) -> tuple[list, Any]:
    """Every answer's bytes and the service, after decode steps of `batches` sequences each (the
    same values for both runs), every step at both layers."""
    svc = make_service(SPEC, backend="cpu")
    engine = svc.engine
    assert engine._rope_in_write  # a bf16 host store with the native pass: fused unless switched off
    engine._rope_in_write = fused
    monkeypatch.setattr(engine.lone, "inline", lambda kv_bytes: inline)
    monkeypatch.setattr(codec, "OUTPUT_MIN_BYTES", 0 if fused else 1 << 40)  # every answer, or none, in place
    svc.start()
    rng = np.random.default_rng(7)
    ids = [f"s{i}" for i in range(max(batches))]
    for sid in ids:
        svc.cache.create(sid)
    answers = []
    for B in batches:
        # The first `B` sequences go on; sequences left out stay behind (their positions are their own).
        for layer in range(2):
            pos = [svc.cache.get(s).lengths[layer] for s in ids[:B]]
            q = rng.standard_normal((B, 4, 1, 16)).astype(BF16)
            k, v = (rng.standard_normal((B, 2, 1, 16)).astype(BF16) for _ in range(2))
            resp = await svc.decode(decode_request(DecodeInput(layer, ids[:B], pos, q, k, v)))
            answers.append(resp.out.data)
    await svc.close()
    return answers, svc


@pytest.mark.parametrize("inline", [True, False])
def test_rope_in_the_store_write_is_bit_identical_to_rope_then_write(
    inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [3, 3, 11, 11, 11, 5, 11, 1, 11, 11]  # scalar (<= 8) and general (> 8) append paths
    calls: list[int] = []
    real = HostKVStore.write_rope

    def counted(self: HostKVStore, *args: Any) -> Any:
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(HostKVStore, "write_rope", counted)
    whole, real_whole = [], codec._whole_bytes
    monkeypatch.setattr(codec, "_whole_bytes", lambda a: whole.append(real_whole(a) is not None) or real_whole(a))
    fused, svc_f = asyncio.run(_run(True, inline, batches, monkeypatch))
    assert len(calls) == 2 * len(batches)  # every step took the fused pass
    assert whole == [True] * 2 * len(batches)  # and every answer went out without tobytes
    unfused, svc_u = asyncio.run(_run(False, inline, batches, monkeypatch))
    assert len(calls) == 2 * len(batches)  # and none of the unfused run's
    assert whole[2 * len(batches) :] == [False] * 2 * len(batches)  # all through tobytes
    assert fused == unfused
    for a, b in zip([*svc_f.cache.store.k, *svc_f.cache.store.v], [*svc_u.cache.store.k, *svc_u.cache.store.v],
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    assert list(svc_f.cache.get("s0").lengths) == [len(batches)] * 2
