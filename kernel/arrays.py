"""Conversions between the array kinds `attention_tkg` accepts (numpy, CPU torch tensors).

bf16 numpy arrays use `ml_dtypes.bfloat16`; torch bf16 tensors cross by bit-reinterpretation
(a view, no copy), since `torch.Tensor.numpy()` refuses bf16.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from tkg.kernel_dtypes import BF16

IO_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.float32), np.dtype(np.float16), BF16)


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
    return torch.from_numpy(a)


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
