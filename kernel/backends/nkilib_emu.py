"""Backend `nkilib-emu`: nki-library's own `attention_tkg`, unmodified, on our NKI emulator.

The peer of backend `nki-emu` (our kernel on the same emulator): the same `KernelCall`, the same
host glue (`nki_host`), the library's kernel behind the thin wrapper of backend `nkilib`. It is
how the emulator is checked against a kernel known to run on Trainium, and how `tkg bench kernel
--backend nki-emu --nkilib PATH` puts both kernels on one cost model.

Where `nkilib` comes from, first match wins: the backend option `nkilib_path=PATH`
(`attention_tkg(..., backend="nkilib-emu", nkilib_path=PATH, lnc=2)`), the environment variable
`TKG_NKILIB_PATH`, or an installed `nkilib` package. PATH is a folder holding the `nkilib`
package, e.g. a checkout's `src/nkilib_src`. The library is never vendored here.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tkg.kernel.backends import nki_emu, nki_host
from tkg.kernel.validate import KernelCall

NAME = "nkilib-emu"
ENV = "TKG_NKILIB_PATH"


def nkilib_path(options: dict[str, Any] | None = None) -> str | None:
    """The folder to import `nkilib` from (option `nkilib_path`, else $TKG_NKILIB_PATH), or None."""
    path = (options or {}).get("nkilib_path") or os.environ.get(ENV)
    return str(path) if path else None


def _check_folder(path: str) -> None:
    if not (Path(path) / "nkilib" / "__init__.py").is_file():
        raise ImportError(
            f"nkilib_path / ${ENV}: {path!r} holds no nkilib package (expected {path}/nkilib/__init__.py, "
            "e.g. a nki-library checkout's src/nkilib_src)"
        )


def peer(path: str | None = None) -> ModuleType:
    """Backend `nkilib`'s module (the library's kernel behind its wrapper), on the emulator.

    Installs the emulator as `nki` first, then imports `nkilib` from `path` (or the installed
    package). A second folder in one process is refused: Python holds one `nkilib`.
    """
    reason = nki_emu.available()
    if reason is not None:
        raise ImportError(f"backend {NAME!r} needs the NKI emulator: {reason}")
    if path is not None:
        _check_folder(path)
        loaded = sys.modules.get("nkilib")
        if loaded is not None:
            have = Path(loaded.__file__ or "").resolve().parent.parent
            if have != Path(path).resolve():
                raise ImportError(f"nkilib is already imported from {have}; cannot switch to {path} in one process")
        elif path not in sys.path:
            sys.path.insert(0, path)
    try:
        importlib.import_module("nkilib.core.attention.attention_tkg")
    except ImportError as exc:
        raise ImportError(
            f"backend {NAME!r}: cannot import nkilib ({exc}); give nkilib_path=PATH or set ${ENV} to a folder "
            "holding the nkilib package"
        ) from exc
    from tkg.kernel.backends import nkilib

    return nkilib


def available(options: dict[str, Any] | None = None) -> str | None:
    """None when the library's kernel can run on the emulator here (with these backend options),
    else why not."""
    try:
        peer(nkilib_path(options))
    except ImportError as exc:
        return str(exc)
    return None


def run(call: KernelCall) -> None:
    """Run the library's kernel on the emulator; fills `call.out` (k_out when RoPE is fused)."""
    if call.dbg is not None:
        raise ValueError(f"attention_tkg: DBG_TENSORS: not supported by backend {NAME!r} (use 'nki-emu')")
    lib = peer(nkilib_path(call.options))
    from nkilib.core.attention.attention_tkg_utils import AttnTKGConfig as NkilibConfig

    def launch(lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return lib.nkilib_kernel[lnc](*args)

    nki_host.run(call, launch, NkilibConfig)


def paged_decode(args: Any, **options: Any) -> None:
    """The service's paged step through the library's kernel: one launch, as backend `nki-emu` does."""
    nki_host.paged_folded(args, NAME, **options)
