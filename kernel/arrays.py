"""Conversions between the array kinds `attention_tkg` accepts (numpy, CPU torch tensors).

bf16 numpy arrays use `ml_dtypes.bfloat16`; torch bf16 tensors cross by bit-reinterpretation
(a view, no copy), since `torch.Tensor.numpy()` refuses bf16. fp8 (`ml_dtypes.float8_e4m3`, 1 byte)
crosses to torch as its uint8 bits.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from tkg.dtypes import BF16, FP8


def is_torch(x: Any) -> bool:
    """True for a torch tensor, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of `x` (numpy array or CPU torch tensor); bf16 stays bf16."""
    if is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise ValueError(f"tensors must be on the CPU for host backends, got device {x.device}")
        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BF16)
        return t.numpy()
    return np.asarray(x)


def from_numpy(a: np.ndarray) -> Any:
    """A torch tensor sharing `a`'s memory; bf16 stays bf16."""
    import torch

    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == FP8:
        # torch's float8_e4m3fn is another encoding (no inf, max 448): carry the bits as uint8
        # and decode with FP8_TO_F32 (`tkg.kernel.backends.cpu_torch`).
        return torch.from_numpy(a.view(np.uint8))
    return torch.from_numpy(a)


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


# float8_e4m3 by bit pattern -> float32 (exact; inf and NaN included): decoding by table lookup.
FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)
