"""kronfluence 1.0.1's EK-FAC on this repository's causal-LM tasks: the anchor the benchmarks (and
tests/engine/test_kronfluence_agreement.py) compare trustrepair with.

:class:`KronfluenceAnchor` fits kronfluence's factors on a model and data and scores queries against the
training examples, one :class:`benchmarks.common.Timing` per phase. Scores are in kronfluence's sign
(negative = detrimental). The measurement runs the model twice (opponent, proponent), so
``has_shared_parameters=True``: kronfluence takes one row per query and silently mis-scores the two-pass
form without it. Damping: ``damping_factor=None``, kronfluence's 0.1 x mean(Lambda), the same as
trustrepair's default (kronfluence's own default is an absolute 1e-8: the first GPU run used it by
mistake and got Spearman 0.83 against our scores).
"""
from __future__ import annotations

import copy
import tempfile

import torch

from benchmarks.common import Timing, matmul_precision, timed
from trustrepair.task import IGNORE_INDEX, pad_batch, sequence_log_probs

FIT_PHASES = ("covariance", "eigendecomposition", "lambda")


class KronfluenceAnchor:
    """kronfluence's EK-FAC on ``model`` (deep-copied: kronfluence wraps the modules in place), its factors
    kept on disk between phases: :meth:`fit`, then :meth:`pairwise` (one score per query and training
    example) or :meth:`pairwise` with ``aggregate=True`` (all queries' gradients summed first). Products in
    exact float32 (``matmul_precision("highest")``); ``dtype`` sets every kronfluence accumulation dtype
    (its defaults are float32 too). ``modules``: the tracked layers' names (default: trustrepair's
    ``find_modules``). Call :meth:`cleanup` (or use it as a context manager) to delete the factors."""

    def __init__(self, model, train, queries, batch_size: int, *, modules=None, fisher: str = "empirical",
                 damping: float | None = None, dtype: torch.dtype = torch.float32, output_dir=None,
                 labelled_logits_only: bool = False):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        from trustrepair.engine.layers import find_modules

        modules = list(modules) if modules is not None else [layer.name for layer in find_modules(model)]
        self.train_rows, self.query_rows = kronfluence_rows(train, queries)
        self.batch_size, self.damping, self.dtype = batch_size, damping, dtype
        self.device = next(model.parameters()).device
        self.factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical",
                                           has_shared_parameters=True, activation_covariance_dtype=dtype,
                                           gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
                                           lambda_dtype=dtype)
        self.tmp = tempfile.TemporaryDirectory()
        task = kronfluence_task(modules, labelled_logits_only)
        self.analyzer = Analyzer("anchor", prepare_model(copy.deepcopy(model), task),
                                 task, cpu=self.device.type == "cpu", disable_tqdm=True,
                                 output_dir=output_dir or self.tmp.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self) -> None:
        self.tmp.cleanup()

    def fit(self) -> dict[str, Timing]:
        """Covariances, eigendecomposition and Lambda: phase -> its timing (:data:`FIT_PHASES`)."""
        common = dict(factors_name="ekfac", factor_args=self.factor_args, overwrite_output_dir=True)
        data = dict(dataset=self.train_rows, per_device_batch_size=self.batch_size)
        calls = {"covariance": lambda: self.analyzer.fit_covariance_matrices(**data, **common),
                 "eigendecomposition": lambda: self.analyzer.perform_eigendecomposition(**common),
                 "lambda": lambda: self.analyzer.fit_lambda_matrices(**data, **common)}
        with matmul_precision("highest"):
            return {phase: timed(calls[phase], self.device) for phase in FIT_PHASES}

    def pairwise(self, aggregate: bool = False) -> Timing:
        """Scores (n_query, n_train), or (1, n_train) with ``aggregate``, as the timing's ``value`` (in
        ``dtype``, on the CPU)."""
        from kronfluence.arguments import ScoreArguments

        name = "aggregated" if aggregate else "pairwise"
        dtype = self.dtype
        score_args = ScoreArguments(aggregate_query_gradients=aggregate, damping_factor=self.damping,
                                    per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
        with matmul_precision("highest"):
            timing = timed(lambda: self.analyzer.compute_pairwise_scores(
                scores_name=name, factors_name="ekfac", query_dataset=self.query_rows,
                train_dataset=self.train_rows, per_device_query_batch_size=len(self.query_rows),
                per_device_train_batch_size=self.batch_size, score_args=score_args, overwrite_output_dir=True),
                self.device)
        timing.value = self.analyzer.load_pairwise_scores(name)["all_modules"].cpu().clone()
        return timing


def kronfluence_task(modules, labelled_logits_only: bool = False):
    """A kronfluence ``Task`` for this repository's causal-LM conventions (summed token losses; the trust
    measurement log P(o|m) - log P(p|m) summed over the batch), tracking ``modules``. The measurement runs
    the model twice (opponent, proponent), so kronfluence needs ``has_shared_parameters=True`` (without
    it, it silently mis-scores). By default the logits are the model's at every position, as a kronfluence
    user writes the task; ``labelled_logits_only=True`` computes the losses with trustrepair's
    :class:`CausalLMTask` instead (LM head at the labelled positions only), the same values with less work."""
    from kronfluence.task import Task as KronfluenceTask

    from trustrepair.task import CausalLMTask

    labelled = CausalLMTask()

    def log_probs(model, batch, prefix="", sample=False):
        batch = {key: batch[prefix + key] for key in ("input_ids", "attention_mask", "labels")}
        if labelled_logits_only:
            return -labelled.train_loss(model, batch, sample=sample)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:2])
            labels = labels.clone()
            labels[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, drawn, labels[:, 1:])
        return sequence_log_probs(logits, labels)

    class LMTask(KronfluenceTask):
        def compute_train_loss(self, batch, model, sample=False):
            return -log_probs(model, batch, sample=sample).sum()

        def compute_measurement(self, batch, model):
            return (log_probs(model, batch, "opponent_") - log_probs(model, batch, "proponent_")).sum()

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch.get("attention_mask")

    return LMTask()


def kronfluence_rows(train, queries):
    """(training rows, query rows) as kronfluence datasets: padded example dicts, and per query the
    proponent's and opponent's padded fields prefixed with ``proponent_`` / ``opponent_``."""
    padded = {side: _padded_rows([q[side] for q in queries]) for side in ("proponent", "opponent")}
    query_rows = [{f"{side}_{key}": padded[side][i][key] for side in padded for key in padded[side][i]}
                  for i in range(len(queries))]
    return _padded_rows(train), query_rows


def _padded_rows(examples):
    batch = pad_batch(examples)
    return [{key: batch[key][i] for key in batch} for i in range(len(examples))]
