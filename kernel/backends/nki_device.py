"""`NeuronDevice`: the `nki_store.Device` of backend `nki` on a Trainium host: torch tensors on the
XLA device (torch-neuronx), updated in place at each barrier.

On a Trainium host `NeuronDevice(name, config_cls)` puts the pools on `torch_xla`'s device and
launches `attention_tkg_kernel[lnc]` ("NKI Kernel as a Framework Custom Operator",
https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/nki/framework_custom_op.html).
The same code runs elsewhere with `device=` and `kernel=` given: on torch CPU tensors (the
dtype test, tests/test_nki_device.py) and on torch-xla's CPU runtime with a stand-in torch kernel
(`make test-xla`, tests/test_xla_store.py), which proves the residency a lazy-tensor device needs
(docs/trainium-store.md): the pools are created once and materialised by a barrier, every
operation is one job of the store ending at `barrier()` (`torch_xla.sync()`), so in-place
`index_put`s on the pools are donated buffers and each graph's shapes come from the buckets.

Transfers are dtype-safe both ways: torch cannot hand bfloat16 or float8 tensors to numpy and numpy
has neither, so the host side of every copy is an integer view of the same width (the dtype
registry `tkg.dtypes` has the facts): bf16 <-> int16, fp8 <-> uint8 (torch carries the fp8 e4m3
bits as uint8: its float8_e4m3fn is another encoding). Only the CPU side views; the device gets
the tensor in its own dtype.

Hardware-only (tests marked `trn`): the kernel as an XLA custom call, the compile counts of
neuronx-cc, the fp8 pool as the kernel sees it (`kernel_view`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tkg import dtypes
from tkg.kernel.backends import nki_host

Kernel = Callable[[int, tuple[Any, ...]], Any]

# Non-float arrays the store uploads: ids (int32; the kernel's uint32 table has the same bits, ids
# stay below 2**31) and the uint8 mask.
_INT_TORCH = {"int32": "int32", "uint32": "int32", "int64": "int64", "uint8": "uint8", "int16": "int16"}


def _bits(itemsize: int) -> tuple[str, np.dtype]:
    """(torch dtype name, numpy dtype) of the integer that carries `itemsize`-byte values."""
    return {1: ("uint8", np.dtype(np.uint8)), 2: ("int16", np.dtype(np.int16)), 4: ("int32", np.dtype(np.int32))}[
        itemsize
    ]


def to_torch(a: np.ndarray) -> Any:
    """A host torch tensor holding `a` (no copy): floats in the registry's torch dtype (fp8 as its
    uint8 bits), reached through an integer view since numpy has no bf16/fp8 torch knows."""
    import torch

    a = np.ascontiguousarray(a)
    row = dtypes.BY_NUMPY.get(a.dtype)
    if row is None:
        name = _INT_TORCH.get(a.dtype.name)
        if name is None:
            raise TypeError(f"to_torch: dtype {a.dtype}: expected a tkg dtype ({dtypes.names()}) or an id/mask integer")
        return torch.from_numpy(a.view(np.dtype(name))).view(getattr(torch, name))
    tname, ndt = _bits(row.itemsize)
    return torch.from_numpy(a.view(ndt)).view(getattr(torch, tname)).view(row.torch)


def to_numpy(t: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """A host torch tensor as numpy in `dtype` (None: the registry's row for its torch dtype), read
    through an integer view. TypeError when the tensor's dtype is not the one `dtype` travels in."""
    import torch

    t = t.detach().contiguous()
    if dtype is None:
        rows = [r for r in dtypes.ALL if r.torch_name != "uint8" and r.torch == t.dtype]
        if not rows:
            return t.numpy()  # integers: numpy has them
        row = rows[0]
    else:
        row = dtypes.BY_NUMPY.get(np.dtype(dtype))
        if row is None:  # integers: numpy has them; same-width ones are the same bits (uint32 ids)
            a = t.numpy()
            if a.dtype.itemsize != np.dtype(dtype).itemsize:
                raise TypeError(f"to_numpy: a {t.dtype} tensor read as {np.dtype(dtype)}; expected the same width")
            return a.view(np.dtype(dtype))
        if t.dtype != row.torch:
            raise TypeError(f"to_numpy: a {t.dtype} tensor read as {row.name}; expected a {row.torch} tensor")
    tname, ndt = _bits(row.itemsize)
    return t.view(getattr(torch, tname)).numpy().view(ndt).view(row.numpy)


def kernel_view(t: Any) -> Any:
    """What the NKI kernel is handed for q/k/v/pools: fp8 (uint8 bits) as an 8-bit float tensor.
    Trn-only assumption: torch's float8_e4m3fn and NKI's float8_e4m3 share every bit pattern the
    store writes (finite values saturated to +-240; they differ only at exponent 1111)."""
    import torch

    return t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 else t


def nki_kernel(lnc: int, args: tuple[Any, ...]) -> Any:
    """`attention_tkg_kernel[lnc](*args)` (Trn-only: needs the Neuron `nki`)."""
    from tkg.kernel.nki_tkg.wrapper import attention_tkg_kernel

    tensors, rest = args[:5], args[5:]  # q, k_active, v_active, k_prior, v_prior: fp8 may be any of them
    views = (None if t is None else kernel_view(t) for t in tensors)  # k/v_active: None when attend-only
    return attention_tkg_kernel[lnc](*views, *rest)


def _xla_device() -> Any:
    import torch_xla

    return torch_xla.device()


class NeuronDevice:
    """Pools and step inputs as torch tensors on `device` (default: the XLA device); `kernel(lnc,
    args)` launches (default: the NKI kernel). Called on the store's device thread only."""

    def __init__(
        self, name: str, config_cls: Callable[[], type], *, device: Any = None, kernel: Kernel | None = None,
        partial: bool | None = None,
    ) -> None:
        import torch

        self.name = name
        self._torch = torch
        self.dev = _xla_device() if device is None else torch.device(device)
        self._lazy = self.dev.type == "xla"
        self._kernel = nki_kernel if kernel is None else kernel
        # Whether the kernel has our partial mode (lse, attend-only): ours does; a stand-in
        # `kernel` only when it says so. Whether the store uses it is the store's `partial`.
        self.partial = kernel is None if partial is None else partial
        self._config_cls = config_cls
        self._lock = threading.Lock()  # the counters are read from other threads (metrics)
        self.h2d = 0
        self.d2h = 0

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        row = dtypes.BY_NUMPY.get(np.dtype(dtype))
        if row is None:
            raise TypeError(f"{self.name}: pool dtype {dtype}: expected one of {dtypes.names()}")
        return self._torch.zeros(shape, dtype=row.torch, device=self.dev)

    def upload(self, a: np.ndarray) -> Any:
        t = to_torch(a).to(self.dev)
        with self._lock:
            self.h2d += a.nbytes
        return t

    def download(self, x: Any, dtype: np.dtype | None = None) -> np.ndarray:
        a = to_numpy(x.cpu(), dtype)
        with self._lock:
            self.d2h += a.nbytes
        return a

    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None:
        pool[:, blocks.long(), offsets.long()] = values  # index_put_ in place on the pool

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None:
        pool[:, dst.long()] = pool[:, src.long()]

    def gather_blocks(self, pool: Any, ids: Any) -> Any:
        return pool[:, ids.long()]

    def fold(self, pool: Any) -> Any:
        Hkv, NB, BL, d = pool.shape
        return pool.view(Hkv * NB, BL, d)

    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        res = self._kernel(lnc, args)
        return res if isinstance(res, tuple) else (res,)

    def barrier(self) -> None:
        """`torch_xla.sync()` on the XLA device: compile (once per graph) and run what is pending,
        updating the pools in place; nothing on an eager device."""
        if self._lazy:
            import torch_xla

            torch_xla.sync()

    def kernel_config(self, cfg: Any, *, return_lse: bool = False, attend_only: bool = False) -> Any:
        return nki_host.kernel_config(cfg, self._config_cls(), return_lse=return_lse, attend_only=attend_only)
