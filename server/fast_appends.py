"""The fast paths of the KV cache's two-phase append (`tkg.server.appends`), for the common decode
step: no block shared anywhere and every sequence live. They give the same plans, tables, lengths,
counts, free-stack order and writes as the general path (tests/test_kv_cache.py runs the three in
lockstep), with far fewer calls: one native pass each for prepare and commit
(`tkg.kernel.backends.host_ops.native_append_prepare` / `native_append_commit`, any batch size), or
without the native module, for batches up to `small_batch`, scalar Python over numpy scalars
(`_prepare_small`, `_commit_small`). Each returns None / False, with nothing changed, for anything
else, and the general path then decides (and raises).

Threading: the event loop thread only, like the rest of the cache (see `tkg.server.kv_cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tkg.kernel.backends.host_ops import host_ops_available, native_append_commit, native_append_prepare
from tkg.kernel.kv_store import KVStore
from tkg.server.append_plan import AppendPlan, Writer
from tkg.server.block_pool import BlockPool
from tkg.server.sequences import SequenceTable


class FastAppends:
    """The fast paths (a base class of `tkg.server.appends.AppendOps`, hence of `KVCache`).

    Relies on the cache's attributes: `seqs`, `pool`, `store`, `block_len`, `num_layers`,
    `max_context`, `small_batch` (0: no fast path at all, for tests), `tokens_appended`, `_clock`,
    `_meter`. `native_appends` False: the scalar path even where the module is built (tests).
    """

    seqs: SequenceTable
    pool: BlockPool
    store: KVStore
    block_len: int
    num_layers: int
    max_context: int
    small_batch: int
    tokens_appended: int
    _clock: Callable[[], float]
    _meter: Callable[[str, int], None]
    native_appends: bool = host_ops_available()

    def _prepare_small(
        self, layer: int, seq_ids: Sequence[str], positions: Sequence[int] | np.ndarray, num_tokens: int
    ) -> AppendPlan | None:
        """`prepare_append` of the common step in scalar Python: at most SMALL_BATCH distinct live
        sequences at their lengths, none in flight at `layer`, within max_context, room in the
        pool, and no shared block anywhere (so nothing needs a copy-on-write reservation). None,
        with nothing changed, for anything else: the general path then decides (and raises)."""
        B = len(seq_ids)
        if not B or not self.small_batch or self.pool.shared_count or num_tokens < 1:
            return None
        if not 0 <= layer < self.num_layers:
            return None
        if self.native_appends:
            return self._prepare_native(layer, seq_ids, positions, num_tokens)
        if len(seq_ids) > self.small_batch:
            return None
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (B,):
            return None
        seqs, BL, limit = self.seqs, self.block_len, self.max_context - num_tokens
        slot_of, lengths, pending, num_blocks = seqs._slot_of, seqs.lengths, seqs.pending, seqs.num_blocks
        base = seqs.base
        slots: list[int] = []
        rel: list[int] = []  # lengths before the append (positions are absolute: base + length)
        fresh = 0
        for seq_id, p in zip(seq_ids, pos.tolist(), strict=True):
            slot = slot_of.get(seq_id)
            if slot is None or p > limit:
                return None
            r = p - int(base[slot])
            if lengths[slot, layer] != r or pending[slot, layer]:
                return None
            fresh += max(0, -(-(r + num_tokens) // BL) - int(num_blocks[slot]))
            slots.append(slot)
            rel.append(r)
        if len(set(slots)) < B or fresh > self.pool.free_count:
            return None
        reserved = self.pool.allocate(fresh)
        if fresh:
            self._meter(seq_ids[0], fresh)
        now = self._clock()
        for slot in slots:
            pending[slot, layer] = True
            seqs.last_used[slot] = now
        slot_ids = np.array(slots, dtype=np.int64)
        pos = np.array(rel, dtype=np.int64)
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=pos, num_tokens=num_tokens,
            seq_lens=(pos + num_tokens).astype(np.int32), _slots=slot_ids, _generations=seqs.generation[slot_ids],
            _reserved=reserved,
        )  # fmt: skip

    def _prepare_native(
        self, layer: int, seq_ids: Sequence[str], positions: Sequence[int] | np.ndarray, num_tokens: int
    ) -> AppendPlan | None:
        """`_prepare_small`'s checks and changes in one native pass, for any batch size (the caller
        checked the layer, the token count and that no block is shared). None, nothing changed,
        for anything else."""
        B, seqs = len(seq_ids), self.seqs
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        if pos.shape != (B,) or len(set(seq_ids)) < B:
            return None
        try:
            slots = np.fromiter(map(seqs._slot_of.__getitem__, seq_ids), dtype=np.int64, count=B)
        except KeyError:
            return None
        got = native_append_prepare(
            slots, pos, seqs.base, seqs.lengths, seqs.pending, seqs.num_blocks, seqs.last_used, seqs.generation,
            layer, num_tokens, self.max_context, self.block_len, self.pool.free_count, self._clock(),
        )  # fmt: skip
        if got is None:
            return None
        fresh, rel, ends, gens = got
        if fresh:  # within free_count: checked by the pass
            reserved = self.pool.allocate(fresh)
            self._meter(seq_ids[0], fresh)
        else:  # most steps: no numpy calls on empty arrays
            reserved = np.zeros(0, np.int32)
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=rel, num_tokens=num_tokens, seq_lens=ends, _slots=slots,
            _generations=gens, _reserved=reserved,
        )  # fmt: skip

    def _commit_small(
        self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, hold: bool, defer: bool, writer: Writer | None
    ) -> None:
        """`commit` in scalar Python for a small batch whose sequences are all live while no block
        is shared (so no write needs a copy first): the same tables, lengths, counts and writes."""
        seqs, BL, layer, S = self.seqs, self.block_len, plan.layer, plan.num_tokens
        tables, num_blocks, lengths, pending = seqs.tables, seqs.num_blocks, seqs.lengths, seqs.pending
        reserved, used, grown = plan._reserved, 0, 0
        slots, ends = plan._slots.tolist(), plan.seq_lens.tolist()
        blk: list[int] = []
        off: list[int] = []
        for slot, end in zip(slots, ends, strict=True):
            need, held = -(-end // BL), int(num_blocks[slot])
            if need > held:  # new blocks at the table's end (none when another layer grew it first)
                tables[slot, held:need] = reserved[used : used + need - held]
                used += need - held
                num_blocks[slot] = need
            row = lengths[slot]
            grown += max(0, end - max(row.tolist()))
            row[layer] = end
            if not hold:
                pending[slot, layer] = False
            for t in range(end - S, end):
                blk.append(int(tables[slot, t // BL]))
                off.append(t % BL)
        B = len(slots)
        tables_out = tables[plan._slots, : max(1, -(-max(ends) // BL))]
        blocks, offsets = np.array(blk, dtype=np.int64).reshape(B, S), np.array(off, dtype=np.int64).reshape(B, S)
        held_ids = None
        if hold:
            # No block is shared: the rows' used entries are distinct ids (no np.unique needed).
            counts = -(-plan.seq_lens.astype(np.int64) // BL)
            if B == 1:
                held_ids = tables_out[0, : counts[0]].copy()
            else:
                held_ids = tables_out[np.arange(tables_out.shape[1])[None, :] < counts[:, None]]
        self._committed(plan, k_new, v_new, defer, writer, blocks, offsets, tables_out, held_ids, used, grown)

    def _committed(
        self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, defer: bool, writer: Writer | None,
        blocks: np.ndarray, offsets: np.ndarray, tables: np.ndarray, held: np.ndarray | None, used: int, grown: int,
    ) -> None:  # fmt: skip
        """What both fast commits do once the rows changed: the reserved blocks not `used` go back,
        `grown` tokens are counted, the new k/v are written (or deferred, or left to `writer`) at
        (blocks, offsets) `[B, S]`, and the plan gets its `tables` and, held, its `held` blocks."""
        reserved, layer = plan._reserved, plan.layer
        if used < reserved.size:
            self.pool.free(reserved[used:])
            self._meter(plan.owner, used - int(reserved.size))
        self.tokens_appended += grown
        if defer:
            plan._deferred = (layer, blocks, offsets, None)
        elif writer is None:
            self.store.write(layer, blocks, offsets, k_new.transpose(1, 0, 2, 3), v_new.transpose(1, 0, 2, 3))
        plan._block_tables = tables
        if held is not None:  # no block is shared: the rows' used entries are distinct ids
            plan._held = held
            self.pool.incref(held)
            plan._state = "held"
        else:
            plan._state = "committed"
        if writer is not None:  # last, as in `commit`
            writer(layer, blocks, offsets, None)

    def _commit_native(
        self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, hold: bool, defer: bool, writer: Writer | None
    ) -> bool:
        """`_commit_small` with the rows' changes in one native pass, for any batch size (no block
        shared: the caller checked). False, nothing changed, when a sequence was released since
        prepare (the general path then commits)."""
        seqs, layer, S = self.seqs, plan.layer, plan.num_tokens
        got = native_append_commit(
            plan._slots, plan._generations, plan.seq_lens, seqs.tables, seqs.num_blocks, seqs.lengths, seqs.pending,
            seqs.generation, plan._reserved, layer, S, self.block_len, hold,
        )  # fmt: skip
        if got is None:
            return False
        blocks, offsets, tables, held, used, grown = got
        self._committed(plan, k_new, v_new, defer, writer, blocks, offsets, tables, held, used, grown)
        return True
