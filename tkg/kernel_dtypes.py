"""The numpy dtypes of the wire and the kernel (no torch, no kernel import: the client uses it)."""

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
# Trainium's fp8 e4m3 (NKI `float8_e4m3`): IEEE-style, bias 7, with inf/NaN, largest finite 240.
FP8 = np.dtype(ml_dtypes.float8_e4m3)
FP8_MAX = 240.0


def to_fp8(x: np.ndarray) -> np.ndarray:
    """Round to float8_e4m3, saturating finite values beyond +-240 to +-240 (NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)
