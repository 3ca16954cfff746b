"""NumPy emulator of the NKI API subset the kernel uses (installs itself as `nki` when absent).

    from tkg.kernel import nki_emu
    nki_emu.install()                  # `import nki` now gives the emulator (unless real nki exists)
    out = my_kernel[2](*numpy_args)    # two programs (LNC2), NumPy results
    stats = nki_emu.last_run_stats()   # RunStats: per-program engine instructions, DMA/HBM bytes
    print(nki_emu.format_estimate(nki_emu.estimate(stats)))   # trn2 ESTIMATE vs the HBM floor

Modules: tensor (storage + views), context (programs, allocation, LNC2 rendezvous), language
(`nl`), isa (`nisa`, re-exporting enums and the per-engine instruction modules isa_tensor,
isa_scalar, isa_vector, isa_select, isa_dma, isa_collectives over the shared operands helpers), ops
(operator constants), dtypes, launch (`nki.jit`, grids, stats), limits (trn1 / trn2 constants with
sources), counters, cost + estimate (roofline), lint (NKI language rules), install.
"""

from tkg.kernel.nki_emu.counters import ProgramStats, RunStats, format_stats
from tkg.kernel.nki_emu.errors import (
    DeadlockError,
    DeadTensorError,
    EmulatorError,
    LaunchError,
    NkiValidationError,
    OutOfBoundsError,
    PoisonError,
    RemovedApiError,
)
from tkg.kernel.nki_emu.estimate import Estimate, estimate, format_estimate
from tkg.kernel.nki_emu.install import install, is_installed, uninstall
from tkg.kernel.nki_emu.launch import collect_stats, last_run_stats, session
from tkg.kernel.nki_emu.limits import TRN1, TRN2, Target

__all__ = [
    "TRN1", "TRN2", "DeadTensorError", "DeadlockError", "EmulatorError", "Estimate", "LaunchError",
    "NkiValidationError", "OutOfBoundsError", "PoisonError", "ProgramStats", "RemovedApiError", "RunStats", "Target",
    "collect_stats", "estimate", "format_estimate", "format_stats", "install", "is_installed", "last_run_stats",
    "session", "uninstall",
]  # fmt: skip
