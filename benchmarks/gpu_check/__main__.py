"""Runs gpu_check (see :mod:`benchmarks.gpu_check`): arguments, stage order, the JSON and the
ready-to-append RESULTS_section.md."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import benchmarks.gpu_check
from benchmarks import benchmark_kernels as bk
from benchmarks import knobs
from benchmarks.gpu_check.eigh import eigh_options, eigh_schedules, eigh_schedules_summary, eigh_summary
from benchmarks.gpu_check.environment import OTHER_GPU_TESTS_S, environment, kernels_importable, pytest_run
from benchmarks.gpu_check.kernels import kernel_records, kernel_summary, tiles_of_tf32
from benchmarks.gpu_check.pipeline import PYTHIA, SMOKE, pipeline
from benchmarks.gpu_check.report import goals_table, pipeline_table
from benchmarks.gpu_check.rows import row_alignment, row_alignment_summary
from benchmarks.gpu_check.runner import GROUPS, Run, describe_for_json
from trustrepair.engine.tunables import current


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=benchmarks.gpu_check.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(tempfile.gettempdir(), "gpu_check_out")),
                        help="folder for logs and JSON (the device tool sets $OUT)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="wall-clock budget of the whole script (the issue asks for 8 minutes)")
    parser.add_argument("--test-timeout-s", type=float, default=180, help="limit of the kernel test run")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups of stages to run, of {','.join(GROUPS)} (default: all); "
                             "for a short rerun after a fix, e.g. --only pipeline,kronfluence")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script's plumbing on the CPU: a tiny model, every stage that runs without "
                             "CUDA (row alignment, pipeline, eigh)")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        parser.error(f"--only takes a comma-separated subset of {','.join(GROUPS)}; got {args.only!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_check needs a CUDA device; on the CPU run `python -m pytest tests/kernels` "
                 "(Triton interpreter), `python -m benchmarks.benchmark_kernels --quick`, or this script with --smoke")
    run = Run(out, args.budget_s, groups)
    res = run.results
    if args.smoke:  # every stage that can run on the CPU, at toy sizes
        cpu = torch.device("cpu")
        res["row_alignment"] = run.stage("row alignment", lambda: row_alignment(cpu, widths=(17, 33), tokens=128),
                                         group="rows")
        res["eigh_schedules"] = run.stage("eigh schedules", lambda: eigh_schedules(cpu, widths=(33, 65, 17), repeats=1),
                                          group="eigh")
        pipeline(run, SMOKE, cpu, tune_even_unchanged=True)  # the tuned runs' plumbing, whatever the tables say
        res["eigh"] = run.stage("eigh options", lambda: eigh_options(cpu, widths=(33, 65)), group="eigh")
        report(res, out)
        return
    res["environment"] = run.stage("environment", environment)
    run.stage("import", kernels_importable)
    (out / "pytest.log").write_text("")
    first_tests = ["tests/kernels", "tests/engine/test_streams.py"]  # the kernels, and eigh on CUDA streams
    res["tests"] = {"kernels": run.stage("tests", lambda: pytest_run(out, "kernels", first_tests, args.test_timeout_s),
                                         needs_s=60, group="tests")}

    res["matmul_tflops"] = run.stage("matmul rates", lambda: bk.matmul_rates(torch.device("cuda")), needs_s=20)
    if res["matmul_tflops"]:
        print("torch.matmul TFLOP/s: " + bk.format_rates(res["matmul_tflops"]), flush=True)
    res["row_alignment"] = run.stage("row alignment", lambda: row_alignment(torch.device("cuda")), needs_s=260,
                                     group="rows")
    res["kernels"] = run.stage("kernels", lambda: kernel_records(run, res.get("matmul_tflops")), needs_s=240,
                               group="kernels")
    res["tiles_of_tf32"] = tiles_of_tf32(res.get("kernels"))

    # The eigh schedules feed one of the tunables that the pipeline's tuned runs apply.
    workers = current().eigh_streams
    res["eigh_schedules"] = run.stage("eigh schedules", lambda: eigh_schedules(torch.device("cuda"), workers=workers),
                                      needs_s=230, group="eigh")
    pipeline(run, PYTHIA, torch.device("cuda"))
    # The per-width eigh options only inform a later change.
    res["eigh"] = run.stage("eigh options", lambda: eigh_options(torch.device("cuda")), needs_s=40, group="eigh")
    res["tests"]["other gpu tests"] = run.stage(
        "other gpu tests", lambda: pytest_run(out, "other gpu tests", ["-m", "gpu", "tests"]
                                              + [f"--ignore={path}" for path in first_tests], run.left() - 10),
        needs_s=OTHER_GPU_TESTS_S, group="other-tests")
    report(res, out)


def report(res: dict, out: Path) -> None:
    env = res.get("environment") or {}
    rates = res.get("matmul_tflops") or {}
    head = [f"{env.get('date', '?')}; {env.get('card', '?')} ({env.get('multiprocessors', '?')} SMs; "
            f"{env.get('nvidia_smi', '')}); python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
            f"triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}, kronfluence "
            f"{env.get('kronfluence', '?')}.",
            "torch.matmul TFLOP/s (8192^3 after 1 s of warm-up, median of 15 windows, same run): "
            + (bk.format_rates(rates) if rates else "not measured"),
            f"Tests: {res.get('tests')}",
            "Correlations: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k.startswith("spearman")),
            f"Planted (TF32): {res.get('planted')}; planted (bf16): {res.get('planted_bf16')}; planted (TF32, tuned "
            f"tunables): {res.get('planted_tuned')}",
            "Stages: " + "; ".join(f"{k}: {v.get('status')}" for k, v in res["stages"].items())]
    kernels = kernel_summary(res.get("kernels")) + ["", *row_alignment_summary(res.get("row_alignment")), "",
                                                    *eigh_summary(res.get("eigh")), "",
                                                    *eigh_schedules_summary(res.get("eigh_schedules"))]
    pipeline = pipeline_table(res)
    goals = goals_table(res)
    if res.get("knobs") is not None:
        goals += ["", "Tunables chosen from this run's tables (benchmarks/knobs.py; the tuned rows above ran with the "
                  "changed ones):", "", *(knobs.describe(res["knobs"]) or ["- (none measured)"])]
    section = ["## Triton kernels on a GPU (issue 5)", "", *head, "",
               "Kernels: B = 16 examples x T = 512 tokens per call, Pythia-160M layer shapes (d_out, d_in incl. bias); "
               "do_bench medians; FLOP formulas in benchmarks/benchmark_kernels.py.", "", *kernels, "",
               "Pipeline (Pythia-160M-shaped GPT-NeoX, 512 x 512 tokens, 32 queries, batch 16, empirical Fisher; "
               "kronfluence 1.0.1 in exact fp32, as its anchors):", "", *pipeline, "", *goals, "",
               "Command: `bash benchmarks/gpu_check.sh` (one device call; see benchmarks/gpu_check/__init__.py)."]
    (out / "RESULTS_section.md").write_text("\n".join(section) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=describe_for_json))
    scores = {f"{run}/{key}": res[run][key] for run in res if isinstance(res[run], dict)
              for key in ("pairwise_scores", "aggregated_scores") if isinstance(res[run].get(key), torch.Tensor)}
    torch.save(scores, out / "scores.pt")
    print("\n".join(["", "=" * 100, *head, "", *kernels, "", *pipeline, "", *goals]), flush=True)


if __name__ == "__main__":
    main()
