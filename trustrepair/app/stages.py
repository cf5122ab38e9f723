"""The stages of a trust repair run, one function each, with explicit inputs and outputs.

    sft       fine-tune the last ``trained_blocks`` blocks on the SFT split     -> sft/params.safetensors
    fit       EK-FAC factors on exactly those blocks' linear layers             -> factors/
    score     aggregated influence per aspect (query halves) + embeddings       -> scores.safetensors
              (in chunks saved as they complete, for large training sets)
    select    subsets per aspect and strategy (dpp, topk, random); one common   -> selection.json
              DPP subset for all aspects (sum of normalised scores, Table 2)
    repair    Newton step per subset, beta searched under the perplexity bound  -> repairs/*.safetensors
    evaluate  pre / post on every aspect; each repair on the aspect it targets  -> evaluation.json
              (the common repair on every aspect), query and held-out halves
    report    tables, plots, top detrimental examples                          -> report.md/.json, *.png

Every stage but the report returns its output read back from the run directory when it is already there
(a crash leaves every completed stage reusable) and otherwise computes, publishes and returns it. The
order in which they run, each once, is :func:`trustrepair.app.pipeline.run_stages`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trustrepair.app.records import (COMMON, EvaluationRecord, Evaluation, AspectLogOdds, RepairRecord, Repairs, RunResults,
                                     Scores, Selection, SFTResult, TopExample, repairs_from_json, repairs_to_json)
from trustrepair.app.rundir import RunDir
from trustrepair.app.workspace import Workspace
from trustrepair.engine.ekfac import EKFACFactors
from trustrepair.engine.storage import atomic_write, load_numpy, load_tensors, read_json, save_tensors, write_json

TOP_EXAMPLES = 10


def restore_post_sft(run: RunDir, ws: Workspace) -> None:
    """Copy the saved post-SFT parameters into ``ws.model``. Applying and reverting a repair leaves one
    rounding per weight, so a stage that measures the post-SFT model after repairs restores it first."""
    params = dict(ws.model.named_parameters())
    with torch.no_grad():
        for name, value in load_tensors(run.path(RunDir.SFT_PARAMS)).items():
            params[name].copy_(value)


def sft(run: RunDir, ws: Workspace) -> SFTResult:
    """Fine-tune the last blocks of ``ws.model`` in place (loading them instead when already trained);
    evaluate the model before and after."""
    from trustrepair.app.models import check_finite_parameters
    from trustrepair.app.sft import supervised_finetune

    cfg = run.config
    path, evals_path = run.path(RunDir.SFT_PARAMS), run.path(RunDir.SFT_EVALUATIONS)
    params = dict(ws.model.named_parameters())
    if path.is_file() and evals_path.is_file():
        restore_post_sft(run, ws)
        return read_json(evals_path, SFTResult.from_json)
    with run.timed("evaluate_pre"):
        pre = ws.evaluation(cfg.aspects)
    with run.timed("sft"):
        for name in ws.trained_params:
            params[name].requires_grad_(True)
        _, history = supervised_finetune(ws.tail, ws.train, task=ws.task, epochs=cfg.sft_epochs, lr=cfg.sft_lr,
                                         batch_size=cfg.batch_size, grad_accum=1, trainable=cfg.trained_blocks,
                                         seed=cfg.seed, progress=run.progress)
        for name in ws.trained_params:
            params[name].requires_grad_(False)
    with run.timed("evaluate_post"):
        post = ws.evaluation(cfg.aspects)
    check_finite_parameters(ws.model, ws.trained_params, what="the fine-tuned model (lower --sft-lr)")
    result = SFTResult(pre, post, [float(x) for x in history.epoch_losses])

    def save():
        save_tensors(path, {n: params[n] for n in ws.trained_params})
        write_json(evals_path, result.to_json())

    run.publish(save)
    return result


def fit(run: RunDir, ws: Workspace) -> EKFACFactors:
    """EK-FAC factors of the fine-tuned blocks' linear layers on the SFT train split."""
    from trustrepair.engine.ekfac import fit_ekfac

    path = run.path(RunDir.FACTORS)
    if (path / "factors.json").is_file():
        return EKFACFactors.load(path)
    with run.timed("fit_ekfac"):
        factors = fit_ekfac(ws.tail, ws.train, modules=ws.tail_module_names(), task=ws.task,
                            fisher=run.config.fisher, batch_size=run.config.batch_size, progress=run.progress,
                            checkpoint_dir=run.path(RunDir.FACTORS_PARTIAL))
    factors.save(path)
    run.publish(lambda: shutil.rmtree(run.path(RunDir.FACTORS_PARTIAL), ignore_errors=True))
    return factors


def _chunk_scores(run: RunDir, ws: Workspace, factors: EKFACFactors, aspects: Sequence[str], chunk: int | None):
    """Influence of ``ws.train`` on every aspect (query halves), ``chunk`` examples at a time (all at once
    when None or at least the set's size); each chunk of a chunked pass is saved in ``scores.partial/`` as
    it completes, and chunks already saved are read back."""
    from safetensors.numpy import save_file

    from trustrepair.methods.scoring import influence

    trust = {a: ws.trust[a]["query"] for a in aspects}
    n = len(ws.train)
    step = n if chunk is None or chunk >= n else chunk
    parts = []
    for number, start in enumerate(range(0, n, step)):
        path = run.path(RunDir.SCORE_CHUNKS) / f"chunk-{number:05d}.safetensors"
        if step < n and path.is_file():
            parts.append(load_numpy(path))
            continue
        values = influence(ws.tail, factors, ws.train[start:start + step], trust, damping=run.config.damping,
                           task=ws.task, batch_size=run.config.batch_size, progress=run.progress)
        part = {a: values[a].double().cpu().numpy() for a in aspects}
        if step < n:
            run.publish(lambda: atomic_write(path, lambda tmp: save_file(part, str(tmp))))
        parts.append(part)
    return {a: np.concatenate([part[a] for part in parts]) for a in aspects}


def read_scores(path: Path, aspects: Sequence[str]) -> Scores:
    """The :class:`Scores` of ``scores.safetensors``."""
    from trustrepair.engine.storage import reading

    arrays = load_numpy(path)
    with reading(path):
        return Scores.from_arrays(arrays, aspects)


def score(run: RunDir, ws: Workspace, factors: EKFACFactors, aspects: Sequence[str], chunk: int | None = None, *,
          with_self_influence: bool = False) -> Scores:
    """Aggregated influence of every training example on every aspect (query halves; scored ``chunk``
    examples at a time, see :func:`_chunk_scores`), the response embeddings the DPP's similarity kernel
    uses, and with ``with_self_influence`` each example's self-influence
    (:func:`trustrepair.methods.scoring.self_influence`: one more pass, as costly as the fit's second)."""
    from safetensors.numpy import save_file

    path = run.path(RunDir.SCORES)
    if path.is_file():
        return read_scores(path, aspects)
    with run.timed("score"):
        per_aspect = _chunk_scores(run, ws, factors, aspects, chunk)
    for aspect, values in per_aspect.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise FloatingPointError(f"aspect {aspect!r}: non-finite influence scores for {bad.size} training examples "
                                     f"(first: {ws.train_records[bad[0]].source or bad[0]}); try a larger --damping")
    sigma = None
    if with_self_influence:
        from trustrepair.methods.scoring import self_influence

        with run.timed("self_influence"):
            sigma = self_influence(ws.tail, factors, ws.train, damping=run.config.damping, task=ws.task,
                                   batch_size=ws.batch_size, progress=run.progress).double().cpu().numpy()
    with run.timed("embeddings"):
        scores = Scores(per_aspect, ws.response_embeddings(ws.train), sigma)
    arrays = scores.to_arrays()

    def save():
        atomic_write(path, lambda tmp: save_file(arrays, str(tmp)))
        shutil.rmtree(run.path(RunDir.SCORE_CHUNKS), ignore_errors=True)

    run.publish(save)
    return scores


def select(run: RunDir, scores: Scores, oracle: dict[str, list[int]] | None = None) -> Selection:
    """Per aspect, a subset per strategy; with several aspects, one common DPP subset chosen by the sum
    of the normalised scores. ``oracle`` (the planted demo): aspect -> the indices of its planted
    examples, added as that aspect's ``oracle`` strategy (the subset a perfect attribution would pick)."""
    from trustrepair.methods.selection import STRATEGIES, common_scores, select as choose

    cfg = run.config
    path = run.path(RunDir.SELECTION)
    if path.is_file():
        return read_json(path, Selection.from_json)
    targets = scores.for_selection(cfg.selection_scores)
    if len(cfg.aspects) > 1:
        targets[COMMON] = common_scores(dict(targets))
    subsets = {}
    with run.timed("select"):
        for target, values in targets.items():
            strategies = ("dpp",) if target == COMMON else STRATEGIES
            subsets[target] = {
                strategy: [int(i) for i in choose(strategy, values, cfg.subset_size, embeddings=scores.embeddings,
                                                  eta=cfg.eta, seed=cfg.seed)]
                for strategy in strategies}
            if oracle and target in oracle:
                subsets[target]["oracle"] = sorted(int(i) for i in oracle[target])
    selection = Selection(subsets)
    run.publish(lambda: write_json(path, selection.to_json()))
    return selection


def objective(aspects: Sequence[str], ws: Workspace, target: str, post: Evaluation):
    """Query-half objective of a repair target, as ``(measure(model), post-SFT value)``: the aspect's
    log-odds, or for ``common`` the sum of every one of ``aspects``' log-odds divided by its post-SFT
    magnitude (so each aspect weighs the same)."""
    aspects = aspects if target == COMMON else (target,)
    post_query = {a: post.aspects[a].query for a in aspects}
    scale = {a: max(abs(v), 1e-6) if target == COMMON else 1.0 for a, v in post_query.items()}

    def measure(_model):
        return sum(ws.log_odds(a, "query") / scale[a] for a in aspects)

    return measure, sum(post_query[a] / scale[a] for a in aspects)


def _traced(run: RunDir, target: str, strategy: str) -> bool:
    """Whether a beta search measures the objective at every probe: Figure 2 (the sweep with and
    without DPP) draws the DPP and top-k searches of ``figure_target`` (default: the first aspect)."""
    return target == (run.config.figure_target or run.config.aspects[0]) and strategy in ("dpp", "topk")


def initial_beta(ws: Workspace, direction) -> float:
    """The beta at which the step's norm is 1e-3 of the analysed weights' norm: a first probe that is
    in the quadratic regime of the perplexity yet large enough to measure its rise."""
    modules = dict(ws.tail.named_modules())
    weight_sq = sum(float(modules[n].weight.detach().double().pow(2).sum()) for n in direction.deltas)
    step_sq = sum(float(d.double().pow(2).sum()) for d in direction.deltas.values())
    return 1e-3 * (weight_sq / max(step_sq, 1e-300)) ** 0.5


def repair_subset(ws: Workspace, factors: EKFACFactors, subset: list[int], measure, baseline, *, damping: float | None,
                  tolerance: float, max_probes: int, trace_metric: bool, target: str, strategy: str):
    """One repair: the Newton direction of ``subset``, the beta search under the perplexity ``tolerance``
    (``measure``: the query-half objective; ``baseline``: the unrepaired model's point), and the delta at
    the chosen beta; returns ``(RepairDelta, RepairRecord)``."""
    from trustrepair.methods.repair_step import newton_direction, search_beta

    start = time.perf_counter()
    direction = newton_direction(ws.tail, factors, ws.train, subset, task=ws.task, damping=damping,
                                 batch_size=ws.batch_size, progress=ws.progress)
    best, points, base = search_beta(direction.scaled, ws.tail, lambda _m: ws.perplexity(), measure,
                                     tolerance=tolerance, beta0=initial_beta(ws, direction), max_probes=max_probes,
                                     baseline=baseline, trace_metric=trace_metric, progress=ws.progress)
    delta = direction.scaled(best.beta)
    delta.metadata.update(target=target, strategy=strategy, beta=best.beta)
    return delta, RepairRecord(best.beta, subset, best.metric, best.perplexity, [base, *points],
                               time.perf_counter() - start)


def repair(run: RunDir, ws: Workspace, factors: EKFACFactors, selection: Selection, sft_result: SFTResult) -> Repairs:
    """For every target and strategy: :func:`repair_subset` (damped by ``repair_damping`` x mean(Lambda)
    per module unless the settings give an absolute damping), and the saved delta."""
    from trustrepair.methods.repair_step import BetaPoint

    cfg = run.config
    path = run.path(RunDir.REPAIRS)
    if path.is_file():
        return read_json(path, repairs_from_json)
    repairs: Repairs = {}
    post = sft_result.post
    factors = factors.with_damping_scale(cfg.repair_damping)
    with run.timed("repair"):
        for target, by_strategy in selection.subsets.items():
            measure, post_objective = objective(cfg.aspects, ws, target, post)
            baseline = BetaPoint(0.0, post_objective, post.perplexity)
            repairs[target] = {}
            for strategy, subset in by_strategy.items():
                delta, repairs[target][strategy] = repair_subset(
                    ws, factors, subset, measure, baseline, damping=cfg.damping, tolerance=cfg.tolerance,
                    max_probes=cfg.beta_probes, trace_metric=_traced(run, target, strategy), target=target,
                    strategy=strategy)
                run.publish(lambda: delta.save(run.repair_path(target, strategy)))
    run.publish(lambda: write_json(path, repairs_to_json(repairs)))
    return repairs


def repaired_evaluation(run: RunDir, ws: Workspace, target: str, record: RepairRecord) -> Evaluation:
    """:meth:`Workspace.evaluation` of the model with ``target``'s repair applied, plus the held-out
    values per pair (for standard errors), reusing what its beta search already measured at the chosen
    beta (the perplexity; for a single aspect its query-half log-odds, which is that target's objective)."""
    aspects = run.config.aspects if target == COMMON else (target,)
    out = {}
    for a in aspects:
        pairs = ws.log_odds_pairs(a, "heldout")
        query = record.metric if target != COMMON else ws.log_odds(a, "query")
        out[a] = AspectLogOdds(query, sum(pairs) / len(pairs), pairs)
    return Evaluation(out, record.perplexity)


def evaluate(run: RunDir, ws: Workspace, repairs: Repairs, sft_result: SFTResult) -> EvaluationRecord:
    """Every saved repair applied in turn (and reverted) to the post-SFT model and evaluated on the aspects
    it targets."""
    from trustrepair.methods.repair_step import RepairDelta

    path = run.path(RunDir.EVALUATION)
    if path.is_file():
        return read_json(path, EvaluationRecord.from_json)
    restore_post_sft(run, ws)  # the repair stage's beta searches applied and reverted steps
    repaired = {}
    with run.timed("evaluate_repaired"):
        post_pairs = {a: ws.log_odds_pairs(a, "heldout") for a in run.config.aspects}
        for target, by_strategy in repairs.items():
            repaired[target] = {}
            for strategy, record in by_strategy.items():
                delta = RepairDelta.load(run.repair_path(target, strategy))
                delta.apply(ws.tail)
                try:
                    repaired[target][strategy] = repaired_evaluation(run, ws, target, record)
                finally:
                    delta.revert(ws.tail)
    result = EvaluationRecord(sft_result.pre, sft_result.post, repaired, post_pairs)
    run.publish(lambda: write_json(path, result.to_json()))
    return result


def top_examples(ws: Workspace, scores: Scores, n: int = TOP_EXAMPLES) -> dict[str, list[TopExample]]:
    """The ``n`` highest-scored (most detrimental) training examples per aspect."""
    top = {}
    for aspect, values in scores.per_aspect.items():
        order = np.argsort(-values, kind="stable")[:n]
        top[aspect] = [TopExample(int(i), float(values[i]), ws.train_records[i].prompt, ws.train_records[i].response)
                       for i in order]
    return top


def report(run: RunDir, ws: Workspace, evaluation: EvaluationRecord, scores: Scores, repairs: Repairs) -> Path:
    """``report.md``, ``report.json`` and the beta-sweep figure (always rewritten: they are cheap)."""
    from trustrepair.app.report import write_report

    cfg = run.config
    results = RunResults(config=cfg.to_json(), sizes=ws.sizes(cfg.trained_blocks, cfg.subset_size),
                         evaluation=evaluation, repairs=repairs, top_examples=top_examples(ws, scores),
                         timings_s=run.timings)
    run.publish(lambda: write_report(results, run.dir))
    return run.path(RunDir.REPORT)
