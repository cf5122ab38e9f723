"""The C++ greedy log-det DPP selector against its numpy reference, in the same run.

Providers (both through ``trustrepair.methods.selection.dpp_greedy``, so both pay the same Python validation):

* ``reference``: ``engine="reference"``, the eager vectorised numpy greedy in float64 (numpy's default
  BLAS threads), the test oracle;
* ``trustrepair``: ``engine="cpp"``, lazy greedy.

What lazy evaluation saves is counted, not timed: the kernel entries the lazy greedy needed against the
N - t per step of the eager greedy (the C++ eager mode is a correctness twin: its SIMD kernels are laid
out for updating each candidate against several picks at once).

Workload: N clustered float32 embeddings (50 Gaussian clusters in d = 256, centres N(0, 1), spread 0.5),
heavy-tailed distinct scores, k = 100, eta in {0, 1, 1e4}, gamma from the median heuristic (timed once
per N, outside the selections). Every time is the median of ``--repeats`` calls (``--reference-repeats``
for numpy) measured with ``time.perf_counter``; the selections of all providers are asserted identical.

Floors, both measured in the same run, and the larger one is the floor of a row:

* arithmetic: every kernel entry is a d-dimensional float64 dot product (2 d flops; the Cholesky
  recurrence's 2 t flops per entry and the exp are not counted), so entries * 2 d flops over the
  single-core float64 GEMM rate (numpy ``@`` of two 1024 x 1024 float64 matrices, median of 15 calls,
  with the BLAS threads of the run). This binds where the embeddings stay in cache (N = 2,000: 2 MB).
* bytes: every candidate update reads the candidate's embedding row once (rows read * d * itemsize;
  its Cholesky row is not counted), over the copy bandwidth (``np.copyto`` of a 256 MiB buffer on 1 and
  on 2 threads; bytes read + written per second; the larger is used). This is what streams from memory
  at large N.

Peak memory: the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one extra call, so C++ allocations are counted too (tracemalloc would miss them), with glibc told
to return freed blocks to the OS. Linux with glibc only.

    python -m benchmarks.benchmark_dpp                          # N = 2k, 10k, 50k, 200k (numpy up to 50k)
    python -m benchmarks.benchmark_dpp --sizes 2000,10000       # a quick run
    python -m benchmarks.benchmark_dpp --threads 1              # one thread for C++ and for numpy's BLAS
    python -m benchmarks.benchmark_dpp --write-results          # append the table to benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

import trustrepair
from benchmarks.common import RESULTS, cpu_name, peak_rss_rise_mib, unmap_large_frees, wall_times
from trustrepair import _dpp
from trustrepair.methods.selection import dpp_greedy, median_heuristic_gamma


def clustered(n: int, d: int, seed: int = 0):
    """(n,) distinct heavy-tailed scores and (n, d) float32 embeddings in 50 Gaussian clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32)
    emb = centres[rng.integers(0, 50, n)]
    emb += 0.5 * rng.standard_normal(size=(n, d), dtype=np.float32)
    scores = rng.standard_exponential(n) + 1e-3 * rng.random(n)
    return scores, emb


def copy_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Median bytes (read + written) per second of np.copyto over a mib-MiB float32 buffer, split evenly
    between `threads` Python threads (np.copyto releases the GIL)."""
    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    np.copyto(dst, src)  # touch the pages

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    times = []
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def gemm_flops(repeats: int = 15, size: int = 1024) -> float:
    """Median float64 flop/s of numpy's ``a @ b`` for two size x size matrices (its BLAS, its threads)."""
    a = np.random.default_rng(0).random((size, size))
    b = np.random.default_rng(1).random((size, size))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def median_time(fn, repeats: int):
    """Median seconds of ``repeats`` calls of ``fn`` and its selection, asserted the same every call."""
    times, results = wall_times(fn, repeats)
    for out in results[1:]:
        assert np.array_equal(out.indices, results[0].indices), "a provider changed its selection between calls"
    return statistics.median(times), results[-1]


def run(args) -> tuple[list[dict], dict]:
    info = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg()[0],
        "versions": f"python {platform.python_version()}, numpy {np.__version__}, trustrepair "
                    f"{trustrepair.__version__} (SIMD variant {_dpp.simd_variant()})",
        "threads": ("defaults (OpenMP and OpenBLAS: one per core)" if args.threads is None else
                    f"{args.threads} for both (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS)"),
    }
    bw = {t: copy_bandwidth(t) for t in (1, 2)}
    info["copy_gbs"] = {t: v / 1e9 for t, v in bw.items()}
    bandwidth = max(bw.values())
    flops = gemm_flops()
    info["gemm_gflops"] = flops / 1e9
    rows = []
    configs = [(n, eta) for n in args.sizes for eta in args.etas]
    data, gammas = {}, {}
    for n, eta in tqdm(configs, desc="DPP benchmark", unit="config"):
        if n not in data:
            data = {n: clustered(n, args.d)}
            start = time.perf_counter()
            gammas[n] = median_heuristic_gamma(data[n][1])
            info.setdefault("gamma_s", {})[n] = time.perf_counter() - start
        scores, emb = data[n]
        kw = dict(eta=eta, gamma=gammas[n])
        row = dict(n=n, eta=eta, d=args.d)
        row["cpp_s"], fast = median_time(lambda: dpp_greedy(scores, emb, args.k, **kw), args.repeats)
        row["cpp_mib"] = peak_rss_rise_mib(lambda: dpp_greedy(scores, emb, args.k, **kw))
        row["entries"] = fast.kernel_entries
        row["row_reads"] = fast.row_reads
        row["eager_entries"] = sum(n - t for t in range(1, min(args.k, n)))
        if n <= args.reference_max:
            row["ref_s"], ref = median_time(lambda: dpp_greedy(scores, emb, args.k, engine="reference", **kw),
                                            args.reference_repeats)
            row["ref_mib"] = peak_rss_rise_mib(lambda: dpp_greedy(scores, emb, args.k, engine="reference", **kw))
            assert np.array_equal(fast.indices, ref.indices), f"N={n} eta={eta}: C++ and numpy selections differ"
        row["row_bytes"] = row["row_reads"] * args.d * emb.itemsize
        row["arith_floor_s"] = row["entries"] * 2 * args.d / flops
        row["bytes_floor_s"] = row["row_bytes"] / bandwidth
        row["floor_s"] = max(row["arith_floor_s"], row["bytes_floor_s"])
        rows.append(row)
        tqdm.write(format_row(row))
    info["load_after"] = os.getloadavg()[0]
    return rows, info


def cell(row, key, fmt, scale=1.0):
    return fmt.format(row[key] * scale) if key in row else "-"


def format_row(row) -> str:
    speedup = f"{row['ref_s'] / row['cpp_s']:.1f}x" if "ref_s" in row else "-"
    return (f"| {row['n']:,} | {row['eta']:g} | {cell(row, 'cpp_s', '{:.1f}', 1e3)} | {cell(row, 'ref_s', '{:.1f}', 1e3)}"
            f" | {speedup} | {row['entries']:,} / {row['eager_entries']:,}"
            f" ({row['entries'] / max(row['eager_entries'], 1):.0%}) | {row['row_reads']:,}"
            f" | {row['arith_floor_s'] * 1e3:.2f} | {row['bytes_floor_s'] * 1e3:.2f} | {row['cpp_s'] / row['floor_s']:.2f}"
            f" | {row['entries'] * 2 * row['d'] / row['cpp_s'] / 1e9:.1f}"
            f" | {cell(row, 'cpp_mib', '{:.0f}')} / {cell(row, 'ref_mib', '{:.0f}')} |")


HEADER = ("| N | eta | C++ ms | numpy ms | numpy / C++ | kernel entries lazy / eager | rows read "
          "| arithmetic floor ms | bytes floor ms | C++ / floor | dot GFLOP/s | peak MiB C++ / numpy |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def report(rows, info, args) -> str:
    gamma = ", ".join(f"{n:,}: {s * 1e3:.0f} ms" for n, s in info["gamma_s"].items())
    lines = [
        "## Greedy log-det DPP selector at its floor (issue 18)",
        "",
        f"{info['date']}; {info['machine']}, shared with other engineers' jobs (1-minute load average "
        f"{info['load_before']:.1f} before, {info['load_after']:.1f} after: nothing controlled it, so absolute "
        f"times are noisy); {info['versions']}; threads: {info['threads']}. Memory copy measured in the same "
        f"run: {info['copy_gbs'][1]:.1f} GB/s on 1 thread, {info['copy_gbs'][2]:.1f} GB/s on 2 (read + write "
        f"bytes; the larger sets the bytes floor); float64 GEMM {info['gemm_gflops']:.1f} GFLOP/s (the arithmetic "
        "floor's rate).",
        f"Workload: clustered float32 embeddings, d = {args.d}, k = {args.k}; medians of {args.repeats} calls "
        f"(numpy: {args.reference_repeats}); numpy reference run up to N = {args.reference_max:,}. Median-heuristic "
        f"gamma (not in the times): {gamma}. C++ and numpy selections identical (asserted). Command: "
        "`python -m benchmarks.benchmark_dpp "
        + " ".join(args.argv) + "`.",
        "Arithmetic floor = kernel entries x 2 d flops / GEMM rate; bytes floor = rows read x d x 4 bytes / copy "
        "bandwidth; C++ / floor uses the larger; dot GFLOP/s = entries x 2 d / C++ time.",
        "",
        HEADER,
        *[format_row(r) for r in rows],
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,10000,50000,200000", help="comma-separated N")
    parser.add_argument("--etas", default="0,1,10000", help="comma-separated eta")
    parser.add_argument("--d", type=int, default=256, help="embedding width")
    parser.add_argument("--k", type=int, default=100, help="subset size")
    parser.add_argument("--repeats", type=int, default=5, help="calls per C++ median")
    parser.add_argument("--reference-repeats", type=int, default=3, help="calls per numpy median")
    parser.add_argument("--reference-max", type=int, default=50_000, help="largest N for the numpy reference")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both providers: C++ (OMP_NUM_THREADS) and numpy's BLAS "
                             "(OPENBLAS_NUM_THREADS); the script restarts itself with them set")
    parser.add_argument("--write-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.threads is not None and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        # BLAS reads its thread count when numpy is first imported: restart with it set.
        threads = str(args.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    args.sizes = [int(v) for v in args.sizes.split(",")]
    unmap_large_frees()
    args.etas = [float(v) for v in args.etas.split(",")]
    rows, info = run(args)
    text = report(rows, info, args)
    print("\n" + text)
    if args.write_results:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
