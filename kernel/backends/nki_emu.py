"""Backend `nki-emu`: our NKI kernel's own source, executed on CPU by the NumPy NKI emulator.

The emulator (`tkg.kernel.nki_emu`) installs itself as the `nki` modules when the real Neuron
package is absent; the kernel (`tkg.kernel.nki_tkg`) is then imported and launched exactly as on
Trainium: `attention_tkg_kernel[lnc](...)`. Options (`attention_tkg(..., backend="nki-emu", lnc=2)`):
`lnc` 1 or 2 (default 1).

Slow (a Python call per engine instruction) and exact: it exists to test the kernel and to count
its DMA bytes and instructions (`tkg bench kernel --backend nki-emu`). `kv_store` gives the server
the same device-resident store as backend `nki`, on the emulator's HBM (`nki_store.HbmDevice`),
so the emulator proves what crosses host <-> device per step.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tkg.kernel.backends import nki_host
from tkg.kernel.validate import KernelCall

NAME = "nki-emu"


def _emulator() -> ModuleType:
    from tkg.kernel import nki_emu

    return nki_emu


def available() -> str | None:
    """None when the emulator can run the kernel here, else why not."""
    try:
        emu = _emulator()
    except ImportError as exc:
        return f"the NKI emulator cannot be imported: {exc}"
    if not hasattr(emu, "install"):
        return "the NKI emulator (tkg.kernel.nki_emu) has no install() yet"
    try:
        emu.install()
        import nki
    except Exception as exc:  # the emulator refuses, or the real package is broken
        return f"the NKI emulator could not be installed: {exc}"
    if not getattr(nki, "__tkg_emulator__", False):
        return "the real Neuron `nki` package is installed; use backend 'nki' (nki.simulate / device)"
    return None


def kernel_module() -> ModuleType:
    """`tkg.kernel.nki_tkg.wrapper`, imported after the emulator is installed."""
    reason = available()
    if reason is not None:
        from tkg.kernel.backends import BackendUnavailable

        raise BackendUnavailable(f"backend 'nki-emu' is not available: {reason}")
    from tkg.kernel.nki_tkg import wrapper

    return wrapper


def _launch(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
    kernel = kernel_module().attention_tkg_kernel
    return kernel[lnc](*args)


def run(call: KernelCall) -> None:
    """Run the NKI kernel on the emulator; fills `call.out` (and k_out, DBG tensors)."""
    kernel_module()  # installs the emulator before any kernel module imports `nki`
    from tkg.kernel.nki_tkg.plan import TKGConfig

    nki_host.run(call, _launch, TKGConfig)


def paged_decode(args: Any, **options: Any) -> None:
    """The service's paged step: one emulated kernel launch for all (sequence, kv head) rows."""
    nki_host.paged_folded(args, NAME, **options)


def paged_decode_partial(args: Any, *, lnc: int = 1, **options: Any) -> None:
    """A partial paged step (context parallelism: lse and/or attend-only, `tkg.kernel.paged`) as
    one emulated launch of our kernel in its partial mode (`nki_host.paged_partial`)."""
    kernel_module()  # the emulator is installed before the kernel is imported
    nki_host.paged_partial(args, _launch, _config_cls(), lnc=lnc)


def _config_cls() -> type:
    kernel_module()
    from tkg.kernel.nki_tkg.plan import TKGConfig

    return TKGConfig


def kv_store(geometry: Any, **options: Any) -> Any:
    """The service's KV store: pools are emulator HBM arrays, allocated once; steps pass them as
    they are (`tkg.kernel.backends.nki_store`). Options: `max_context`, `max_batch`, `max_s_active`,
    `context_buckets`, `batch_buckets`, `lnc`, `partial` (default True: serve lse / attend-only)."""
    from tkg.kernel.backends.nki_store import HbmDevice, make_store

    kernel_module()  # the emulator is installed before the kernel is imported
    return make_store(geometry, HbmDevice(NAME, _launch, _config_cls), **options)
