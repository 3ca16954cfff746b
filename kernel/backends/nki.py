"""Backend `nki`: our NKI kernel through the real Neuron `nki` package, and the service hooks.

- Off-device (no `/dev/neuron0`, or `NKI_SIMULATOR=1`): `nki.simulate(kernel[lnc])(...)` on CPU.
- On a Trainium host: the compiled kernel on the NeuronCores, `kernel[lnc](...)`.
Everything Neuron is imported lazily; `available()` says why this backend cannot run here. None of
it can run on a build machine without the Neuron SDK (the PyPI `nki` is a placeholder): here it is
the emulator (`nki-emu`) that executes the same kernel source.

Service hooks for `tkg serve --backend nki`:
- `require_runtime()`: the startup check, a clear error when the Neuron runtime is missing;
- `auto_reason()`: `--backend auto` picks `nki` only where a Neuron device exists;
- `kv_store(geometry, ...)`: the server's KV store (`nki_store.DeviceKVStore`): pools resident on
  the NeuronCore through torch-neuronx (`nki_device.NeuronDevice`), shape buckets compiled at
  start; the same store as `nki-emu` but for the device module;
- `paged_decode(args, ...)`: `tkg.kernel.paged_decode` over host pools (tests, benchmarks).
The Neuron library's own kernel, for comparison on hardware, is backend `nkilib` (`backends/nkilib.py`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from tkg.kernel.backends import nki_host
from tkg.kernel.validate import KernelCall

NAME = "nki"
NEURON_DEVICE = "/dev/neuron0"


def _real_nki() -> tuple[ModuleType | None, str | None]:
    """(the real `nki` module, None) or (None, why not)."""
    nki = sys.modules.get("nki")
    if nki is None:
        if importlib.util.find_spec("nki") is None:
            return None, "the Neuron `nki` package is not installed (the `neuron` extra, from the Neuron pip repo)"
        try:
            nki = importlib.import_module("nki")
        except Exception as exc:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ...")
            return None, f"`import nki` failed ({exc}); the PyPI `nki` is a placeholder, use the Neuron pip repo"
    if getattr(nki, "__tkg_emulator__", False):
        return None, "`nki` in this process is the tkg NumPy emulator (backend 'nki-emu'), not the Neuron SDK"
    if not hasattr(nki, "jit"):
        return None, "the installed `nki` has no `nki.jit` (NKI 0.3+ is required)"
    return nki, None


def available() -> str | None:
    """None when the real NKI can run the kernel here (simulated or on device), else why not."""
    return _real_nki()[1]


def on_device() -> bool:
    """True when kernels run on NeuronCores (a device is present and simulation is not forced)."""
    return os.path.exists(NEURON_DEVICE) and os.environ.get("NKI_SIMULATOR", "0") != "1"


def _launch(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    nki, reason = _real_nki()
    if nki is None:
        from tkg.kernel.backends import BackendUnavailable

        raise BackendUnavailable(f"backend 'nki' is not available: {reason}")
    from tkg.kernel.nki_tkg.wrapper import attention_tkg_kernel

    kernel = attention_tkg_kernel[lnc]
    if on_device():
        return kernel(*args)
    return nki.simulate(kernel)(*args)


def run(call: KernelCall) -> None:
    """Run our NKI kernel through the real `nki` (simulated off-device, compiled on Trainium)."""
    reason = available()
    if reason is not None:
        from tkg.kernel.backends import BackendUnavailable

        raise BackendUnavailable(f"backend 'nki' is not available: {reason}")
    from tkg.kernel.nki_tkg.plan import TKGConfig

    nki_host.run(call, _launch, TKGConfig)


# --- service hooks ------------------------------------------------------------------------------
class NeuronRuntimeMissing(RuntimeError):
    """`--backend nki` was asked for on a host that cannot run Neuron kernels."""


def require_runtime(allow_simulator: bool = False) -> None:
    """Startup check for `tkg serve --backend nki`: raise NeuronRuntimeMissing naming what is missing."""
    _, reason = _real_nki()
    problems = [] if reason is None else [reason]
    if not allow_simulator:
        if not os.path.exists(NEURON_DEVICE):
            problems.append(f"no Neuron device ({NEURON_DEVICE} not found; is this a Trn instance with the driver?)")
        if importlib.util.find_spec("torch_neuronx") is None:
            problems.append("torch-neuronx is not installed (needed for device-resident KV pools)")
    if problems:
        raise NeuronRuntimeMissing(
            "backend 'nki' needs the Neuron runtime: " + "; ".join(problems)
            + ". Use --backend cpu here, or the Trn container image (deploy/)."
        )  # fmt: skip


def auto_reason() -> str | None:
    """Why `auto` must not pick this backend here: only where a Neuron device exists (the
    simulator is for tests, never a server's default)."""
    reason = available()
    if reason is None and not on_device():
        reason = f"no Neuron device ({NEURON_DEVICE} not found, or NKI_SIMULATOR=1)"
    return reason


def paged_decode(args: Any, *, lnc: int = 1, **options: Any) -> None:
    """`tkg.kernel.paged_decode` through our kernel: one folded launch, context rounded up to 128*lnc."""
    nki_host.paged_folded(args, NAME, lnc=lnc, **options)


def _config_cls() -> type:
    from tkg.kernel.nki_tkg.plan import TKGConfig

    return TKGConfig


def _simulate(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`nki.simulate` on host NumPy (no device here): device arrays are passed as their memory."""
    from tkg.kernel.nki_emu.device import HbmArray

    return _launch(lnc, tuple(a.data if isinstance(a, HbmArray) else a for a in args))


def kv_store(geometry: Any, **options: Any) -> Any:
    """The service's KV store: pools on the NeuronCore (torch-neuronx, `NeuronDevice`), allocated
    once; off-device (simulator) host memory standing in for HBM. Options as `nki_store.make_store`."""
    from tkg.kernel.backends.nki_store import HbmDevice, make_store

    if on_device():  # Trn-only
        require_runtime()  # Trn-only
        from tkg.kernel.backends.nki_device import NeuronDevice  # Trn-only

        return make_store(geometry, NeuronDevice(NAME, _config_cls), **options)  # Trn-only
    return make_store(geometry, HbmDevice(NAME, _simulate, _config_cls), **options)
