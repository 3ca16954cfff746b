"""`Buckets`: the step shapes a device store compiles (`nki_store.DeviceKVStore`), and their defaults.

A device store builds one kernel specialisation per launch shape at start (`DeviceKVStore.warm_up`)
and refuses a step no bucket covers (`StepOutOfBuckets`) instead of compiling it while serving;
docs/trainium-store.md says why. Pure arithmetic, no device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tkg.kernel import decisions
from tkg.kernel.kv_store import StepOutOfBuckets


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
        return cls(tuple(ctx), tuple(batches or powers(max_batch)), tuple(powers(max_s_active)), align)

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


def powers(limit: int) -> list[int]:
    out, v = [], 1
    while v < limit:
        out.append(v)
        v *= 2
    out.append(limit)
    return out
