"""Gradient-similarity attributions a practitioner would try instead of EK-FAC influence (issue 17's
ranking baselines), on the same layers, sign convention and single pass as :func:`~trustrepair.methods.scoring.influence`.

For an aspect j with mean measurement gradient grad F^j (:func:`~trustrepair.methods.scoring.measurement_gradient`)
and a training example z with summed-loss gradient G_z = grad L(z), both over the analysed layers:

    gradient_dot^j(z)    = - <grad F^j, G_z>                              (identity curvature)
    gradient_cosine^j(z) = - <grad F^j, G_z> / (||grad F^j|| ||G_z||)     (unit-normalised, as TrackStar / LESS)

Positive = detrimental, as for influence: gradient_dot is influence with G + lambda I replaced by I.
Neither forms G_z: per layer, <grad F^j, G_z> = sum_t g_t^T grad F^j a_t (ghost dot products,
:func:`~trustrepair.engine.ops.ghost_dots.ghost_dots`) and ||G_z||^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')
(two (T, T) Gram matrices per example), T^2 (d_in + d_out) multiply-adds, less than the T d_in d_out of
forming G_z whenever T < d_in d_out / (d_in + d_out). Products run in the model's dtype and accumulate in
float32 (float64 for a float64 model), like influence's.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from trustrepair.engine.examples import as_examples
from trustrepair.engine.ekfac import factor_dtype
from trustrepair.engine.layers import ModuleSelection, find_modules
from trustrepair.engine.layout import aligned
from trustrepair.engine.ops.ghost_dots import ghost_dots
from trustrepair.methods.scoring import _score_pass, as_queries, measurement_gradient
from trustrepair.task import CausalLMTask, Task

METHODS = ("gradient_dot", "gradient_cosine")


def gradient_norms_squared(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) ||sum_t g_t a_t^T||_F^2 per example of ``a`` (B, T, d_in) and ``g`` (B, T, d_out), by the Gram
    identity of the module docstring."""
    return (torch.bmm(a, a.mT) * torch.bmm(g, g.mT)).sum((1, 2))


def gradient_similarity(model: nn.Module, train, trust: Mapping[str, Sequence[Mapping]], *,
                        modules: ModuleSelection = None, task: Task | None = None, batch_size: int = 8,
                        progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Both baselines of the module docstring for every training example and aspect.

    Args:
        model: the model as it was fine-tuned (its analysed layers: ``modules``, default every linear layer).
        train: training examples (as for :func:`~trustrepair.methods.scoring.influence`).
        trust: aspect name -> list of trust queries ``{"proponent": ex, "opponent": ex}``.
    Returns:
        ``{"gradient_dot": {aspect: (n_train,)}, "gradient_cosine": {aspect: (n_train,)}}``; an example
        without labelled tokens has gradient 0 and scores 0 on both.
    """
    if not isinstance(trust, Mapping) or not trust:
        raise ValueError("trust must map each aspect name to a non-empty list of trust queries")
    task = task or CausalLMTask()
    layers = find_modules(model, modules)
    examples = as_examples(train, "training set", vocab_size=task.vocab_size(model))
    names = [layer.name for layer in layers]
    grads = [measurement_gradient(model, as_queries(queries, model, task, f"aspect {aspect!r}"), modules=names,
                                  task=task, batch_size=batch_size, progress=progress)
             for aspect, queries in trust.items()]
    stacked = [aligned(torch.stack([g[name] for g in grads])) for name in names]
    query_norms = torch.stack([sum(g[name].double().pow(2).sum() for name in names) for g in grads]).sqrt()

    def contract(i, a, g):
        return torch.cat([ghost_dots(a, g, stacked[i].to(a.dtype)), gradient_norms_squared(a, g)[:, None]], dim=1)

    sums = _score_pass(model, layers, examples, task, batch_size, progress, len(grads) + 1, contract,
                       factor_dtype(layers), None)
    dots, norms = -sums[:, :-1], sums[:, -1].double().clamp_min(0).sqrt()
    cosine = (dots.double() / (norms[:, None] * query_norms.clamp_min(1e-300)[None, :]).clamp_min(1e-300)).to(dots.dtype)
    return {"gradient_dot": {a: dots[:, j] for j, a in enumerate(trust)},
            "gradient_cosine": {a: cosine[:, j] for j, a in enumerate(trust)}}
