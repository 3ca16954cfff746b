"""Smoke test: the paged path through the reference backend equals a per-token loop."""

import numpy as np

from tkg.kernel import paged_decode


def test_paged_reference_matches_loop() -> None:
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, d, BL, NB = 3, 8, 2, 2, 64, 16, 40
    lens = np.array([5, 33, 17])
    q = rng.standard_normal((B, Hq, S, d)).astype(np.float32)
    kc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    vc = rng.standard_normal((Hkv, NB, BL, d)).astype(np.float32)
    bt = rng.permutation(NB)[: B * 4].reshape(B, 4).astype(np.int32)
    sinks = rng.standard_normal(Hq).astype(np.float32)
    G = Hq // Hkv
    for window in (None, 7):
        out = paged_decode(q, kc, vc, bt, lens, scale=d**-0.5, backend="reference", window=window, sinks=sinks)
        ref = np.zeros_like(q)
        for b in range(B):
            L = int(lens[b])
            for h in range(Hq):
                g = h // G
                keys = np.stack([kc[g, bt[b, j // BL], j % BL] for j in range(L)])
                vals = np.stack([vc[g, bt[b, j // BL], j % BL] for j in range(L)])
                for i in range(S):
                    t = L - S + i
                    vis = [j for j in range(L) if j <= t and (window is None or t - j < window)]
                    sc = np.array([keys[j] @ q[b, h, i] * d**-0.5 for j in vis] + [sinks[h]])
                    p = np.exp(sc - sc.max())
                    p /= p.sum()
                    ref[b, h, i] = p[:-1] @ vals[vis]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
