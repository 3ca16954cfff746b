"""On-paper trn2 latency ESTIMATE from the emulator's counters (a roofline, not a measurement).

Cost model per instruction (cycles on its engine), from research/nki-api.md section 5, 4.x and
the documents it cites (ARCH1/ARCH2 architecture guides, PERF performance guide, DMAOV/DMABW DMA
guides, SHARED engine-selection notes):

- Tensor engine: a matmul costs max(N, 64) cycles for 2-byte / fp8 operands, 4x that for fp32
  (N = moving free size; PERF / nki-api.md 4.1 "Cost"); a PE transpose is a matmul whose moving
  operand is an identity with N = the input's partition count.
- Vector engine: N cycles per input operand (N = elements per partition; 2 inputs ~ 2N; ARCH1),
  plus a fixed ~60-cycle SBUF/PSUM access start (ARCH1 "Fixed overheads"). The trn2 2-4x bf16
  perf modes are not modelled (conservative).
- Scalar engine: max(N, 64) cycles (64-cycle minimum initiation interval; SHARED) + 60 fixed.
- GpSimd: N cycles + 60 fixed (8 cores x 16 partitions, 16 fp32 lanes each: one element per
  partition per cycle; ARCH1).
- DMA: moved bytes / per-core DMA bandwidth (16 engines x 23 B/ns on trn2, DMAOV/DMABW tables),
  but never faster than the HBM bytes / per-core HBM bandwidth (HW-TRN2 2.9 TB/s per chip over
  8 physical cores, ~362 GB/s), plus the ~1.3 us fixed cost per transfer (DMABW) overlapped
  across the 16 DMA engines. Each transfer is cut into runs contiguous on both sides (~ one
  descriptor each); DMABW calls runs under 256 B overhead-bound, so such a run is charged as if it
  moved 256 B (ASSUMPTION: the docs give the threshold, not the curve below it).

Engines run concurrently, so a program's estimate is its busiest engine (roofline lower bound);
`serial_s` is the no-overlap sum (a pessimistic bound). The programs of an LNC2 launch run in
parallel: the launch estimate is the slower program. `hbm_floor_s` is the time the launch's HBM
bytes take at full HBM bandwidth of the cores used (lnc x per-core share); `floor_bytes` lets a
caller ask for the floor of other bytes (e.g. only the compulsory K/V bytes of a decode step).
NOT modelled: instruction dependencies and semaphores, queue scheduling, DMA descriptor
generation, engine clock ramp, PSUM/SBUF bank conflicts, cache-less HBM access patterns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tkg.kernel.nki_emu.counters import ProgramStats, RunStats
from tkg.kernel.nki_emu.limits import Target, get_target


@dataclass
class ProgramEstimate:
    program_id: int
    engine_s: dict[str, float]
    busiest: str
    estimate_s: float
    serial_s: float


@dataclass
class Estimate:
    """ESTIMATE of one launch on `target` (seconds). See the module docstring for the model."""

    label: str
    target: str
    lnc: int
    estimate_s: float
    serial_s: float
    hbm_bytes: int
    hbm_floor_s: float
    floor_bytes: int
    estimate_over_floor: float
    dma_small_run_fraction: float  # share of DMA bytes moved in runs < 256 B (overhead-bound)
    programs: list[ProgramEstimate] = field(default_factory=list)
    assumptions: dict[str, float] = field(default_factory=dict)


def _program(p: ProgramStats, t: Target) -> ProgramEstimate:
    eng = {
        "tensor": p.engine_cycles["tensor"] / t.pe_hz,
        "vector": p.engine_cycles["vector"] / t.dve_hz,
        "scalar": p.engine_cycles["scalar"] / t.act_hz,
        "gpsimd": p.engine_cycles["gpsimd"] / t.pool_hz,
    }
    hbm = p.hbm_read_bytes + p.hbm_write_bytes
    moved = max(p.dma_bytes, p.dma_charged_bytes)
    fixed = p.dma_transfers * t.dma_fixed_s / t.dma_engines
    eng["dma"] = max(moved / t.dma_bytes_per_s, hbm / t.hbm_bytes_per_s) + fixed
    busiest = max(eng, key=lambda e: eng[e])
    return ProgramEstimate(p.program_id, eng, busiest, eng[busiest], sum(eng.values()))


def estimate(stats: RunStats, target: str | Target | None = "trn2", floor_bytes: int | None = None) -> Estimate:
    """The latency ESTIMATE of a launch's counters on `target` (default trn2), with its HBM floor."""
    t = get_target(target)
    progs = [_program(p, t) for p in stats.programs]
    hbm = stats.hbm_read_bytes + stats.hbm_write_bytes
    fb = hbm if floor_bytes is None else int(floor_bytes)
    floor = fb / (t.hbm_bytes_per_s * stats.lnc)
    est = max(p.estimate_s for p in progs) if progs else 0.0
    dma_bytes = sum(p.dma_bytes for p in stats.programs)
    small = sum(p.dma_small_run_bytes for p in stats.programs) / dma_bytes if dma_bytes else 0.0
    return Estimate(
        label=f"ESTIMATE ({t.name} roofline from emulator counts, not a measurement)",
        target=t.name, lnc=stats.lnc, estimate_s=est, serial_s=max((p.serial_s for p in progs), default=0.0),
        hbm_bytes=hbm, hbm_floor_s=floor, floor_bytes=fb, estimate_over_floor=(est / floor) if floor else 0.0,
        dma_small_run_fraction=small, programs=progs,
        assumptions={
            "pe_hz": t.pe_hz, "dve_hz": t.dve_hz, "act_hz": t.act_hz, "pool_hz": t.pool_hz,
            "hbm_bytes_per_s_per_core": t.hbm_bytes_per_s, "dma_bytes_per_s_per_core": t.dma_bytes_per_s,
            "dma_fixed_s": t.dma_fixed_s, "dma_engines": t.dma_engines,
        },
    )  # fmt: skip


def format_estimate(e: Estimate) -> str:
    """One-paragraph human summary."""
    lines = [
        f"{e.label}: {e.estimate_s * 1e6:.1f} us (no-overlap bound {e.serial_s * 1e6:.1f} us); "
        f"HBM floor for {e.floor_bytes / 2**20:.2f} MiB on {e.lnc} core(s): {e.hbm_floor_s * 1e6:.1f} us "
        f"(x{e.estimate_over_floor:.2f}); {e.dma_small_run_fraction:.0%} of DMA bytes in runs < 256 B"
    ]
    for p in e.programs:
        per = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in p.engine_s.items())
        lines.append(f"  program {p.program_id}: busiest {p.busiest}; us per engine: {per}")
    return "\n".join(lines)
