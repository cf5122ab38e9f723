"""The end-to-end trust repair run behind ``trustrepair demo`` and the CLI stages: the stages of
:mod:`trustrepair.app.stages` in order, each once, on one :class:`~trustrepair.app.workspace.Workspace`.

A stage whose output is already in the run directory is read back instead of computed, so a rerun
skips completed stages; a run directory made with other settings is refused
(:class:`~trustrepair.app.rundir.RunDir`).

A planted run (``config.planted`` > 0) adds the stages of :mod:`trustrepair.app.planted_stages`: the gold
retrains after ``sft``, ``scores.jsonl`` and the rankings after ``score``, and each aspect's ``oracle``
subset (its planted examples) to ``select``. :func:`run_demo` then runs every seed in ``OUT/seed-N`` (the
seeds sharing one prefix hidden-state store, ``OUT/cache/hidden-states.pt``) and writes the report over
the seeds in ``OUT`` (:mod:`trustrepair.app.planted_report`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trustrepair.app import planted_stages, stages
from trustrepair.app.records import EvaluationRecord, Repairs, Scores, Selection, SFTResult
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import DemoConfig
from trustrepair.app.demo_workspace import demo_inputs, demo_scenario, load_demo_workspace
from trustrepair.app.workspace import Workspace
from trustrepair.engine.ekfac import EKFACFactors

logger = logging.getLogger(__name__)

STAGE_ORDER = ("sft", "fit", "score", "select", "repair", "evaluate", "report")
HIDDEN_STORE = Path("cache") / "hidden-states.pt"


@dataclass
class StageOutputs:
    """What :func:`run_stages` computed or read back; None for the stages after the last one asked for."""

    workspace: Workspace
    sft: SFTResult
    factors: EKFACFactors | None = None
    scores: Scores | None = None
    selection: Selection | None = None
    repairs: Repairs | None = None
    evaluation: EvaluationRecord | None = None
    report: Path | None = None


def run_stages(run: RunDir, last: str = "report", hidden_store: Path | None = None) -> StageOutputs:
    """Load the workspace, then run every stage up to ``last`` (one of :data:`STAGE_ORDER`) in order (with
    the planted stages of a planted run, module docstring)."""
    if last not in STAGE_ORDER:
        raise ValueError(f"unknown stage {last!r}: choose one of {', '.join(STAGE_ORDER)}")
    wanted = STAGE_ORDER[:STAGE_ORDER.index(last) + 1]
    scenario = demo_scenario(run.config) if run.config.planted else None
    prepared = load_demo_workspace(run, hidden_store, scenario)
    ws = prepared.workspace
    planted = scenario.planted if scenario is not None else None
    params = dict(ws.model.named_parameters())
    pre_sft = {n: params[n].detach().clone() for n in ws.trained_params} if planted is not None else None
    out = StageOutputs(ws, stages.sft(run, ws))
    if planted is not None:
        planted_stages.gold(run, ws, planted, pre_sft, out.sft)
    if "fit" in wanted:
        out.factors = stages.fit(run, ws)
    if "score" in wanted:
        out.scores = stages.score(run, ws, out.factors, run.config.aspects, with_self_influence=(
            planted is not None or run.config.selection_scores == "normalized"))
        if planted is not None:
            planted_stages.write_scores_jsonl(run, prepared, out.scores.per_aspect, out.scores.self_influence)
            planted_stages.ranking(run, ws, planted)
    if "select" in wanted:
        oracle = None if planted is None else planted_stages.planted_by_aspect(planted, run.config.aspects)
        out.selection = stages.select(run, out.scores, oracle)
    if "repair" in wanted:
        out.repairs = stages.repair(run, ws, out.factors, out.selection, out.sft)
    if "evaluate" in wanted:
        out.evaluation = stages.evaluate(run, ws, out.repairs, out.sft)
    if "report" in wanted:
        out.report = stages.report(run, ws, out.evaluation, out.scores, out.repairs)
    return out


def seed_dir_name(seed: int) -> str:
    return f"seed-{seed}"


def run_planted_demo(run: RunDir) -> Path:
    """Every seed of a planted demo in ``OUT/seed-N`` (one prefix store for all), then the report over the
    seeds in ``OUT``; returns the path of ``OUT/report.md``."""
    from trustrepair.app.planted_report import seed_summary, write_planted_report
    from trustrepair.engine.storage import read_json

    cfg = run.config
    run.check_inputs(demo_inputs(cfg))  # the store holds hidden states of these inputs only
    summaries, names, timings = [], [], {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        name = seed_dir_name(seed)
        logger.info("planted demo: seed %d (%d of %d)", seed, seed - cfg.seed + 1, cfg.seeds)
        seed_run = RunDir(run.dir / name, dataclasses.replace(cfg, seed=seed, seeds=1), progress=run.progress)
        out = run_stages(seed_run, hidden_store=run.path(HIDDEN_STORE))
        summaries.append(seed_summary(read_json(seed_run.path(planted_stages.GOLD)), out.evaluation, out.repairs,
                                      read_json(seed_run.path(planted_stages.RANKING))))
        names.append(name)
        for stage, seconds in seed_run.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    path = run.path(RunDir.REPORT)
    run.publish(lambda: write_planted_report(run.dir, cfg.to_json(), summaries, names, timings))
    return path


def run_demo(out_dir: str | os.PathLike = "runs/demo", config: DemoConfig | None = None, *,
             progress: bool = True) -> Path:
    """Every stage in order, reusing completed ones (a planted demo: :func:`run_planted_demo`); returns the
    path of ``report.md``."""
    run = RunDir(out_dir, config or DemoConfig(), progress=progress)
    start = time.perf_counter()
    report = run_planted_demo(run) if run.config.planted else run_stages(run).report
    logger.info("demo finished in %.1f s; report at %s", time.perf_counter() - start, report)
    return report
