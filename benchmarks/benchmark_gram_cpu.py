"""The CPU covariance update's block width (the ``gram_block["cpu"]`` tunable), on a real model's factor widths.

:func:`trustrepair.engine.ops.gram.add_gram_upper_` adds the upper block triangle of ``x^T x`` one block row
at a time: block width b costs rows x d (d + b) / 2 multiply-adds instead of the full product's rows x d^2,
but each block row is a (b, rows) x (rows, d - start) product, and narrow products run below the BLAS
rate. This times every width in ``--blocks`` (``full`` = the plain ``addmm_``) on token rows of one batch
(``--rows``, 8 x 128 = the real-model benchmark's batch) for SmolLM2-135M's factor widths, weighted by how
many of one block's covariance factors have each width (activations: q, k, v, gate, up and o 576, down
1536; output gradients: q, o, down 576, k, v 192, gate, up 1536), with torch's default threads.

    PYTHONPATH=. python -m benchmarks.benchmark_gram_cpu [--rows 1024] [--repeats 15]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.common import cpu_name, wall_times
from trustrepair.engine.layout import aligned
from trustrepair.engine.ops.gram import add_gram_upper_

SMOLLM2_WIDTHS = {576: 9, 192: 2, 1536: 3}
"""Factor width -> how many of one SmolLM2-135M block's 14 covariance factors have it."""


def block_times(width: int, rows: int, blocks: list[int | None], repeats: int, seed: int = 0) -> dict:
    """Block width (None = the full product) -> median ms of one covariance update of ``rows`` token rows,
    the widths timed in interleaved rounds so that a slow spell of the machine hits them all alike."""
    x = aligned(torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)))
    out = torch.zeros(width, width)
    calls = {block: (lambda b=block: add_gram_upper_(out, x, block=b)) if block is not None
             else (lambda: out.addmm_(x.T, x)) for block in blocks}
    times = {block: [] for block in blocks}
    for _ in range(repeats + 1):  # the first round warms up
        for block, call in calls.items():
            times[block].append(wall_times(call, 1)[0][0])
    return {block: 1e3 * statistics.median(t[1:]) for block, t in times.items()}


def weighted(times: dict[int, dict], weights: dict[int, int]) -> dict:
    """Block width -> sum over factor widths of weight x ms."""
    blocks = next(iter(times.values()))
    return {block: sum(weights[w] * times[w][block] for w in weights) for block in blocks}


def table(times: dict[int, dict], weights: dict[int, int]) -> str:
    blocks = list(next(iter(times.values())))
    names = ["full" if b is None else str(b) for b in blocks]
    lines = ["| factor width (factors per block) | " + " | ".join(f"block {n} ms" for n in names) + " |",
             "|---" * (len(blocks) + 1) + "|"]
    for width, by_block in times.items():
        lines.append(f"| {width} ({weights[width]}) | " + " | ".join(f"{by_block[b]:.2f}" for b in blocks) + " |")
    total = weighted(times, weights)
    lines.append("| weighted sum, one block's factors | " + " | ".join(f"**{total[b]:.1f}**" for b in blocks) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--blocks", default="256,512,768,1024,full")
    args = parser.parse_args(argv)
    blocks = [None if b == "full" else int(b) for b in args.blocks.split(",")]
    times = {w: block_times(w, args.rows, blocks, args.repeats) for w in SMOLLM2_WIDTHS}
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.rows} rows, medians of {args.repeats}; loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(table(times, SMOLLM2_WIDTHS))


if __name__ == "__main__":
    main()
