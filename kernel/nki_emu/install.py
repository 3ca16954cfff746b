"""`install()`: make `import nki`, `nki.language`, `nki.isa` resolve to the emulator when the real
Neuron package is absent (the PyPI placeholder, which raises ImportError, counts as absent).

The emulator's modules are marked `__tkg_emulator__ = True`, so callers can tell which `nki` they
got. Idempotent and cheap: after the first call it is a dictionary lookup.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

VERSION = "0.6.0+tkg.emulator"
_SUBMODULES = ("language", "isa")
_REMOVED = {
    "simulate_kernel": "nki.simulate_kernel was removed in NKI 0.2: use nki.simulate(kernel)(...)",
    "baremetal": "nki.baremetal was removed in NKI 0.2: call the @nki.jit kernel",
    "benchmark": "nki.benchmark was removed in NKI 0.2: use the Neuron profiler",
    "profile": "nki.profile was removed in NKI 0.2: use the Neuron profiler",
}


def _nki_getattr(name: str) -> object:
    from tkg.kernel.nki_emu.errors import RemovedApiError

    if name in _REMOVED:
        raise RemovedApiError(_REMOVED[name])
    raise AttributeError(f"module 'nki' (tkg NKI emulator) has no attribute {name!r}")


def _real_nki_importable() -> bool:
    if importlib.util.find_spec("nki") is None:
        return False
    try:
        importlib.import_module("nki")
    except ImportError:
        for name in [m for m in sys.modules if m == "nki" or m.startswith("nki.")]:
            del sys.modules[name]
        return False
    return True


def is_installed() -> bool:
    """True if `nki` in this process is the emulator."""
    mod = sys.modules.get("nki")
    return bool(mod is not None and getattr(mod, "__tkg_emulator__", False))


def install() -> bool:
    """Register the emulator as `nki` unless a real package is importable; True if the emulator is `nki`."""
    mod = sys.modules.get("nki")
    if mod is not None:
        return bool(getattr(mod, "__tkg_emulator__", False))
    if _real_nki_importable():
        return False
    from tkg.kernel.nki_emu import isa, language, launch

    nki = types.ModuleType("nki", "NKI emulator (tkg.kernel.nki_emu) standing in for the Neuron `nki` package.")
    nki.__path__ = []  # a package, so `import nki.language` works
    nki.__version__ = VERSION
    nki.__tkg_emulator__ = True
    nki.jit = launch.jit
    nki.simulate = launch.simulate
    nki.language = language
    nki.isa = isa
    nki.__getattr__ = _nki_getattr  # PEP 562: removed legacy entry points get a migration message
    for name, sub in (("language", language), ("isa", isa)):
        sub.__tkg_emulator__ = True  # type: ignore[attr-defined]
        sys.modules[f"nki.{name}"] = sub
    sys.modules["nki"] = nki
    return True


def uninstall() -> None:
    """Remove the emulator's `nki` modules (tests); a real package is left alone."""
    if is_installed():
        for name in ("nki", *tuple(f"nki.{s}" for s in _SUBMODULES)):
            sys.modules.pop(name, None)
