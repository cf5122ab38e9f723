"""A user's own model and data: ``trustrepair attribute``, then ``repair``, then ``report``.

    attribute   EK-FAC factors of the chosen layers on the training examples, the influence of every
                example on every aspect (query parts), the DPP embeddings     -> factors/, scores.jsonl
    repair      one subset (dpp / topk / random) for one target (an aspect or ``common``), the Newton step
                with its size searched under the perplexity tolerance, the input and repaired model
                evaluated on both parts of every aspect; optionally the repaired model saved as a
                complete Hugging Face directory                                -> repair.json, repair/delta.safetensors
    report      report.md / report.json / beta_sweep.png of the last repair

Run directory (``--out``), besides ``attribute.json`` (the settings) and ``timings.json``:

    splits/<aspect>.query.jsonl, splits/<aspect>.heldout.jsonl   the trust pairs as the model sees them
    splits/perplexity.jsonl       the examples perplexity is measured on, when held out of the training data
    cache/hidden.pt               hidden states entering the first analysed block (prefix cache, if used)
    factors/                      :class:`~trustrepair.engine.ekfac.EKFACFactors`
    scores.partial/chunk-*.safetensors   scores of each chunk of ``score_chunk`` examples (removed at the end)
    scores.safetensors            the scores per aspect and the embeddings (what ``repair`` reads)
    scores.jsonl                  one line per analysed training example, in input order:
                                  {"index", "source", "<aspect>": score, "<aspect>_rank": r, ...,
                                  "self_influence": sigma (with selection_scores = normalized)}
    base.json                     the ``--base-model``'s log-odds and perplexity (with --base-model)
    repair/delta.safetensors, repair.json   the last repair (a :class:`RepairDelta` and its record)

Scores: gamma(z) = -grad F^T (G + lambda I)^-1 grad L(z) in nats of the aspect's log-odds per unit step,
**positive = detrimental** (raising the example's loss is predicted to lower, i.e. improve, F); rank 1 is
the most detrimental example. ``index`` is the example's position in the ``--train`` files (in the
order given); examples held out for perplexity have no line. ``self_influence`` is
sigma(z) = grad L(z)^T (G + lambda I)^-1 grad L(z); with ``selection_scores = "normalized"`` (the
default) ``repair`` chooses its subsets by gamma(z) / sqrt(sigma(z)) (RelatIF), the ranks stay those of
gamma.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trustrepair.app import stages
from trustrepair.app.records import COMMON, HALVES, AspectLogOdds, Evaluation, RepairRecord, Scores
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import AttributeConfig, RepairOptions, as_written
from trustrepair.app.inputs import PreparedRun
from trustrepair.app.user_workspace import load_model, load_user_workspace
from trustrepair.engine.storage import read_json, write_json, write_text

logger = logging.getLogger(__name__)

SCORES_JSONL = Path("scores.jsonl")
BASE = Path("base.json")
REPAIR_RECORD = Path("repair.json")
REPAIR_DELTA = Path("repair") / "delta.safetensors"


def open_run(out_dir, cfg: AttributeConfig, *, progress: bool = True) -> RunDir:
    """The attribute run directory ``out_dir`` with settings ``cfg`` (``attribute.json``); while it holds no
    result, new settings replace the saved ones (a run that stopped on bad input can be corrected)."""
    return RunDir(out_dir, cfg, progress=progress, settings_file=RunDir.ATTRIBUTE_SETTINGS)


def load_settings(out_dir) -> AttributeConfig:
    """The settings an attribute run was made with.

    Raises:
        FileNotFoundError: ``out_dir`` holds no attribute run.
    """
    path = Path(out_dir) / RunDir.ATTRIBUTE_SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no attribute run ({path.name} is missing); run "
                                f"`trustrepair attribute --model DIR --train FILE --out {out_dir}` first")
    return read_json(path, lambda saved: AttributeConfig(**as_written(saved, AttributeConfig)))


# -- attribute -----------------------------------------------------------------------------------------

def _ranks(values: np.ndarray) -> np.ndarray:
    """1 for the highest (most detrimental) score; ties by input order."""
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
    return ranks


def scores_jsonl(inputs: PreparedRun, per_aspect: dict[str, np.ndarray], self_influence: np.ndarray | None = None) -> str:
    """The text of ``scores.jsonl`` (module docstring), with a ``self_influence`` field per row when given."""
    ranks = {a: _ranks(v) for a, v in per_aspect.items()}
    lines = []
    for i, (index, source) in enumerate(zip(inputs.train_index, inputs.train_sources)):
        row = {"index": index, "source": source}
        for aspect, values in per_aspect.items():
            row[aspect] = float(values[i])
            row[f"{aspect}_rank"] = int(ranks[aspect][i])
        if self_influence is not None:
            row["self_influence"] = float(self_influence[i])
        lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def _evaluate_base(run: RunDir, cfg: AttributeConfig, inputs: PreparedRun) -> None:
    """The base model's log-odds on both parts of every aspect and its perplexity (``base.json``), run in
    full on the fine-tuned model's tokenisation."""
    from trustrepair.methods.metrics import perplexity, query_log_odds
    from trustrepair.task import CausalLMTask

    if cfg.base_model is None or run.path(BASE).is_file():
        return
    ws = inputs.workspace
    device = next(ws.model.parameters()).device
    with run.timed("evaluate_base"):
        base, _ = load_model(cfg.base_model, device, cfg.dtype, option="--base-model")
        task = CausalLMTask()
        task.pad_token_id = ws.task.pad_token_id
        strip = lambda ex: {k: v for k, v in ex.items() if k != "hidden"}  # noqa: E731
        aspects = {}
        for aspect in inputs.aspects:
            halves = {h: [{s: strip(q[s]) for s in ("proponent", "opponent")} for q in ws.trust[aspect][h]]
                      for h in HALVES}
            values = {h: query_log_odds(base, halves[h], task=task, batch_size=cfg.batch_size).tolist() for h in HALVES}
            aspects[aspect] = AspectLogOdds(float(np.mean(values["query"])), float(np.mean(values["heldout"])),
                                            values["heldout"])
        result = Evaluation(aspects, perplexity(base, [strip(e) for e in ws.heldout], task=task,
                                                batch_size=cfg.batch_size))
    run.publish(lambda: write_json(run.path(BASE), result.to_json()))


def attribute(run: RunDir) -> Path:
    """Factors, chunked scores, embeddings, ``scores.jsonl`` (and ``base.json``); returns the path of
    ``scores.jsonl``. Completed parts are read back, so a rerun after a crash resumes."""
    cfg = run.config
    inputs = load_user_workspace(run, cfg)
    factors = stages.fit(run, inputs.workspace)
    scores = stages.score(run, inputs.workspace, factors, inputs.aspects, chunk=cfg.score_chunk,
                          with_self_influence=cfg.selection_scores == "normalized")

    run.publish(lambda: write_text(run.path(SCORES_JSONL), scores_jsonl(inputs, scores.per_aspect,
                                                                        scores.self_influence)))
    _evaluate_base(run, cfg, inputs)
    return run.path(SCORES_JSONL)


def _read_scores(run: RunDir, aspects: list[str]) -> Scores:
    return stages.read_scores(run.path(RunDir.SCORES), aspects)


# -- repair --------------------------------------------------------------------------------------------

@dataclass
class RepairResult:
    """One repair of an attribute run (``repair.json``): its options, the target, the record of its
    beta search, the input and repaired model's evaluation (held-out values per pair included), and
    where the repaired model was saved (None when it was not)."""

    options: dict
    target: str
    record: RepairRecord
    input: Evaluation
    repaired: Evaluation
    saved_model: str | None

    def to_json(self) -> dict:
        return {"options": self.options, "target": self.target, "record": self.record.to_json(),
                "input": self.input.to_json(), "repaired": self.repaired.to_json(), "saved_model": self.saved_model}

    @classmethod
    def from_json(cls, data: dict) -> "RepairResult":
        return cls(data["options"], data["target"], RepairRecord.from_json(data["record"]),
                   Evaluation.from_json(data["input"]), Evaluation.from_json(data["repaired"]), data["saved_model"])


def resolve_target(options: RepairOptions, aspects: list[str]) -> str:
    """The repair target: ``options.target``, or by default ``common`` with several aspects.

    Raises:
        ValueError: a target that is neither an aspect of the run nor ``common``.
    """
    targets = [*aspects, COMMON] if len(aspects) > 1 else list(aspects)
    target = options.target or targets[-1]
    if target not in targets:
        raise ValueError(f"--target {target!r} is not one of this run's repair targets {targets}")
    return target


def check_save_path(save_model: Path, model_dir: str) -> Path:
    """Refuse a ``--save-model`` that is (or lies inside, or contains) the input model, or exists.

    Raises:
        ValueError / FileExistsError: naming the path.
    """
    target, source = save_model.resolve(), Path(model_dir).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ValueError(f"--save-model {save_model} would write into the input model {model_dir}, which is never "
                         "overwritten; choose a new directory")
    if target.exists():
        raise FileExistsError(f"--save-model {save_model} already exists; choose a new directory or delete it")
    return target


def _evaluation(ws, aspects: list[str]) -> Evaluation:
    out = {}
    for aspect in aspects:
        pairs = ws.log_odds_pairs(aspect, "heldout")
        out[aspect] = AspectLogOdds(ws.log_odds(aspect, "query"), float(np.mean(pairs)), pairs)
    return Evaluation(out, ws.perplexity())


def repair(run: RunDir, options: RepairOptions, save_model: Path | None = None) -> Path:
    """Select, step, search beta, evaluate and (optionally) save the repaired model; returns ``repair.json``."""
    from trustrepair.app.models import save_causal_lm
    from trustrepair.engine.ekfac import EKFACFactors
    from trustrepair.methods.repair_step import BetaPoint
    from trustrepair.methods.selection import common_scores, select

    cfg = run.config
    if save_model is not None:
        save_model = check_save_path(Path(save_model), cfg.model)
    if not run.path(RunDir.SCORES).is_file() or not (run.path(RunDir.FACTORS) / "factors.json").is_file():
        raise FileNotFoundError(f"{run.dir} has no completed attribution (factors and scores); rerun `trustrepair "
                                f"attribute --out {run.dir}` to finish it")
    inputs = load_user_workspace(run, cfg)
    ws = inputs.workspace
    target = resolve_target(options, inputs.aspects)
    factors = EKFACFactors.load(run.path(RunDir.FACTORS))
    scores = _read_scores(run, inputs.aspects)
    chosen_by = scores.for_selection(cfg.selection_scores)
    values = common_scores(chosen_by) if target == COMMON else chosen_by[target]
    with run.timed("repair"):
        subset = [int(i) for i in select(options.strategy, values, options.subset_size, embeddings=scores.embeddings,
                                         eta=options.eta, seed=cfg.seed)]
        before = _evaluation(ws, inputs.aspects)
        measure, start = stages.objective(inputs.aspects, ws, target, before)
        delta, record = stages.repair_subset(ws, factors, subset, measure, BetaPoint(0.0, start, before.perplexity),
                                             damping=cfg.damping, tolerance=options.tolerance,
                                             max_probes=options.beta_probes, trace_metric=True, target=target,
                                             strategy=options.strategy)
        delta.apply(ws.tail)
        try:
            after = _evaluation(ws, inputs.aspects)
            if save_model is not None:
                with run.timed("save_model"):
                    run.publish(lambda: save_causal_lm(ws.model, inputs.tokenizer, save_model, metadata={
                        "repaired_from": cfg.model, "run": str(run.dir.resolve()), "target": target,
                        "strategy": options.strategy, "beta": record.beta, "subset": subset}))
        finally:
            delta.revert(ws.tail)
    result = RepairResult(options.to_json(), target, record, before, after,
                          None if save_model is None else str(save_model))

    def save():
        delta.save(run.path(REPAIR_DELTA))
        write_json(run.path(REPAIR_RECORD), result.to_json())

    run.publish(save)
    return run.path(REPAIR_RECORD)


def read_repair(run_dir) -> RepairResult:
    path = Path(run_dir) / REPAIR_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no repair yet ({path.name} is missing); run `trustrepair repair "
                                f"--out {run_dir}` first")
    return read_json(path, RepairResult.from_json)
