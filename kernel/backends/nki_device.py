"""`NeuronDevice`: the `nki_store.Device` of backend `nki` on a Trainium host. Trn-only: every line
here needs torch-neuronx and a NeuronCore, and is covered only by the `trn`-marked tests.

Residency follows the Neuron documentation for calling `@nki.jit` kernels from PyTorch: tensors
are created on the XLA device once (`xm.xla_device()`, `tensor.to(device)`) and the kernel is
called with them directly ("NKI Kernel as a Framework Custom Operator",
https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/nki/framework_custom_op.html);
`nki.jit` picks the PyTorch integration from `torch.Tensor` arguments
(https://awsdocs-neuron.readthedocs-hosted.com/en/v2.31.0/nki/api/generated/nki.jit.html), and
in eager mode "the first call compiles the kernel for the input shapes, data types, and
non-tensor argument values of that call. Later calls with the same inputs reuse the compiled
kernel" ("How to work with NKI kernels from torch-neuronx",
https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/guides/how-to-work-with-nki.html).
So the pools stay in device memory across launches and only what `upload` is given crosses.

What would verify it on a trn2 instance: `pytest -m trn tests/test_kv_store.py` (store
round-trips, decode against the host store, per-step h2d bytes independent of context).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tkg.kernel.backends import nki_host


def _torch_dtype(dt: np.dtype) -> tuple[Any, np.dtype]:
    """(torch dtype, same-width numpy view dtype) for a numpy dtype (ml_dtypes bf16/fp8 via int views)."""
    import torch

    name = np.dtype(dt).name
    table = {
        "float32": (torch.float32, np.dtype(np.float32)), "float16": (torch.float16, np.dtype(np.float16)),
        "bfloat16": (torch.bfloat16, np.dtype(np.int16)), "float8_e4m3": (torch.float8_e4m3fn, np.dtype(np.int8)),
        "float8_e4m3fn": (torch.float8_e4m3fn, np.dtype(np.int8)), "uint8": (torch.uint8, np.dtype(np.uint8)),
        "int32": (torch.int32, np.dtype(np.int32)), "uint32": (torch.int32, np.dtype(np.int32)),
    }  # fmt: skip
    return table[name]


class NeuronDevice:
    """Pools and step inputs as torch tensors on the Neuron XLA device; see the module docstring."""

    def __init__(self, name: str, config_cls: Callable[[], type]) -> None:
        import torch
        import torch_xla.core.xla_model as xm

        self.name = name
        self._torch = torch
        self.dev = xm.xla_device()
        self._config_cls = config_cls
        self._lock = threading.Lock()
        self.h2d = 0
        self.d2h = 0

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self._torch.zeros(shape, dtype=_torch_dtype(dtype)[0], device=self.dev)

    def upload(self, a: np.ndarray) -> Any:
        tdt, view = _torch_dtype(a.dtype)
        t = self._torch.from_numpy(np.ascontiguousarray(a).view(view)).view(tdt).to(self.dev)
        with self._lock:
            self.h2d += a.nbytes
        return t

    def download(self, x: Any) -> np.ndarray:
        a = x.cpu().numpy()
        with self._lock:
            self.d2h += a.nbytes
        return a

    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None:
        pool[:, blocks.long(), offsets.long()] = values  # index_put on the device

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None:
        pool[:, dst.long()] = pool[:, src.long()]

    def gather_blocks(self, pool: Any, ids: Any) -> Any:
        return pool[:, ids.long()]

    def fold(self, pool: Any) -> Any:
        Hkv, NB, BL, d = pool.shape
        return pool.view(Hkv * NB, BL, d)

    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
        from tkg.kernel.nki_tkg.wrapper import attention_tkg_kernel

        res = attention_tkg_kernel[lnc](*args)
        res = res if isinstance(res, tuple) else (res,)
        return tuple(self.download(r) for r in res)

    def kernel_config(self, cfg: Any) -> Any:
        return nki_host.kernel_config(cfg, self._config_cls())
