"""Data-parallel EK-FAC on the CPU: 1 process against 2 gloo processes, same model, data and machine.

Model, data and sizes are those of the EK-FAC benchmark (imported from ``benchmarks.benchmark_ekfac``, not
copied): GPT-NeoX hidden 512, 8 layers, 256 training sequences of 64 tokens, 16 trust queries, batch 8,
every block Linear, empirical Fisher (deterministic, so the runs' results can be compared exactly).
``--quick`` uses that benchmark's small configuration.

Each configuration "P x T" runs P processes with T torch threads each (the 1-process runs have no
process group: the plain code path). Every process builds the model and data itself, warms up, then
times each stage ``--repeats`` times between barriers, so a stage's time is the slowest rank's:

    fit         fit_ekfac (covariances, eigendecompositions, eigenvalue correction, all-reduces)
    aggregated  influence with one aspect of all queries (ghost dot products, scores gathered)
    pairwise    pairwise_influence (queries x training examples, scores gathered)

Reported: medians, the speed-up of each configuration against "1 x T" with the same total threads and
against "1 x 1", peak extra resident memory per process, and the largest relative difference of the
factors and scores from the first configuration's (the distributed path must not change results).

    python -m benchmarks.benchmark_distributed --quick
    python -m benchmarks.benchmark_distributed --write-results      # the full run, a few minutes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.benchmark_ekfac import FULL, QUICK, make_data, make_model
from benchmarks.common import RESULTS, PeakMemory, cpu_name, replace_section, section_span

HEADING = "## Data-parallel EK-FAC: 1 vs 2 processes (issue 6)"
STAGES = ("fit", "aggregated", "pairwise")
FIT_STAGES = ("covariance", "eigendecomposition", "lambda")  # fit_ekfac's own timings, this rank's


def _rank_main(rank: int, world: int, threads: int, folder: str, quick: bool, repeats: int) -> None:
    """One process of a configuration: times every stage, writes rank{rank}.json and (rank 0) results.pt."""
    import trustrepair.engine.distributed as D
    from trustrepair import fit_ekfac, influence, pairwise_influence

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    cfg = QUICK if quick else FULL
    model = make_model(cfg)
    train, queries = make_data(cfg)
    bs = cfg["batch_size"]

    fit_ekfac(model, train[: 2 * bs * world], fisher="empirical", batch_size=bs, progress=False)  # warm-up
    seconds = {stage: [] for stage in STAGES + FIT_STAGES}
    peak = {stage: 0.0 for stage in STAGES}
    outputs = {}

    def timed_stage(stage, fn):
        if world > 1:
            dist.barrier()
        with PeakMemory() as mem:
            start = time.perf_counter()
            outputs[stage] = fn()
            if world > 1:
                dist.barrier()
            seconds[stage].append(time.perf_counter() - start)
        peak[stage] = max(peak[stage], mem.mib)
        return outputs[stage]

    for _ in range(repeats):
        factors = timed_stage("fit", lambda: fit_ekfac(model, train, fisher="empirical", batch_size=bs,
                                                       progress=False))
        for stage in FIT_STAGES:
            seconds[stage].append(factors.timings[stage])
        timed_stage("aggregated", lambda: influence(model, factors, train, {"all": queries}, batch_size=bs,
                                                    progress=False)["all"])
        timed_stage("pairwise", lambda: pairwise_influence(model, factors, train, queries, batch_size=bs,
                                                           progress=False))
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "peak_mib": peak}))
    if D.is_main_process():
        factors = outputs["fit"]
        torch.save({"lambda": {n: f.lambda_ for n, f in factors.modules.items()},
                    "aggregated": outputs["aggregated"], "pairwise": outputs["pairwise"]},
                   Path(folder, "results.pt"))
    if world > 1:
        dist.destroy_process_group()


def run_configuration(world: int, threads: int, quick: bool, repeats: int) -> dict:
    """Spawn ``world`` processes of ``threads`` threads; per-stage medians (slowest rank), peaks, outputs."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=_rank_main, args=(r, world, threads, folder, quick, repeats))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks {failed} of the {world} x {threads} configuration failed (see their output)")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
        outputs = torch.load(Path(folder, "results.pt"))
    return {
        "median": {s: statistics.median(max(r["seconds"][s][i] for r in ranks) for i in range(repeats))
                   for s in STAGES + FIT_STAGES},
        "peak_mib": {s: max(r["peak_mib"][s] for r in ranks) for s in STAGES},
        "outputs": outputs,
    }


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest relative difference (max-norm) over Lambda of every module and both score tensors."""
    pairs = [(a["lambda"][n], b["lambda"][n]) for n in a["lambda"]]
    pairs += [(a["aggregated"], b["aggregated"]), (a["pairwise"], b["pairwise"])]
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in pairs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the EK-FAC benchmark's small configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each stage (median reported)")
    parser.add_argument("--configs", default="1x1,1x2,2x1",
                        help="comma-separated PROCESSESxTHREADS configurations, e.g. 1x2,2x1")
    parser.add_argument("--write-results", action="store_true", help=f"append the table to {RESULTS.name}")
    args = parser.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    except ValueError:
        parser.error(f"--configs must look like 1x2,2x1 (PROCESSESxTHREADS); got {args.configs!r}")
    if any(p < 1 or t < 1 for p, t in configs) or args.repeats < 1:
        parser.error("processes, threads and --repeats must be positive")
    cfg = QUICK if args.quick else FULL
    print(f"config: {cfg}; configurations {configs}; {args.repeats} repeats", flush=True)

    results = {}
    for world, threads in configs:
        start = time.perf_counter()
        results[(world, threads)] = run_configuration(world, threads, args.quick, args.repeats)
        print(f"{world} x {threads}: " + ", ".join(f"{s} {results[(world, threads)]['median'][s]:.2f}s" for s in STAGES)
              + f" (wall {time.perf_counter() - start:.0f}s)", flush=True)

    reference = results[configs[0]]["outputs"]
    lines = ["| processes x threads | fit s (covariance / eigendecomposition / lambda) | "
             + " | ".join(f"{s} s" for s in STAGES[1:])
             + " | fit+scores speed-up vs 1 x same total threads | vs 1 x 1 | peak MiB per process (fit / aggregated / pairwise) "
             "| max rel. diff. vs first row |",
             "|---|" + "---|" * (len(STAGES) + 4)]
    fit_cell = lambda m: f"{m['fit']:.2f} ({' / '.join(f'{m[s]:.2f}' for s in FIT_STAGES)})"
    for (world, threads), res in results.items():
        total = sum(res["median"][s] for s in STAGES)
        same = results.get((1, world * threads))
        single = results.get((1, 1))
        ratio = lambda other: f"{sum(other['median'][s] for s in STAGES) / total:.2f}x" if other else "not run"
        lines.append(f"| {world} x {threads} | {fit_cell(res['median'])} | "
                     + " | ".join(f"{res['median'][s]:.2f}" for s in STAGES[1:])
                     + f" | {ratio(same)} | {ratio(single)} | "
                     + " / ".join(f"{res['peak_mib'][s]:.0f}" for s in STAGES)
                     + f" | {max_relative_difference(res['outputs'], reference):.1e} |")
    report = "\n".join(lines)
    print(report)
    if args.write_results:
        write_results(cfg, args, report)


def write_results(cfg: dict, args, report: str) -> None:
    """Put this run's table under the section HEADING of RESULTS.md, in a subsection for its size (full or
    quick) that replaces the previous run of that size; other sections are left as they are."""
    import transformers

    import trustrepair

    cpu = cpu_name()
    size = "quick" if args.quick else "full"
    subsection = "\n".join([
        f"### {size} size",
        "",
        f"{datetime.date.today().isoformat()}; {cpu}, {os.cpu_count()} cores shared with 4-5 other engineers' jobs "
        f"(load average about {os.getloadavg()[0]:.0f} when the run ended; nothing controlled it, so absolute seconds "
        f"are noisy and configurations ran one after another under whatever else ran); python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trustrepair {trustrepair.__version__}; gloo backend, one machine.",
        f"Config (the EK-FAC benchmark's {size} one): GPT-NeoX hidden {cfg['hidden']}, {cfg['layers']} layers, "
        f"{cfg['heads']} heads, intermediate {cfg['intermediate']}, vocab {cfg['vocab']}, float32; {cfg['n_train']} x "
        f"{cfg['seq_len']} tokens (half prompt), {cfg['n_queries']} queries, batch {cfg['batch_size']}, all block "
        f"linears, empirical Fisher. Median of {args.repeats} per stage; a stage's time is its slowest rank's "
        f"(barriers around it). Command: `python -m benchmarks.benchmark_distributed {' '.join(sys.argv[1:])}`. "
        f"Speed-up: summed medians of fit, aggregated and pairwise of the reference row over this row's. "
        f"Peak MiB: extra resident memory above the stage's start, largest over ranks. Max rel. diff.: largest "
        f"max-norm relative difference of every module's Lambda and of both score tensors from the first row's "
        f"(float32; only the summation order differs).",
        "",
        report,
        ""])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    span = section_span(text, HEADING)
    section = text[span[0]:span[1]] if span else HEADING + "\n"
    section = replace_section(section, f"### {size} size", subsection, level=3)
    RESULTS.write_text(replace_section(text, HEADING, section))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
