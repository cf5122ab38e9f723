"""Measure a model: trust log-odds per aspect and perplexity on held-out fine-tuning data.

* Trust metric of aspect j (paper Eq. 3/8): F^j = mean over queries of log P(o|m) - log P(p|m), each
  log-probability summed over the response tokens. Lower is better; 0 means indifferent.
* Perplexity: exp(total next-token negative log-likelihood / number of labelled tokens) over the
  held-out SFT split (token-weighted, so long responses count for what they are).
* Relative change (the paper's Table 1 convention): 100 * (post - repaired) / |post|; positive means
  the repaired model is better on that aspect.

Everything runs under ``torch.no_grad`` in the model's dtype, in length-sorted batches to cut padding.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from trustrepair.batching import example_length, length_sorted_batches
from trustrepair.engine.examples import as_examples
from trustrepair.task import IGNORE_INDEX, CausalLMTask, Task


@torch.no_grad()
def query_log_odds(model: torch.nn.Module, queries: Sequence[Mapping], *, task: Task | None = None,
                   batch_size: int = 16, progress: bool = False, desc: str = "log-odds") -> torch.Tensor:
    """(Q,) float64 log P(o|m) - log P(p|m) per query, in input order (queries checked and converted by
    :func:`trustrepair.methods.scoring.as_queries`)."""
    from trustrepair.methods.scoring import as_queries

    if len(queries) == 0:
        raise ValueError("no trust queries to evaluate; pass at least one {'proponent', 'opponent'} pair")
    task = task or CausalLMTask()
    queries = as_queries(queries, model, task)
    out = torch.empty(len(queries), dtype=torch.float64)
    chunks = length_sorted_batches([example_length(q) for q in queries], batch_size)
    for idx in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        values = task.measurement(model, task.collate_queries([queries[i] for i in idx]))
        out[idx] = values.detach().double().cpu()
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, examples: Sequence[Mapping], *, task: Task | None = None,
               batch_size: int = 16, progress: bool = False) -> float:
    """Token-weighted perplexity exp(sum NLL / labelled tokens) over ``examples`` (checked and converted
    by :func:`trustrepair.engine.examples.as_examples`)."""
    task = task or CausalLMTask()
    examples = as_examples(examples, "perplexity set", vocab_size=task.vocab_size(model))
    total_nll, total_tokens = 0.0, 0
    chunks = length_sorted_batches([example_length(ex) for ex in examples], batch_size)
    for idx in tqdm(chunks, desc="perplexity", disable=not progress, leave=False):
        batch = task.collate([examples[i] for i in idx])
        total_nll += float(task.train_loss(model, batch).double().sum())
        total_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("the perplexity set has no labelled tokens; every example's labels are -100")
    return math.exp(total_nll / total_tokens)


def relative_change_se_pct(post: Sequence[float], repaired: Sequence[float]) -> float:
    """Standard error of :func:`relative_change_pct` of the means over the same pairs, from the paired
    differences: 100 * sd(post_i - repaired_i) / sqrt(n) / |mean(post)| (sd with n - 1). It is the
    sampling error of the trust pairs (which pairs were held out), not of the model; NaN for fewer than
    two pairs or a zero post-SFT mean."""
    if len(post) != len(repaired):
        raise ValueError(f"paired values must have the same length, got {len(post)} and {len(repaired)}")
    n = len(post)
    mean_post = sum(post) / n if n else 0.0
    if n < 2 or mean_post == 0:
        return float("nan")
    diffs = [p - r for p, r in zip(post, repaired)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return 100.0 * sd / math.sqrt(n) / abs(mean_post)


def relative_change_pct(post: float, repaired: float) -> float:
    """100 * (post - repaired) / |post|: positive when the repaired model is better (lower)."""
    if post == 0:
        return float("nan")
    return 100.0 * (post - repaired) / abs(post)


def evaluate(model: torch.nn.Module, trust: Mapping[str, Sequence[Mapping]], sft_examples: Sequence[Mapping],
             *, task: Task | None = None, batch_size: int = 16, progress: bool = False) -> dict:
    """Trust log-odds per aspect and perplexity.

    Returns ``{"aspects": {name: {"log_odds": mean, "n_queries": Q}}, "perplexity": ppl}``.
    """
    aspects = {}
    for name, queries in trust.items():
        values = query_log_odds(model, queries, task=task, batch_size=batch_size, progress=progress, desc=name)
        aspects[name] = {"log_odds": float(values.mean()), "n_queries": len(queries)}
    return {"aspects": aspects,
            "perplexity": perplexity(model, sft_examples, task=task, batch_size=batch_size, progress=progress)}
