"""Backend `nki`: our NKI kernel through the real Neuron `nki` package, and the service hooks.

- Off-device (no `/dev/neuron*`, or `NKI_SIMULATOR=1`): `nki.simulate(kernel[lnc])(...)` on CPU.
- On a Trainium host: the compiled kernel on the NeuronCores, `kernel[lnc](...)`.
Everything Neuron is imported lazily; `available()` says why this backend cannot run here. None of
it can run on a build machine without the Neuron SDK (the PyPI `nki` is a placeholder): here it is
the emulator (`nki-emu`) that executes the same kernel source.

Service hooks for `tkg serve --backend nki`:
- `require_runtime()`: the startup check of `tkg serve --backend nki`: one line naming what is
  missing (an `nki` older than `neuron_env.MIN_NKI`, no `/dev/neuron*`, no torch-neuronx);
- `auto_reason()`: `--backend auto` picks `nki` only where a Neuron device exists;
- `kv_store(geometry, ..., lnc=...)`: the server's KV store (`nki_store.DeviceKVStore`): pools
  resident on the NeuronCore through torch-neuronx (`nki_device.NeuronDevice`), shape buckets
  compiled at start, every launch at `lnc` (which must equal the runtime's
  NEURON_LOGICAL_NC_CONFIG, `neuron_env.lnc_config`); the same store as `nki-emu` but for the
  device module;
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

from tkg.kernel.backends import BackendUnavailable, neuron_env, nki_host
from tkg.kernel.validate import KernelCall

NAME = "nki"


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
    too_old = neuron_env.nki_version_problem(nki)
    if too_old is not None:
        return None, too_old
    return nki, None


def available() -> str | None:
    """None when the real NKI can run the kernel here (simulated or on device), else why not."""
    return _real_nki()[1]


def _simulator_forced() -> bool:
    return os.environ.get("NKI_SIMULATOR", "0") == "1"


def on_device() -> bool:
    """True when kernels run on NeuronCores (a `/dev/neuron*` is present and simulation is not forced)."""
    return bool(neuron_env.neuron_devices()) and not _simulator_forced()


def _launch(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    nki, reason = _real_nki()
    if nki is None:
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
        raise BackendUnavailable(f"backend 'nki' is not available: {reason}")
    from tkg.kernel.nki_tkg.plan import TKGConfig

    nki_host.run(call, _launch, TKGConfig)


# --- service hooks ------------------------------------------------------------------------------
class NeuronRuntimeMissing(BackendUnavailable):
    """`--backend nki` was asked for on a host that cannot run Neuron kernels."""


def _no_device() -> str:
    where = neuron_env.looked_for()
    return f"no Neuron device ({where} not found; is this a Trn instance with the driver, or a pod given one?)"


def require_runtime(allow_simulator: bool | None = None) -> None:
    """Startup check for `tkg serve --backend nki`: raise NeuronRuntimeMissing naming what is missing.

    `allow_simulator` (None: `NKI_SIMULATOR=1`) skips the device and torch-neuronx checks, for
    serving from `nki.simulate` on a host with the SDK but no device (tests only).
    """
    if allow_simulator is None:
        allow_simulator = _simulator_forced()
    _, reason = _real_nki()
    problems = [] if reason is None else [reason]
    if not allow_simulator:
        if not neuron_env.neuron_devices():
            problems.append(_no_device())
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
        reason = "NKI_SIMULATOR=1" if _simulator_forced() else _no_device()
    return reason


def paged_decode(args: Any, *, lnc: int = 1, **options: Any) -> None:
    """`tkg.kernel.paged_decode` through our kernel: one folded launch, context rounded up to 128*lnc."""
    nki_host.paged_folded(args, NAME, lnc=lnc, **options)


def paged_decode_partial(args: Any, *, lnc: int = 1, **options: Any) -> None:
    """A partial paged step (context parallelism: lse and/or attend-only, `tkg.kernel.paged`) as
    one launch of our kernel in its partial mode (`nki_host.paged_partial`)."""
    reason = available()
    if reason is not None:
        raise BackendUnavailable(f"backend 'nki' is not available: {reason}")
    nki_host.paged_partial(args, _launch, _config_cls(), lnc=lnc)


def _config_cls() -> type:
    from tkg.kernel.nki_tkg.plan import TKGConfig

    return TKGConfig


def _simulate(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`nki.simulate` on host NumPy (no device here): device arrays are passed as their memory."""
    from tkg.kernel.nki_emu.device import HbmArray

    return _launch(lnc, tuple(a.data if isinstance(a, HbmArray) else a for a in args))


def kv_store(geometry: Any, **options: Any) -> Any:
    """The service's KV store: pools on the NeuronCore (torch-neuronx, `NeuronDevice`), allocated
    once; off-device (simulator) host memory standing in for HBM. Options as `nki_store.make_store`
    (`lnc`: the launches' LNC degree, default `neuron_env.lnc_config()`; `partial`: serve
    context-parallel requests, return_lse and attend_only, warming up their specialisations too:
    default False on a NeuronCore, where that is 3x the compiles, True on the simulator)."""
    from tkg.kernel.backends.nki_store import HbmDevice, make_store

    options.setdefault("lnc", neuron_env.lnc_config())
    if on_device():  # Trn-only
        require_runtime()  # Trn-only
        # The runtime and neuronx-cc read this variable; a launch at another LNC fails at run time.
        os.environ.setdefault(neuron_env.LNC_VAR, str(options["lnc"]))  # Trn-only
        if neuron_env.lnc_config() != options["lnc"]:  # Trn-only
            raise neuron_env.NeuronConfigError(  # Trn-only
                f"{neuron_env.LNC_VAR}={os.environ[neuron_env.LNC_VAR].strip()}: the store launches at lnc "
                f"{options['lnc']}; expected the same value"
            )  # Trn-only
        from tkg.kernel.backends.nki_device import NeuronDevice  # Trn-only

        options.setdefault("partial", False)  # Trn-only: opt-in, 3x the warm-up compiles (docs/trainium.md)
        return make_store(geometry, NeuronDevice(NAME, _config_cls), **options)  # Trn-only
    return make_store(geometry, HbmDevice(NAME, _simulate, _config_cls), **options)
