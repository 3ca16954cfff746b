"""`tkg bench kernel --backend nki-emu`: what our NKI kernel does at the reference shapes.

Wall time on the emulator says nothing about Trainium, so this reports what the emulator counts
while executing the kernel's own source: HBM bytes read and written, instructions per engine and
DMA transfers, per NeuronCore, then the emulator's on-paper trn2 latency ESTIMATE next to the
HBM-bandwidth floor for the compulsory K/V bytes of the same step (docs/performance.md). The
kernel runs through `paged_decode` (the service's path: one launch, (sequence, kv head) rows
folded into the batch, block KV, positions-generated mask).

    python -m tkg.bench.nki [--json FILE] [--lnc 1 2] [--context 4096] [--s-active 1 4] [--block-len 16 128]
                                   [--nkilib PATH]

With `--nkilib PATH` (a folder holding nki-library's `nkilib` package) it runs our kernel and the
library's side by side instead (`tkg.bench.nki_peer`); `--json FILE` then writes
{"rows": [{"case", "ours_us", "nkilib_us", "floor_us", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tkg.dtypes import BF16
from tkg.kernel.paged import paged_decode


@dataclass(frozen=True)
class Step:
    """One decode step of the reference geometry (docs/performance.md)."""

    batch: int = 8
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    context: int = 4096
    s_active: int = 1
    block_len: int = 16
    ragged: bool = False

    def compulsory_bytes(self, itemsize: int = 2) -> int:
        """K and V bytes the step must read: every cached token of every kv head, once."""
        lens = self.lengths()
        return int(2 * self.kv_heads * int(lens.sum()) * self.head_dim * itemsize)

    def lengths(self) -> np.ndarray:
        if not self.ragged:
            return np.full(self.batch, self.context, dtype=np.int64)
        # Ragged: evenly spread between a quarter and all of the context.
        return np.linspace(self.context // 4, self.context, self.batch).astype(np.int64)


def _inputs(step: Step, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, S, d, BL = step.batch, step.q_heads, step.kv_heads, step.s_active, step.head_dim, step.block_len
    lens = step.lengths()
    per_seq = -(-int(lens.max()) // BL)
    nb = B * per_seq + 8
    return {
        "q": rng.standard_normal((B, Hq, S, d)).astype(BF16),
        "k_cache": rng.standard_normal((Hkv, nb, BL, d)).astype(BF16),
        "v_cache": rng.standard_normal((Hkv, nb, BL, d)).astype(BF16),
        "block_tables": rng.permutation(nb)[: B * per_seq].reshape(B, per_seq).astype(np.int32),
        "seq_lens": lens,
    }


def _emulator_stats(floor_bytes: int) -> tuple[Any, Any, str]:
    """(counters, estimate, text) of the emulator's last launch; the estimate's floor is the
    compulsory K/V bytes of the step (not what the kernel happened to read)."""
    from tkg.kernel import nki_emu

    stats = nki_emu.last_run_stats()
    if stats is None:
        return None, None, "    (the emulator recorded no launch)"
    est = nki_emu.estimate(stats, target="trn2", floor_bytes=floor_bytes)
    body = nki_emu.format_stats(stats) + "\n" + nki_emu.format_estimate(est)
    text = "\n".join("    " + ln for ln in body.split("\n"))
    return stats, est, text


def _plain(x: Any) -> Any:
    """JSON-friendly copy of the emulator's stats objects (dataclasses, dicts, numbers)."""
    if hasattr(x, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)


def emulator_report(steps: list[Step], lncs: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Run each step through the emulated kernel for each lnc; one row of counters per run."""
    rows = []
    for step in steps:
        args = _inputs(step)
        for lnc in lncs:
            paged_decode(**args, scale=step.head_dim**-0.5, backend="nki-emu", lnc=lnc)
            stats, est, text = _emulator_stats(step.compulsory_bytes())
            rows.append({
                "step": asdict(step), "lnc": lnc, "compulsory_kv_bytes": step.compulsory_bytes(),
                "counters": _plain(stats), "estimate": _plain(est), "text": text,
            })  # fmt: skip
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    lines = ["NKI kernel on the emulator (counts of the kernel's own instructions; latency is an ESTIMATE)"]
    for r in rows:
        s = r["step"]
        head = (
            f"B={s['batch']} Hq={s['q_heads']} Hkv={s['kv_heads']} d={s['head_dim']} ctx={s['context']} "
            f"S={s['s_active']} BL={s['block_len']}{' ragged' if s['ragged'] else ''} lnc={r['lnc']}: "
            f"compulsory K+V {r['compulsory_kv_bytes'] / 2**20:.1f} MiB"
        )
        lines.append(head)
        lines.append(r["text"])
    return "\n".join(lines)


def default_steps(context: int = 4096, s_active: tuple[int, ...] = (1, 4), block_len: tuple[int, ...] = (16, 128),
                  ragged: bool = True) -> list[Step]:  # fmt: skip
    steps = [Step(context=context, s_active=s, block_len=bl) for s in s_active for bl in block_len]
    if ragged:
        steps.append(Step(context=context, s_active=s_active[0], block_len=block_len[0], ragged=True))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tkg bench kernel --backend nki-emu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, metavar="FILE", help="JSON rows to FILE ('-' = stdout)")
    ap.add_argument(
        "--nkilib",
        metavar="PATH",
        default=None,
        help="folder holding nki-library's nkilib package: run our kernel and the library's side by side",
    )
    ap.add_argument("--lnc", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--s-active", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--block-len", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged-lengths step")
    a = ap.parse_args(argv)
    from tkg.kernel.backends import unavailable_reason

    reason = unavailable_reason("nki-emu")
    if reason is not None:
        print(f"nki-emu: unavailable: {reason}", file=sys.stderr)
        return 1
    if a.nkilib is not None:
        return _peer_main(a)
    steps = default_steps(a.context, tuple(a.s_active), tuple(a.block_len), not a.no_ragged)
    rows = emulator_report(steps, tuple(a.lnc))
    if a.json:
        _emit_json([{k: v for k, v in r.items() if k != "text"} for r in rows], a.json)
    else:
        print(format_report(rows))
    return 0


def _emit_json(doc: Any, dest: str) -> None:
    text = json.dumps(doc, indent=1)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def _peer_main(a: argparse.Namespace) -> int:
    import os

    from tkg.bench import nki_peer
    from tkg.kernel.backends import nkilib_emu

    try:
        nkilib_emu.peer(os.path.abspath(a.nkilib))
    except ImportError as exc:
        print(f"--nkilib {a.nkilib}: {exc}", file=sys.stderr)
        return 2
    cases = nki_peer.default_cases(a.context, tuple(a.s_active), tuple(a.lnc), a.block_len[0])
    rows = nki_peer.side_by_side(cases, os.path.abspath(a.nkilib))
    print(nki_peer.format_rows(rows))
    if a.json:
        _emit_json({"rows": rows}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
