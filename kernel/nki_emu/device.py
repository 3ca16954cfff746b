"""Emulated device memory: arrays resident in HBM across launches, and what crosses the host link.

On Trainium a kernel's inputs either already live in device memory (framework tensors on the
Neuron device, allocated once) or are copied host -> device at the call (standalone `nki.jit` with
NumPy arrays). The emulator keeps that distinction so a caller can prove what it moves:

- `HbmArray`: an array in emulated HBM. Launches take it as it is (no transfer); `reshape` is a
  view of the same memory; kernels that write it update it in place.
- `to_device(a)` (host -> device, counted), `to_host(x)` (device -> host, counted).
- A NumPy launch argument counts as host -> device, a returned tensor as device -> host.
- Every launch with a new signature (kernel, lnc, argument shapes/dtypes, non-tensor values) counts
  one kernel specialisation, as `nki.jit` compiles once per such signature.

`device_counters()` reads the process-wide totals (`h2d_bytes`, `d2h_bytes`, `specialisations`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np


class HbmArray:
    """A C-contiguous array in emulated device HBM (`data` is its memory; do not index it from the
    host in code that models a device: use `to_host`)."""

    def __init__(self, data: np.ndarray) -> None:
        if not data.flags.c_contiguous:
            raise ValueError("HbmArray: data must be C-contiguous")
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def reshape(self, *shape: Any) -> HbmArray:
        """A view of the same device memory (no copy, no transfer)."""
        return HbmArray(self.data.reshape(*shape))

    def __repr__(self) -> str:
        return f"HbmArray({list(self.shape)}, {self.dtype})"


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.signatures: set[tuple[Any, ...]] = set()

    def add(self, h2d: int = 0, d2h: int = 0) -> None:
        with self.lock:
            self.h2d_bytes += h2d
            self.d2h_bytes += d2h

    def launched(self, signature: tuple[Any, ...]) -> bool:
        """Record a launch signature; True when it is new (a specialisation was built)."""
        with self.lock:
            if signature in self.signatures:
                return False
            self.signatures.add(signature)
            return True


COUNTERS = _Counters()


def device_counters() -> dict[str, int]:
    """Process-wide totals since import: `h2d_bytes`, `d2h_bytes`, `specialisations`."""
    with COUNTERS.lock:
        return {"h2d_bytes": COUNTERS.h2d_bytes, "d2h_bytes": COUNTERS.d2h_bytes,
                "specialisations": len(COUNTERS.signatures)}  # fmt: skip


def zeros(shape: tuple[int, ...], dtype: Any) -> HbmArray:
    """A zero-filled device allocation (made on the device: nothing crosses)."""
    return HbmArray(np.zeros(shape, dtype=dtype))


def to_device(a: np.ndarray) -> HbmArray:
    """Copy a host array into device HBM (counted host -> device)."""
    arr = np.array(a, order="C", copy=True)
    COUNTERS.add(h2d=arr.nbytes)
    return HbmArray(arr)


def to_host(x: HbmArray) -> np.ndarray:
    """Copy a device array back to the host (counted device -> host)."""
    COUNTERS.add(d2h=x.nbytes)
    return x.data.copy()


def signature_of(value: Any) -> Any:
    """What a launch argument contributes to the kernel's specialisation key."""
    if isinstance(value, (np.ndarray, HbmArray)):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, tuple):
        return tuple(signature_of(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), signature_of(v)) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, tuple(signature_of(getattr(value, f.name)) for f in dataclasses.fields(value)))
    return repr(value)
