"""Per-instruction cost model (cycles on the executing engine) used by the counters.

The model and its sources are described in `estimate.py` (which turns the cycles into an ESTIMATE
of seconds); the numbers here are the per-instruction part of it.
"""

from __future__ import annotations

ACCESS_FIXED = 60  # cycles to start an SBUF/PSUM access (ARCH1)
PE_MIN = 64  # PE cycles per matmul minimum (MM_INIT_LATENCY, ARCH1 / PERF)
ACT_MIN = 64  # Scalar-engine minimum initiation interval (SHARED)


def pe_cycles(n_moving: int, fp32: bool) -> float:
    return float(max(n_moving, PE_MIN) * (4 if fp32 else 1))


def vector_cycles(n_free: int, n_inputs: int = 1) -> float:
    return float(n_free * max(n_inputs, 1) + ACCESS_FIXED)


def scalar_cycles(n_free: int) -> float:
    return float(max(n_free, ACT_MIN) + ACCESS_FIXED)


def gpsimd_cycles(n_free: int, n_inputs: int = 1) -> float:
    return float(n_free * max(n_inputs, 1) + ACCESS_FIXED)
