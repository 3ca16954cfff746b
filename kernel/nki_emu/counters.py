"""What one program (NeuronCore) of a launch did: instructions per engine, DMA bytes, cost cycles.

Engines use the `nisa.engine` names: `tensor` (PE), `vector` (DVE), `scalar` (ACT), `gpsimd`
(Pool), and `dma` for the DMA queues. Every emulated instruction is recorded once with the engine
that executes it and its estimated cycles on that engine (cost model in `estimate.py`), so the
counters and the estimate always agree. DMA transfers are counted per queue kind (the DGE mode of
`dma_copy`, or the transport of `sendrecv`) with HBM reads and writes separately.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")
SMALL_RUN_BYTES = 256  # DMABW: "< 256 B per partition is overhead-bound" (nki-api.md 5)


@dataclass
class ProgramStats:
    """Counters of one program of one launch (per physical NeuronCore)."""

    program_id: int = 0
    instructions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENGINES, 0))
    by_instruction: dict[str, int] = field(default_factory=dict)
    engine_cycles: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ENGINES[:4], 0.0))
    dma_transfers: int = 0
    dma_queues: dict[str, int] = field(default_factory=dict)  # transfers per DGE mode / transport
    dma_bytes: int = 0  # every byte a DMA moved (HBM and SBUF sides counted once per transfer)
    hbm_read_bytes: int = 0
    hbm_write_bytes: int = 0
    sbuf_to_sbuf_bytes: int = 0
    # DMA efficiency: a transfer is cut into runs contiguous on both sides (~ descriptors). Runs under
    # SMALL_RUN_BYTES are overhead-bound (DMABW), and the estimate charges each as SMALL_RUN_BYTES.
    dma_runs: int = 0
    dma_small_run_bytes: int = 0  # bytes moved in runs shorter than SMALL_RUN_BYTES
    dma_charged_bytes: int = 0  # sum over runs of max(run bytes, SMALL_RUN_BYTES)
    sendrecv_bytes: int = 0  # bytes this program sent to its partner
    sbuf_high_water_bytes: int = 0  # highest explicitly addressed SBUF byte used per partition
    psum_banks_used: int = 0  # distinct PSUM banks written

    def record(self, engine: str, instr: str, cycles: float = 0.0) -> None:
        self.instructions[engine] += 1
        self.by_instruction[instr] = self.by_instruction.get(instr, 0) + 1
        if engine in self.engine_cycles:
            self.engine_cycles[engine] += cycles

    def record_dma(self, instr: str, queue: str, nbytes: int, hbm_read: int, hbm_write: int,
                   run_bytes: int | None = None) -> None:  # fmt: skip
        """One DMA transfer of `nbytes`; `run_bytes`: its contiguous run length (None: one run)."""
        self.record("dma", instr)
        run = nbytes if not run_bytes else min(run_bytes, nbytes)
        runs = -(-nbytes // run) if run else 0
        self.dma_runs += runs
        if run < SMALL_RUN_BYTES:
            self.dma_small_run_bytes += nbytes
        self.dma_charged_bytes += runs * max(run, SMALL_RUN_BYTES) if run < SMALL_RUN_BYTES else nbytes
        self.dma_transfers += 1
        self.dma_queues[queue] = self.dma_queues.get(queue, 0) + 1
        self.dma_bytes += nbytes
        self.hbm_read_bytes += hbm_read
        self.hbm_write_bytes += hbm_write
        if not hbm_read and not hbm_write:
            self.sbuf_to_sbuf_bytes += nbytes


@dataclass
class RunStats:
    """Counters of one kernel launch: one ProgramStats per program (lnc of them)."""

    kernel: str
    lnc: int
    target: str
    programs: list[ProgramStats]

    @property
    def hbm_read_bytes(self) -> int:
        return sum(p.hbm_read_bytes for p in self.programs)

    @property
    def hbm_write_bytes(self) -> int:
        return sum(p.hbm_write_bytes for p in self.programs)

    def total_instructions(self) -> dict[str, int]:
        tot: Counter[str] = Counter()
        for p in self.programs:
            tot.update(p.instructions)
        return {e: tot.get(e, 0) for e in ENGINES}


def format_stats(stats: RunStats) -> str:
    """A few lines per program: instructions per engine, DMA transfers and bytes (MiB)."""
    lines = [f"{stats.kernel} lnc={stats.lnc} target={stats.target}"]
    for p in stats.programs:
        eng = " ".join(f"{e}={p.instructions[e]}" for e in ENGINES)
        queues = " ".join(f"{q}={n}" for q, n in sorted(p.dma_queues.items()))
        lines.append(
            f"  program {p.program_id}: instructions {eng}; DMA transfers {p.dma_transfers} ({queues}); "
            f"HBM read {p.hbm_read_bytes / 2**20:.2f} MiB, write {p.hbm_write_bytes / 2**20:.2f} MiB; "
            f"SBUF<->SBUF {p.sbuf_to_sbuf_bytes / 2**20:.2f} MiB; {p.dma_runs} contiguous runs, "
            f"{p.dma_small_run_bytes / 2**20:.2f} MiB in runs < {SMALL_RUN_BYTES} B; "
            f"SBUF high water {p.sbuf_high_water_bytes} B/partition"
        )
    return "\n".join(lines)
