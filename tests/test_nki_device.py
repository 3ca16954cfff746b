"""The `nki` device module's code on torch CPU tensors: every host <-> device transfer is dtype-safe.

`NeuronDevice` is what runs on a Trainium host, where nothing here can run it. Its code is plain
torch, so it runs here on torch CPU tensors (`device="cpu"`) with a stand-in torch kernel
(`support.torch_kernel`) in place of the NKI call: a dtype mistake in a transfer (torch cannot
hand bfloat16 or float8 tensors to numpy) fails here instead of at the first launch on a trn2.
The same store on torch-xla's lazy tensors is tests/test_xla_store.py (`make test-xla`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from support import torch_kernel

from tkg.dtypes import BF16, FP8, to_fp8
from tkg.kernel.backends.nki_device import NeuronDevice, to_numpy, to_torch
from tkg.kernel.backends.nki_store import DeviceKVStore, make_store
from tkg.kernel.kv_store import HostKVStore, KVGeometry, LayerVariant

torch = pytest.importorskip("torch")

HKV, HQ, BL, D, NB = 2, 4, 16, 32, 40


class _Config:
    """The kernel config class the device builds (the stand-in kernel reads only the tensors)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _cpu_store(dtype: np.dtype, **limits: Any) -> DeviceKVStore:
    geo = KVGeometry(2, HKV, NB, BL, D, np.dtype(dtype), io_dtype=BF16)
    dev = NeuronDevice("nki", lambda: _Config, device="cpu", kernel=torch_kernel.attention)
    return make_store(geo, dev, **({"max_context": 256, "max_batch": 2, "max_s_active": 2} | limits))


@pytest.mark.parametrize("dtype", [BF16, FP8, np.float16, np.float32])
def test_every_kv_dtype_round_trips_bit_for_bit_through_integer_views(dtype: np.dtype) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32) * 100
    x[0, 0, :2] = np.inf, -0.0  # special values keep their bits (fp8 saturates inf to 240)
    a = to_fp8(x) if np.dtype(dtype) == FP8 else x.astype(dtype)
    t = to_torch(a)
    want = torch.uint8 if np.dtype(dtype) == FP8 else {BF16: torch.bfloat16}.get(np.dtype(dtype))
    if want is not None:
        assert t.dtype == want
    back = to_numpy(t, a.dtype)
    assert back.dtype == a.dtype
    np.testing.assert_array_equal(back.view(f"u{a.itemsize}"), a.view(f"u{a.itemsize}"))
    if np.dtype(dtype) != FP8:  # floats read back without naming their dtype too
        assert to_numpy(t).dtype == a.dtype


def test_a_tensor_read_as_another_dtype_is_refused() -> None:
    t = to_torch(np.ones(4, BF16))
    with pytest.raises(TypeError, match=r"torch.bfloat16 tensor read as float8_e4m3; expected a torch.uint8"):
        to_numpy(t, FP8)
    with pytest.raises(TypeError, match="expected a tkg dtype"):
        to_torch(np.ones(2, np.complex64))


@pytest.mark.parametrize("dtype", [BF16, FP8])
def test_the_device_store_on_torch_cpu_writes_reads_warms_up_and_decodes_like_the_host_store(dtype: np.dtype) -> None:
    """bf16 and fp8 pools: writes (padded, into the scratch block), read_blocks, a copy, the
    warm-up (every output downloaded), and decodes at batch 1 and 2 against the host store."""
    rng = np.random.default_rng(1)
    dev = _cpu_store(dtype)
    host = HostKVStore(dev.geometry, "reference")
    assert dev.k[0].dtype == (torch.uint8 if dtype == FP8 else torch.bfloat16)
    assert tuple(dev.k[0].shape) == (HKV, NB + 1, BL, D)  # one scratch block past the cache's ids
    report = dev.warm_up({LayerVariant(), LayerVariant(window=True, sinks=True)}, HQ)
    assert dev.buckets.contexts == (256,) and report.launches == 2 * 2 * 2  # variants x batches x s_actives
    tables = rng.permutation(NB)[: 2 * 12].reshape(2, 12).astype(np.int32)
    length = 150
    pos = np.arange(length)
    kv = rng.standard_normal((2, 2, HKV, length, D)).astype(np.float32)
    kv = to_fp8(kv) if dtype == FP8 else kv.astype(dtype)
    for s in (dev, host):
        for layer in (0, 1):
            s.write(layer, tables[:, pos // BL], np.broadcast_to(pos % BL, (2, length)),
                    kv[0].transpose(1, 0, 2, 3), kv[1].transpose(1, 0, 2, 3))  # fmt: skip
    ids = np.r_[tables[0, :3], tables[1, 9]]
    dev.copy_blocks(ids[:1], np.array([tables[1, 11]]))
    host.copy_blocks(ids[:1], np.array([tables[1, 11]]))
    for layer in (0, 1):
        for a, b in zip(dev.read_blocks(layer, ids), host.read_blocks(layer, ids), strict=True):
            assert a.dtype == np.dtype(dtype) and a.shape == (HKV, 4, BL, D)
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    S = 2
    for B in (1, 2):
        lens = np.array([120, 97][:B], np.int32)
        q = rng.standard_normal((B, HQ, S, D)).astype(BF16)
        new = lens[:, None] - S + np.arange(S)
        k_new = np.stack([kv[0][b][:, new[b]] for b in range(B)])  # stored: fp8 caches get fp8 (as the service)
        v_new = np.stack([kv[1][b][:, new[b]] for b in range(B)])
        sinks = rng.standard_normal(HQ).astype(np.float32)
        for window, sk in ((None, None), (40, sinks)):
            got = dev.decode(1, q, k_new, v_new, tables[:B], lens, scale=0.125, window=window, sinks=sk)
            want = host.decode(1, q, None, None, tables[:B], lens, scale=0.125, window=window, sinks=sk)
            assert got.dtype == BF16
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=3e-2, rtol=3e-2)
    moved = dev.transfer_bytes()
    assert moved["h2d"] > 0 and moved["d2h"] > 0


def test_the_store_pads_every_write_copy_and_read_to_the_shapes_warm_up_ran() -> None:
    """A fixed set of shapes: after warm-up, writes of 1..4 tokens, copies and reads of 1..5
    blocks and decodes at every batch run no operation shape the warm-up did not run."""
    rng = np.random.default_rng(2)
    dev = _cpu_store(BF16, max_batch=2, max_s_active=2)
    dev.warm_up({LayerVariant()}, HQ)
    warmed = set(dev.graphs)
    assert {g[0] for g in warmed} == {"write", "copy", "read", "decode"}
    tables = rng.permutation(NB)[:8].reshape(2, 4).astype(np.int32)
    for n in (1, 2, 3, 4, 7):
        k = rng.standard_normal((HKV, n, D)).astype(BF16)
        dev.write(0, tables.reshape(-1)[:n], np.arange(n) % BL, k, k)
        dev.copy_blocks(tables.reshape(-1)[:n], np.arange(NB - n, NB))
        dev.read_blocks(1, tables.reshape(-1)[:n])
    for B, S in ((1, 1), (2, 1), (1, 2), (2, 2)):
        q = rng.standard_normal((B, HQ, S, D)).astype(BF16)
        kv = rng.standard_normal((B, HKV, S, D)).astype(BF16)
        dev.decode(0, q, kv, kv, tables[:B], np.full(B, 40, np.int32), scale=0.1)
    dev.sync()
    assert dev.graphs == warmed
    assert dev.graphs >= {("write", 1), ("write", 2), ("write", 4), ("read", 1), ("read", 16), ("copy", 8)}
