"""`DeviceKVStore`: the KV store of the NKI backends (`nki-emu`, `nki`), pools resident on the device.

Shared by both NKI backends; they differ only in the `Device` they pass (the emulator's HBM, or a
NeuronCore through torch-neuronx). Per layer the K and V pools `[Hkv, NB+1, BL, d]` (one scratch
block past the cache's ids) are allocated once on the device; `write` uploads only the new tokens
and their slots, `copy_blocks` the block ids, `read_blocks` downloads only the blocks asked for. A
decode step uploads q, the new k/v, the folded block table and the positions (and window starts),
launches the kernel over the resident pools (viewed as `[Hkv*(NB+1), BL, d]`, no copy) and
downloads the output. Masks and sinks are constants per shape / layer, uploaded once.

Shapes are bucketed (`nki_buckets.Buckets`): the batch to a batch bucket (padding rows masked), the new tokens
per sequence to an s_active bucket (padding queries dropped), the longest sequence to a context
bucket; writes to the batch x s_active sizes and copies/reads to powers of two, padded into the
scratch block. Every device operation runs on the store's one device thread and ends at the
device's barrier (`torch_xla.sync()` on a lazy-tensor device), so the pools are updated in place
and the graphs are a fixed set. `warm_up` runs every write, copy and read size and launches every
(variant, batch, context, s_active) combination at start, so nothing is built while serving;
`decode` refuses a step outside the buckets (`StepOutOfBuckets`) instead of compiling it.

Partial launches (context parallelism, docs/context-parallel.md): `decode(..., return_lse=True)`
and attend-only `decode(..., q_start=...)` run our kernel's partial mode (`nki_host.partial_kind`:
a decode with lse, or attend-only, each its own specialisation per shape), so warm-up launches
those kinds too, for every shape, when the device's kernel has that mode (`Device.partial`).
docs/trainium-store.md says why, and what `make test-xla` proves of it on torch-xla's CPU runtime.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from tkg.kernel.backends import nki_host
from tkg.kernel.backends.device_worker import DeviceWorker
from tkg.kernel.backends.nki_buckets import Buckets, powers
from tkg.kernel.kv_store import KVGeometry, KVStore, LayerVariant, WarmUp


class Device(Protocol):
    """Where the pools live: allocation, counted transfers, device-side index ops, kernel launch.

    Arrays are the device's own handles; `upload`/`download` are the only host <-> device copies
    and the device counts their bytes (`h2d`, `d2h`). `barrier` ends a unit of device work: on a
    lazy-tensor device (torch-xla) it compiles and runs what is pending and updates the pools in
    place; where every operation runs when issued (the emulator) it does nothing. The store calls
    every method on its one device thread (`device_worker.DeviceWorker`).
    """

    name: str
    h2d: int
    d2h: int
    partial: bool  # its kernel has our partial mode (return_lse, attend_only: lse out, no active tokens)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...
    def upload(self, a: np.ndarray) -> Any: ...
    def download(self, x: Any, dtype: np.dtype | None = None) -> np.ndarray: ...
    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None: ...
    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None: ...
    def gather_blocks(self, pool: Any, ids: Any) -> Any: ...
    def fold(self, pool: Any) -> Any: ...
    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]: ...
    def barrier(self) -> None: ...
    def kernel_config(self, cfg: Any, *, return_lse: bool = False, attend_only: bool = False) -> Any: ...


class HbmDevice:
    """A device whose arrays are the emulator's `HbmArray`s (NumPy memory standing for HBM).

    `launcher(lnc, args)` runs the kernel on them: the emulator (backend `nki-emu`) or the Neuron
    simulator (backend `nki` without a device). Counts its own uploads and downloads; the kernel's
    outputs count as downloads. Every operation runs when issued, so `barrier` has nothing to do.
    """

    def __init__(self, name: str, launcher: Callable[[int, tuple[Any, ...]], Any], config_cls: Callable[[], type]):
        from tkg.kernel.nki_emu import device as hbm

        self.name = name
        self._hbm = hbm
        self._launcher = launcher
        self._config_cls = config_cls
        self._lock = threading.Lock()
        self.h2d = 0
        self.d2h = 0
        self.partial = True  # our kernel, emulated or simulated

    def _count(self, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            self.h2d += h2d
            self.d2h += d2h

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self._hbm.zeros(shape, dtype)

    def upload(self, a: np.ndarray) -> Any:
        x = self._hbm.to_device(a)
        self._count(h2d=x.nbytes)
        return x

    def download(self, x: Any, dtype: np.dtype | None = None) -> np.ndarray:
        """An `HbmArray` (a pool's blocks) or a kernel output (host memory in the emulator)."""
        a = self._hbm.to_host(x) if isinstance(x, self._hbm.HbmArray) else np.asarray(x)
        self._count(d2h=a.nbytes)
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise TypeError(f"{self.name}: download: the array holds {a.dtype}, expected {np.dtype(dtype)}")
        return a

    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None:
        pool.data[:, blocks.data, offsets.data] = values.data

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None:
        pool.data[:, dst.data] = pool.data[:, src.data]

    def gather_blocks(self, pool: Any, ids: Any) -> Any:
        return self._hbm.HbmArray(np.ascontiguousarray(pool.data[:, ids.data]))

    def fold(self, pool: Any) -> Any:
        Hkv, NB, BL, d = pool.shape
        return pool.reshape(Hkv * NB, BL, d)

    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        res = self._launcher(lnc, args)
        return res if isinstance(res, tuple) else (res,)

    def barrier(self) -> None:
        """Nothing pending: the emulator's operations already ran."""

    def kernel_config(self, cfg: Any, *, return_lse: bool = False, attend_only: bool = False) -> Any:
        return nki_host.kernel_config(cfg, self._config_cls(), return_lse=return_lse, attend_only=attend_only)


MAX_BLOCKS_PER_JOB = 64  # copies and reads go in chunks of at most this many blocks (warm-up reads each size)


def _bucket(sizes: tuple[int, ...], n: int) -> int:
    """The smallest of `sizes` (ascending) holding `n` (n <= sizes[-1])."""
    return next(s for s in sizes if s >= n)


class DeviceKVStore(KVStore):
    """Pools on `device`; see the module docstring. `lnc`: NeuronCores per launch (1 or 2).

    Internals (the shapes a lazy-tensor device compiles, docs/trainium-store.md):
    - the pools hold `num_blocks + 1` blocks: block `num_blocks` is the scratch block, never
      handed out by the cache (its block ids are `0 .. num_blocks-1`), where padding goes;
    - a write of n tokens goes in chunks of the largest write bucket (batch x s_active buckets),
      each padded to its bucket with slots in the scratch block; copies and reads of n blocks in
      chunks padded to powers of two (up to `MAX_BLOCKS_PER_JOB`) with scratch ids;
    - every device operation is a job on the store's one device thread (`DeviceWorker`), each
      ending at `device.barrier()`: the pools are updated in place, and no job's graph holds
      another's operations;
    - `warm_up` runs every write, copy, read and kernel shape once, so serving compiles nothing.
    `graphs` (device thread only; read it after `sync()`): the (operation, shape) keys run so far.
    """

    def __init__(
        self, geometry: KVGeometry, device: Device, buckets: Buckets, *, lnc: int = 1, partial: bool = True
    ) -> None:
        super().__init__(geometry)
        if any(c % Buckets.alignment(geometry.block_len, lnc) for c in buckets.contexts):
            raise ValueError(
                f"DeviceKVStore: buckets.contexts {buckets.contexts} must be multiples of "
                f"{Buckets.alignment(geometry.block_len, lnc)} (block_len {geometry.block_len}, lnc {lnc})"
            )
        self.backend = device.name
        self.device = device
        self.buckets = buckets
        self.lnc = lnc
        self.partial = partial and bool(getattr(device, "partial", False))  # see `supports_partial`
        g = geometry
        self.scratch = g.num_blocks  # the reserved padding block (see the class docstring)
        self._nb = g.num_blocks + 1  # blocks in each device pool
        self.write_sizes = tuple(sorted({b * s for b in buckets.batches for s in buckets.s_actives}))
        self.block_counts = tuple(powers(min(MAX_BLOCKS_PER_JOB, -(-buckets.contexts[-1] // g.block_len))))
        self.graphs: set[tuple[Any, ...]] = set()
        self._worker = DeviceWorker(device.name)
        self._consts: dict[tuple[Any, ...], Any] = {}  # masks per shape, sinks per value: uploaded once
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._seen: set[tuple[Any, ...]] = set()  # launch shapes so far: one specialisation each
        self.k, self.v = self._worker.call(self._allocate)

    def _allocate(self) -> tuple[list[Any], list[Any]]:
        g, dev = self.geometry, self.device
        shape, dt = (g.num_kv_heads, self._nb, g.block_len, g.head_dim), np.dtype(g.dtype)
        k = [dev.zeros(shape, dt) for _ in range(g.num_layers)]
        v = [dev.zeros(shape, dt) for _ in range(g.num_layers)]
        dev.barrier()  # the pools become device buffers now, not a pending fill in the first step's graph
        return k, v

    def sync(self) -> None:
        """Wait for every device job queued so far (writes and copies do not wait)."""
        self._worker.drain()

    def close(self) -> None:
        """Finish the queued device jobs and stop the device thread."""
        self._worker.close()

    # ---- limits and counters --------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.buckets.contexts[-1]

    @property
    def max_s_active(self) -> int:
        return self.buckets.s_actives[-1]

    @property
    def reads_new_kv(self) -> bool:
        return True

    @property
    def supports_partial(self) -> bool:
        """lse and attend-only launches: asked for (`partial`, the default but for a NeuronCore's
        store: 3x the warm-up compiles) and the device's kernel has our partial mode."""
        return self.partial

    def transfer_bytes(self) -> dict[str, int]:
        return {"h2d": self.device.h2d, "d2h": self.device.d2h}

    # ---- storage --------------------------------------------------------------------------------
    # Called from the event loop: the padded host arrays are fresh copies (the caller may reuse its
    # own), and writes/copies are posted without waiting; reads wait for their job.

    def write(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        self._check_layer(layer)
        g = self.geometry
        dt = np.dtype(g.dtype)
        b = np.asarray(blocks).reshape(-1)
        o = np.asarray(offsets).reshape(-1)
        n = b.size
        kk = np.asarray(k).reshape(g.num_kv_heads, n, g.head_dim)
        vv = np.asarray(v).reshape(g.num_kv_heads, n, g.head_dim)
        top = self.write_sizes[-1]
        for c0 in range(0, n, top):
            c1 = min(n, c0 + top)
            m, size = c1 - c0, _bucket(self.write_sizes, c1 - c0)
            pb = np.full(size, self.scratch, np.int32)
            po = (np.arange(size) % g.block_len).astype(np.int32)  # padding: distinct slots of the scratch block
            pk = np.zeros((g.num_kv_heads, size, g.head_dim), dt)
            pv = np.zeros((g.num_kv_heads, size, g.head_dim), dt)
            pb[:m], po[:m] = b[c0:c1], o[c0:c1]
            pk[:, :m], pv[:, :m] = kk[:, c0:c1], vv[:, c0:c1]
            self._worker.post(lambda layer=layer, pb=pb, po=po, pk=pk, pv=pv: self._write_job(layer, pb, po, pk, pv))

    def _write_job(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        dev = self.device
        b, o = dev.upload(blocks), dev.upload(offsets)
        dev.scatter(self.k[layer], b, o, dev.upload(k))
        dev.scatter(self.v[layer], b, o, dev.upload(v))
        dev.barrier()
        self.graphs.add(("write", blocks.size))

    def _padded_ids(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(real count, int32 ids padded with the scratch id to a block-count bucket) per chunk."""
        ids = np.asarray(ids).reshape(-1)
        top, out = self.block_counts[-1], []
        for c0 in range(0, ids.size, top):
            part = ids[c0 : c0 + top]
            padded = np.full(_bucket(self.block_counts, part.size), self.scratch, np.int32)
            padded[: part.size] = part
            out.append((part.size, padded))
        return out

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        # Chunks run one after another: right for the cache's copies (fresh dst blocks, never a src).
        for (_, s), (_, d) in zip(self._padded_ids(src), self._padded_ids(dst), strict=True):
            self._worker.post(lambda s=s, d=d: self._copy_job(s, d))

    def _copy_job(self, src: np.ndarray, dst: np.ndarray) -> None:
        dev = self.device
        s, d = dev.upload(src), dev.upload(dst)
        for pools in (self.k, self.v):
            for pool in pools:
                dev.copy_blocks(pool, s, d)
        dev.barrier()
        self.graphs.add(("copy", src.size))

    def read_blocks(self, layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._check_layer(layer)
        g = self.geometry
        ks, vs = [], []
        for m, ids in self._padded_ids(blocks):
            k, v = self._worker.call(lambda ids=ids: self._read_job(layer, ids))
            ks.append(k[:, :m])
            vs.append(v[:, :m])
        if not ks:
            empty = np.zeros((g.num_kv_heads, 0, g.block_len, g.head_dim), np.dtype(g.dtype))
            return empty, empty.copy()
        if len(ks) == 1:
            return np.ascontiguousarray(ks[0]), np.ascontiguousarray(vs[0])
        return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)

    def _read_job(self, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev, dt = self.device, np.dtype(self.geometry.dtype)
        i = dev.upload(ids)
        k, v = dev.gather_blocks(self.k[layer], i), dev.gather_blocks(self.v[layer], i)
        dev.barrier()
        self.graphs.add(("read", ids.size))
        return dev.download(k, dt), dev.download(v, dt)

    # ---- decode ---------------------------------------------------------------------------------

    def _const(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> Any:
        """A constant on the device, uploaded at its first use (device thread only: no lock)."""
        x = self._consts.get(key)
        if x is None:
            x = self._consts[key] = self.device.upload(make())
        return x

    def _config(self, st: nki_host.FoldedStep) -> Any:
        cfg = st.cfg
        key = (cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, cfg.d_head, cfg.block_len)
        key = (*key, st.return_lse, st.attend_only)
        kcfg = self._configs.get(key)
        if kcfg is None:
            kcfg = self._configs[key] = self.device.kernel_config(
                cfg, return_lse=st.return_lse, attend_only=st.attend_only
            )
        return kcfg

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
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        trusted: bool = False,
        return_lse: bool = False,
        q_start: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """(k_scale, v_scale: the pools hold value / scale: the logits' scale takes k_scale, the
        output v_scale. `trusted` changes nothing here: the device step checks only its buckets.
        return_lse, q_start: `KVStore.decode`'s partial launches (`supports_partial`); `out`: the
        destination `[B, Hq, S, d]` (default: q's dtype, float32 for a partial launch).)"""
        attend = q_start is not None
        if (return_lse or attend) and not self.supports_partial:
            raise ValueError(
                f"DeviceKVStore.decode: return_lse, q_start: this {self.device.name} store takes no partial launches "
                "(made with partial=False, or its kernel has no partial mode); expected return_lse=False, q_start=None"
            )
        if attend and sinks is not None:
            raise ValueError("DeviceKVStore.decode: sinks: an attend-only launch (q_start) adds no sink; expected None")
        if not attend and (k_new is None or v_new is None):
            raise ValueError("DeviceKVStore.decode: k_new, v_new: expected [B, Hkv, S, d] arrays, got None")
        B, S = q.shape[0], q.shape[2]
        lens = np.asarray(seq_lens, dtype=np.int64)
        self.check_step(S, int(lens.max()))  # attend-only: the cached keys are the whole context
        if out is None:
            out = np.empty(q.shape, np.float32) if (return_lse or attend) else np.empty_like(q)
        lse = np.empty(q.shape[:3], np.float32) if return_lse else None
        starts = None if q_start is None else np.asarray(q_start, np.int64)
        step = self.buckets.batches[-1]
        for b0 in range(0, B, step):  # more sequences than the largest batch bucket: several launches
            sl = slice(b0, min(B, b0 + step))
            self._decode_chunk(
                layer, q[sl], None if attend else k_new[sl], None if attend else v_new[sl], block_tables[sl],
                lens[sl], out[sl], scale * k_scale, window, sinks, None if lse is None else lse[sl],
                None if starts is None else starts[sl],
            )  # fmt: skip
        if v_scale != 1.0:
            out[...] = np.asarray(out, np.float32) * np.float32(v_scale)
        return (out, lse) if return_lse else out

    def _decode_chunk(
        self, layer: int, q: np.ndarray, k_new: np.ndarray | None, v_new: np.ndarray | None, tables: np.ndarray,
        lens: np.ndarray, out: np.ndarray, scale: float, window: int | None, sinks: np.ndarray | None,
        lse: np.ndarray | None, q_start: np.ndarray | None,
    ) -> None:  # fmt: skip
        g = self.geometry
        B, Hq, S = q.shape[:3]
        Hkv = g.num_kv_heads
        G = Hq // Hkv
        Bb, Sb = self.buckets.batch_for(B), self.buckets.s_active_for(S)
        ctx = self.buckets.context_for(int(lens.max()))
        # The kernel's sink is per query head of a launch, shared by its rows: with sinks, one launch
        # per kv head (its group's sinks); without, every kv head folded into one launch.
        groups = [range(Hkv)] if sinks is None else [[h] for h in range(Hkv)]
        for heads in groups:
            st = nki_host.fold_inputs(
                q, k_new, v_new, tables, lens, scale=scale, window=window, heads=heads, num_blocks=self._nb,
                block_len=g.block_len, context=ctx, batch=Bb, s_active=Sb, return_lse=lse is not None,
                q_start=q_start, num_kv_heads=Hkv,
            )  # fmt: skip
            sg = None
            if sinks is not None:
                sg = np.asarray(sinks, dtype=np.float32).reshape(Hkv, G)[heads[0]].reshape(G, 1)
            kv_dt = np.dtype(g.dtype).name if st.k_active is None else st.k_active.dtype.name
            key = (Bb, ctx, Sb, st.cfg.bs, window is not None, sinks is not None, kv_dt, st.return_lse, st.attend_only)
            res = self._worker.call(lambda st=st, sg=sg, key=key: self._launch_job(layer, st, sg, key))
            st.unfold(res[0], out)
            if lse is not None:
                st.unfold_lse(res[1], lse)

    def _launch_job(
        self, layer: int, st: nki_host.FoldedStep, sink: np.ndarray | None, key: tuple[Any, ...]
    ) -> tuple[np.ndarray, ...]:
        """Upload the step's inputs, launch over the resident pools, barrier, download the output
        (and the lse of a launch with `st.return_lse`). An attend-only step has no k/v/mask to send."""
        dev = self.device
        Sb, rows, G = st.cfg.s_active, st.cfg.bs, st.cfg.q_head
        mask = None if st.mask is None else self._const(("mask", Sb, rows, G), lambda: st.mask)
        sk = None if sink is None else self._const(("sink", sink.tobytes()), lambda: sink)
        starts = None if st.starts is None else dev.upload(st.starts)
        ka = None if st.k_active is None else dev.upload(st.k_active)
        va = None if st.v_active is None else dev.upload(st.v_active)
        args = (
            dev.upload(st.q), ka, va, dev.fold(self.k[layer]), dev.fold(self.v[layer]), mask, None,
            dev.upload(st.positions), starts, sk, dev.upload(st.table), self._config(st), False,
        )  # fmt: skip
        if key not in self._seen:
            self._seen.add(key)
            self.compilations += 1
        res = dev.launch(self.lnc, args)
        dev.barrier()
        self.graphs.add(("decode", *key))
        if st.return_lse:  # results: out, lse (no k_out: RoPE is not fused in the store's launches)
            return dev.download(res[0]), dev.download(res[1])
        return (dev.download(res[0]),)

    def warm_up(self, variants: set[LayerVariant], num_q_heads: int, s_active: int = 1) -> WarmUp:
        """Run every shape serving can need once: each write bucket, each copy/read block count (all
        on the scratch block), and a launch per (launch kind, batch, context, s_active) over block 0
        (`launch_kinds`: the variants' decodes, and their partial launches when supported)."""
        t0 = time.perf_counter()
        before, launches = self.compilations, 0
        g, bk = self.geometry, self.buckets
        dt, io = np.dtype(g.dtype), np.dtype(g.io_dtype or g.dtype)
        for n in self.write_sizes:
            slots = np.full(n, self.scratch, np.int32)
            kv = np.zeros((g.num_kv_heads, n, g.head_dim), dt)
            self.write(0, slots, np.arange(n) % g.block_len, kv, kv)
        for n in self.block_counts:
            ids = np.full(n, self.scratch, np.int32)
            self.copy_blocks(ids, ids)
            self.read_blocks(0, ids)
        for window, has_sinks, kind in launch_kinds(variants, self.supports_partial):
            sinks = np.zeros(num_q_heads, np.float32) if has_sinks else None
            for B in bk.batches:
                for S in bk.s_actives:
                    q = np.zeros((B, num_q_heads, S, g.head_dim), io)
                    kv = np.zeros((B, g.num_kv_heads, S, g.head_dim), dt)  # new k/v come stored (fp8 stays fp8)
                    for ctx in bk.contexts:
                        tables = np.zeros((B, ctx // g.block_len), np.int32)
                        lens = np.full(B, ctx, np.int32)
                        w = ctx if window else None
                        if kind == "attend":  # queries right past the ctx cached keys
                            starts = lens.astype(np.int64)
                            self.decode(0, q, None, None, tables, lens, scale=1.0, window=w, q_start=starts)
                        else:
                            lse = kind == "lse"
                            self.decode(0, q, kv, kv, tables, lens, scale=1.0, window=w, sinks=sinks, return_lse=lse)
                        launches += 1
        self.sync()
        return WarmUp(launches, self.compilations - before, time.perf_counter() - t0)


def launch_kinds(variants: set[LayerVariant], partial: bool) -> list[tuple[bool, bool, str]]:
    """(window, sinks, kind) of every launch family serving can need, each once: every layer
    variant's plain "decode"; with partial launches also its "lse" decode (return_lse) and its
    "attend" launch (attend-only, lse or not: one kind, `nki_host.partial_kind`), which never has
    sinks (the sink counts in the appending segment only). Each family is warmed up over every
    (batch, s_active, context) bucket."""
    kinds: dict[tuple[bool, bool, str], None] = {}
    for v in sorted(variants, key=lambda x: (x.window, x.sinks)):
        kinds[(v.window, v.sinks, "decode")] = None
        if partial:
            kinds[(v.window, v.sinks, "lse")] = None
            kinds[(v.window, False, "attend")] = None
    return list(kinds)


def make_store(
    geometry: KVGeometry,
    device: Device,
    *,
    max_context: int,
    max_batch: int,
    max_s_active: int = 1,
    context_buckets: Sequence[int] | None = None,
    batch_buckets: Sequence[int] | None = None,
    lnc: int = 1,
    partial: bool = True,
) -> DeviceKVStore:
    """A `DeviceKVStore` on `device` with default buckets for the limits (or the given ones);
    `partial`: serve (and warm up) lse and attend-only launches when the device's kernel can."""
    buckets = Buckets.default(
        max_context, max_batch, max_s_active, block_len=geometry.block_len, lnc=lnc,
        contexts=context_buckets, batches=batch_buckets,
    )  # fmt: skip
    return DeviceKVStore(geometry, device, buckets, lnc=lnc, partial=partial)
