"""The numpy dtypes of the wire and the kernel (no torch, no kernel import: the client uses it)."""

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
