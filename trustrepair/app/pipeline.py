"""The end-to-end trust repair run behind ``trustrepair demo`` and the CLI stages: the stages of
:mod:`trustrepair.app.stages` in order, each once, on one :class:`~trustrepair.app.workspace.Workspace`.

A stage whose output is already in the run directory is read back instead of computed, so a rerun
skips completed stages; a run directory made with other settings is refused
(:class:`~trustrepair.app.rundir.RunDir`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trustrepair.app import stages
from trustrepair.app.records import EvaluationRecord, Repairs, Scores, Selection, SFTResult
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import DemoConfig
from trustrepair.app.demo_workspace import load_demo_workspace
from trustrepair.app.workspace import Workspace
from trustrepair.engine.ekfac import EKFACFactors

logger = logging.getLogger(__name__)

STAGE_ORDER = ("sft", "fit", "score", "select", "repair", "evaluate", "report")


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


def run_stages(run: RunDir, last: str = "report") -> StageOutputs:
    """Load the workspace, then run every stage up to ``last`` (one of :data:`STAGE_ORDER`) in order."""
    if last not in STAGE_ORDER:
        raise ValueError(f"unknown stage {last!r}: choose one of {', '.join(STAGE_ORDER)}")
    wanted = STAGE_ORDER[:STAGE_ORDER.index(last) + 1]
    ws = load_demo_workspace(run).workspace
    out = StageOutputs(ws, stages.sft(run, ws))
    if "fit" in wanted:
        out.factors = stages.fit(run, ws)
    if "score" in wanted:
        out.scores = stages.score(run, ws, out.factors, run.config.aspects)
    if "select" in wanted:
        out.selection = stages.select(run, out.scores)
    if "repair" in wanted:
        out.repairs = stages.repair(run, ws, out.factors, out.selection, out.sft)
    if "evaluate" in wanted:
        out.evaluation = stages.evaluate(run, ws, out.repairs, out.sft)
    if "report" in wanted:
        out.report = stages.report(run, ws, out.evaluation, out.scores, out.repairs)
    return out


def run_demo(out_dir: str | os.PathLike = "runs/demo", config: DemoConfig | None = None, *,
             progress: bool = True) -> Path:
    """Every stage in order, reusing completed ones; returns the path of ``report.md``."""
    run = RunDir(out_dir, config or DemoConfig(), progress=progress)
    start = time.perf_counter()
    report = run_stages(run).report
    logger.info("demo finished in %.1f s; report at %s", time.perf_counter() - start, report)
    return report
