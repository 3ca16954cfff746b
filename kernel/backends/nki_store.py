"""`DeviceKVStore`: the KV store of the NKI backends (`nki-emu`, `nki`), pools resident on the device.

Shared by both NKI backends; they differ only in the `Device` they pass (the emulator's HBM, or a
NeuronCore through torch-neuronx). Per layer the K and V pools `[Hkv, NB, BL, d]` are allocated
once on the device; `write` uploads only the new tokens and their slots, `copy_blocks` the block
ids, `read_blocks` downloads only the blocks asked for. A decode step uploads q, the new k/v, the
folded block table and the positions (and window starts), launches the kernel over the resident
pools (viewed as `[Hkv*NB, BL, d]`, no copy) and downloads the output. Masks and sinks are
constants per shape / layer, uploaded once.

Shapes are bucketed (`Buckets`): the batch to a batch bucket (padding rows masked), the new tokens
per sequence to an s_active bucket (padding queries dropped), the longest sequence to a context
bucket. `warm_up` launches every (variant, batch, context, s_active) combination at start, so a
kernel specialisation is never built while serving; `decode` refuses a step outside the buckets
(`StepOutOfBuckets`) instead of compiling it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tkg.kernel import decisions
from tkg.kernel.backends import nki_host
from tkg.kernel.kv_store import KVGeometry, KVStore, LayerVariant, StepOutOfBuckets, WarmUp


@dataclass(frozen=True)
class Buckets:
    """Compiled step shapes: context (`curr_sprior`) buckets, batch buckets, s_active buckets.

    Contexts are multiples of `align` = lcm(block_len, 128 * lnc) (the NKI kernel's key tiling);
    a step is rounded up to the smallest bucket of each kind that covers it.
    """

    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    s_actives: tuple[int, ...]
    align: int = 128

    def __post_init__(self) -> None:
        for name in ("contexts", "batches", "s_actives"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"Buckets: {name}: {values}; expected positive sizes")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        bad = [c for c in self.contexts if c % self.align]
        if bad:
            raise ValueError(f"Buckets: contexts: {bad[0]} must be a positive multiple of {self.align}")

    @staticmethod
    def alignment(block_len: int, lnc: int = 1) -> int:
        return int(np.lcm(block_len, 128 * lnc))

    @classmethod
    def default(
        cls, max_context: int, max_batch: int, max_s_active: int, *, block_len: int, lnc: int = 1,
        contexts: Sequence[int] | None = None, batches: Sequence[int] | None = None,
    ) -> Buckets:  # fmt: skip
        """Powers of two (contexts from 256, aligned) up to the limits, each limit itself the last
        bucket; `contexts`/`batches` replace the defaults (contexts rounded up to the alignment)."""
        align = cls.alignment(block_len, lnc)
        if contexts is None:
            ctx, c = [], max(256, align)
            while c < max_context:
                ctx.append(decisions.round_up(c, align))
                c *= 2
            ctx.append(decisions.round_up(max_context, align))
        else:
            ctx = [decisions.round_up(int(c), align) for c in contexts]
        return cls(tuple(ctx), tuple(batches or _powers(max_batch)), tuple(_powers(max_s_active)), align)

    def _pick(self, kind: str, values: tuple[int, ...], n: int, what: str) -> int:
        for v in values:
            if v >= n:
                return v
        raise StepOutOfBuckets(
            f"{what}: {n} exceeds the largest compiled {kind} bucket {values[-1]}; expected at most {values[-1]}"
        )

    def context_for(self, tokens: int) -> int:
        return self._pick("context", self.contexts, tokens, "context")

    def batch_for(self, batch: int) -> int:
        return self._pick("batch", self.batches, batch, "batch")

    def s_active_for(self, s: int) -> int:
        return self._pick("s_active", self.s_actives, s, "s_active")

    def count(self) -> int:
        return len(self.contexts) * len(self.batches) * len(self.s_actives)


def _powers(limit: int) -> list[int]:
    out, v = [], 1
    while v < limit:
        out.append(v)
        v *= 2
    out.append(limit)
    return out


class Device(Protocol):
    """Where the pools live: allocation, counted transfers, device-side index ops, kernel launch.

    Arrays are the device's own handles; `upload`/`download` are the only host <-> device copies
    and the device counts their bytes (`h2d`, `d2h`).
    """

    name: str
    h2d: int
    d2h: int

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...
    def upload(self, a: np.ndarray) -> Any: ...
    def download(self, x: Any) -> np.ndarray: ...
    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None: ...
    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None: ...
    def gather_blocks(self, pool: Any, ids: Any) -> Any: ...
    def fold(self, pool: Any) -> Any: ...
    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[np.ndarray, ...]: ...
    def kernel_config(self, cfg: Any) -> Any: ...


class HbmDevice:
    """A device whose arrays are the emulator's `HbmArray`s (NumPy memory standing for HBM).

    `launcher(lnc, args)` runs the kernel on them: the emulator (backend `nki-emu`) or the Neuron
    simulator (backend `nki` without a device). Counts its own uploads and downloads; the kernel's
    outputs count as downloads.
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

    def download(self, x: Any) -> np.ndarray:
        self._count(d2h=x.nbytes)
        return self._hbm.to_host(x)

    def scatter(self, pool: Any, blocks: Any, offsets: Any, values: Any) -> None:
        pool.data[:, blocks.data, offsets.data] = values.data

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> None:
        pool.data[:, dst.data] = pool.data[:, src.data]

    def gather_blocks(self, pool: Any, ids: Any) -> Any:
        return self._hbm.HbmArray(np.ascontiguousarray(pool.data[:, ids.data]))

    def fold(self, pool: Any) -> Any:
        Hkv, NB, BL, d = pool.shape
        return pool.reshape(Hkv * NB, BL, d)

    def launch(self, lnc: int, args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
        res = self._launcher(lnc, args)
        res = res if isinstance(res, tuple) else (res,)
        out = tuple(np.asarray(r) for r in res)
        self._count(d2h=sum(r.nbytes for r in out))
        return out

    def kernel_config(self, cfg: Any) -> Any:
        return nki_host.kernel_config(cfg, self._config_cls())


class DeviceKVStore(KVStore):
    """Pools on `device`; see the module docstring. `lnc`: NeuronCores per launch (1 or 2)."""

    def __init__(self, geometry: KVGeometry, device: Device, buckets: Buckets, *, lnc: int = 1) -> None:
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
        shape, dt = geometry.pool_shape, np.dtype(geometry.dtype)
        self.k = [device.zeros(shape, dt) for _ in range(geometry.num_layers)]
        self.v = [device.zeros(shape, dt) for _ in range(geometry.num_layers)]
        self._fk = [device.fold(p) for p in self.k]  # [Hkv*NB, BL, d] views of the same memory
        self._fv = [device.fold(p) for p in self.v]
        self._consts: dict[tuple[Any, ...], Any] = {}  # masks per shape, sinks per value: uploaded once
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._seen: set[tuple[Any, ...]] = set()  # launch shapes so far: one specialisation each
        self._lock = threading.Lock()

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

    def transfer_bytes(self) -> dict[str, int]:
        return {"h2d": self.device.h2d, "d2h": self.device.d2h}

    # ---- storage --------------------------------------------------------------------------------

    def _ids(self, a: np.ndarray) -> Any:
        return self.device.upload(np.ascontiguousarray(a, dtype=np.int32))

    def write(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        dt = np.dtype(self.geometry.dtype)
        b, o = self._ids(blocks), self._ids(offsets)
        self.device.scatter(self.k[layer], b, o, self.device.upload(np.asarray(k, dtype=dt)))
        self.device.scatter(self.v[layer], b, o, self.device.upload(np.asarray(v, dtype=dt)))

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        if not len(src):
            return
        s, d = self._ids(src), self._ids(dst)
        for pools in (self.k, self.v):
            for pool in pools:
                self.device.copy_blocks(pool, s, d)

    def read_blocks(self, layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._check_layer(layer)
        ids = self._ids(blocks)
        dev = self.device
        return dev.download(dev.gather_blocks(self.k[layer], ids)), dev.download(dev.gather_blocks(self.v[layer], ids))

    # ---- decode ---------------------------------------------------------------------------------

    def _const(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> Any:
        with self._lock:
            x = self._consts.get(key)
        if x is None:
            x = self.device.upload(make())
            with self._lock:
                self._consts[key] = x
        return x

    def _config(self, cfg: Any) -> Any:
        key = (cfg.bs, cfg.q_head, cfg.s_active, cfg.curr_sprior, cfg.d_head, cfg.block_len)
        kcfg = self._configs.get(key)
        if kcfg is None:
            kcfg = self._configs[key] = self.device.kernel_config(cfg)
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
    ) -> np.ndarray:
        """(k_scale, v_scale: the pools hold value / scale: the logits' scale takes k_scale, the
        output v_scale. `trusted` changes nothing here: the device step checks only its buckets.)"""
        if k_new is None or v_new is None:
            raise ValueError("DeviceKVStore.decode: k_new, v_new: expected [B, Hkv, S, d] arrays, got None")
        B, S = q.shape[0], q.shape[2]
        lens = np.asarray(seq_lens, dtype=np.int64)
        self.check_step(S, int(lens.max()))
        out = np.empty_like(q)
        step = self.buckets.batches[-1]
        for b0 in range(0, B, step):  # more sequences than the largest batch bucket: several launches
            sl = slice(b0, min(B, b0 + step))
            self._decode_chunk(
                layer, q[sl], k_new[sl], v_new[sl], block_tables[sl], lens[sl], out[sl], scale * k_scale, window, sinks
            )
        if v_scale != 1.0:
            out[...] = np.asarray(out, np.float32) * np.float32(v_scale)
        return out

    def _decode_chunk(
        self, layer: int, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, tables: np.ndarray,
        lens: np.ndarray, out: np.ndarray, scale: float, window: int | None, sinks: np.ndarray | None,
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
        dev = self.device
        for heads in groups:
            st = nki_host.fold_inputs(
                q, k_new, v_new, tables, lens, scale=scale, window=window, heads=heads, num_blocks=g.num_blocks,
                block_len=g.block_len, context=ctx, batch=Bb, s_active=Sb,
            )  # fmt: skip
            rows = st.cfg.bs
            mask = self._const(("mask", Sb, rows, G), lambda m=st.mask: m)
            sink = None
            if sinks is not None:
                sg = np.asarray(sinks, dtype=np.float32).reshape(Hkv, G)[heads[0]].reshape(G, 1)
                sink = self._const(("sink", sg.tobytes()), lambda s=sg: s)
            starts = None if st.starts is None else dev.upload(st.starts)
            args = (
                dev.upload(st.q), dev.upload(st.k_active), dev.upload(st.v_active), self._fk[layer], self._fv[layer],
                mask, None, dev.upload(st.positions), starts, sink, dev.upload(st.table), self._config(st.cfg), False,
            )  # fmt: skip
            self._count_specialisation((Bb, ctx, Sb, rows, window is not None, sinks is not None))
            res = dev.launch(self.lnc, args)[0]
            st.unfold(res, out)

    def _count_specialisation(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                self.compilations += 1

    def warm_up(self, variants: set[LayerVariant], num_q_heads: int, s_active: int = 1) -> WarmUp:
        """Launch every (variant, batch, context, s_active) bucket once over zero pools' block 0."""
        t0 = time.perf_counter()
        before, launches = self.compilations, 0
        g, bk = self.geometry, self.buckets
        io = np.dtype(g.io_dtype or g.dtype)
        for variant in sorted(variants, key=lambda x: (x.window, x.sinks)):
            sinks = np.zeros(num_q_heads, np.float32) if variant.sinks else None
            for B in bk.batches:
                for S in bk.s_actives:
                    q = np.zeros((B, num_q_heads, S, g.head_dim), io)
                    kv = np.zeros((B, g.num_kv_heads, S, g.head_dim), io)
                    for ctx in bk.contexts:
                        tables = np.zeros((B, ctx // g.block_len), np.int32)
                        lens = np.full(B, ctx, np.int32)
                        self.decode(
                            0, q, kv, kv, tables, lens, scale=1.0, window=ctx if variant.window else None, sinks=sinks
                        )
                        launches += 1
        return WarmUp(launches, self.compilations - before, time.perf_counter() - t0)


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
) -> DeviceKVStore:
    """A `DeviceKVStore` on `device` with default buckets for the limits (or the given ones)."""
    buckets = Buckets.default(
        max_context, max_batch, max_s_active, block_len=geometry.block_len, lnc=lnc,
        contexts=context_buckets, batches=batch_buckets,
    )  # fmt: skip
    return DeviceKVStore(geometry, device, buckets, lnc=lnc)
