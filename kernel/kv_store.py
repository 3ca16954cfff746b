"""`KVStore`: the paged K/V pools of every layer, owned by the kernel backend that reads them.

The server's cache manager (`tkg.server.kv_cache.KVCache`) keeps the bookkeeping on the host
(block tables, lengths, reference counts) and goes through this interface for every byte of KV:

- the pools are allocated once, at construction: per layer K and V `[num_kv_heads, num_blocks,
  block_len, head_dim]` in the store's dtype (head-major, so `[g]` is the kernel's `[num_blocks,
  block_len, d]` pool of kv head g; block i is slot i of every layer);
- `write(layer, blocks, offsets, k, v)`: new tokens at (block, offset) slots;
- `copy_blocks(src, dst)`: whole blocks, every layer (fork copy-on-write);
- `read_blocks(layer, blocks)`: blocks back to host numpy (tests, sequence export);
- `read_sequence(blocks, out)` / `write_sequence(blocks, payload)`: whole blocks of every layer as one
  run `[num_layers, 2, Hkv, n, block_len, head_dim]` (KV tiers: spill and restore of a sequence);
- `decode(layer, q, k_new, v_new, block_tables, seq_lens, ...)`: one decode launch over the
  resident pools (the S new tokens were written first, so they are ordinary cache entries);
  `return_lse` / `q_start` (attend-only) make it a partial launch for context parallelism, which
  only stores whose backend has a partial decoder run (`supports_partial`).

Implementations: `HostKVStore` (numpy pools in host memory; backends `reference`, `cpu`: the cpu
native kernel reads the pool in place) and `tkg.kernel.backends.nki_store.DeviceKVStore` (pools in
device memory, shape buckets compiled at start; backends `nki-emu` and `nki`, which differ only in
their device module). `create_kv_store(backend, geometry)` asks the backend module for its store.

Counters for metrics: `transfer_bytes()` (host -> device `h2d`, device -> host `d2h`; 0 for host
stores) and `compilations` (kernel specialisations built, warm-up included; 0 for host stores).

Threading: the service calls `write`/`copy_blocks`/`read_blocks` from its event loop and `decode`
from one kernel thread at a time; `decode` only reads blocks named by its tables, and the cache
never writes blocks a running launch reads (see `tkg.server.kv_cache`).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tkg.kernel import backends
from tkg.kernel.backends.host_ops import native_rope_store, native_scatter

NATIVE_SCATTER_BYTES = 64 << 10  # per tensor: HostKVStore.write's native pass from here (measured crossover)


@dataclass(frozen=True)
class KVGeometry:
    """Shape and dtype of the pools: `num_layers` x K/V `[num_kv_heads, num_blocks, block_len, head_dim]`.

    `dtype` is the storage dtype (any numpy dtype the backend supports, 1-byte fp8 included);
    `io_dtype` what q, new k/v and the output travel in (None: `dtype`).
    """

    num_layers: int
    num_kv_heads: int
    num_blocks: int
    block_len: int
    head_dim: int
    dtype: np.dtype
    io_dtype: np.dtype | None = None

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        return (self.num_kv_heads, self.num_blocks, self.block_len, self.head_dim)


class StepOutOfBuckets(ValueError):
    """A decode step whose shape no compiled bucket covers (the service answers INVALID_ARGUMENT).

    `dimension`: which limit it passed, "s_active" or "context" (so a caller can name its own field)."""

    def __init__(self, message: str, dimension: str = "") -> None:
        super().__init__(message)
        self.dimension = dimension


@dataclass(frozen=True)
class WarmUp:
    """What `KVStore.warm_up` did: kernel specialisations built and the seconds it took."""

    launches: int
    compiled: int
    seconds: float


@dataclass(frozen=True)
class LayerVariant:
    """What changes a layer's kernel specialisation besides shapes: a sliding window, sinks."""

    window: bool = False
    sinks: bool = False


class KVStore:
    """The interface (see the module docstring). Subclasses implement the `_` methods' storage."""

    backend: str = ""

    def __init__(self, geometry: KVGeometry) -> None:
        for name in ("num_layers", "num_kv_heads", "num_blocks", "block_len", "head_dim"):
            if getattr(geometry, name) < 1:
                raise ValueError(f"KVStore: {name}: expected >= 1, got {getattr(geometry, name)}")
        self.geometry = geometry
        self.compilations = 0

    # ---- limits ---------------------------------------------------------------------------------

    @property
    def max_context(self) -> int | None:
        """The most tokens (cached + new) a sequence may have in a decode step; None: no limit."""
        return None

    @property
    def max_s_active(self) -> int | None:
        """The most new tokens per sequence in a decode step; None: no limit."""
        return None

    @property
    def reads_new_kv(self) -> bool:
        """True when `decode` needs `k_new`/`v_new` (device stores send them with the step)."""
        return False

    @property
    def takes_max_threads(self) -> bool:
        """True when `decode` accepts a `max_threads` option (a host kernel with its own thread pool)."""
        return False

    @property
    def supports_partial(self) -> bool:
        """True when `decode` takes `return_lse` and `q_start` (attend-only); device stores: when their
        device's kernel has our partial mode (`nki_store.DeviceKVStore.supports_partial`)."""
        return False

    def check_step(self, s_active: int, context: int) -> None:
        """Raise StepOutOfBuckets naming the limit when no bucket covers the step."""
        if self.max_s_active is not None and s_active > self.max_s_active:
            raise StepOutOfBuckets(
                f"S={s_active} new tokens exceeds the largest compiled s_active bucket {self.max_s_active} "
                f"(backend {self.backend}); expected at most {self.max_s_active}",
                "s_active",
            )
        if self.max_context is not None and context > self.max_context:
            raise StepOutOfBuckets(
                f"{context} tokens exceeds the largest compiled context bucket {self.max_context} "
                f"(backend {self.backend}, --context-buckets); expected at most {self.max_context}",
                "context",
            )

    # ---- counters -------------------------------------------------------------------------------

    def transfer_bytes(self) -> dict[str, int]:
        """Bytes moved host -> device (`h2d`) and device -> host (`d2h`) since construction."""
        return {"h2d": 0, "d2h": 0}

    # ---- storage --------------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise ValueError(f"KVStore: layer: expected 0 <= layer < {self.geometry.num_layers}, got {layer}")

    def write(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store tokens at `layer`: slot (blocks[i], offsets[i]) gets `k[:, i]`, `v[:, i]`.

        blocks, offsets: int arrays of one shape I; k, v: `[num_kv_heads, *I, head_dim]`, cast to
        the store dtype. Slots must be distinct.
        """
        raise NotImplementedError

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy blocks `src[i]` -> `dst[i]` (int `[n]`, distinct `dst`) in every layer, K and V."""
        raise NotImplementedError

    def read_blocks(self, layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of blocks `blocks` (int `[n]`) at `layer`: K, V `[num_kv_heads, n, block_len, head_dim]`."""
        raise NotImplementedError

    def sequence_shape(self, n: int) -> tuple[int, ...]:
        """The shape of `n` blocks of every layer as one run: `[num_layers, 2, Hkv, n, block_len, d]`."""
        g = self.geometry
        return (g.num_layers, 2, g.num_kv_heads, n, g.block_len, g.head_dim)

    def read_sequence(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """Copy blocks `blocks` (int `[n]`) of every layer, K and V, into `out` (`sequence_shape(n)`,
        the store dtype). A device store counts it as a device-to-host transfer. Only reads blocks
        nothing writes meanwhile (the caller's guarantee), so it may run off the event loop."""
        for layer in range(self.geometry.num_layers):
            out[layer, 0], out[layer, 1] = self.read_blocks(layer, blocks)

    def write_sequence(self, blocks: np.ndarray, payload: np.ndarray) -> None:
        """Store `payload` (`sequence_shape(n)`) into blocks `blocks` (int `[n]`, reserved for it:
        nothing else names them), every slot of every block."""
        g = self.geometry
        ids = np.asarray(blocks, dtype=np.int64)
        slots = np.repeat(ids, g.block_len)
        offsets = np.tile(np.arange(g.block_len), ids.size)
        for layer in range(g.num_layers):
            k = payload[layer, 0].reshape(g.num_kv_heads, ids.size * g.block_len, g.head_dim)
            v = payload[layer, 1].reshape(g.num_kv_heads, ids.size * g.block_len, g.head_dim)
            self.write(layer, slots, offsets, k, v)

    def decode(
        self,
        layer: int,
        q: np.ndarray,
        k_new: np.ndarray | None,
        v_new: np.ndarray | None,
        block_tables: np.ndarray,
        seq_lens: np.ndarray,
        *,
        scale: float,
        window: int | None = None,
        sinks: np.ndarray | None = None,
        trusted: bool = False,
        return_lse: bool = False,
        q_start: np.ndarray | None = None,
        **options: Any,
    ) -> Any:
        """One decode step of `layer` for B sequences (`tkg.kernel.paged.paged_decode`'s math).

        q: `[B, Hq, S, d]` (RoPE applied, not scaled); k_new, v_new: `[B, Hkv, S, d]`, the S tokens
        already written at positions `seq_lens[b]-S ..` (None unless `reads_new_kv`);
        block_tables: int32 `[B, >= ceil(seq_lens/block_len)]`; seq_lens: int32 `[B]`.
        trusted: the tables and lengths come from the cache that built them (`tkg.server.kv_cache`
            keeps every used entry a valid id and every length within its table): the per-step
            range check over the tables is skipped, as FlashInfer's run() trusts what plan() made.
        return_lse: also return the float32 log-sum-exp `[B, Hq, S]` of each query; out is then float32.
        q_start: int64 `[B]`, an attend-only launch: nothing new was written, query i of sequence b sits
            at key index `q_start[b] + i >= seq_lens[b]`, no sink is added (pass `sinks=None`).
        options: the backend's own per-call options (e.g. the cpu kernel's `max_threads`).
        Returns `[B, Hq, S, d]` in q's dtype; partial launches return float32 out and, with
        `return_lse`, the pair (out, lse). Only stores with `supports_partial` take them.
        """
        raise NotImplementedError

    def warm_up(self, variants: set[LayerVariant], num_q_heads: int, s_active: int = 1) -> WarmUp:
        """Build every kernel specialisation serving can need (device stores) or run one tiny step
        (host stores), so no request pays for it."""
        t0 = time.perf_counter()
        g = self.geometry
        io = g.io_dtype or g.dtype
        for variant in sorted(variants, key=lambda x: (x.window, x.sinks)):
            q = np.zeros((1, num_q_heads, 1, g.head_dim), dtype=io)
            sinks = np.zeros(num_q_heads, np.float32) if variant.sinks else None
            self.decode(
                0, q, None, None, np.zeros((1, 1), np.int32), np.ones(1, np.int32), scale=1.0,
                window=1 if variant.window else None, sinks=sinks,
            )  # fmt: skip
        return WarmUp(len(variants), 0, time.perf_counter() - t0)


class HostKVStore(KVStore):
    """Numpy pools in host memory; `decode` runs `paged_decode` on them in place (no copies).

    `k[layer]`, `v[layer]`: the pools, allocated and written once here so the hot path never
    page-faults on cache memory.
    """

    def __init__(self, geometry: KVGeometry, backend: str = "reference") -> None:
        super().__init__(geometry)
        self.backend = backend
        self._module: backends.KernelBackend | None = None  # the backend's module, loaded at the first decode
        self.k: list[np.ndarray] = [self._touched() for _ in range(geometry.num_layers)]
        self.v: list[np.ndarray] = [self._touched() for _ in range(geometry.num_layers)]

    def _touched(self) -> np.ndarray:
        a = np.empty(self.geometry.pool_shape, dtype=self.geometry.dtype)
        a.fill(0)  # every page now: first-touch faults stay off the decode path
        return a

    def write(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        # [Hkv, NB, BL, d][:, blocks, offsets] is [Hkv, *I, d]: one scatter per tensor, no token loop.
        # Large writes: one native pass of row copies that prefetches the slots ahead (a batch-64
        # step: 118 -> 75 us, its slots cold in pools far larger than the caches); small ones, or
        # without the extension, numpy's fancy assignment (the native call's ~6 us of argument
        # handling is more than numpy takes for a few rows).
        for pool, rows in ((self.k[layer], k), (self.v[layer], v)):
            rows = np.asarray(rows)
            if rows.dtype != pool.dtype:
                rows = rows.astype(pool.dtype)
            if rows.nbytes < NATIVE_SCATTER_BYTES or not native_scatter(pool, blocks, offsets, rows):
                pool[:, blocks, offsets] = rows

    def write_rope(
        self, layer: int, blocks: np.ndarray, offsets: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
        positions: np.ndarray, cos2: np.ndarray, sin2: np.ndarray,
    ) -> np.ndarray | None:
        """`write` of a decode step's k and v `[B, Hkv, T, d]` at slots (blocks, offsets) (int `[B, T]`)
        with k RoPE'd on the way in, and q `[B, Hq, T, d]` RoPE'd alike (positions `[B, T]`, cos2 and
        sin2 rows as `tkg.server.rope.RopeTable`'s): one native pass
        (`tkg.kernel.backends.host_ops.native_rope_store`) that never materialises the rotated k. Returns
        the rotated q; None, with nothing written, when the pass does not cover the call (no native
        module; k, v or the pools of different dtypes): the caller then rotates and `write`s."""  # fmt: skip
        return native_rope_store(q, k, v, positions, cos2, sin2, self.k[layer], self.v[layer], blocks, offsets)

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        if not len(src):
            return
        for pools in (self.k, self.v):
            for a in pools:
                a[:, dst] = a[:, src]

    def read_blocks(self, layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._check_layer(layer)
        ids = np.asarray(blocks, dtype=np.int64)
        return self.k[layer][:, ids], self.v[layer][:, ids]  # fancy indexing: copies

    def read_sequence(self, blocks: np.ndarray, out: np.ndarray) -> None:
        ids = np.asarray(blocks, dtype=np.int64)
        for layer in range(self.geometry.num_layers):
            for kv, pools in enumerate((self.k, self.v)):
                # Straight into the run: one copy. mode="clip" because numpy buffers `out` (a second
                # copy, 3x the time on the llama-3-8b geometry) under the default "raise"; the ids are
                # blocks the caller's sequence holds, always in range, so clipping never changes one.
                np.take(pools[layer], ids, axis=1, out=out[layer, kv], mode="clip")

    def write_sequence(self, blocks: np.ndarray, payload: np.ndarray) -> None:
        ids = np.asarray(blocks, dtype=np.int64)
        n = ids.size
        # Fresh pools hand out ascending ids: a contiguous range is a slice (a plain memcpy per head).
        run = slice(int(ids[0]), int(ids[0]) + n) if n and (np.diff(ids) == 1).all() else ids
        for layer in range(self.geometry.num_layers):
            self.k[layer][:, run] = payload[layer, 0]
            self.v[layer][:, run] = payload[layer, 1]

    def decode(
        self,
        layer: int,
        q: np.ndarray,
        k_new: np.ndarray | None,
        v_new: np.ndarray | None,
        block_tables: np.ndarray,
        seq_lens: np.ndarray,
        *,
        scale: float,
        window: int | None = None,
        sinks: np.ndarray | None = None,
        trusted: bool = False,
        return_lse: bool = False,
        q_start: np.ndarray | None = None,
        **options: Any,
    ) -> Any:
        from tkg.kernel.paged import check_paged_args, run_paged

        out, k_scale, v_scale = options.pop("out", None), options.pop("k_scale", 1.0), options.pop("v_scale", 1.0)
        lse = np.empty(q.shape[:3], np.float32) if return_lse else None
        args = check_paged_args(
            q, self.k[layer], self.v[layer], block_tables, seq_lens, scale, window, sinks, out, k_scale, v_scale,
            check_tables=not trusted, lse=lse, q_start=q_start,
        )  # fmt: skip
        run_paged(self.module, self.backend, args, **options)
        return (args.out, lse) if return_lse else args.out

    @property
    def module(self) -> backends.KernelBackend:
        """The backend's module, loaded at first use (the backend is fixed for the store's life)."""
        if self._module is None:
            self._module = backends.load(self.backend)
        return self._module

    @property
    def supports_partial(self) -> bool:
        from tkg.kernel.paged import partial_decoder

        return partial_decoder(self.module) is not None

    @property
    def takes_max_threads(self) -> bool:
        impl = getattr(self.module, "paged_decode", None)
        return impl is not None and "max_threads" in inspect.signature(impl).parameters


def create_kv_store(backend: str, geometry: KVGeometry, **options: Any) -> KVStore:
    """The store of backend `backend` (a resolved name): its module's `kv_store(geometry, **options)`,
    else host numpy pools. Options (device stores): `buckets`, `lnc`."""
    mod = backends.load(backend)
    make = getattr(mod, "kv_store", None)
    if make is None:
        return HostKVStore(geometry, backend)
    return make(geometry, **options)
