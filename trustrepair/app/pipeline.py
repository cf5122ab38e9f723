"""The end-to-end trust repair run behind ``trustrepair demo`` and the CLI stages.

Stages, each writing its result into the run directory and reusing it when it is already there (a
crash leaves every completed stage reusable; a changed configuration is refused, not mixed):

    sft       fine-tune the last ``trained_blocks`` blocks on the SFT split     -> sft/params.safetensors
    fit       EK-FAC factors on exactly those blocks' linear layers             -> factors/
    score     aggregated influence per aspect (query halves) + embeddings       -> scores.safetensors
    select    subsets per aspect and strategy (dpp, topk, random); one common   -> selection.json
              DPP subset for all aspects (sum of normalised scores, Table 2)
    repair    Newton step per subset, beta searched under the perplexity bound  -> repairs/*.safetensors
    evaluate  pre / post on every aspect; each repair on the aspect it targets  -> evaluation.json
              (the common repair on every aspect), query and held-out halves
    report    tables, plots, top detrimental examples                          -> report.md/.json, *.png

Only the last blocks are trained, analysed and repaired, so the hidden states entering them are the
same for the pre-SFT, post-SFT and repaired models: they are computed once per dataset and cached in
``cache/`` (see :mod:`trustrepair.app.prefix_cache`), and every later pass runs only the last blocks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trustrepair.app.settings import DemoConfig
from trustrepair.engine.storage import atomic_write, save_tensors, save_torch, write_json
from trustrepair.engine.distributed import fail_together, is_main_process, progress_enabled
from trustrepair.methods.metrics import perplexity, query_log_odds

logger = logging.getLogger(__name__)

class Run:
    """A run directory and the state its stages share (model, data, cached hidden states, timings)."""

    def __init__(self, out_dir: str | os.PathLike, config: DemoConfig, *, progress: bool = True):
        self.dir = Path(out_dir)
        self.config = config
        self.progress = progress_enabled(progress)
        self.timings: dict[str, float] = {}
        self._check_config()
        self._model = None

    # -- bookkeeping ---------------------------------------------------------------------------------
    @staticmethod
    def _publish(write) -> None:
        """Run a write into the run directory on rank 0 only. Under ``torchrun`` every rank computes the
        same stage result (fit and score share their work through the library); the other ranks wait
        here, and an error on rank 0 is raised on every rank."""
        with fail_together("writing the run directory"):
            if is_main_process():
                write()

    def _check_config(self) -> None:
        path = self.dir / "config.json"
        wanted = self.config.to_json()
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if changed:
                raise ValueError(
                    f"run directory {self.dir} was made with other settings {changed} (saved, requested); "
                    "use a new --out directory or delete that one")
        else:
            self._publish(lambda: write_json(path, wanted))
        timings = self.dir / "timings.json"
        if timings.is_file():
            self.timings = json.loads(timings.read_text())

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[stage] = round(time.perf_counter() - start, 2)
        self._publish(lambda: write_json(self.dir / "timings.json", self.timings))
        logger.info("%s: %.1f s", stage, self.timings[stage])

    # -- model and data ------------------------------------------------------------------------------
    def load(self) -> None:
        """Model, tokenizer, tokenised splits and the hidden states entering the trained blocks."""
        if self._model is not None:
            return
        from trustrepair.data import load_aspect, load_hh_sft
        from trustrepair.app.models import block_layer_names, freeze_all_but_last_blocks, load_causal_lm, transformer_blocks
        from trustrepair.app.prefix_cache import TailLM, TailTask, cache_prefix_hidden

        cfg = self.config
        with self.timed("load_model"):
            model, tokenizer = load_causal_lm(cfg.model)
            for p in model.parameters():
                p.requires_grad_(False)
        n_blocks = len(transformer_blocks(model))
        if cfg.trained_blocks > n_blocks:
            raise ValueError(f"trained_blocks={cfg.trained_blocks} but the model has {n_blocks} blocks")
        self.first_block = n_blocks - cfg.trained_blocks
        self.module_names = block_layer_names(model, cfg.trained_blocks)
        self.trained_params = freeze_all_but_last_blocks(model, cfg.trained_blocks)
        for p in model.parameters():
            p.requires_grad_(False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.task = TailTask()
        self.task.pad_token_id = int(pad)
        with self.timed("load_data"):
            sft = load_hh_sft(cfg.data_dir, max_examples=cfg.n_sft, seed=cfg.seed)
            train, heldout = sft.split(0.8, seed=cfg.seed)
            self.train_records, self.heldout_records = list(train), list(heldout)
            train_ex = train.tokenize(tokenizer, cfg.max_length)
            heldout_ex = heldout.tokenize(tokenizer, cfg.max_length)
            trust = {}
            self.trust_records = {}
            for aspect in cfg.aspects:
                query, held = load_aspect(aspect, cfg.data_dir, max_pairs=cfg.n_pairs, seed=cfg.seed).split(0.8, cfg.seed)
                trust[aspect] = (query.tokenize(tokenizer, cfg.max_length), held.tokenize(tokenizer, cfg.max_length))
                self.trust_records[aspect] = list(query)
        cache = self.dir / "cache" / "hidden.pt"
        with self.timed("cache_hidden_states"):
            if cache.is_file():
                hidden = torch.load(cache, weights_only=True)
            else:
                def prefix(examples, desc):
                    rows = cache_prefix_hidden(model, examples, self.first_block, batch_size=cfg.batch_size,
                                               pad_token_id=self.task.pad_token_id, progress=self.progress,
                                               desc=desc)
                    return [r["hidden"] for r in rows]

                hidden = {"train": prefix(train_ex, "hidden: sft train"),
                          "heldout": prefix(heldout_ex, "hidden: sft held-out")}
                for aspect, halves in trust.items():
                    for half_name, queries in zip(("query", "heldout"), halves):
                        flat = [q[side] for q in queries for side in ("proponent", "opponent")]
                        hidden[f"{aspect}/{half_name}"] = prefix(flat, f"hidden: {aspect} {half_name}")
                self._publish(lambda: save_torch(cache, hidden))

        def attach(examples, states):
            return [{**ex, "hidden": h} for ex, h in zip(examples, states)]

        def attach_queries(queries, states):
            it = iter(states)
            return [{side: {**q[side], "hidden": next(it)} for side in ("proponent", "opponent")} for q in queries]

        self.train = attach(train_ex, hidden["train"])
        self.heldout = attach(heldout_ex, hidden["heldout"])
        self.trust = {a: {"query": attach_queries(q, hidden[f"{a}/query"]),
                          "heldout": attach_queries(h, hidden[f"{a}/heldout"])} for a, (q, h) in trust.items()}
        self._model = model
        self.tail = TailLM(model, self.first_block)

    # -- measurements --------------------------------------------------------------------------------
    def perplexity(self) -> float:
        return perplexity(self.tail, self.heldout, task=self.task, batch_size=self.config.batch_size)

    def log_odds_pairs(self, aspect: str, half: str) -> list[float]:
        """Per trust pair of ``aspect``'s ``half``: log P(o|m) - log P(p|m), in the split's order."""
        return query_log_odds(self.tail, self.trust[aspect][half], task=self.task,
                              batch_size=self.config.batch_size).tolist()

    def log_odds(self, aspect: str, half: str) -> float:
        values = self.log_odds_pairs(aspect, half)
        return sum(values) / len(values)

    def evaluation(self, aspects: Sequence[str] | None = None) -> dict:
        """Both halves of ``aspects`` (default: all) and the held-out perplexity, for the model as it is."""
        return {"aspects": {a: {half: self.log_odds(a, half) for half in ("query", "heldout")}
                            for a in (aspects or self.config.aspects)},
                "perplexity": self.perplexity()}

    # -- stages --------------------------------------------------------------------------------------
    def stage_sft(self) -> dict:
        """Fine-tune the last blocks (loading them instead when already trained); evaluate pre and post."""
        from safetensors.torch import load_file

        from trustrepair.app.sft import supervised_finetune

        self.load()
        path = self.dir / "sft" / "params.safetensors"
        evals_path = self.dir / "sft" / "evaluations.json"
        params = dict(self._model.named_parameters())
        if path.is_file() and evals_path.is_file():
            with torch.no_grad():
                for name, value in load_file(str(path)).items():
                    params[name].copy_(value)
            return json.loads(evals_path.read_text())
        with self.timed("evaluate_pre"):
            pre = self.evaluation()
        with self.timed("sft"):
            for name in self.trained_params:
                params[name].requires_grad_(True)
            _, history = supervised_finetune(self.tail, self.train, task=self.task, epochs=self.config.sft_epochs,
                                             lr=self.config.sft_lr, batch_size=self.config.batch_size, grad_accum=1,
                                             trainable=self.config.trained_blocks, seed=self.config.seed,
                                             progress=self.progress)
            for name in self.trained_params:
                params[name].requires_grad_(False)
        with self.timed("evaluate_post"):
            post = self.evaluation()
        evals = {"pre": pre, "post": post, "sft_epoch_loss": [float(x) for x in history.epoch_losses]}

        def save_sft():
            save_tensors(path, {n: params[n] for n in self.trained_params})
            write_json(evals_path, evals)

        self._publish(save_sft)
        return evals

    def stage_fit(self):
        from trustrepair.engine.ekfac import EKFACFactors, fit_ekfac

        self.stage_sft()
        path = self.dir / "factors"
        if (path / "factors.json").is_file():
            return EKFACFactors.load(path)
        with self.timed("fit_ekfac"):
            factors = fit_ekfac(self.tail, self.train, modules=self._tail_module_names(), task=self.task,
                                fisher=self.config.fisher, batch_size=self.config.batch_size,
                                progress=self.progress, checkpoint_dir=self.dir / "factors.partial")
        factors.save(path)
        self._publish(lambda: shutil.rmtree(self.dir / "factors.partial", ignore_errors=True))
        return factors

    def _tail_module_names(self) -> list[str]:
        """The analysed layers' names inside :class:`TailLM` (``body.layers.{i - first_block}...``)."""
        tail_names = {id(m): n for n, m in self.tail.named_modules()}
        model_modules = dict(self._model.named_modules())
        return [tail_names[id(model_modules[name])] for name in self.module_names]

    def stage_score(self) -> dict[str, np.ndarray]:
        """Aggregated influence of every SFT train example on every aspect (query halves) + embeddings."""
        from safetensors.numpy import load_file, save_file

        from trustrepair.methods.scoring import influence

        factors = self.stage_fit()
        path = self.dir / "scores.safetensors"
        if path.is_file():
            return load_file(str(path))
        with self.timed("score"):
            trust = {a: self.trust[a]["query"] for a in self.config.aspects}
            scores = influence(self.tail, factors, self.train, trust, damping=self.config.damping,
                               task=self.task, batch_size=self.config.batch_size, progress=self.progress)
            out = {f"score/{a}": scores[a].double().cpu().numpy() for a in self.config.aspects}
        with self.timed("embeddings"):
            out["embeddings"] = self.response_embeddings(self.train)
        self._publish(lambda: atomic_write(path, lambda tmp: save_file(out, str(tmp))))
        return out

    @torch.no_grad()
    def response_embeddings(self, examples: Sequence[dict]) -> np.ndarray:
        """(N, H) float32: final hidden state averaged over each example's response tokens (Eq. 7)."""
        rows = []
        for start in range(0, len(examples), self.config.batch_size):
            batch = self.task.collate(examples[start:start + self.config.batch_size])
            hidden = self.task.final_hidden(self.tail, batch)
            mask = (batch["labels"] != -100).to(hidden.dtype).unsqueeze(-1)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
        return torch.cat(rows).float().cpu().numpy()

    def stage_select(self) -> dict:
        from trustrepair.methods.selection import STRATEGIES, common_scores, select

        scores = self.stage_score()
        path = self.dir / "selection.json"
        if path.is_file():
            return json.loads(path.read_text())
        cfg = self.config
        per_aspect = {a: scores[f"score/{a}"] for a in cfg.aspects}
        targets = dict(per_aspect)
        if len(cfg.aspects) > 1:
            targets["common"] = common_scores(per_aspect)
        selection = {}
        with self.timed("select"):
            for target, values in targets.items():
                strategies = ("dpp",) if target == "common" else STRATEGIES
                selection[target] = {
                    strategy: [int(i) for i in select(strategy, values, cfg.subset_size,
                                                      embeddings=scores["embeddings"], eta=cfg.eta,
                                                      seed=cfg.seed)]
                    for strategy in strategies}
        self._publish(lambda: write_json(path, selection))
        return selection

    def _objective(self, target: str, post_eval: dict):
        """Query-half objective of a repair target, as ``(measure(model), post-SFT value)``: the aspect's
        log-odds, or for ``common`` the sum of every aspect's log-odds divided by its post-SFT magnitude
        (so each aspect weighs the same)."""
        aspects = self.config.aspects if target == "common" else (target,)
        post = {a: post_eval["aspects"][a]["query"] for a in aspects}
        scale = {a: max(abs(v), 1e-6) if target == "common" else 1.0 for a, v in post.items()}

        def measure(_model):
            return sum(self.log_odds(a, "query") / scale[a] for a in aspects)

        return measure, sum(post[a] / scale[a] for a in aspects)

    def _traced(self, target: str, strategy: str) -> bool:
        """Whether a beta search measures the objective at every probe: Figure 2 (the sweep with and
        without DPP) draws the DPP and top-k searches of ``figure_target`` (default: the first aspect)."""
        return target == (self.config.figure_target or self.config.aspects[0]) and strategy in ("dpp", "topk")

    def stage_repair(self) -> dict:
        """For every target and strategy: the Newton direction, the beta search, the saved delta."""
        from trustrepair.methods.repair_step import BetaPoint, RepairDelta, newton_direction, search_beta

        selection = self.stage_select()
        factors = self.stage_fit()
        evals = self.stage_sft()
        path = self.dir / "repairs.json"
        if path.is_file():
            return json.loads(path.read_text())
        results = {}
        post = evals["post"]
        with self.timed("repair"):
            for target, by_strategy in selection.items():
                measure, post_objective = self._objective(target, post)
                baseline = BetaPoint(0.0, post_objective, post["perplexity"])
                results[target] = {}
                for strategy, subset in by_strategy.items():
                    direction = newton_direction(self.tail, factors, self.train, subset, task=self.task,
                                                 damping=self.config.damping, batch_size=self.config.batch_size,
                                                 progress=self.progress)
                    beta0 = self._initial_beta(direction)
                    best, points, base = search_beta(direction.scaled, self.tail, lambda _m: self.perplexity(),
                                                     measure, tolerance=self.config.tolerance, beta0=beta0,
                                                     max_probes=self.config.beta_probes, baseline=baseline,
                                                     trace_metric=self._traced(target, strategy),
                                                     progress=self.progress)
                    delta: RepairDelta = direction.scaled(best.beta)
                    delta.metadata.update(target=target, strategy=strategy, beta=best.beta)
                    self._publish(lambda: delta.save(self.dir / "repairs" / f"{target}_{strategy}.safetensors"))
                    results[target][strategy] = {
                        "beta": best.beta, "subset": subset, "metric": best.metric, "perplexity": best.perplexity,
                        "points": [dataclasses.asdict(p) for p in [base] + points]}
        self._publish(lambda: write_json(path, results))
        return results

    def _initial_beta(self, direction) -> float:
        """The beta at which the step's norm is 1e-3 of the analysed weights' norm: a first probe that is
        in the quadratic regime of the perplexity yet large enough to measure its rise."""
        modules = dict(self.tail.named_modules())
        weight_sq = sum(float(modules[n].weight.detach().double().pow(2).sum()) for n in direction.deltas)
        step_sq = sum(float(d.double().pow(2).sum()) for d in direction.deltas.values())
        return 1e-3 * (weight_sq / max(step_sq, 1e-300)) ** 0.5

    def stage_evaluate(self) -> dict:
        from trustrepair.methods.repair_step import RepairDelta

        repairs = self.stage_repair()
        evals = self.stage_sft()
        path = self.dir / "evaluation.json"
        if path.is_file():
            return json.loads(path.read_text())
        repaired = {}
        with self.timed("evaluate_repaired"):
            post_pairs = {a: self.log_odds_pairs(a, "heldout") for a in self.config.aspects}
            for target, by_strategy in repairs.items():
                repaired[target] = {}
                for strategy, record in by_strategy.items():
                    delta = RepairDelta.load(self.dir / "repairs" / f"{target}_{strategy}.safetensors")
                    delta.apply(self.tail)
                    try:
                        repaired[target][strategy] = self._repaired_evaluation(target, record)
                    finally:
                        delta.revert(self.tail)
        result = {"pre": evals["pre"], "post": evals["post"], "repaired": repaired, "post_heldout_pairs": post_pairs}
        self._publish(lambda: write_json(path, result))
        return result

    def _repaired_evaluation(self, target: str, record: dict) -> dict:
        """:meth:`evaluation` of the model with ``target``'s repair applied, plus the held-out values per
        pair (``heldout_pairs``, for standard errors), reusing what its beta search already measured at
        the chosen beta (the perplexity; for a single aspect its query-half log-odds, which is that
        target's objective)."""
        aspects = self.config.aspects if target == "common" else (target,)
        out = {}
        for a in aspects:
            pairs = self.log_odds_pairs(a, "heldout")
            out[a] = {"query": record["metric"] if target != "common" else self.log_odds(a, "query"),
                      "heldout": sum(pairs) / len(pairs), "heldout_pairs": pairs}
        return {"aspects": out, "perplexity": record["perplexity"]}

    def stage_report(self) -> Path:
        from trustrepair.app.report import write_report

        evaluation = self.stage_evaluate()
        scores = self.stage_score()
        top = {}
        for aspect in self.config.aspects:
            values = scores[f"score/{aspect}"]
            order = np.argsort(-values, kind="stable")[:10]
            top[aspect] = [{"index": int(i), "score": float(values[i]),
                            "prompt": self.train_records[i].prompt, "response": self.train_records[i].response}
                           for i in order]
        results = {
            "config": self.config.to_json(),
            "sizes": self.sizes(),
            "evaluation": evaluation,
            "repairs": json.loads((self.dir / "repairs.json").read_text()),
            "top_examples": top,
            "timings_s": self.timings,
        }
        self._publish(lambda: write_report(results, self.dir))
        return self.dir / "report.md"

    def sizes(self) -> dict:
        self.load()
        return {"sft_train": len(self.train), "sft_heldout": len(self.heldout),
                "sft_train_tokens": int(sum(len(e["input_ids"]) for e in self.train)),
                "trained_blocks": self.config.trained_blocks, "first_block": self.first_block,
                "analysed_modules": len(self.module_names),
                "aspects": {a: {h: len(v) for h, v in halves.items()} for a, halves in self.trust.items()},
                "subset_size": self.config.subset_size}


def run_demo(out_dir: str | os.PathLike = "runs/demo", config: DemoConfig | None = None, *,
             progress: bool = True) -> Path:
    """Every stage in order, reusing completed ones; returns the path of ``report.md``."""
    run = Run(out_dir, config or DemoConfig(), progress=progress)
    start = time.perf_counter()
    report = run.stage_report()
    logger.info("demo finished in %.1f s; report at %s", time.perf_counter() - start, report)
    return report
