"""Hardware constants per target, each with its documentation source.

Sources are the IDs of research/nki-api.md section 0 (ARCH1 = Trainium/NeuronCore-v2 architecture
guide, ARCH2 = Trainium2/NeuronCore-v3 guide, TILESIZE = `nl.tile_size` page, HW-TRN2 = Trainium2
chip page, DMAOV / DMABW = DMA overview / bandwidth guide, PERF = performance guide). Values that
the docs leave open are marked ASSUMPTION with the reason for the chosen number.

The target comes from `NEURON_PLATFORM_TARGET_OVERRIDE` (trn1/inf2/gen2 or trn2/gen3, as for the
official simulator; nki-api.md 1.5); unset means trn2. trn3/gen4 is not emulated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tkg.kernel.nki_emu.errors import NkiValidationError

KIB = 1024


@dataclass(frozen=True)
class Target:
    """Limits and throughput figures of one NeuronCore generation (per physical core)."""

    name: str
    gen: int
    # -- memory (bytes) --
    pmax: int = 128  # partitions; TILESIZE pmax, ARCH1/ARCH2
    sbuf_partition_bytes: int = 192 * KIB  # physical SBUF per partition; ARCH1 24 MiB / 128
    # Usable SBUF per partition (`nl.tile_size.total_available_sbuf_size`). ASSUMPTION: the docs
    # give no number (nki-api.md 3.3); we use 192 KiB on both targets, i.e. never more than trn1's
    # physical size, so a kernel that fits here fits either chip.
    sbuf_usable_bytes: int = 192 * KIB
    psum_banks: int = 8  # ARCH1 "8 banks x 2 KiB per partition"; TILESIZE psum_num_banks
    psum_bank_bytes: int = 2 * KIB  # ARCH1; TILESIZE psum_bank_fmax_bytes
    # -- Tensor engine (nc_matmul) --
    gemm_contract_max: int = 128  # K <= 128 partitions; STUB-ISA nc_matmul
    gemm_stationary_fmax: int = 128  # TILESIZE
    gemm_moving_fmax: int = 512  # TILESIZE (gen2/gen3)
    pe_transpose_max: int = 128  # STUB-ISA nc_transpose (Tensor engine)
    vector_transpose_max: int = 32  # STUB-ISA nc_transpose (Vector engine)
    max_free_dims: int = 4  # ARCH1 "Accessing SBUF/PSUM tensors"; APS
    max_view_dims: int = 5  # GUIDE "Anatomy of a tensor"
    # -- clocks (Hz) and HBM --
    pe_hz: float = 2.8e9  # ARCH1 Tensor engine
    act_hz: float = 1.4e9  # ARCH1 Scalar engine
    dve_hz: float = 1.12e9  # ARCH1 Vector engine
    pool_hz: float = 1.4e9  # ARCH1 GpSimd
    hbm_bytes_per_s: float = 820e9 / 2  # ARCH1 820 GB/s per chip, 2 cores per chip
    dma_bytes_per_s: float = 16 * 17e9  # DMAOV/DMABW tables: 16 engines x 17 B/ns per core
    dma_fixed_s: float = 1.3e-6  # DMABW: fixed cost per DMA transfer
    dma_engines: int = 16  # DMAOV: 16 DMA engines per core

    @property
    def psum_partition_bytes(self) -> int:
        return self.psum_banks * self.psum_bank_bytes


TRN1 = Target(name="trn1", gen=2)
TRN2 = Target(
    name="trn2",
    gen=3,
    sbuf_partition_bytes=224 * KIB,  # ARCH2 / HW-TRN2: 28 MiB per core = 128 x 224 KiB
    pe_hz=2.4e9,  # ARCH2 Tensor engine
    act_hz=1.2e9,  # ARCH2 Scalar engine
    dve_hz=0.96e9,  # ARCH2 Vector engine
    pool_hz=1.2e9,  # ARCH2 GpSimd
    hbm_bytes_per_s=2.9e12 / 8,  # HW-TRN2 2.9 TB/s per chip (ARCH2 says ~3 TB/s), 8 physical cores
    dma_bytes_per_s=16 * 23e9,  # DMAOV/DMABW tables: 16 engines x 23 B/ns per core
)

TARGETS = {"trn1": TRN1, "inf2": TRN1, "gen2": TRN1, "trn2": TRN2, "gen3": TRN2}
ENV_VAR = "NEURON_PLATFORM_TARGET_OVERRIDE"


def target_from_env() -> Target:
    """The target named by NEURON_PLATFORM_TARGET_OVERRIDE (default trn2)."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if not raw:
        return TRN2
    if raw in ("trn3", "gen4"):
        raise NkiValidationError(f"{ENV_VAR}={raw!r}: trn3/gen4 is not emulated; expected one of trn1, trn2")
    try:
        return TARGETS[raw]
    except KeyError:
        raise NkiValidationError(f"{ENV_VAR}={raw!r}: expected one of {sorted(TARGETS)}") from None


def get_target(name: str | Target | None = None) -> Target:
    """A Target from a name ('trn1', 'trn2', aliases), a Target, or None for the environment's."""
    if name is None:
        return target_from_env()
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise NkiValidationError(f"target: {name!r}: expected one of {sorted(TARGETS)}") from None
