"""Backend `nki`: our NKI kernel through the real Neuron `nki` package, and the service hooks.

- Off-device (no `/dev/neuron0`, or `NKI_SIMULATOR=1`): `nki.simulate(kernel[lnc])(...)` on CPU.
- On a Trainium host: the compiled kernel on the NeuronCores, `kernel[lnc](...)`.
Everything Neuron is imported lazily; `available()` says why this backend cannot run here. None of
it can run on a build machine without the Neuron SDK (the PyPI `nki` is a placeholder): here it is
the emulator (`nki-emu`) that executes the same kernel source.

Service hooks for `tkg serve --backend nki`:
- `require_runtime()`: the startup check, a clear error when the Neuron runtime is missing;
- `ContextBuckets`: the compiled context buckets (`curr_sprior` values, multiples of 128 per
  core) and batch buckets, `warm_up()` traces/compiles each once at start;
- `DeviceKVPool`: one layer's K/V pools as device tensors through torch-neuronx;
- `paged_decode(args, ...)`: the service's step, padded to a compiled bucket.
The Neuron library's own kernel, for comparison on hardware, is backend `nkilib` (`backends/nkilib.py`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

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


def context_align(lnc: int) -> int:
    """Bucket granularity: `curr_sprior / cores` must be a multiple of 128, so 128*lnc is always safe."""
    return 128 * lnc


@dataclass
class ContextBuckets:
    """Compiled shapes: context buckets (`curr_sprior`) and batch buckets, each compiled once.

    NKI kernels are specialised per static shape, so the service rounds every step up to a bucket:
    the context to the smallest bucket >= the longest sequence, the batch to the smallest batch
    bucket >= B (padding rows point at block 0 and are fully masked but for their diagonal).
    """

    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    lnc: int = 1
    warmed: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        align = context_align(self.lnc)
        for c in self.contexts:
            if c <= 0 or c % align:
                msg = f"ContextBuckets: contexts: {c} must be a positive multiple of {align} (lnc={self.lnc})"
                raise ValueError(msg)
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"ContextBuckets: batches: {self.batches} must be positive sizes")
        self.contexts = tuple(sorted(set(self.contexts)))
        self.batches = tuple(sorted(set(self.batches)))

    @classmethod
    def powers_of_two(cls, max_context: int, max_batch: int, lnc: int = 1) -> ContextBuckets:
        """Buckets 256, 512, ... up to max_context, and batches 1, 2, 4, ... up to max_batch."""
        align = context_align(lnc)
        ctx, c = [], max(256, align)
        while c < max_context:
            ctx.append(c)
            c *= 2
        ctx.append(-(-max_context // align) * align)
        bat, b = [], 1
        while b < max_batch:
            bat.append(b)
            b *= 2
        bat.append(max_batch)
        return cls(tuple(ctx), tuple(bat), lnc)

    def context_for(self, longest: int) -> int:
        for c in self.contexts:
            if c >= longest:
                return c
        raise ValueError(f"context: {longest} tokens exceed the largest compiled bucket {self.contexts[-1]}")

    def batch_for(self, batch: int) -> int:
        for b in self.batches:
            if b >= batch:
                return b
        raise ValueError(f"batch: {batch} sequences exceed the largest compiled bucket {self.batches[-1]}")

    def warm_up(self, step: Any, shapes: Iterable[tuple[int, int]] | None = None) -> int:
        """Call `step(batch, context)` once per bucket (compiling it); returns how many were warmed."""
        todo = list(shapes) if shapes is not None else [(b, c) for b in self.batches for c in self.contexts]
        for b, c in todo:
            if (b, c) not in self.warmed:
                step(b, c)
                self.warmed.add((b, c))
        return len(todo)


class DeviceKVPool:
    """One layer's K and V pools `[Hkv, num_blocks, block_len, d]` resident on a NeuronCore.

    Allocated once at start through torch-neuronx (no allocation on the hot path); `append`
    writes new tokens in place, and each kv head's pool is a view `[num_blocks, block_len, d]`
    that the kernel reads through its block table.
    """

    def __init__(self, shape: Sequence[int], dtype: Any, device: Any = None) -> None:
        require_runtime()
        import torch

        if device is None:
            import torch_xla.core.xla_model as xm  # torch-neuronx runs on the XLA device

            device = xm.xla_device()
        self.device = device
        self.k = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.v = torch.zeros(tuple(shape), dtype=dtype, device=device)

    def append(self, head: int, blocks: Any, offsets: Any, k: Any, v: Any) -> None:
        """Write tokens `[T, d]` of kv head `head` at (block, offset) slots (index tensors `[T]`)."""
        self.k[head, blocks, offsets] = k.to(self.device)
        self.v[head, blocks, offsets] = v.to(self.device)

    def head(self, g: int) -> tuple[Any, Any]:
        return self.k[g], self.v[g]


def paged_decode(args: Any, *, lnc: int = 1, buckets: ContextBuckets | None = None, **options: Any) -> None:
    """The service's decode step through our kernel, with the context rounded to a compiled bucket."""
    align = context_align(lnc)
    if buckets is not None:
        longest = int(np.max(args.seq_lens)) if len(args.seq_lens) else 1
        align = buckets.context_for(longest)  # one bucket: rounding up to it is rounding to a multiple of it
    nki_host.paged_folded(args, NAME, lnc=lnc, align=align, **options)
