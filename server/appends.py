"""The two-phase, all-or-nothing append of `tkg.server.kv_cache.KVCache`: `AppendPlan` and its lifecycle.

`prepare_append` validates every sequence of a batch and reserves every block it may need (new
blocks and copy-on-write copies) or raises with nothing changed; `commit` then cannot fail for
lack of blocks: it applies table changes, writes `[B, Hkv, S, d]` into the slots with one
`store.write` and advances the layer's lengths; `abort` returns the reservation; `rollback` undoes
a committed plan at its layer; `finish` ends a hold (a kernel read the plan's blocks); `undo` is
whichever of abort/rollback the plan's state calls for. A plan's life:
prepared -> held (commit(hold=True)) -> committed (finish) -> [rolled_back]; prepared -> aborted.

The common step (no shared block, every sequence live) takes a fast path that gives the same
tables, lengths, counts and writes as the general path (`tkg.server.fast_appends`: one native
pass each for prepare and commit, or scalar Python for small batches without the module).

Threading: the event loop thread only, like the rest of the cache (see `tkg.server.kv_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tkg.server.append_plan import AppendPlan, Writer
from tkg.server.errors import FailedPrecondition, InvalidArgument, OutOfRange, pool_full
from tkg.server.fast_appends import FastAppends

# Batches of at most this many sequences take the scalar path of `prepare_append`, `commit` and
# `finish` when no block is shared (the common decode step): plain Python over numpy scalars
# beats the general path's ~25 numpy calls on tiny arrays (B=1: ~65 -> ~15 us per step).
SMALL_BATCH = 8


@dataclass(frozen=True)
class Fields:
    """How `prepare_append`'s errors name the caller's own fields (an RPC's, so it need not
    re-check the same conditions to name them): `ids` and `positions`, `[b]` appended when `indexed`."""

    ids: str = "sequence_ids"
    positions: str = "positions"
    indexed: bool = True

    def id(self, b: int) -> str:
        return f"{self.ids}[{b}]" if self.indexed else self.ids

    def position(self, b: int) -> str:
        return f"{self.positions}[{b}]" if self.indexed else self.positions


BATCH = Fields()  # Decode: sequence_ids[b], positions[b]
ONE_SEQUENCE = Fields("sequence_id", "position", indexed=False)  # AppendKV: one sequence per call


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ragged(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries `starts[i] .. starts[i] + counts[i] - 1` of every row i, flattened: (row, column)."""
    counts = np.maximum(counts, 0)
    rows = np.repeat(np.arange(counts.size), counts)
    within = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, starts[rows] + within


class AppendOps(FastAppends):
    """The two-phase append of `KVCache` (its base class: the methods below are the cache's own).

    Relies on the cache's attributes: `seqs` (`SequenceTable`), `pool` (`BlockPool`), `store`
    (`KVStore`), `block_len`, `num_layers`, `num_kv_heads`, `head_dim`, `max_context`,
    `small_batch`, `tokens_appended`, `_clock`, `_meter`, `_copy_blocks`; its fast paths are
    `FastAppends`'.
    """

    # Besides those `FastAppends` declares:
    num_kv_heads: int
    head_dim: int

    def _copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        raise NotImplementedError

    def prepare_append(
        self, layer: int, seq_ids: Sequence[str], positions: Sequence[int] | np.ndarray, num_tokens: int,
        fields: Fields = BATCH,
    ) -> AppendPlan:
        """Validate an append of `num_tokens` tokens to each sequence at `layer` and reserve blocks.

        `positions[b]` is absolute: it must equal sequence b's base position plus its current length
        at `layer` (`SequenceTable.base`; the plan keeps lengths, `positions - base`), and
        `max_context` bounds the absolute end. Raises (nothing changed):
        INVALID_ARGUMENT bad layer/num_tokens/batch or a sequence twice; NOT_FOUND unknown sequence;
        FAILED_PRECONDITION wrong position or an append already in flight at this layer;
        OUT_OF_RANGE past `max_context`; RESOURCE_EXHAUSTED not enough free blocks. Messages name
        `fields` (`ONE_SEQUENCE` for a single sequence's `sequence_id`/`position`).
        """
        plan = self._prepare_small(layer, seq_ids, positions, num_tokens)
        if plan is not None:
            return plan
        seqs = self.seqs
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if num_tokens < 1:
            raise InvalidArgument(f"num_tokens: expected >= 1, got {num_tokens}")
        B = len(seq_ids)
        if B < 1:
            raise InvalidArgument("sequence_ids: expected at least one sequence, got none")
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (B,):
            raise InvalidArgument(f"positions: expected {B} (one per sequence), got {pos.size}")
        if fields.indexed:
            slots = seqs.slots(fields.ids, seq_ids)
        else:
            slots = np.array([seqs.slot(fields.ids, sid) for sid in seq_ids], dtype=np.int64)
        if len(set(seq_ids)) != B:
            first: dict[str, int] = {}
            for b, sid in enumerate(seq_ids):
                if sid in first:
                    raise InvalidArgument(
                        f"{fields.id(b)}: {sid!r} already at {fields.id(first[sid])}; expected distinct ids"
                    )
                first[sid] = b
        base = seqs.base[slots]
        lens = seqs.lengths[slots, layer]
        if (pos != base + lens).any():
            b = int(np.flatnonzero(pos != base + lens)[0])
            what = f"end at layer {layer} (base position {int(base[b])} + length {int(lens[b])})"
            raise FailedPrecondition(
                f"{fields.position(b)}: {int(pos[b])} is not sequence {seq_ids[b]!r}'s "
                f"{what if base[b] else f'length at layer {layer}'}; expected {int(base[b] + lens[b])}"
            )
        if seqs.pending[slots, layer].any():
            b = int(np.flatnonzero(seqs.pending[slots, layer])[0])
            raise FailedPrecondition(
                f"{fields.id(b)}: sequence {seq_ids[b]!r} already has an append in flight at layer {layer}"
            )
        if (pos + num_tokens).max() > self.max_context:  # absolute: RoPE's table ends there
            b = int(np.flatnonzero(pos + num_tokens > self.max_context)[0])
            raise OutOfRange(
                f"{fields.position(b)}: {int(pos[b])} + {num_tokens} tokens exceeds max_context for sequence "
                f"{seq_ids[b]!r}; expected at most {self.max_context} tokens"
            )
        pos = pos - base  # from here on lengths: the sequence's own token counts
        ends = pos + num_tokens
        fresh, cow = self._blocks_for(slots, pos, num_tokens)
        if fresh + cow > self.pool.free_count:
            raise pool_full(fresh + cow, f" ({fresh} new, {cow} copy-on-write)")
        reserved = self.pool.allocate(fresh + cow)
        if reserved.size:
            self._meter(seq_ids[0], int(reserved.size))
        seqs.pending[slots, layer] = True
        seqs.touch(slots, self._clock())
        return AppendPlan(
            layer=layer, seq_ids=tuple(seq_ids), positions=pos, num_tokens=num_tokens,
            seq_lens=ends.astype(np.int32), _slots=slots, _generations=seqs.generation[slots],
            _reserved=reserved,
        )  # fmt: skip

    def _blocks_for(self, slots: np.ndarray, lens: np.ndarray, num_tokens: int) -> tuple[int, int]:
        """(new blocks, copy-on-write copies) appending `num_tokens` to sequences at `slots` of
        lengths `lens` (int64 `[B]`, this layer's) takes."""
        seqs, BL = self.seqs, self.block_len
        need, held = -(-(lens + num_tokens) // BL), seqs.num_blocks[slots]
        fresh = int(np.maximum(need - held, 0).sum())
        cow = 0
        if self.pool.shared_count:  # no fork alive: nothing can need a copy
            first_blk = lens // BL
            rows, cols = _ragged(first_blk, np.minimum(need, held) - first_blk)
            # An upper bound: a block shared by two writers of this batch may need only one copy.
            cow = int((self.pool.refcounts(seqs.tables[slots[rows], cols]) > 1).sum())
        return fresh, cow

    def blocks_needed(
        self, layer: int, seq_ids: Sequence[str], num_tokens: int, positions: Sequence[int] | np.ndarray
    ) -> int:
        """The blocks an append of `num_tokens` at `layer` to `seq_ids` at absolute `positions`
        would reserve now (KV tiers make that much room first). 0 when the append would be refused
        (an id not live, a position not at its end, bad arguments): it then fails before taking
        anything, and nothing moves for it. Changes nothing."""
        slot_of, seqs = self.seqs._slot_of, self.seqs
        found = [slot for s in seq_ids if (slot := slot_of.get(s)) is not None]
        if len(found) != len(seq_ids) or not 0 <= layer < self.num_layers or num_tokens < 1:
            return 0
        slots = np.array(found, dtype=np.int64)
        lens = seqs.lengths[slots, layer]
        if len(positions) != len(found) or (np.asarray(positions) != seqs.base[slots] + lens).any():
            return 0
        fresh, cow = self._blocks_for(slots, lens, num_tokens)
        return fresh + cow

    def commit(
        self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray, *, hold: bool = False, defer: bool = False,
        writer: Writer | None = None,
    ) -> None:
        """Write `k_new`, `v_new` `[B, num_kv_heads, S, head_dim]` into the plan's slots, advance
        the lengths at `plan.layer` and set `plan.block_tables`.

        A shape error raises INVALID_ARGUMENT and aborts the plan (nothing changed). Values are
        cast to the cache dtype. Sequences released since prepare are skipped.

        `hold=True` (a kernel will read `plan.block_tables`): the plan keeps a reference to every
        block in its tables and its sequences stay in flight at the layer until `finish(plan)` or
        `rollback(plan)` (see the module docstring). Without it the plan is finished at once.

        `defer=True` (with `hold`; a bulk write off the event loop): everything but the store write,
        which `write_deferred(plan, k, v)` does later, on any one thread, with the values (`k_new`
        and `v_new` give the shapes only). The plan is held meanwhile, so nothing reads, moves or
        frees its slots; `finish` after the write, `rollback` if it failed.

        `writer` (not with `defer`): writes instead of the store's `write`, called last (the plan is
        then committed or held, so a writer that raises leaves a plan the caller `undo`es) with
        (layer, blocks, offsets int `[B', S]`, live): the slots of the rows to write, `live` None when
        every row is written, else the bool `[B]` mask of the rows still live (`k_new`, `v_new` then
        give the shapes only). The step's fused RoPE + store pass (`tkg.server.rope.RopeTable.rotate_into`).
        """
        if defer and writer is not None:
            raise ValueError("KVCache.commit: defer=True and a writer exclude each other")
        if defer and not hold:
            raise ValueError("KVCache.commit: defer=True needs hold=True (the slots stay held until written)")
        self._check_open(plan, "commit")
        expect = (plan.batch_size, self.num_kv_heads, plan.num_tokens, self.head_dim)
        for name, t in (("k", k_new), ("v", v_new)):
            if t.shape != expect:
                self.abort(plan)
                raise InvalidArgument(
                    f"{name}: expected shape [B, num_kv_heads, S, head_dim] = {list(expect)}, got {list(t.shape)}"
                )
        if self.small_batch and not self.pool.shared_count:
            if self.native_appends:
                if self._commit_native(plan, k_new, v_new, hold, defer, writer):
                    return
            elif plan.batch_size <= self.small_batch:
                gen = self.seqs.generation
                if all(gen[s] == g for s, g in zip(plan._slots.tolist(), plan._generations.tolist(), strict=True)):
                    self._commit_small(plan, k_new, v_new, hold, defer, writer)
                    return
        seqs, BL, layer, S = self.seqs, self.block_len, plan.layer, plan.num_tokens
        slots, pos, ends = plan._slots, plan.positions, plan.seq_lens.astype(np.int64)
        live = seqs.generation[slots] == plan._generations
        all_live = bool(live.all())
        if not all_live:  # released since prepare: write nothing for them
            slots, pos, ends = slots[live], pos[live], ends[live]
            k_new, v_new = k_new[live], v_new[live]
        reserved, used = plan._reserved, 0
        need, held = -(-ends // BL), seqs.num_blocks[slots]
        # New blocks at the tables' ends (fewer than reserved when another layer grew them first).
        if (need > held).any():
            rows, cols = _ragged(held, need - held)
            used = rows.size
            seqs.tables[slots[rows], cols] = reserved[:used]
            seqs.num_blocks[slots] = np.maximum(need, held)
        if self.pool.shared_count:
            used = self._copy_on_write(slots, pos // BL, np.minimum(need, held), reserved, used)
        if used < reserved.size:
            self.pool.free(reserved[used:])
            self._meter(plan.owner, used - int(reserved.size))
        before = seqs.lengths[slots].max(axis=1)
        self.tokens_appended += int(np.maximum(ends - before, 0).sum())
        seqs.lengths[slots, layer] = ends
        if not hold:
            seqs.pending[slots, layer] = False
        width = max(1, _ceil_div(int(plan.seq_lens.max()), BL))
        tables = seqs.tables[plan._slots, :width]
        tok = pos[:, None] + np.arange(S)  # [B', S] positions written
        if all_live:
            blk = tables[np.arange(len(slots))[:, None], tok // BL]
        else:
            blk = tables[np.flatnonzero(live)[:, None], tok // BL]
            tables[~live] = 0
        off = tok % BL
        if defer:
            plan._deferred = (layer, blk, off, None if all_live else live)
        elif writer is None:  # [Hkv, B', S, d] values for the [B', S] slots: one store write, no token loop.
            self.store.write(layer, blk, off, k_new.transpose(1, 0, 2, 3), v_new.transpose(1, 0, 2, 3))
        plan._block_tables = tables
        if hold:
            # Every block the launch may read, once: [B, width] entries past a row's length are
            # block 0 padding (read-protected as well, harmlessly: it is a valid id).
            used = -(-plan.seq_lens.astype(np.int64) // BL)
            if all_live and int(used.min()) == width:  # every row uses its whole table: a rectangle,
                ids = tables.reshape(-1).copy()  # the ragged walk's ids in its order (a copy, not a view)
            else:
                rows, cols = _ragged(np.zeros_like(used), np.where(live, used, 0))
                ids = tables[rows, cols]
            # With no block shared, no id is named twice (each table names its own blocks once).
            plan._held = np.unique(ids).astype(np.int32) if self.pool.shared_count else ids
            self.pool.incref(plan._held)
            plan._state = "held"
        else:
            plan._state = "committed"
        if writer is not None:  # last: the plan is committed, so a writer that raises leaves it to `undo`
            writer(layer, blk, off, None if all_live else live)

    def write_deferred(self, plan: AppendPlan, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """The store write `commit(plan, ..., defer=True)` left: `k_new`, `v_new` `[B, num_kv_heads,
        S, head_dim]` (cast to the cache dtype) into the plan's slots. Touches only the store, at
        slots the held plan owns (no table, length or count): safe on the kernel worker thread
        while the loop goes on, as long as the loop neither finishes nor rolls back the plan
        before this returns (the service awaits it first)."""
        if plan._deferred is None or plan._state != "held":
            raise RuntimeError(f"KVCache.write_deferred: expected a held plan of commit(defer=True), got {plan._state}")
        layer, blk, off, live = plan._deferred
        if live is not None:
            k_new, v_new = k_new[live], v_new[live]
        self.store.write(layer, blk, off, k_new.transpose(1, 0, 2, 3), v_new.transpose(1, 0, 2, 3))

    def finish(self, plan: AppendPlan) -> None:
        """The launch reading a held plan's blocks is over: drop its block references and clear
        the in-flight mark of its (still live) sequences at the layer."""
        if plan._state != "held":
            raise RuntimeError(f"KVCache.finish: expected a held plan, got one {plan._state}")
        self._unhold(plan)
        plan._state = "committed"

    def _unhold(self, plan: AppendPlan) -> None:
        freed = self.pool.decref(plan._held)
        if freed:  # blocks its sequences dropped (truncate, release) while the launch read them
            self._meter(plan.owner, -freed)
        plan._held = plan._held[:0]
        seqs, layer = self.seqs, plan.layer
        if plan.batch_size <= self.small_batch:
            gen, pending = seqs.generation, seqs.pending
            for slot, g in zip(plan._slots.tolist(), plan._generations.tolist(), strict=True):
                if gen[slot] == g:
                    pending[slot, layer] = False
            return
        slots = plan._slots[seqs.generation[plan._slots] == plan._generations]
        seqs.pending[slots, layer] = False

    def abort(self, plan: AppendPlan) -> None:
        """Return the plan's reserved blocks; nothing is appended."""
        self._check_open(plan, "abort")
        self.pool.free(plan._reserved)
        if plan._reserved.size:
            self._meter(plan.owner, -int(plan._reserved.size))
        slots = plan._slots[self.seqs.generation[plan._slots] == plan._generations]
        self.seqs.pending[slots, plan.layer] = False
        plan._state = "aborted"

    def rollback(self, plan: AppendPlan) -> int:
        """Undo a committed or held `plan` at its layer: lengths back to `plan.positions`, blocks
        no layer needs any more returned to the pool, a hold dropped. Returns how many sequences
        were rolled back.

        Skipped: sequences released since, and sequences whose length at the layer moved on (a
        later append built on these tokens; impossible while the plan is held). Copy-on-write
        copies made by the commit stay (they hold the same data). A fork taken in between keeps
        its own copy of the tokens (impossible while held).
        """
        if plan._state not in ("committed", "held"):
            raise RuntimeError(f"KVCache.rollback: expected a committed plan, got one {plan._state}")
        if plan._state == "held":
            self._unhold(plan)
        seqs, layer = self.seqs, plan.layer
        slots, pos = plan._slots, plan.positions
        keep = (seqs.generation[slots] == plan._generations) & (seqs.lengths[slots, layer] == plan.seq_lens)
        slots, pos = slots[keep], pos[keep]
        if slots.size:
            before = seqs.lengths[slots].max(axis=1)
            seqs.lengths[slots, layer] = pos
            after = seqs.lengths[slots].max(axis=1)
            self.tokens_appended -= int((before - after).sum())
            need, held = -(-after // self.block_len), seqs.num_blocks[slots]
            rows, cols = _ragged(need, held - need)
            if rows.size:
                freed = self.pool.decref(seqs.tables[slots[rows], cols])
                if freed:
                    self._meter(plan.owner, -freed)
                seqs.tables[slots[rows], cols] = 0
                seqs.num_blocks[slots] = np.minimum(need, held)
        plan._state = "rolled_back"
        return int(slots.size)

    def undo(self, plan: AppendPlan) -> None:
        """Take back whatever `plan` did so far: abort a prepared plan, roll back a committed or
        held one; nothing for a plan already aborted or rolled back (a failed step's cleanup)."""
        if plan._state == "prepared":
            self.abort(plan)
        elif plan._state in ("held", "committed"):
            self.rollback(plan)

    def _copy_on_write(
        self, slots: np.ndarray, first: np.ndarray, upto: np.ndarray, reserved: np.ndarray, used: int
    ) -> int:
        """Give each sequence a private copy of every shared block it is about to write (blocks
        `first[i] .. upto[i]-1` of `slots[i]`), taking targets from `reserved[used:]`.

        Sequential on purpose: once one writer copied a block, a second writer in the same batch
        may be its last holder and write in place. Returns the new `used`.
        """
        tables = self.seqs.tables
        rows, cols = _ragged(first, upto - first)
        for slot, col in zip(slots[rows].tolist(), cols.tolist(), strict=True):
            old = tables[slot, col : col + 1].copy()
            if self.pool.refcount(int(old[0])) > 1:
                new = reserved[used : used + 1]
                used += 1
                self._copy_blocks(old, new)
                tables[slot, col] = new[0]
                self.pool.decref(old)
        return used

    @staticmethod
    def _check_open(plan: AppendPlan, what: str) -> None:
        if plan._state != "prepared":
            raise RuntimeError(f"KVCache.{what}: plan is already {plan._state}")
