"""The device store on a real lazy-tensor runtime: torch-xla's CPU runtime (`make test-xla`).

`NeuronDevice` on a Trainium host puts the pools on torch-xla's device (torch-neuronx). Here the
same code runs on `PJRT_DEVICE=CPU` with a stand-in torch kernel (`support.torch_kernel`) in place
of the NKI call, and the test asserts what the runtime itself reports (`torch_xla.debug.metrics`):
after warm-up, 50 steps of writes and decodes at batches 1-4 compile nothing; the pools' IR stays
one `device_data` node; the compiled graphs that write the pools alias their buffers (updated in
place); and the outputs and pools equal the host store's. The second test removes the barrier and
shows the runtime reporting the failure the first one guards against (the issue's repro).

Needs torch-xla (its own venv: `make test-xla`); skipped where it cannot be imported.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla starts its runtime
torch_xla = pytest.importorskip("torch_xla")
met = pytest.importorskip("torch_xla.debug.metrics")

from support import torch_kernel  # noqa: E402

from tkg.dtypes import BF16  # noqa: E402
from tkg.kernel.backends.nki_device import NeuronDevice  # noqa: E402
from tkg.kernel.backends.nki_store import DeviceKVStore, make_store  # noqa: E402
from tkg.kernel.kv_store import HostKVStore, KVGeometry, LayerVariant  # noqa: E402

pytestmark = pytest.mark.xla

LAYERS, HKV, HQ, BL, D, NB = 2, 2, 4, 16, 32, 64


class _Config:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _stores() -> tuple[DeviceKVStore, HostKVStore]:
    geo = KVGeometry(LAYERS, HKV, NB, BL, D, np.dtype(BF16))
    dev = NeuronDevice("nki", lambda: _Config, kernel=torch_kernel.attention)  # the XLA device
    assert dev.dev.type == "xla"
    store = make_store(geo, dev, max_context=256, max_batch=4, max_s_active=1, context_buckets=(128, 256))
    return store, HostKVStore(geo, "reference")


def _compiles() -> int:
    return int(met.metric_data("CompileTime")[0])


def _ir_lines(t: Any) -> int:
    return len(torch_xla._XLAC._get_xla_tensors_text([t]).strip().splitlines())


class _Steps:
    """Four sequences on disjoint blocks, filled to 100/60/120/20 tokens in both stores; step i
    appends one token to the first `[1, 2, 3, 4][i % 4]` of them and decodes every layer."""

    def __init__(self, stores: tuple[Any, ...], rng: np.random.Generator) -> None:
        self.stores, self.rng = stores, rng
        self.tables = rng.permutation(NB).reshape(4, NB // 4).astype(np.int32)  # 16 blocks: 256 tokens
        self.lens = np.array([100, 60, 120, 20], np.int32)
        for b, n in enumerate(self.lens):
            self._write(np.array([b]), np.arange(n)[None, :])

    def _write(self, rows: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Random k/v `[B, Hkv, T, d]` at positions `pos` `[B, T]` of sequences `rows`, every layer."""
        B, T = pos.shape
        blocks = np.take_along_axis(self.tables[rows], pos // BL, axis=1)
        for layer in range(LAYERS):
            k, v = (self.rng.standard_normal((B, HKV, T, D)).astype(BF16) for _ in range(2))
            for s in self.stores:
                s.write(layer, blocks, pos % BL, k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3))
        return k, v  # the last layer's (decode reads the new tokens from the pools' writes)

    def step(self, i: int) -> list[np.ndarray]:
        B = (1, 2, 3, 4)[i % 4]
        rows = np.arange(B)
        self.lens[rows] += 1
        lens = self.lens[rows].copy()
        pos = (lens - 1)[:, None]
        blocks = np.take_along_axis(self.tables[rows], pos // BL, axis=1)
        outs = []
        for layer in range(LAYERS):
            k, v = (self.rng.standard_normal((B, HKV, 1, D)).astype(BF16) for _ in range(2))
            q = self.rng.standard_normal((B, HQ, 1, D)).astype(BF16)
            for s in self.stores:
                s.write(layer, blocks, pos % BL, k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3))
            for s in self.stores:
                k_new = k if isinstance(s, DeviceKVStore) else None
                outs.append(s.decode(layer, q, k_new, v if k_new is not None else None, self.tables[rows], lens,
                                     scale=0.17))  # fmt: skip
        return outs


def test_pools_stay_resident_and_nothing_compiles_after_warm_up_over_50_steps() -> None:
    store, host = _stores()
    rng = np.random.default_rng(0)
    assert store.buckets.batches == (1, 2, 4) and store.buckets.contexts == (128, 256)
    aliases_before = met.metric_data("InputOutputAliasCount")
    report = store.warm_up({LayerVariant()}, HQ)
    assert report.launches == 3 * 2
    steps = _Steps((store, host), rng)  # the fill: writes of every size, chunked to the write buckets
    store.sync()
    warmed = _compiles()
    ir = [_ir_lines(p) for p in store.k + store.v]
    assert ir == [3] * (2 * LAYERS), torch_xla._XLAC._get_xla_tensors_text([store.k[0]])  # one device_data node
    # Buffers aliased: each compiled graph that updates pools in place donates them; the write graphs
    # (one per write bucket) alias K and V, the copy graphs (one per block count) every pool; the
    # reads and decodes only read them (0). One sample per compiled graph since warm-up began.
    count0 = 0 if aliases_before is None else aliases_before[0]
    samples = [v for _, v in met.metric_data("InputOutputAliasCount")[2]][-(warmed - count0) :]
    want = [2.0] * len(store.write_sizes) + [2.0 * LAYERS] * len(store.block_counts)
    assert sorted(x for x in samples if x) == sorted(want), samples
    executed = met.counter_value("CachedCompile") or 0
    for i in range(50):
        dev_host = steps.step(i)
        for got, want in zip(dev_host[::2], dev_host[1::2], strict=True):
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)
    store.sync()
    assert steps.lens.tolist() == [150, 97, 144, 32] and store.buckets.context_for(150) == 256
    print(f"compiles: {warmed} by the end of warm-up and fill, {_compiles()} after 50 steps; pool IR lines {ir}")
    assert _compiles() == warmed, "a graph was compiled after warm-up"
    assert (met.counter_value("CachedCompile") or 0) - executed >= 50 * LAYERS * 2  # writes + decodes ran
    assert [_ir_lines(p) for p in store.k + store.v] == ir  # the pools' IR did not grow
    everything = np.arange(NB)
    for layer in range(LAYERS):
        for a, b in zip(store.read_blocks(layer, everything), host.read_blocks(layer, everything), strict=True):
            np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    assert _compiles() == warmed  # the reads too (chunks of the warmed block counts)
    store.close()


def test_without_the_step_barrier_the_graph_grows_and_recompiles_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement above can fail: with `barrier` a no-op (the store before residency), the
    pools stay pending IR and each output's `.cpu()` compiles a bigger graph."""
    store, host = _stores()
    monkeypatch.setattr(store.device, "barrier", lambda: None)
    steps = _Steps((store, host), np.random.default_rng(1))
    store.sync()
    compiles, ir = [], []
    for i in range(4):
        steps.step(4 * i)  # batch 1 each time: the same bucket, a graph the runtime has seen
        store.sync()
        compiles.append(_compiles())
        ir.append(_ir_lines(store.k[0]))
    print(f"without the barrier: compiles {compiles}, the K pool's IR lines {ir}")
    assert compiles[-1] - compiles[0] >= 3 and ir == sorted(ir) and ir[-1] > ir[0], (compiles, ir)
    store.close()
