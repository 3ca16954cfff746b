"""`tkg bench kernel --backend nki-emu --nkilib PATH`: our NKI kernel and nki-library's, side by side.

Both kernels run on the emulator (backends `nki-emu` and `nkilib-emu`) on the same inputs: the
reference step of docs/performance.md folded into one launch ((sequence, kv head) rows, as the
service launches it), at S = 1 and 4, with the K/V prior in block layout (the paged pool, block
16) and flat (each row's keys contiguous), at lnc 1 and 2. Per case: DMA bytes, HBM bytes,
instructions per engine, the trn2 latency ESTIMATE of each (`nki_emu.estimate`, the cost model of
the README's "Cost model" table) and the HBM floor of the step's compulsory K/V bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from tkg.bench.nki import Step, _inputs
from tkg.kernel.backends.nki_host import FoldedStep, fold_inputs

ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")
KERNELS = {"ours": "nki-emu", "nkilib": "nkilib-emu"}


@dataclass(frozen=True)
class PeerCase:
    """One side-by-side case: the reference step at `s_active`, `layout` "block" or "flat", `lnc`."""

    step: Step
    layout: str
    lnc: int

    @property
    def name(self) -> str:
        s = self.step
        return (f"B{s.batch} Hq{s.q_heads} Hkv{s.kv_heads} d{s.head_dim} ctx{s.context} S{s.s_active} "
                f"{self.layout}{s.block_len if self.layout == 'block' else ''} lnc{self.lnc}")  # fmt: skip


def default_cases(context: int = 4096, s_active: tuple[int, ...] = (1, 4), lncs: tuple[int, ...] = (1, 2),
                  block_len: int = 16) -> list[PeerCase]:  # fmt: skip
    return [
        PeerCase(Step(context=context, s_active=s, block_len=block_len), layout, lnc)
        for s in s_active for layout in ("block", "flat") for lnc in lncs
    ]  # fmt: skip


def _folded(step: Step) -> tuple[FoldedStep, np.ndarray, np.ndarray]:
    """The folded launch inputs of `step` and its head-major pools viewed as `[Hkv*NB, BL, d]`."""
    a = _inputs(step)
    kc, vc, bt, lens = a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"]
    Hkv, NB, BL, d = kc.shape
    S = step.s_active
    new_pos = (lens - S)[:, None] + np.arange(S)[None, :]
    blk = np.take_along_axis(bt.astype(np.int64), new_pos // BL, axis=1)
    k_new = kc[:, blk, new_pos % BL].transpose(1, 0, 2, 3)
    v_new = vc[:, blk, new_pos % BL].transpose(1, 0, 2, 3)
    fs = fold_inputs(a["q"], k_new, v_new, bt, lens, scale=d**-0.5, window=None, heads=range(Hkv), num_blocks=NB,
                     block_len=BL, context=step.context, batch=step.batch, s_active=S)  # fmt: skip
    return fs, kc.reshape(Hkv * NB, BL, d), vc.reshape(Hkv * NB, BL, d)


def call_args(case: PeerCase) -> dict[str, Any]:
    """`attention_tkg` arguments of `case` (identical for both kernels)."""
    fs, pool_k, pool_v = _folded(case.step)
    args: dict[str, Any] = {
        "q": fs.q, "k_active": fs.k_active, "v_active": fs.v_active, "k_prior": pool_k, "v_prior": pool_v,
        "mask": fs.mask, "out": None, "cfg": fs.cfg, "rope_pos_ids": fs.positions, "active_blocks_table": fs.table,
    }  # fmt: skip
    if case.layout == "flat":
        rows, d = fs.cfg.bs, fs.cfg.d_head
        table = fs.table.astype(np.int64)
        args["k_prior"] = np.ascontiguousarray(pool_k[table].reshape(rows, 1, -1, d))
        args["v_prior"] = np.ascontiguousarray(pool_v[table].reshape(rows, 1, -1, d))
        args["active_blocks_table"] = None
        args["cfg"] = dataclasses.replace(fs.cfg, block_len=0)
    return args


def _run(backend: str, case: PeerCase, args: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from tkg.kernel import nki_emu
    from tkg.kernel.api import attention_tkg

    with nki_emu.collect_stats() as runs:
        out, _ = attention_tkg(**args, backend=backend, lnc=case.lnc, **options)
    (stats,) = runs
    est = nki_emu.estimate(stats, target="trn2", floor_bytes=case.step.compulsory_bytes())
    progs = stats.programs
    return {
        "out": np.asarray(out, dtype=np.float32),
        "us": est.estimate_s * 1e6,
        "floor_us": est.hbm_floor_s * 1e6,
        "dma_bytes": sum(p.dma_bytes for p in progs),
        "hbm_bytes": stats.hbm_read_bytes + stats.hbm_write_bytes,
        "dma_transfers": sum(p.dma_transfers for p in progs),
        "instructions": stats.total_instructions(),
        # The slower program decides; its per-engine busy time says which engine bounds it.
        "engine_us": {k: v * 1e6 for k, v in max(est.programs, key=lambda p: p.estimate_s).engine_s.items()},
        "busiest": max(est.programs, key=lambda p: p.estimate_s).busiest,
    }


def side_by_side(cases: list[PeerCase], nkilib_path: str) -> list[dict[str, Any]]:
    """One row per case: both kernels' counters and estimates, the floor, and their output difference."""
    rows = []
    for case in cases:
        args = call_args(case)
        ours = _run(KERNELS["ours"], case, args, {})
        lib = _run(KERNELS["nkilib"], case, args, {"nkilib_path": nkilib_path})
        row: dict[str, Any] = {
            "case": case.name, "layout": case.layout, "s_active": case.step.s_active, "lnc": case.lnc,
            "ours_us": ours["us"], "nkilib_us": lib["us"], "floor_us": ours["floor_us"],
            "max_abs_diff": float(np.max(np.abs(ours["out"] - lib["out"]))),
        }  # fmt: skip
        for who, r in (("ours", ours), ("nkilib", lib)):
            for k in ("dma_bytes", "hbm_bytes", "dma_transfers", "instructions", "engine_us", "busiest"):
                row[f"{who}_{k}"] = r[k]
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table (ESTIMATEs in us; instructions PE/DVE/ACT/Pool/DMA)."""
    head = (f"{'case':<46} {'ours us':>8} {'nkilib us':>9} {'floor us':>8} {'ours/lib':>8}  "
            f"{'DMA MiB ours/lib':>16}  {'instr ours PE/DVE/ACT/Pool/DMA':>30}  {'instr nkilib':>24}  "
            "busiest")  # fmt: skip
    lines = ["NKI kernels on the emulator, trn2 ESTIMATE (roofline from emulator counts, not a measurement)", head]

    def instr(r: dict[str, Any], who: str) -> str:
        return "/".join(str(r[f"{who}_instructions"][e]) for e in ENGINES)

    for r in rows:
        lines.append(
            f"{r['case']:<46} {r['ours_us']:>8.1f} {r['nkilib_us']:>9.1f} {r['floor_us']:>8.1f} "
            f"{r['ours_us'] / r['nkilib_us']:>8.2f}  "
            f"{r['ours_dma_bytes'] / 2**20:>7.2f}/{r['nkilib_dma_bytes'] / 2**20:<8.2f}  {instr(r, 'ours'):>30}  "
            f"{instr(r, 'nkilib'):>24}  {r['ours_busiest']}/{r['nkilib_busiest']}"
        )
    return "\n".join(lines)
