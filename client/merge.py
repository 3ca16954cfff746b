"""The exact merge of partial attention results (context parallelism over replicas).

A sequence split by token ranges into segments is attended segment by segment; each segment i
answers its output `o_i` `[..., d]` and the log-sum-exp `l_i` `[...]` of the logits its keys gave
(the natural log of the softmax denominator over them). Attention over all keys is then
`l = log(sum_i exp(l_i))`, `o = sum_i exp(l_i - l) * o_i` (the log-sum-exp rule FlashInfer's
`merge_state` applies). A segment with `l_i = -inf` saw no key and contributes nothing; when every
segment has -inf the result is out 0, lse -inf. Computed in float32 after subtracting the largest
`l_i`, so nothing overflows. Pure numpy: no I/O, no torch (the client installs without it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_states(outs: Sequence[np.ndarray], lses: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-segment states into one.

    Args:
        outs: n >= 1 arrays of one shape `[..., d]` (any float dtype; computed in float32).
        lses: n arrays `[...]` (the outs' shape without d), natural-log sums; -inf = no key seen.

    Returns:
        (out `[..., d]` float32, lse `[...]` float32).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_states: expected as many lses as outs (>= 1), got {len(outs)} and {len(lses)}")
    o = np.stack([np.asarray(x, dtype=np.float32) for x in outs])  # [n, ..., d]
    lse = np.stack([np.asarray(x, dtype=np.float32) for x in lses])  # [n, ...]
    if o.shape[:-1] != lse.shape:
        raise ValueError(f"merge_states: lse shape {lse.shape[1:]} does not match out shape {o.shape[1:]} without d")
    top = lse.max(axis=0)  # [...]
    seen = np.isfinite(top)  # False: no segment saw a key (all -inf)
    safe_top = np.where(seen, top, np.float32(0))
    w = np.exp(lse - safe_top)  # -inf segments weigh exactly 0; the largest weighs 1
    total = w.sum(axis=0)  # >= 1 where seen
    safe_total = np.where(seen, total, np.float32(1))
    # 0 * o_i for a segment that saw nothing: its out is 0 by contract, but garbage must not leak.
    contrib = np.where((w > 0)[..., None], w[..., None] * o, np.float32(0))
    out = contrib.sum(axis=0) / safe_total[..., None]
    out = np.where(seen[..., None], out, np.float32(0)).astype(np.float32)
    merged = np.where(seen, safe_top + np.log(safe_total), np.float32(-np.inf)).astype(np.float32)
    return out, merged
