"""Backend registry: one interface, chosen by name (`--backend`), loaded lazily.

A backend is a module satisfying `KernelBackend` (`NAME` and `run`), and optionally any of the
hooks in `HOOKS`: `available`, `auto_reason`, `require_runtime`, `paged_decode`, `kv_store` (each
its own Protocol below; callers look a hook up with `getattr` and fall back when it is absent).
tests/test_backends.py checks every shipped module against these Protocols. Modules are imported
only when asked for, so the client never imports torch and Neuron code never loads on CPU hosts.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from tkg.kernel.kv_store import KVGeometry, KVStore
    from tkg.kernel.paged import PagedArgs
    from tkg.kernel.validate import KernelCall


class KernelBackend(Protocol):
    """What every backend module defines (a module satisfies a Protocol by its attributes)."""

    NAME: str  # the name it is registered under

    def run(self, call: KernelCall) -> None:
        """One validated `attention_tkg` call: fill `call.out` (and `call.k_out`, `call.dbg`)."""


class Availability(Protocol):
    def available(self) -> str | None:
        """None when the backend can run here, else why not (a module may also accept `options`)."""


class AutoReason(Protocol):
    def auto_reason(self) -> str | None:
        """Why `auto` must not pick it though it is available (e.g. `nki` without a Neuron device)."""


class RuntimeCheck(Protocol):
    def require_runtime(self) -> None:
        """`tkg serve`'s start-up check beyond `available()` (e.g. `nki`: a reachable Neuron device):
        raise BackendUnavailable with one line naming what is missing."""


class PagedDecoder(Protocol):
    def paged_decode(self, args: PagedArgs, **options: Any) -> None:
        """The service's fast path (`tkg.kernel.paged`); without it, `attention_tkg` per kv head."""


class StoreFactory(Protocol):
    def kv_store(self, geometry: KVGeometry, **options: Any) -> KVStore:
        """The server's KV store (`tkg.kernel.kv_store`); without it, host numpy pools."""


# The optional hooks by attribute name: a module defining one must match its Protocol.
HOOKS: dict[str, type] = {
    "available": Availability, "auto_reason": AutoReason, "require_runtime": RuntimeCheck,
    "paged_decode": PagedDecoder, "kv_store": StoreFactory,
}  # fmt: skip

# name -> module path. Order is the `auto` preference among available backends.
_BACKENDS: dict[str, str] = {
    "nki": "tkg.kernel.backends.nki",
    "cpu": "tkg.kernel.backends.cpu",
    "reference": "tkg.kernel.backends.reference",
    "nki-emu": "tkg.kernel.backends.nki_emu",
    "nkilib": "tkg.kernel.backends.nkilib",  # the Neuron library's own kernel, a peer on Trn only
    "nkilib-emu": "tkg.kernel.backends.nkilib_emu",  # that kernel on our emulator (needs $TKG_NKILIB_PATH)
}
# Backends `auto` may pick: the emulator is exact but slow, it is never chosen implicitly.
_AUTO_ORDER = ("nki", "cpu", "reference")


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (missing package, device or build)."""


def names() -> list[str]:
    """Every backend name this build knows, available here or not."""
    return list(_BACKENDS)


def module_path(name: str) -> str:
    """The module implementing backend `name` (`tkg.kernel.backends.cpu`), without importing it."""
    return _BACKENDS[name]


def _import(name: str) -> KernelBackend:
    try:
        return cast("KernelBackend", importlib.import_module(module_path(name)))
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is not available here: {exc}") from exc


def unavailable_reason(name: str, options: dict[str, Any] | None = None) -> str | None:
    """None when `name` can run here, else why not. `options`: the call's backend options, for a
    backend whose availability depends on them (`available(options)`, e.g. nkilib-emu's nkilib_path)."""
    if name not in _BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(['auto', *_BACKENDS])}"
    try:
        mod = _import(name)
    except BackendUnavailable as exc:
        return str(exc)
    check = getattr(mod, "available", None)
    if check is None:
        return None
    if options and "options" in inspect.signature(check).parameters:
        return check(options=options)
    return check()


def _auto_reason(name: str) -> str | None:
    """Why `auto` skips an available backend (its module's `auto_reason()`, e.g. `nki` without a device)."""
    check = getattr(_import(name), "auto_reason", None)
    return check() if check is not None else None


def available() -> list[str]:
    """Names of the backends that can run on this host."""
    return [n for n in _BACKENDS if unavailable_reason(n) is None]


def auto_skipped() -> list[tuple[str, str]]:
    """(name, why) for each backend `auto` prefers to the one it picks but cannot use here, in
    preference order: what the start line says when `auto` falls back (e.g. nki: no Neuron device)."""
    skipped = []
    for n in _AUTO_ORDER:
        why = unavailable_reason(n) or _auto_reason(n)
        if why is None:
            break
        skipped.append((n, why))
    return skipped


def require_serving(name: str) -> None:
    """`tkg serve`'s start-up check of a resolved backend: its `require_runtime()` hook, if any
    (BackendUnavailable naming what is missing, e.g. the Neuron device `nki` looked for)."""
    check = getattr(_import(name), "require_runtime", None)
    if check is not None:
        check()


def resolve(name: str, options: dict[str, Any] | None = None) -> str:
    """Map `auto` to the best available backend; check an explicit name is usable (with `options`)."""
    if name == "auto":
        for n in _AUTO_ORDER:
            if unavailable_reason(n) is None and _auto_reason(n) is None:
                return n
        raise BackendUnavailable("no backend is available")  # reference always is; defensive
    reason = unavailable_reason(name, options)
    if reason is not None:
        raise BackendUnavailable(reason)
    return name


def load(name: str, options: dict[str, Any] | None = None) -> KernelBackend:
    """The backend module for `name` (after `resolve` with the call's backend `options`)."""
    return _import(resolve(name, options))
