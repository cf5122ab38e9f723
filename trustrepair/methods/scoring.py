"""Influence of training examples on trust metrics, with fitted EK-FAC factors.

**Definition, sign and scale.** For an aspect j with metric F^j (the mean over its trust queries of
log P(o|m) - log P(p|m); lower is better) and a training example z with summed loss L(z),

    gamma^j(z) = - grad F^j^T (G + lambda I)^{-1} grad L(z),

over the analysed layers' parameters, G the EK-FAC Fisher (:mod:`trustrepair.engine.ekfac`). It is the
first-order *decrease* of F^j per unit beta of the repair step theta <- theta + beta (G + lambda I)^{-1}
grad L(z) (the paper's Eq. 5-6). **Positive = detrimental**: raising this example's loss improves the
aspect. Its units are those of F^j (nats of log-odds) per unit step, and it grows with the example's
gradient norm (longer responses tend to score larger). Read as a classical influence function (model
trained on the mean loss over n examples, Hessian ~ G), removing z changes F^j by about
-gamma^j(z) / n. :func:`normalize_scores` (from :mod:`trustrepair.methods.selection`) maps scores to
[0, 1] (the selection step's convention) when only their order and relative size matter.

**Aggregated scores** (:func:`influence`, what subset selection needs) never form a per-example
gradient: per layer, U_j = (G + lambda I)^{-1} grad F^j (d_out, d_in [+ 1]) is formed once per aspect,
and in one batched backward pass over the training set every layer adds its ghost dot products
<U_j, G_z> = sum_t g_t^T U_j a_t for all aspects at once (:func:`trustrepair.engine.ops.ghost_dots.ghost_dots`).
Scoring the whole set costs one forward + backward pass without weight gradients plus, per aspect,
T d_out d_in multiply-adds per example and layer (as much as one more weight-gradient product).

**Pairwise scores** (:func:`pairwise_influence`, explanations per query) use the same identity with
one U_q per query: since Q_A and Q_S are orthogonal, <(G + lambda I)^{-1} V_q, G_z> is an inner product
in the original basis, so no training example's gradient needs rotating into the eigenbasis. Each query's
gradient has rank at most its 2T tokens, so it is projected into the eigenbasis token by token
(:func:`trustrepair.engine.ops.projected_gradients.projected_gradients`), divided by Lambda + lambda there, and rotated
back once (Q d_out d_in (d_out + d_in) multiply-adds per layer: for many queries the largest single
cost), or, in a layer where projecting the training pass's N tokens costs less (N (d_in^2 + d_out^2):
many queries against a small training set, :func:`eigenbasis_is_cheaper`), not rotated at all: the
contraction then runs in the eigenbasis
(:func:`trustrepair.engine.ops.projected_gradients.projected_scores`). The contraction with the training
set forms G_z once and multiplies it with all U_q; it reads every U_q once per batch, so on a CPU
larger batches make it cheaper. With ``query_rank=r`` the division's result is factorised in the
eigenbasis, only the rank-r factors are rotated back, and the contraction runs through the tokens: the
approximate fast path.

**Distributed.** Under ``torch.distributed`` (see :mod:`trustrepair.engine.distributed`) both functions are
collective calls: every rank computes the (few) query gradients itself, each layer's preconditioning
runs on one rank and is broadcast, every rank scores its contiguous shard of the training set, and the
scores are all-gathered back into the original order, so every rank returns the full result. A failure
while preconditioning or scoring on any rank raises on every rank.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trustrepair.engine.layout import aligned
from trustrepair.batching import example_length, length_sorted_batches, padded_batches, padded_slots
from trustrepair.engine.capture import TokenCapture
from trustrepair.engine.examples import as_example, as_examples, check_token_ids, describe_rows, unlabelled
from trustrepair.engine.ops.blocking import cache_blocked
from trustrepair.engine.ops.ghost_dots import ghost_dots, low_rank_ghost_dots
from trustrepair.engine.ops.projected_gradients import projected_gradients, projected_scores, projected_square_norms
from trustrepair.engine.distributed import fail_together, gather_rows, map_once, progress_enabled, shard_range
from trustrepair.engine.ekfac import EKFACFactors, check_damping, factor_dtype
from trustrepair.engine.lowrank import low_rank_factors, rotate_factors
from trustrepair.engine.layers import ModuleSelection, TrackedLayer, find_modules
from trustrepair.engine.replay import PrefixStore, prefix_pass
from trustrepair.methods.selection import normalize_scores  # re-exported: the scores' [0, 1] convention
from trustrepair.task import IGNORE_INDEX, Batch, CausalLMTask, Task


def influence(model: nn.Module, factors: EKFACFactors, train, trust: Mapping[str, Sequence[Mapping]], *,
              damping: float | None = None, batch_size: int = 8, task: Task | None = None,
              progress: bool = True, timings: dict | None = None, check_fingerprint: bool = True,
              prefix_store: PrefixStore | None = None) -> dict[str, torch.Tensor]:
    """Aggregated influence gamma^j(z) of every training example on every aspect's metric.

    Args:
        model: the model the factors were fitted on (layer names and shapes are checked).
        factors: from :func:`trustrepair.fit_ekfac`.
        train: sequence or map-style dataset of training examples.
        trust: aspect name -> list of trust queries ``{"proponent": ex, "opponent": ex}``.
        damping: ``None`` for 0.1 * mean(Lambda) per module, or an absolute float.
        batch_size: training examples (or queries) per pass.
        task: defaults to :class:`CausalLMTask`.
        progress: tqdm bars (on rank 0 only under ``torch.distributed``).
        timings: if a dict is given, it receives seconds per stage: ``query_gradients``,
            ``precondition``, ``scores``.
        check_fingerprint: refuse a model whose weights differ from those the factors were fitted on
            (a digest, :meth:`EKFACFactors.check_model`); ``False`` skips it (layer shapes are still checked).
        prefix_store: the :class:`~trustrepair.engine.replay.PrefixStore` given to :func:`trustrepair.fit_ekfac`
            (same training set and ``batch_size``): the training-set pass then replays the frozen blocks
            before the first analysed one instead of running them, with the same scores; batches it does
            not hold run the whole model and are recorded.
    Returns:
        aspect -> (n_train,) scores, float32 (float64 for a float64 model); positive = detrimental (see
        the module docstring for sign and scale). Equals the mean over the aspect's queries of
        :func:`pairwise_influence`.
    """
    if not isinstance(trust, Mapping) or not trust:
        raise ValueError("trust must map each aspect name to a non-empty list of trust queries, e.g. "
                         "{'truthfulness': [{'proponent': ex, 'opponent': ex}, ...]}")
    task, progress, layers, factors, examples, damping = _prepare(model, factors, train, task, progress, damping,
                                                                  check_fingerprint)
    trust = {aspect: as_queries(queries, model, task, f"aspect {aspect!r}") for aspect, queries in trust.items()}
    clock = _Clock(timings)

    aspect_grads = []
    for aspect, queries in trust.items():
        aspect_grads.append(measurement_gradient(model, queries, modules=[l.name for l in layers], task=task,
                                                 batch_size=batch_size, progress=progress))
    clock.lap("query_gradients")
    stacked = {l.name: torch.stack([g[l.name] for g in aspect_grads]) for l in layers}
    contract = _preconditioned_contractions(factors, layers, stacked, damping, None, progress, projected=False,
                                            train_tokens=_pass_tokens(examples, batch_size))
    clock.lap("precondition")

    scores = _score_pass(model, layers, examples, task, batch_size, progress, len(aspect_grads),
                         lambda i, a, g: contract[i](a, g), factor_dtype(layers), prefix_store)
    clock.lap("scores")
    return {aspect: -scores[:, j] for j, aspect in enumerate(trust)}


def pairwise_influence(model: nn.Module, factors: EKFACFactors, train, queries: Sequence[Mapping], *,
                       damping: float | None = None, query_rank: int | None = None, batch_size: int = 8,
                       task: Task | None = None, progress: bool = True, timings: dict | None = None,
                       check_fingerprint: bool = True, prefix_store: PrefixStore | None = None) -> torch.Tensor:
    """Influence of every training example on every query's measurement.

    scores[q, z] = - grad m_q^T (G + lambda I)^{-1} grad L(z), m_q = log P(o_q|m_q) - log P(p_q|m_q).

    Args:
        queries: trust queries ``{"proponent": ex, "opponent": ex}``.
        query_rank: if given, each layer's preconditioned query gradient is replaced by its best rank-r
            approximation, computed in the eigenbasis by a randomized SVD so that only the factors are
            rotated back (:mod:`trustrepair.engine.lowrank`), and scores are contracted through the tokens:
            memory Q r (d_out + d_in) instead of Q d_out d_in per layer, and neither the dense rotation
            back nor the per-example gradient is formed. Layers narrower than r stay exact.
        Other arguments as in :func:`influence`.
    Returns:
        (n_query, n_train), float32 (float64 for a float64 model); positive = detrimental.
    """
    if query_rank is not None and query_rank < 1:
        raise ValueError(f"query_rank must be a positive rank or None; got {query_rank}")
    task, progress, layers, factors, examples, damping = _prepare(model, factors, train, task, progress, damping,
                                                                  check_fingerprint)
    queries = as_queries(queries, model, task)
    clock = _Clock(timings)

    per_query, order = per_query_projected_gradients(model, factors, layers, queries, task, batch_size, progress)
    clock.lap("query_gradients")
    contract = _preconditioned_contractions(factors, layers, per_query, damping, query_rank, progress,
                                            projected=True, train_tokens=_pass_tokens(examples, batch_size))
    del per_query
    clock.lap("precondition")

    scores = _score_pass(model, layers, examples, task, batch_size, progress, len(queries),
                         lambda i, a, g: contract[i](a, g), factor_dtype(layers), prefix_store)
    clock.lap("scores")
    rows = torch.empty(len(order), dtype=torch.long)
    rows[torch.tensor(order)] = torch.arange(len(order))  # query q's scores are column rows[q]
    return -scores.T[rows].contiguous()


def self_influence(model: nn.Module, factors: EKFACFactors, train, *, damping: float | None = None,
                   batch_size: int = 8, task: Task | None = None, progress: bool = True,
                   check_fingerprint: bool = True, prefix_store: PrefixStore | None = None) -> torch.Tensor:
    """sigma(z) = grad L(z)^T (G + lambda I)^{-1} grad L(z) for every training example: its gradient's
    squared length in the damped inverse-Fisher metric that the scores use.

    Dividing a score by sqrt(sigma(z)) (:func:`normalized_influence`) removes the length of the example's
    gradient in that metric and keeps its direction: the l-relative influence of RelatIF (Barshan et al.,
    AISTATS 2020); the unit normalisation of TrackStar and LESS is the same idea in other metrics. Examples
    with large gradients (long or high-loss responses) then stop crowding the top of the ranking.

    One forward + backward pass over the training set, each token projected into every layer's
    eigenbasis (as the fit's eigenvalue-correction pass: T (d_in^2 + d_out^2 + d_out d_in) multiply-adds
    per example and layer), in float32 (float64 for a float64 model). Arguments as in :func:`influence`.

    Returns:
        (n_train,) non-negative.
    """
    task, progress, layers, factors, examples, damping = _prepare(model, factors, train, task, progress, damping,
                                                                  check_fingerprint)
    weights = [1.0 / (factors.modules[l.name].lambda_ + factors.damping(l.name, damping)) for l in layers]

    def contract(i, a, g):
        f = factors.modules[layers[i].name]
        return projected_square_norms(a, g, f.q_a, f.q_s, weights[i])[:, None]

    return _score_pass(model, layers, examples, task, batch_size, progress, 1, contract, factor_dtype(layers),
                       prefix_store)[:, 0]


def normalized_influence(scores: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``scores / sqrt(sigma)`` (scores of :func:`influence` or :func:`pairwise_influence`, last axis the
    training examples; sigma from :func:`self_influence`); an example with sigma = 0 (no labelled token)
    scores 0.

    Raises:
        ValueError: sigma has another length than the scores' last axis, or a negative or non-finite entry.
    """
    scores, sigma = torch.as_tensor(scores), torch.as_tensor(sigma)
    if sigma.ndim != 1 or sigma.shape[0] != scores.shape[-1]:
        raise ValueError(f"sigma must hold one self-influence per training example ({scores.shape[-1]}); got shape "
                         f"{tuple(sigma.shape)}")
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError("sigma must be finite and non-negative (self-influences from self_influence)")
    root = sigma.to(scores.dtype).sqrt()
    return torch.where(root > 0, scores / root.clamp_min(torch.finfo(root.dtype).tiny), torch.zeros_like(scores))


def _prepare(model: nn.Module, factors: EKFACFactors, train, task: Task | None, progress: bool,
             damping: float | None, check_fingerprint: bool):
    """What both scorers start from: the task (default :class:`CausalLMTask`), the rank-aware progress
    flag, the analysed layers (checked against the factors, weight digest included unless
    ``check_fingerprint=False``), the factors on the model's device, the validated training examples
    (warning about unlabelled ones) and the checked damping."""
    task = task or CausalLMTask()
    damping = check_damping(damping)
    progress = progress_enabled(progress)
    factors.check_model(model, weights=check_fingerprint)
    layers = find_modules(model, list(factors.modules))
    factors = factors.to(layers[0].module.weight.device)
    examples = as_examples(train, "training set", vocab_size=task.vocab_size(model))
    _warn_unlabelled(examples)
    return task, progress, layers, factors, examples, damping


def measurement_gradient(model: nn.Module, queries: Sequence[Mapping], *, modules: ModuleSelection = None,
                         task: Task | None = None, batch_size: int = 8,
                         progress: bool = False) -> dict[str, torch.Tensor]:
    """grad F of the mean measurement F = (1/Q) sum_q [log P(o_q|m_q) - log P(p_q|m_q)], per layer.

    Each chunk of queries runs as one stacked batch (proponents in the first half of the rows, opponents
    in the second), so every layer runs once per measurement.

    Returns:
        module name -> (d_out, d_in [+ 1]) in the folded layout, float32 (float64 for a float64 model).
    """
    task = task or CausalLMTask()
    queries = as_queries(queries, model, task)
    layers = find_modules(model, modules)
    batches = ((f"batch {n} of the trust queries", task.collate_queries(queries[start:start + batch_size]))
               for n, start in enumerate(range(0, len(queries), batch_size)))
    sums = _gradient_sums(model, layers, batches, task.measurement, task, progress)
    return {name: grad / len(queries) for name, grad in sums.items()}


def summed_gradient(model: nn.Module, examples, *, modules: ModuleSelection = None, task: Task | None = None,
                    batch_size: int = 8, progress: bool = False) -> dict[str, torch.Tensor]:
    """sum_{z in examples} grad L(z) per layer (data labels), e.g. the repair step's direction before
    preconditioning: ``factors.precondition(summed_gradient(model, subset, modules=list(factors.modules)))``
    then :func:`trustrepair.engine.layers.apply_deltas` with ``alpha=beta``.

    Returns:
        module name -> (d_out, d_in [+ 1]) in the folded layout (bias last), float32 (float64 for a
        float64 model).
    """
    task = task or CausalLMTask()
    layers = find_modules(model, modules)
    examples = as_examples(examples, "example subset", vocab_size=task.vocab_size(model))
    batches = ((describe_rows("example subset", n, rows), batch)
               for n, (rows, batch) in enumerate(padded_batches(examples, batch_size, collate=task.collate)))
    return _gradient_sums(model, layers, batches, task.train_loss, task, progress)


def per_query_projected_gradients(model: nn.Module, factors: EKFACFactors, layers: list[TrackedLayer], queries: list,
                                  task: Task, batch_size: int,
                                  progress: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
    """grad m_q per query and layer, in the layer's eigenbasis: ``(name -> (Q, d_out, d_in [+ 1]), order)``,
    row j holding Q_S^T grad m_q Q_A for q = order[j] (the queries in the order they were batched, so each
    batch writes one contiguous slice of the Q d_out d_in buffer, once).

    In a stacked batch, rows q (proponent) and Q + q (opponent) both feed m_q alone, so the query's
    gradient is g^T a over the tokens of both rows; gathering the unmasked tokens of the two rows along
    one token axis (:func:`_query_token_index`) gives it as one "example" of at most 2T tokens, projected
    token by token (T << width), far cheaper than rotating a dense (d_out, d_in) gradient per query.
    Queries are batched in length order, so the gathered examples of a batch are of similar length.
    """
    dtype = factor_dtype(layers)
    device = layers[0].module.weight.device
    out = {l.name: torch.empty(len(queries), *l.shape, dtype=dtype, device=device) for l in layers}
    chunks = length_sorted_batches([example_length(q) for q in queries], batch_size)
    start = 0
    with TokenCapture(model, layers) as capture:
        for number, rows in enumerate(tqdm(chunks, desc="query gradients", unit="batch", disable=not progress)):
            batch = task.collate_queries([queries[i] for i in rows])
            mask = task.token_mask(batch)
            index = _query_token_index(mask.to(device))
            part = slice(start, start + len(rows))

            def on_layer(i, a, g):
                f = factors.modules[layers[i].name]
                projected_gradients(_gathered(a, index), _gathered(g, index), f.q_a, f.q_s, out=out[layers[i].name][part])

            capture.run(lambda: task.measurement(model, batch), mask, describe_rows("trust queries", number, rows),
                        on_layer)
            start += len(rows)
    return out, [i for rows in chunks for i in rows]


def _query_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(Q, L) indices into the flattened (2Q T) token axis of a stacked query batch with token ``mask``
    (2Q, T): query q's unmasked tokens of row q, then of row Q + q, then the index 2Q T (a zero row,
    :func:`_gathered`) up to L, the longest query's token count."""
    n, width = mask.shape[0] // 2, mask.shape[1]
    flat = torch.arange(2 * n * width, device=mask.device).reshape(2 * n, width)
    per_query = [torch.cat([flat[q][mask[q]], flat[n + q][mask[n + q]]]) for q in range(n)]
    index = torch.full((n, max(len(t) for t in per_query)), 2 * n * width, dtype=torch.long, device=mask.device)
    for q, tokens in enumerate(per_query):
        index[q, :len(tokens)] = tokens
    return index


def _gathered(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(Q, L, d): the tokens of ``x`` (2Q, T, d) at ``index`` (:func:`_query_token_index`), zero past each
    query's own tokens."""
    flat = torch.cat([x.reshape(-1, x.shape[-1]), x.new_zeros(1, x.shape[-1])])
    return flat[index]


def as_queries(queries, model: nn.Module, task: Task, what: str = "") -> list:
    """The trust queries as a list of ``{"proponent": ex, "opponent": ex}``, each side checked and converted
    like a training example (:func:`trustrepair.engine.examples.as_example`; lists become long tensors).

    Raises:
        ValueError: naming the query (and ``what``, e.g. the aspect): a missing side, a side without a
            labelled response token (its log-probability would be 0 and the query would score exactly 0),
            proponent and opponent with different prompt tokens (the tokens before the first labelled
            one), or a token id outside ``task.vocab_size(model)``.
    """
    where = f" of {what}" if what else ""
    queries = list(queries)
    if not queries:
        raise ValueError(f"{what + ' has' if what else 'got'} no trust queries; pass a list of "
                         f"{{'proponent': ex, 'opponent': ex}}")
    checked, sides, names = [], [], []
    for i, q in enumerate(queries):
        name = f"trust query {i}{where}"
        if not isinstance(q, Mapping) or {"proponent", "opponent"} - set(q):
            raise ValueError(f"{name} must be a dict with 'proponent' and 'opponent' examples")
        pair = {side: as_example(q[side], f"{name} ({side})") for side in ("proponent", "opponent")}
        prompts = {}
        for side, ex in pair.items():
            labels = ex.get("labels")
            if labels is None:
                prompts[side] = ex["input_ids"][:0]
                continue
            labelled = (labels != IGNORE_INDEX).nonzero()
            if not bool((labels[1:] != IGNORE_INDEX).any()):
                raise ValueError(f"{name}: the {side} has no labelled token (labels[1:] all -100), so its "
                                 f"log-probability is 0 and the query would score exactly 0; label its response")
            prompts[side] = ex["input_ids"][:int(labelled[0])]
        if not torch.equal(prompts["proponent"], prompts["opponent"]):
            raise ValueError(f"{name}: the proponent's and the opponent's prompt tokens differ ({len(prompts['proponent'])} "
                             f"and {len(prompts['opponent'])} tokens before the first label); a query compares "
                             f"two responses to one prompt")
        checked.append({**q, **pair})
        sides += [pair["proponent"], pair["opponent"]]
        names += [f"{name} (proponent)", f"{name} (opponent)"]
    vocab_size = task.vocab_size(model)
    if vocab_size is not None:
        check_token_ids(sides, names, vocab_size)
    return checked


# ----------------------------------------------------------------------------------------------------

def _preconditioned_contractions(factors: EKFACFactors, layers: list[TrackedLayer], grads: dict[str, torch.Tensor],
                                 damping: float | None, rank: int | None, progress: bool, *,
                                 projected: bool, train_tokens: int) -> list[Callable]:
    """Per layer, ``contract(a, g) -> (B, K)``: the ghost dot products of a batch with the K
    preconditioned directions U_k = Q_S [P_k / (Lambda + lambda)] Q_A^T, where P_k = ``grads[name][k]``
    (already in the eigenbasis when ``projected``, else rotated in first; ``projected`` grads are the
    caller's to give away: they may be divided in place).

    Which basis the contraction runs in is chosen per layer for the whole pass: rotating the K directions
    back costs K d_out d_in (d_out + d_in) multiply-adds once; projecting the training pass's
    ``train_tokens`` token slots into the eigenbasis instead (``a Q_A``, ``g Q_S``, then the same
    contraction with P_k / (Lambda + lambda), :func:`projected_scores`) costs train_tokens (d_in^2 +
    d_out^2). Equal by orthogonality; the cheaper one runs (the second when many queries meet a small
    training set).

    With ``rank`` below a layer's smaller side, U_k is replaced by its best rank-r approximation,
    factorised in the eigenbasis and only the factors rotated back (:mod:`trustrepair.engine.lowrank`), and the
    contraction runs through the tokens (:func:`low_rank_ghost_dots`); otherwise U_k is dense
    (:func:`ghost_dots`).

    Each layer is computed by one rank and broadcast (:func:`trustrepair.engine.distributed.map_once`, balanced
    by the dense rotations' cost K d_out d_in (d_out + d_in)), so every rank gets the same directions; in
    a single process it is a loop over the layers. Low-rank factors travel as one (K, d_out + d_in, r)
    buffer, left on top of right^T.
    """
    low = {l.name for l in layers if rank is not None and rank < min(l.shape)}
    eigen = {l.name for l in layers
             if l.name not in low and eigenbasis_is_cheaper(train_tokens, grads[l.name].shape[0], l.shape)}

    def compute(name):
        p = grads[name] if projected else factors.project({name: grads[name]})[name]
        if name in eigen:  # projected grads are the caller's own buffer (Q d_out d_in): divided in place
            return factors.divide_projected({name: p}, damping, in_place=True)[name]
        if name not in low:
            return factors.precondition_projected({name: p}, damping)[name]
        f = factors.modules[name]
        with torch.autocast(f.q_a.device.type, enabled=False):
            scaled = factors.divide_projected({name: p}, damping)[name]
            left, right = rotate_factors(*low_rank_factors(scaled, rank, column_basis=f.q_a), f.q_s, f.q_a)
        return torch.cat([left, right.mT], dim=-2)

    def like(name):
        reference = factors.modules[name].q_a
        k, d_out, d_in = grads[name].shape
        shape = (k, d_out + d_in, rank) if name in low else (k, d_out, d_in)
        return torch.empty(shape, dtype=reference.dtype, device=reference.device)

    names = [l.name for l in layers]
    done = map_once(compute, names, like,
                    cost=lambda name: grads[name].numel() * (1 if name in eigen else sum(grads[name].shape[-2:])),
                    desc="preconditioning", progress=progress)
    contract = []
    for i, layer in enumerate(layers):
        direction, done[i] = done[i], None  # an aligned copy replaces it: one layer's extra memory at a time
        if layer.name in low:
            d_out = layer.shape[0]
            left, right = direction[:, :d_out], direction[:, d_out:].mT
            contract.append(lambda a, g, left=left, right=right: low_rank_ghost_dots(a, g, left, right))
        elif layer.name in eigen:
            f = factors.modules[layer.name]
            contract.append(lambda a, g, w=direction, f=f: projected_scores(a, g, f.q_a, f.q_s, w))
        else:  # a GPU's row-by-row ghost products want aligned rows (made once here, not per batch); a CPU's
            # flattened product wants them contiguous (see trustrepair.engine.ops.ghost_dots.ghost_dots)
            u = direction if cache_blocked(direction.device) else aligned(direction)
            contract.append(lambda a, g, u=u: ghost_dots(a, g, u))
    return contract


def eigenbasis_is_cheaper(train_tokens: int, n_directions: int, shape: tuple[int, int]) -> bool:
    """Whether a (d_out, d_in) layer's contraction with ``n_directions`` preconditioned directions is cheaper
    in the eigenbasis (project ``train_tokens`` token slots: train_tokens (d_in^2 + d_out^2) multiply-adds)
    than in the original basis (rotate the directions back once: K d_out d_in (d_out + d_in))."""
    d_out, d_in = shape
    return train_tokens * (d_out * d_out + d_in * d_in) < n_directions * d_out * d_in * (d_out + d_in)


def _pass_tokens(examples, batch_size: int) -> int:
    """Token slots of the training pass over all ranks (rows x longest row, summed over the length-sorted
    batches of the whole set): the same number on every rank, so every rank chooses the same basis."""
    lengths = [example_length(ex) for ex in examples]
    return padded_slots(lengths, length_sorted_batches(lengths, batch_size))


def _score_pass(model, layers, examples, task, batch_size, progress, n_cols, contract, dtype,
                prefix_store: PrefixStore | None) -> torch.Tensor:
    """(n_train, n_cols): sum over layers of contract(layer_index, a, g) for every training example
    (this rank's shard computed here, the others gathered in the original order), the prefix replayed
    from ``prefix_store`` where it holds a batch."""
    device = layers[0].module.weight.device
    shard = shard_range(len(examples))
    scores = torch.zeros(len(shard), n_cols, dtype=dtype, device=device)
    with fail_together("influence scoring"), TokenCapture(model, layers) as capture, \
            prefix_pass(prefix_store, model, layers) as prefix:
        for number, (rows, batch) in enumerate(padded_batches(examples[shard.start:shard.stop], batch_size,
                                                               "influence scores", progress, task.collate)):
            index = torch.tensor(rows, device=device)
            rows = [shard.start + row for row in rows]

            def on_layer(i, a, g):
                scores.index_add_(0, index, contract(i, a, g).to(dtype))

            with prefix.batch(batch):
                capture.run(lambda: task.train_loss(model, batch), task.token_mask(batch),
                            describe_rows("training set", number, rows), on_layer)
    return gather_rows(scores, len(examples)).cpu()


def _gradient_sums(model: nn.Module, layers: list[TrackedLayer], batches: Iterable[tuple[str, Batch]],
                   objective: Callable[[nn.Module, Batch], torch.Tensor], task: Task, progress: bool) -> dict:
    """sum over every row of every (label, batch) of g_r^T a_r per layer: the gradient of the summed
    objective, one (d_out, tokens) x (tokens, d_in) product per layer and batch."""
    dtype = factor_dtype(layers)
    device = layers[0].module.weight.device
    sums = {l.name: torch.zeros(*l.shape, dtype=dtype, device=device) for l in layers}
    with TokenCapture(model, layers) as capture:
        for label, batch in tqdm(batches, desc="gradients", unit="batch", disable=not progress):
            def on_layer(i, a, g):
                a = a.reshape(-1, a.shape[-1]).to(dtype)
                g = g.reshape(-1, g.shape[-1]).to(dtype)
                sums[layers[i].name].addmm_(g.T, a)

            capture.run(lambda: objective(model, batch), task.token_mask(batch), label, on_layer)
    return sums


def _warn_unlabelled(examples) -> None:
    empty = unlabelled(examples)
    if empty:
        warnings.warn(f"{len(empty)} of {len(examples)} training examples have no labelled token (indices "
                      f"{empty[:10]}{' ...' if len(empty) > 10 else ''}): their gradient is zero and they score 0",
                      stacklevel=3)


class _Clock:
    """Fills ``timings[stage]`` with the seconds since the previous lap (no-op without a dict)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = now - self.last
        self.last = now
