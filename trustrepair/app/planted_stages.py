"""The stages a planted demo seed adds to the demo's (:mod:`trustrepair.app.stages`), one function each.

    gold      the counterfactual retrains: the same SFT from the same pre-SFT weights without one aspect's
              planted examples (one per aspect) and without any; per-pair log-odds on both halves,
              perplexity and the retrain's seconds                                         -> gold.json
    ranking   how well each attribution ranks every aspect's planted examples: EK-FAC influence read back
              from ``scores.jsonl`` (the file a user with their own planted set reads), raw and divided by
              the root of the example's self-influence (``ekfac_normalized``, RelatIF), gradient dot and
              cosine (:mod:`trustrepair.methods.baselines`), TF-IDF text similarity
              (:mod:`trustrepair.methods.text_similarity`) and random; precision at k, recall at 2k, rank
              AUC, and how many of the other aspects' planted examples each top k holds     -> ranking.json

Every output is written atomically and read back instead of recomputed on a rerun.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np
import torch

from trustrepair.app.records import HALVES, SFTResult
from trustrepair.app.rundir import RunDir
from trustrepair.app.workspace import Workspace
from trustrepair.engine.storage import read_json, write_json, write_text

GOLD = "gold.json"
RANKING = "ranking.json"
SCORES_JSONL = "scores.jsonl"
WITHOUT_ALL = "all"
"""The key of the gold retrain without any planted example."""
RANKING_METHODS = ("ekfac", "ekfac_normalized", "gradient_dot", "gradient_cosine", "text", "random")
EKFAC_METHODS = ("ekfac", "ekfac_normalized")  # the rest are the baselines


def planted_by_aspect(planted: dict[int, str], aspects: Sequence[str]) -> dict[str, list[int]]:
    """aspect -> the sorted indices of its planted examples."""
    return {a: sorted(i for i, b in planted.items() if b == a) for a in aspects}


def gold(run: RunDir, ws: Workspace, planted: dict[int, str], pre_sft: dict[str, torch.Tensor],
         sft_result: SFTResult) -> dict:
    """``{aspect or "all": {"sft_s", "n_train", "perplexity", "aspects": {aspect: {half: [per-pair log-odds]}}},
    "post": {...}}``: each gold model trained with the demo's SFT settings from ``pre_sft`` (the trained
    parameters before fine-tuning) and measured on the aspect it concerns (every aspect for ``"all"``),
    then the post-SFT parameters restored."""
    from trustrepair.app.sft import supervised_finetune
    from trustrepair.app.stages import restore_post_sft

    cfg = run.config
    path = run.path(GOLD)
    if path.is_file():
        return read_json(path)
    params = dict(ws.model.named_parameters())
    out = {}
    with run.timed("gold_retrains"):
        for dropped in (*cfg.aspects, WITHOUT_ALL):
            drop = set(cfg.aspects) if dropped == WITHOUT_ALL else {dropped}
            examples = [e for i, e in enumerate(ws.train) if planted.get(i) not in drop]
            with torch.no_grad():
                for name, value in pre_sft.items():
                    params[name].copy_(value)
            for name in ws.trained_params:
                params[name].requires_grad_(True)
            start = time.perf_counter()
            try:
                supervised_finetune(ws.tail, examples, task=ws.task, epochs=cfg.sft_epochs, lr=cfg.sft_lr,
                                    batch_size=cfg.batch_size, grad_accum=1, trainable=cfg.trained_blocks,
                                    seed=cfg.seed, progress=run.progress)
            finally:
                for name in ws.trained_params:
                    params[name].requires_grad_(False)
            seconds = time.perf_counter() - start
            measured = cfg.aspects if dropped == WITHOUT_ALL else (dropped,)
            out[dropped] = {"sft_s": seconds, "n_train": len(examples), "perplexity": ws.perplexity(),
                            "aspects": {a: {h: ws.log_odds_pairs(a, h) for h in HALVES} for a in measured}}
    restore_post_sft(run, ws)
    out["post"] = {"aspects": {a: {h: ws.log_odds_pairs(a, h) for h in HALVES} for a in cfg.aspects},
                   "perplexity": sft_result.post.perplexity}
    run.publish(lambda: write_json(path, out))
    return out


def write_scores_jsonl(run: RunDir, prepared, per_aspect: dict[str, np.ndarray],
                       self_influence: np.ndarray | None = None) -> None:
    """``scores.jsonl`` of the seed, as ``trustrepair attribute`` writes it (:func:`~trustrepair.app.workflow.scores_jsonl`),
    plus each example's ``self_influence``."""
    from trustrepair.app.workflow import scores_jsonl

    path = run.path(SCORES_JSONL)
    if not path.is_file():
        text = scores_jsonl(prepared, per_aspect, self_influence)
        run.publish(lambda: write_text(path, text))


def read_scores_jsonl(run: RunDir, aspects: Sequence[str]) -> dict[str, np.ndarray]:
    """aspect -> (N,) scores in training order, from ``scores.jsonl``, plus ``"self_influence"`` when the
    file has it."""
    rows = [json.loads(line) for line in run.path(SCORES_JSONL).read_text().splitlines() if line.strip()]
    keys = [*aspects, *(["self_influence"] if rows and "self_influence" in rows[0] else [])]
    return {key: np.array([row[key] for row in rows], dtype=np.float64) for key in keys}


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[:k]


def ranking(run: RunDir, ws: Workspace, planted: dict[int, str]) -> dict:
    """``{aspect: {method: {"precision_at_k", "recall_at_2k", "auc", "other_planted_in_top_k": {aspect: n}}}}``
    plus ``"seconds": {method: s}`` (module docstring; EK-FAC's seconds are the fit and score stages')."""
    from trustrepair.methods.baselines import gradient_similarity
    from trustrepair.methods.ground_truth import ranking_metrics
    from trustrepair.methods.scoring import normalized_influence
    from trustrepair.methods.text_similarity import text_similarity

    cfg = run.config
    path = run.path(RANKING)
    if path.is_file():
        return read_json(path)
    queries = {a: ws.trust[a]["query"] for a in cfg.aspects}
    seconds = {"ekfac": run.timings.get("fit_ekfac", 0.0) + run.timings.get("score", 0.0)}
    start = time.perf_counter()
    gradients = gradient_similarity(ws.tail, ws.train, queries, modules=ws.tail_module_names(), task=ws.task,
                                    batch_size=cfg.batch_size, progress=run.progress)
    seconds["gradient_dot"] = seconds["gradient_cosine"] = time.perf_counter() - start
    start = time.perf_counter()
    split_rows = {a: [json.loads(line) for line in (run.path("splits") / f"{a}.query.jsonl").read_text().splitlines()]
                  for a in cfg.aspects}
    text = text_similarity([r.prompt + r.response for r in ws.train_records],
                           {a: [row["prompt"] + " " + row["opponent"] for row in rows] for a, rows in split_rows.items()})
    seconds["text"] = time.perf_counter() - start
    rng = np.random.default_rng(cfg.seed)
    ekfac = read_scores_jsonl(run, cfg.aspects)
    labelled = planted_by_aspect(planted, cfg.aspects)
    out = {"seconds": seconds}
    for aspect in cfg.aspects:
        normalized = {} if "self_influence" not in ekfac else {"ekfac_normalized": normalized_influence(
            torch.from_numpy(ekfac[aspect]), torch.from_numpy(ekfac["self_influence"])).numpy()}
        methods = {"ekfac": ekfac[aspect], **normalized,
                   "gradient_dot": gradients["gradient_dot"][aspect].double().numpy(),
                   "gradient_cosine": gradients["gradient_cosine"][aspect].double().numpy(), "text": text[aspect],
                   "random": rng.random(len(ws.train))}
        k = len(labelled[aspect])
        out[aspect] = {}
        for method, values in methods.items():
            top = _top_k(values, k)
            out[aspect][method] = {**ranking_metrics(values, labelled[aspect]), "other_planted_in_top_k": {
                b: int(sum(planted.get(int(i)) == b for i in top)) for b in cfg.aspects if b != aspect}}
    run.publish(lambda: write_json(path, out))
    return out
