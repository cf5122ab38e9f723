"""Load times of the offline default model: first de-quantisation (GGUF -> fp32 cache) vs cached loads.

    python -m benchmarks.benchmark_model_load [--repeats 3]

Uses a fresh temporary cache (``TRUSTREPAIR_CACHE``), so the first number is a real first run; prints a
Markdown section for benchmarks/RESULTS.md with the machine, the date, the load average (the 2-core
machines are shared) and the peak resident memory.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

from benchmarks.common import wall_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRUSTREPAIR_CACHE"] = cache
        import torch
        import transformers

        from trustrepair.app.models import default_model_dir, load_causal_lm

        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        folder = default_model_dir()
        first = time.perf_counter() - start
        def load_and_free() -> None:  # each model freed before the next load
            load_causal_lm()

        cached, _ = wall_times(load_and_free, args.repeats)
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        load_after = os.getloadavg()[0]
    print(f"## Default model load (models.py, issue 4)\n\n"
          f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"1-minute load average {load_before:.1f} before / {load_after:.1f} after (shared machine).\n\n"
          f"| stage | seconds |\n|---|---|\n"
          f"| first call: GGUF de-quantisation + fp32 cache write ({size_mb:.0f} MiB) | {first:.1f} |\n"
          f"| cached load, median of {args.repeats} (min {min(cached):.2f}, max {max(cached):.2f}) | "
          f"{statistics.median(cached):.2f} |\n\n"
          f"Peak resident memory {peak_mb:.0f} MiB. Ratio first / cached: {first / statistics.median(cached):.0f}x.\n")


if __name__ == "__main__":
    main()
