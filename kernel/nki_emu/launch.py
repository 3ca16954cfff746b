"""`nki.jit`, `kernel[lnc](...)` launches, `nki.simulate`, and the run statistics of each launch.

A launch runs the kernel function eagerly, like `nki.simulate` (nki-api.md 2.3): NumPy arguments
become `shared_hbm` tensors over the same memory (inputs the kernel writes are updated in place),
other arguments pass through (lists are rejected: NKI 0.3+ takes tuples), every instruction runs
in program order, and the returned `shared_hbm` tensors come back as NumPy arrays. `kernel[2]`
runs two programs in two threads with `nl.program_id(0)` 0 and 1; an error in either program is
re-raised in the caller (the root cause, not the partner's resulting deadlock).

Host <-> device traffic and kernel specialisations are counted in `device.py`: `HbmArray`
arguments are already in HBM, NumPy arguments cross host -> device, returned tensors device ->
host, and each new launch signature is one specialisation.

After every launch `last_run_stats()` returns its counters (`RunStats`, one `ProgramStats` per
program); `collect_stats()` gathers the stats of every launch made inside a `with` block.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from tkg.kernel.nki_emu import context, device, dtypes
from tkg.kernel.nki_emu.counters import RunStats
from tkg.kernel.nki_emu.errors import DeadlockError, LaunchError, PoisonError, RemovedApiError
from tkg.kernel.nki_emu.limits import Target, get_target
from tkg.kernel.nki_emu.tensor import SHARED_HBM, NkiTensor, Storage

_stats_lock = threading.Lock()
_last: RunStats | None = None
_thread_last = threading.local()
_collectors: list[list[RunStats]] = []


def last_run_stats() -> RunStats | None:
    """Counters of the most recent completed launch made by this thread (else by any thread; None before
    the first), so a benchmark reading its own launch is not confused by a server thread's launches."""
    return getattr(_thread_last, "stats", None) or _last


@contextmanager
def collect_stats() -> Iterator[list[RunStats]]:
    """`with collect_stats() as runs:` - `runs` receives the RunStats of every launch in the block."""
    runs: list[RunStats] = []
    with _stats_lock:
        _collectors.append(runs)
    try:
        yield runs
    finally:
        with _stats_lock:
            _collectors.remove(runs)


def _publish(stats: RunStats) -> None:
    global _last
    _thread_last.stats = stats
    with _stats_lock:
        _last = stats
        for c in _collectors:
            c.append(stats)


class Kernel:
    """An `@nki.jit` kernel: call it (`k(...)`, one program) or index it with the LNC (`k[2](...)`)."""

    def __init__(self, fn: Callable[..., Any], **options: Any):
        if "platform_target" in options:
            raise RemovedApiError(
                "nki.jit(platform_target=...) raises since NKI 0.3: set NEURON_PLATFORM_TARGET_OVERRIDE"
            )
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if isinstance(grid, tuple):
            if len(grid) != 1:
                raise LaunchError(f"{self.fn.__name__}[{grid}]: the launch grid is one LNC value (1 or 2)")
            grid = grid[0]
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or int(grid) not in (1, 2):
            raise LaunchError(f"{self.fn.__name__}[{grid!r}]: expected 1 or 2 (NeuronCores per logical core)")
        return functools.partial(launch, self, int(grid), grid_ndim=1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return launch(self, 1, *args, grid_ndim=0, **kwargs)

    def __repr__(self) -> str:
        return f"<nki.jit kernel {self.fn.__name__}>"


def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """`@nki.jit` or `@nki.jit(...)`."""
    if fn is None:
        return lambda f: Kernel(f, **options)
    return Kernel(fn, **options)


def simulate(kernel: Any) -> Callable[..., Any]:
    """`nki.simulate(kernel)(*args)` / `nki.simulate(kernel[2])(*args)`; plain functions are jit-wrapped."""
    if isinstance(kernel, (Kernel, functools.partial)):
        return kernel
    return Kernel(kernel)


def _convert_args(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], list[tuple[np.ndarray, np.ndarray, Storage]]]:
    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    back: list[tuple[np.ndarray, np.ndarray, Storage]] = []

    def conv(v: Any, label: str) -> Any:
        if isinstance(v, device.HbmArray):  # resident in HBM: the kernel works on it in place
            dt = dtypes.from_numpy(v.dtype, f"kernel argument {label!r}")
            return context._whole(Storage(tuple(v.shape) or (1,), dt, SHARED_HBM, label, data=v.data.reshape(-1)))
        if isinstance(v, np.ndarray):
            dt = dtypes.from_numpy(v.dtype, f"kernel argument {label!r}")
            device.COUNTERS.add(h2d=v.nbytes)  # a host array crosses at every call
            arr = np.ascontiguousarray(v)
            st = Storage(tuple(int(n) for n in v.shape) or (1,), dt, SHARED_HBM, label, data=arr.reshape(-1))
            if arr is not v:
                back.append((v, arr, st))
            return context._whole(st)
        if isinstance(v, list):
            raise LaunchError(
                f"kernel argument {label!r} is a list; pass a tuple (lists are not kernel arguments since NKI 0.3)"
            )
        if isinstance(v, NkiTensor):
            raise LaunchError(f"kernel argument {label!r} is an NkiTensor of another launch; pass NumPy arrays")
        if isinstance(v, dict) and any(not isinstance(k, str) for k in v):
            raise LaunchError(f"kernel argument {label!r}: dict keys must be strings in NKI")
        return v

    new_args = tuple(conv(v, names[i] if i < len(names) else f"arg{i}") for i, v in enumerate(args))
    new_kwargs = {k: conv(v, k) for k, v in kwargs.items()}
    return new_args, new_kwargs, back


def _check_poison(what: str, values: np.ndarray, programs: list[context.Program]) -> None:
    """Fail if a float output holds NaN after some program read never-written (NaN-poisoned) memory.

    NaN without a poisoned read is the kernel's own arithmetic (or its inputs') and passes.
    """
    reads = [p for p in programs if p.first_poison_read is not None]
    if not reads or values.dtype.kind in "iub":
        return  # integer outputs carry no NaN; never-written output elements are caught separately
    nan = np.isnan(values.astype(np.float32))
    if nan.any():
        first = reads[0].first_poison_read
        raise PoisonError(
            f"{what}: {int(nan.sum())} of {values.size} element(s) are NaN computed from never-written memory "
            f"({sum(p.poison_reads for p in programs)} read(s) of it; the first: {first})"
        )


def _result(v: Any, kernel: str, programs: list[context.Program]) -> Any:
    if v is None:
        return None
    if isinstance(v, tuple):
        return tuple(_result(x, kernel, programs) for x in v)
    if isinstance(v, NkiTensor):
        if v.buffer is not SHARED_HBM:
            raise LaunchError(
                f"{kernel}: returned tensor {v.name!r} is in {v.buffer!r}; kernel outputs must be allocated with "
                "buffer=nl.shared_hbm (since NKI 0.3)"
            )
        what = f"{kernel}: returned tensor {v.name!r}"
        v.check_alive(what)
        msg = v.unwritten(what)
        if msg is not None:
            raise PoisonError(msg)
        out = np.array(v.array())
        _check_poison(what, out, programs)
        device.COUNTERS.add(d2h=out.nbytes)
        return out
    raise LaunchError(f"{kernel}: returned {type(v).__name__}; expected an HBM tensor or a tuple of them")


def launch(kernel: Kernel, lnc: int, /, *args: Any, grid_ndim: int = 1, target: str | Target | None = None,
           **kwargs: Any) -> Any:  # fmt: skip
    """Run `kernel` with `lnc` programs; returns NumPy arrays for the returned tensors."""
    name = kernel.fn.__name__
    if context.current_or_none() is not None:
        raise LaunchError(
            f"{name}: an @nki.jit kernel was called from inside a running kernel; sub-kernels must be plain functions "
            "(drop @nki.jit, or apply nki.jit(fn) at the top-level call site)"
        )
    tgt = get_target(target)
    if lnc == 2 and tgt.gen < 3:
        raise LaunchError(f"{name}[2]: LNC=2 needs trn2 (gen3); the target is {tgt.name}")
    device.COUNTERS.launched((name, lnc, tgt.name, device.signature_of(args), device.signature_of(kwargs)))
    cargs, ckwargs, back = _convert_args(kernel.fn, args, kwargs)
    run = context.Launch(name, lnc, tgt)
    run.grid_ndim = grid_ndim
    results: list[Any] = [None] * lnc
    errors: list[BaseException | None] = [None] * lnc
    programs: list[context.Program] = [context.Program(run, pid) for pid in range(lnc)]

    def body(pid: int) -> None:
        with context.bind(programs[pid]):
            try:
                results[pid] = kernel.fn(*cargs, **ckwargs)
            except BaseException as exc:  # re-raised in the caller below
                errors[pid] = exc
                run.set_state(pid, "failed")
                return
            run.set_state(pid, "done")

    if lnc == 1:
        body(0)
    else:
        threads = [
            threading.Thread(target=body, args=(pid,), name=f"nki-emu-{name}-p{pid}", daemon=True) for pid in range(lnc)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    failed = [e for e in errors if e is not None]
    if failed:
        # The root cause, not the partner's "partner failed" deadlock report.
        root = next((e for e in failed if not isinstance(e, DeadlockError) or "failed before" not in str(e)), failed[0])
        raise root
    out = _result(results[0], name, programs)
    for orig, arr, st in back:
        if st.written:
            orig[...] = arr
    for v in (*cargs, *ckwargs.values()):  # inputs the kernel wrote are outputs too
        if isinstance(v, NkiTensor) and v.storage.written:
            _check_poison(f"{name}: kernel argument {v.name!r} (written by the kernel)", np.array(v.array()), programs)
    _publish(RunStats(kernel=name, lnc=lnc, target=tgt.name, programs=[p.stats for p in programs]))
    return out


@contextmanager
def session(target: str | Target | None = None) -> Iterator[context.Program]:
    """Run NKI calls directly in this thread as program 0 of a one-program launch (tests, notebooks)."""
    if context.current_or_none() is not None:
        raise LaunchError("session(): a kernel or session is already running in this thread")
    run = context.Launch("session", 1, get_target(target))
    run.grid_ndim = 0
    prog = context.Program(run, 0)
    with context.bind(prog):
        yield prog
    _publish(RunStats(kernel="session", lnc=1, target=run.target.name, programs=[prog.stats]))
