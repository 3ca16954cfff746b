"""What a Neuron host offers the NKI backends: devices, the platform, the LNC degree, the `nki` version.

Pure host-side checks (no Neuron import), so the tests run them everywhere with fake `/dev`
folders, fake environments and fake `nki` modules:

- `neuron_devices(dev_dir)`: every `/dev/neuron<N>` present. Under Kubernetes the Neuron device
  plugin passes the allocated device under its host index (`/dev/neuron3` in a pod), so looking
  for `/dev/neuron0` alone would miss it.
- `platform(env)`: trn1, trn2 or trn3, from `NEURON_PLATFORM_TARGET_OVERRIDE` (the variable the
  NKI compiler and simulator read; trn1/inf2/gen2, trn2/gen3, trn3/gen4), else trn2, the only
  platform this project supports (deploy/ schedules onto trn2/trn3 nodes only).
- `lnc_config(env)`: the logical NeuronCore degree from `NEURON_LOGICAL_NC_CONFIG`: default 2 on
  trn2/trn3 (the compiler's and the runtime's default there), 1 on trn1, which has no LNC 2
  (neuronx-cc error NCC_EARG001). A launch whose LNC differs from the runtime's fails at run time
  (the `nki.jit` docs, compiler error NCC_EVRF066), so the server reads the one variable the
  runtime reads and passes it to every launch.
- `nki_version_problem(nki)`: the kernel needs NKI >= `MIN_NKI`: 0.3 for its APIs
  (`nc_matmul(accumulate=...)`, the `nisa.dma_engine` enum, `nki.simulate`) and 0.4 for the two
  `nki.jit` cache fixes (dataclass configs, `None` arguments) without which every launch would
  compile again. NKI 0.4 ships with Neuron SDK 2.30, 0.5 with 2.31 (the supported line,
  docs/trainium.md).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

DEV_DIR = Path("/dev")  # where the driver creates neuron<N>
DEV_DIR_VAR = "TKG_NEURON_DEV_DIR"  # another folder to look in instead (tests: a fake /dev)
DEVICE_GLOB = "neuron*"
LNC_VAR = "NEURON_LOGICAL_NC_CONFIG"
PLATFORM_VAR = "NEURON_PLATFORM_TARGET_OVERRIDE"
MIN_NKI = (0, 4, 0)
SUPPORTED_SDK = "2.31"  # the Neuron SDK line deploy/Dockerfile.neuron builds on (NKI 0.5.0)

_PLATFORMS = {"trn1": "trn1", "inf2": "trn1", "gen2": "trn1", "trn2": "trn2", "gen3": "trn2",
              "trn3": "trn3", "gen4": "trn3"}  # fmt: skip
_LNC_ALLOWED = {"trn1": (1,), "trn2": (1, 2), "trn3": (1, 2)}
_LNC_DEFAULT = {"trn1": 1, "trn2": 2, "trn3": 2}


class NeuronConfigError(ValueError):
    """A Neuron environment variable holds a value this platform cannot run; the message names it."""


def _dev_dir(dev_dir: Path | None) -> Path:
    if dev_dir is not None:
        return dev_dir
    override = os.environ.get(DEV_DIR_VAR, "")
    return Path(override) if override else DEV_DIR


def neuron_devices(dev_dir: Path | None = None) -> list[Path]:
    """Every Neuron device node `<dev_dir>/neuron<N>` (any N), in index order. `dev_dir` None:
    $TKG_NEURON_DEV_DIR, else /dev."""
    folder = _dev_dir(dev_dir)
    found = [p for p in folder.glob(DEVICE_GLOB) if re.fullmatch(r"neuron\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len("neuron"):]))


def looked_for(dev_dir: Path | None = None) -> str:
    """The device pattern searched, for messages: `/dev/neuron*`."""
    return str(_dev_dir(dev_dir) / DEVICE_GLOB)


def platform(env: Mapping[str, str] | None = None) -> str:
    """trn1, trn2 or trn3 from NEURON_PLATFORM_TARGET_OVERRIDE; unset: trn2 (the supported platform)."""
    env = os.environ if env is None else env
    raw = env.get(PLATFORM_VAR, "").strip().lower()
    if not raw:
        return "trn2"
    try:
        return _PLATFORMS[raw]
    except KeyError:
        raise NeuronConfigError(f"{PLATFORM_VAR}={raw!r}: expected one of {', '.join(sorted(_PLATFORMS))}") from None


def lnc_config(env: Mapping[str, str] | None = None) -> int:
    """The LNC degree every launch must use: NEURON_LOGICAL_NC_CONFIG, checked against `platform(env)`.

    Unset: 2 on trn2/trn3, 1 on trn1. NeuronConfigError names the variable, the value and what
    the platform accepts.
    """
    env = os.environ if env is None else env
    plat = platform(env)
    allowed = _LNC_ALLOWED[plat]
    raw = env.get(LNC_VAR, "").strip()
    if not raw:
        return _LNC_DEFAULT[plat]
    expected = " or ".join(str(a) for a in allowed)
    try:
        value = int(raw)
    except ValueError:
        raise NeuronConfigError(f"{LNC_VAR}={raw!r}: expected {expected} on {plat}") from None
    if value not in allowed:
        raise NeuronConfigError(f"{LNC_VAR}={value}: {plat} does not support LNC {value}; expected {expected}")
    return value


def _parse_version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return None if m is None else tuple(int(g or 0) for g in m.groups())


def nki_version(nki: ModuleType) -> str | None:
    """The installed `nki`'s version: its `__version__`, else the distribution's metadata."""
    version = getattr(nki, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        return importlib.metadata.version("nki")
    except importlib.metadata.PackageNotFoundError:
        return None


def nki_version_problem(nki: ModuleType) -> str | None:
    """None when `nki` is new enough for the kernel, else one line naming installed and required."""
    need = ".".join(map(str, MIN_NKI))
    installed = nki_version(nki)
    parsed = None if installed is None else _parse_version(installed)
    if parsed is None:
        return (f"cannot tell the installed nki's version ({installed!r}); the kernel needs nki >= {need} "
                f"(Neuron SDK {SUPPORTED_SDK})")  # fmt: skip
    if parsed < MIN_NKI:
        return (f"nki {installed} is installed; the kernel needs nki >= {need} (Neuron SDK {SUPPORTED_SDK} "
                "ships 0.5.0): NKI 0.3 APIs and the 0.4 nki.jit cache fixes")  # fmt: skip
    return None
