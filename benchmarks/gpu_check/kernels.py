"""gpu_check's kernel stage: :mod:`benchmarks.benchmark_kernels` at the Pythia-160M layer shapes."""
from __future__ import annotations

import torch

from benchmarks import benchmark_kernels as bk
from benchmarks.gpu_check.report import fmt
from benchmarks.gpu_check.runner import Run

# No exact fp32: on CUDA the library routes it to the reference (the kernel's FMA loops lost to cuBLAS;
# see trustrepair.engine.ops.routing). TF32 first: the goals and the tunables (knobs.py) read it, in case
# the stage is cut short.
PLAN = [(("squares_tiles", "squares"), ("tf32",)),
        (("squares_tiles", "squares"), ("bf16",))]
"""(ops, precisions) in the order the stage times them, every op at every Pythia-160M layer shape."""

RESERVE_S = 225
"""Seconds of the budget the stage leaves for the eigh schedules and the pipeline: it stops below them."""


def kernel_records(run: Run, rates: dict | None) -> dict:
    """:func:`benchmarks.benchmark_kernels.run_op` records of :data:`PLAN` at B = 16, T = 512 on CUDA, their
    rates against the matmul ``rates``; ``cut_short`` when the budget ran low."""
    records = []
    for ops, precisions in PLAN:
        for op in ops:
            for layer, shape in bk.PYTHIA_LAYERS.items():
                for precision in precisions:
                    if run.left() < RESERVE_S:
                        print(f"kernel benchmarks cut short at {op} {layer} {precision}", flush=True)
                        return {"records": records, "cut_short": True}
                    r = bk.run_op(op, layer, shape, precision, 16, 512, torch.device("cuda"), rates)
                    records.append(r)
                    o = r["trustrepair"]
                    print(f"{op} {layer} {precision}: ours {o['ms']:.3f} ms ({o['tflops']:.1f} TFLOP/s), "
                          f"reference {r['reference']['ms']:.3f} ms, rel err {r['rel_err']:.1e}", flush=True)
    return {"records": records}


def tiles_of_tf32(kernels: dict | None) -> float | None:
    """The tile kernel's worst TF32 share of the matmul rate over the layers (the issue's goal), if measured."""
    tiles = [r["trustrepair"].get("of_matmul") for r in (kernels or {}).get("records", [])
             if r["op"] == "squares_tiles" and r["precision"] == "tf32"]
    return min(tiles) if tiles and None not in tiles else None

def kernel_summary(kernels: dict | None) -> list[str]:
    if not kernels:
        return ["(kernel benchmarks not run)"]
    lines = ["| op | layer | prec | ours ms | reference ms | speed-up | TFLOP/s | of matmul |",
             "|---|---|---|---|---|---|---|---|"]
    for r in kernels["records"]:
        o = r.get("trustrepair") or {}
        lines.append(f"| {r['op']} | {r['layer']} | {r['precision']} | {fmt(o.get('ms'), '.3f')} | "
                     f"{r['reference']['ms']:.3f} | {fmt(r.get('speedup'))}x | {fmt(o.get('tflops'), '.1f')} | "
                     f"{fmt(100 * o['of_matmul'] if 'of_matmul' in o else None, '.0f')} % |")
    traffic = [r for r in kernels["records"] if "tile" in (r.get("trustrepair") or {})]
    if traffic:
        lines += ["", "Tile kernel operand traffic (squares_tiles; projected tokens loaded per output tile and "
                  "example, benchmark_kernels.tile_operand_bytes, over the median; 128 x 128 TF32 tiles do 32 FLOP "
                  "per byte, so a rate R needs R / 32 of operand bandwidth from L2):", "",
                  "| layer | prec | tile picked | GB loaded | FLOP/byte | TFLOP/s | operand TB/s |", "|---|---|---|---|---|---|---|"]
        for r in traffic:
            o = r["trustrepair"]
            lines.append(f"| {r['layer']} | {r['precision']} | {o['tile']} | {o['operand_gb']:.2f} | "
                         f"{o['flop_per_byte']:.1f} | {o['tflops']:.1f} | {o['operand_tb_s']:.2f} |")
    return lines
