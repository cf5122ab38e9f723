"""Repair a fine-tuned model by raising the loss on a selected subset of its training data.

Two methods, both anchored at the post-SFT parameters theta_post (paper Sec. 3.4):

* ``"newton"`` (Eq. 5): one EK-FAC-preconditioned ascent step,
      theta = theta_post + beta * sum_{z in S} (G + lambda I)^{-1} grad L(z),
  reusing the fitted factors. The step is linear in beta, so a beta search evaluates one direction at
  many scales without recomputing anything.
* ``"pbrf"`` (Eq. 4): a few EK-FAC-preconditioned gradient steps on the Proximal Bregman Response Function
      (1/|K|) sum_{x in K} KL_x(p_post || p_theta) - beta * sum_{z in S} L(z) + lambda/2 ||theta - theta_post||^2,
  where the KL, summed over each SFT example's labelled tokens, is the Bregman divergence of the
  cross-entropy in function space: it holds the model's predictions on ordinary data in place while the
  subset's loss rises. The iteration starts from theta_post, and its first step is the Newton step; the
  later ones correct it where EK-FAC's curvature differs from the exact KL's. The post-SFT
  log-probabilities are computed once, in float32.

Only the parameters of the analysed modules move. A repair is a :class:`RepairDelta` (module name ->
additive change of its folded (d_out, d_in [+1]) weight, bias in the last column, the layout of
:mod:`trustrepair.engine.layers`) that can be applied to and reverted from a model in memory and saved
atomically as safetensors: the input model on disk is never modified.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trustrepair.batching import chunked
from trustrepair.engine.arguments import finite
from trustrepair.engine.ekfac import check_damping
from trustrepair.engine.examples import as_example, as_examples, check_token_ids
from trustrepair.engine.storage import load_tensors, save_tensors, tensor_metadata
from trustrepair.engine.layers import TrackedLayer, apply_deltas, find_modules
from trustrepair.task import CausalLMTask, Task


@dataclass
class RepairDelta:
    """An additive change to analysed layers: ``W_repaired = W_post + deltas[name]`` per layer.

    Attributes:
        deltas: module name -> change of the folded weight (d_out, d_in [+1]), bias in the last column.
        metadata: JSON-serialisable description (method, beta, subset size, ...).
    """

    deltas: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    _applied: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def scaled(self, factor: float) -> "RepairDelta":
        """The change times ``factor`` (a step size beta).

        Raises:
            ValueError: ``factor`` is not finite, or takes an entry past the dtype's range (a beta such as
                1e300 on a float32 model), which would write infinities into the weights.
        """
        factor = finite("beta", factor)
        deltas = {k: v * factor for k, v in self.deltas.items()}
        overflow = [k for k, v in deltas.items() if not bool(torch.isfinite(v).all())]
        if overflow:
            raise ValueError(f"beta = {factor!r} scales the step past the range of "
                             f"{deltas[overflow[0]].dtype} (non-finite entries in {overflow[0]}); use a smaller beta")
        return RepairDelta(deltas, {**self.metadata, "scale": self.metadata.get("scale", 1.0) * factor})

    def apply(self, model: torch.nn.Module, sign: float = 1.0) -> None:
        """Add the change to ``model``'s layers in place (``sign=-1`` subtracts it), keeping a copy of the
        parameters it touches (the analysed layers' weights and biases only) for :meth:`revert`.

        Raises:
            ValueError: the delta is already applied to ``model`` (revert it first; for a larger step
                apply ``delta.scaled(factor)``), or its shapes do not fit the model's layers (then the model
                is left unchanged).
        """
        held = self._applied.get(id(model))
        if held is not None and held[0]() is model:
            raise ValueError("this RepairDelta is already applied to the model; revert() it before applying it "
                             "again, or apply delta.scaled(2.0) for twice the step")
        originals = [p.detach().clone() for p in _layer_parameters(find_modules(model, list(self.deltas)))]
        try:
            apply_deltas(model, self.deltas, alpha=sign)
        except Exception:
            self._restore(model, originals)
            raise
        self._applied[id(model)] = (weakref.ref(model), originals)

    def revert(self, model: torch.nn.Module) -> None:
        """Undo :meth:`apply` exactly: the touched parameters get back the bits they had before it,
        however many apply / revert cycles ran (anything else done to them in between is undone too).

        Raises:
            ValueError: the delta is not applied to ``model``. To subtract a change that was applied
                elsewhere (e.g. before the model was saved), use ``delta.apply(model, sign=-1.0)``
                (exact up to one floating-point rounding per weight).
        """
        held = self._applied.pop(id(model), None)
        if held is None or held[0]() is not model:
            raise ValueError("this RepairDelta is not applied to the model, so there is nothing to revert; to "
                             "subtract a change applied elsewhere use delta.apply(model, sign=-1.0)")
        self._restore(model, held[1])

    def _restore(self, model: torch.nn.Module, originals: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, original in zip(_layer_parameters(find_modules(model, list(self.deltas))), originals):
                param.copy_(original)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, metadata as JSON under ``"trustrepair"`` in its header) atomically."""
        return save_tensors(path, self.deltas, metadata={"trustrepair": json.dumps(self.metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RepairDelta":
        metadata = json.loads(tensor_metadata(path).get("trustrepair", "{}"))
        return cls(load_tensors(path), metadata)


def _check_subset(train: Sequence, subset) -> list[int]:
    """The subset as a list of distinct indices into ``train``: integer indices (list, numpy array or
    tensor) or a boolean mask of length ``len(train)``, converted explicitly.

    Raises:
        ValueError: an empty subset, a mask of another length, non-integer values, an index outside the
            training set, or a repeated index.
    """
    n = len(train)
    values = subset.detach().cpu().numpy() if isinstance(subset, torch.Tensor) else np.asarray(subset)
    if values.ndim != 1:
        raise ValueError(f"subset must be 1-D integer indices or a boolean mask of length {n}; got shape "
                         f"{values.shape}")
    if values.dtype == np.bool_:
        if len(values) != n:
            raise ValueError(f"a boolean subset mask must have length {n} (one entry per training example); "
                             f"got length {len(values)}")
        values = np.flatnonzero(values)
    elif len(values) and values.dtype.kind not in "iu":
        raise ValueError(f"subset must hold integer indices (or be a boolean mask); got {values.dtype} values "
                         f"{values[:5].tolist()}")
    indices = [int(i) for i in values]
    if not indices:
        raise ValueError("the repair subset is empty; select at least one training example")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"subset indices {bad[:5]} are outside the training set of {n} examples")
    repeated = sorted(i for i, count in Counter(indices).items() if count > 1)
    if repeated:
        raise ValueError(f"subset indices repeat: {repeated[:5]}; each training example counts once")
    return indices


def _subset_examples(model: torch.nn.Module, task: Task, train: Sequence, subset: list[int]) -> list:
    """The subset's training examples, checked (and converted from lists) under their training-set names."""
    names = [f"training set item {i}" for i in subset]
    examples = [as_example(train[i], name) for i, name in zip(subset, names)]
    vocab_size = task.vocab_size(model)
    if vocab_size is not None:
        check_token_ids(examples, names, vocab_size)
    return examples


def newton_direction(model: torch.nn.Module, factors, train: Sequence, subset, *,
                     task: Task | None = None, damping: float | None = None, batch_size: int = 8,
                     progress: bool = False, check_fingerprint: bool = True) -> RepairDelta:
    """sum_{z in S} (G + lambda I)^{-1} grad L(z) as a :class:`RepairDelta` at beta = 1 (Eq. 5).

    The summed gradient of the subset's loss is taken per analysed layer in the folded (d_out, d_in [+1])
    layout and preconditioned by ``factors.precondition`` (EK-FAC eigenbasis, damping as given).

    Args:
        subset: integer indices into ``train`` (distinct) or a boolean mask of length ``len(train)``.
        check_fingerprint: refuse a model whose weights differ from those the factors were fitted on
            (:meth:`EKFACFactors.check_model`); ``False`` skips that digest check (shapes are still checked).
    """
    from trustrepair.methods.scoring import summed_gradient

    task = task or CausalLMTask()
    damping = check_damping(damping)
    factors.check_model(model, weights=check_fingerprint)
    subset = _check_subset(train, subset)
    grads = summed_gradient(model, _subset_examples(model, task, train, subset), modules=list(factors.modules),
                            task=task, batch_size=batch_size, progress=progress)
    deltas = factors.precondition(grads, damping=damping)
    return RepairDelta(deltas, {"method": "newton", "beta": 1.0, "subset_size": len(subset),
                                "damping": damping})


def _token_log_probs(model, task: Task, batch) -> torch.Tensor:
    """(N, V) log-softmax at the labelled positions of ``batch`` (order of ``task.token_logits``), in float32
    or the logits' dtype where wider."""
    logits = task.token_logits(model, batch)
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _layer_parameters(layers: Sequence[TrackedLayer]) -> list[torch.nn.Parameter]:
    params = []
    for layer in layers:
        params.append(layer.module.weight)
        if layer.has_bias:
            params.append(layer.module.bias)
    return params


ARMIJO = 1e-4  # sufficient-decrease constant of the PBRF line search (Nocedal & Wright's usual value)


def pbrf_repair(model: torch.nn.Module, train: Sequence, subset: Sequence[int], *, beta: float,
                layers: Sequence[TrackedLayer], kl_examples: Sequence, proximal: float | None = 1e-3,
                steps: int = 10, lr: float = 1e-4, task: Task | None = None, batch_size: int = 8,
                init: RepairDelta | None = None, factors=None, damping: float | None = None,
                progress: bool = False) -> RepairDelta:
    """Minimise the PBRF objective (Eq. 4) over the ``layers``' parameters by ``steps`` gradient steps.

        J(theta) = (1/|K|) sum_{x in K} sum_t KL(p_post(.|x_<t) || p_theta(.|x_<t))
                   - beta sum_{z in S} L(z) + sum_l lambda_l / 2 ||W_l - W_l,post||^2

    with K the ``kl_examples``, t their labelled tokens and L the summed per-example loss. The KL is summed
    per example and averaged over examples, as the loss L, the SFT objective and the per-example Fisher G
    of the EK-FAC factors are, so that J's Gauss-Newton Hessian at theta_post is G + lambda I: Eq. 5's
    Newton step is the minimiser of J's quadratic model.

    Two iterations, both plain (not Adam: Adam's per-coordinate normalisation would blow rounding noise
    up to full-size steps when beta is small):

    * ``factors`` given: EK-FAC-preconditioned descent, Delta <- Delta - lr (G + lambda I)^{-1} grad J,
      with lambda the factors' ``damping`` per module, also the proximal weight when ``proximal=None``. The
      gradient of J at theta_post is exactly the ascent term (the KL and proximal terms are stationary
      there), so from theta_post one step at ``lr=1`` is ``beta * newton_direction``; later steps follow the
      exact KL on K where EK-FAC approximates it.
    * ``factors=None``: gradient descent on the raw gradient, ``proximal`` a float.

    Each step is a backtracking line search (Nocedal & Wright, Sec. 3.5): a step that lowers J by less
    than ``ARMIJO`` x its predicted decrease is undone (it still counts as a step), and the next one tried
    at the minimiser of the quadratic through J and its slope at the current point and J at the refused
    step (kept within 1/100 to 1/2 of the refused step); after an accepted step ``lr`` doubles, up to its
    start. Where the exact KL bends up faster than EK-FAC predicts, the solve so shortens the Newton step.

    ``metadata["trials"]`` lists every evaluation of J: its ``lr``, J, the first-order prediction
    J + lr x slope and whether the step was kept (the first entry is the start).

    Precision: the post-SFT log-probabilities and the KL in float32 at least (the model's dtype if wider);
    J is compared in float64.

    The model is restored to theta_post before returning: apply the returned delta to use the repair.

    Args:
        beta: weight of the ascent term -beta * sum_S L(z).
        layers: the analysed layers (see :func:`trustrepair.engine.layers.find_modules`); nothing else moves.
        kl_examples: SFT examples whose labelled tokens carry the KL term.
        proximal: lambda of the proximal term, one float for every layer; ``None`` takes the factors'
            per-module damping (needs ``factors``).
        init: optional starting change (e.g. a scaled Newton step); the default starts at theta_post.
        factors: EK-FAC factors of these layers to precondition the steps (:class:`EKFACFactors`).
        damping: the preconditioner's damping, ``None`` for the factors' default (``damping_scale`` x
            mean(Lambda) per module).
    """
    task = task or CausalLMTask()
    beta = finite("beta", beta, minimum=0, hint="the weight of the loss ascent on the subset")
    lr = first_lr = finite("lr", lr, positive=True, hint="the PBRF learning rate")
    if proximal is None and factors is None:
        raise ValueError("proximal=None takes the EK-FAC damping per module: pass factors, or a proximal weight")
    if proximal is not None:
        proximal = finite("proximal", proximal, minimum=0, hint="the weight of the proximal term")
    damping = check_damping(damping)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    subset = _check_subset(train, subset)
    if not kl_examples:
        raise ValueError("PBRF needs SFT examples for its KL term; pass kl_examples")
    kl_examples = as_examples(kl_examples, "kl_examples", vocab_size=task.vocab_size(model))
    weights = {layer.name: (factors.damping(layer.name, damping) if proximal is None else proximal)
               for layer in layers}
    params = _layer_parameters(layers)
    post = [p.detach().clone() for p in params]
    post_folded = {layer.name: layer.folded_weight() for layer in layers}
    kl_batches = [task.collate(chunk) for chunk in chunked(kl_examples, batch_size)]
    with torch.no_grad():
        post_log_probs = [_token_log_probs(model, task, b) for b in kl_batches]
    if sum(lp.shape[0] for lp in post_log_probs) == 0:
        raise ValueError("kl_examples have no labelled tokens")
    subset_batches = [task.collate(chunk) for chunk in chunked(_subset_examples(model, task, train, subset), batch_size)]

    def objective_and_gradient() -> tuple[float, dict[str, torch.Tensor]]:
        """J at the current parameters and its gradient per layer in the folded layout."""
        for p in params:
            p.grad = None
        value = 0.0
        for batch, ref in zip(kl_batches, post_log_probs):
            kl = (ref.exp() * (ref - _token_log_probs(model, task, batch))).sum() / len(kl_examples)
            kl.backward()
            value += float(kl.detach())
        for batch in subset_batches:
            ascent = -beta * task.train_loss(model, batch).sum()
            ascent.backward()
            value += float(ascent.detach())
        grads = {}
        with torch.no_grad():
            for layer in layers:
                moved = layer.folded_weight() - post_folded[layer.name]
                value += weights[layer.name] / 2 * float(moved.double().pow(2).sum())
                grads[layer.name] = layer.folded_grad() + weights[layer.name] * moved
        return value, grads

    def descent(grads: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """The step direction (moved along by ``-lr``) and J's slope along it per unit ``lr`` (<= 0)."""
        step = grads if factors is None else factors.precondition(grads, damping=damping)
        return step, -sum(float((grads[n].double() * step[n].double()).sum()) for n in grads)

    requires_grad = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        if init is not None:
            init.apply(model)
        value, grads = objective_and_gradient()
        step, slope = descent(grads)
        trials = [{"lr": 0.0, "objective": value, "predicted": value, "accepted": True}]
        for _ in tqdm(range(steps), desc=f"PBRF beta={beta:.3g}", disable=not progress, leave=False):
            accepted = [p.detach().clone() for p in params]
            for layer in layers:
                layer.add_(step[layer.name], alpha=-lr)
            trial, trial_grads = objective_and_gradient()
            trials.append({"lr": lr, "objective": trial, "predicted": value + lr * slope,
                           "accepted": bool(trial <= value + ARMIJO * lr * slope)})
            if not trials[-1]["accepted"]:  # NaN is refused too
                with torch.no_grad():
                    for p, p0 in zip(params, accepted):
                        p.copy_(p0)
                curvature = (trial - value - slope * lr) / lr ** 2
                shrunk = -slope / (2 * curvature) if math.isfinite(curvature) and curvature > 0 else lr / 2
                lr = min(max(shrunk, lr / 100), lr / 2)
                continue
            value, grads = trial, trial_grads
            step, slope = descent(grads)
            lr = min(2 * lr, first_lr)
        deltas = {layer.name: layer.folded_weight() - post_folded[layer.name] for layer in layers}
    finally:
        with torch.no_grad():
            for p, p0, flag in zip(params, post, requires_grad):
                p.copy_(p0)
                p.requires_grad_(flag)
                p.grad = None
    return RepairDelta(deltas, {"method": "pbrf", "beta": beta, "steps": steps, "lr": first_lr, "final_lr": lr,
                                "proximal": proximal, "preconditioned": factors is not None,
                                "objective": value, "trials": trials, "subset_size": len(subset)})


@dataclass
class BetaPoint:
    """One evaluated step size: the trust objective on the query half (``None`` where the search did not
    need it) and the held-out perplexity."""

    beta: float
    metric: float | None
    perplexity: float


def _measured(make_delta: Callable[[float], RepairDelta], model: torch.nn.Module, beta: float,
              measure: Callable[[torch.nn.Module], float]) -> float:
    """``measure(model)`` with the step ``make_delta(beta)`` applied; the model is restored afterwards."""
    delta = make_delta(beta)
    delta.apply(model)
    try:
        return measure(model)
    finally:
        delta.revert(model)


def _next_probe(rises: Sequence[tuple[float, float]], target: float) -> float | None:
    """The next beta of :func:`search_beta`, or ``None`` when the boundary is located well enough.

    ``rises`` holds (beta, d(beta)) of every probe so far (d = inf for a diverged one); the aim is
    d = 0.97 * target. From the probes nearest the boundary (the largest admissible one and the smallest
    inadmissible one, or the two largest admissible ones, or when every probe overshot the two smallest
    inadmissible ones) the model d = b beta + c beta^2 is solved
    exactly and its root taken; with one probe of rise d_1 > 0 the step is beta_1 (aim / d_1)^0.75,
    between the linear (exponent 1) and the quadratic (exponent 1/2) extrapolation; while the perplexity
    does not rise at all beta grows 4x. Falling probes (d < 0: ascent on the subset lowered the held-out
    loss, as for subsets of planted examples unlike the held-out data) are anchors too: with b < 0 and
    c > 0 the model's root lies beyond its dip, and it is taken, at most 16x the largest probe, while no
    probe has risen. A guess outside the bracket (largest admissible, smallest inadmissible) is replaced by
    the bracket's geometric midpoint.
    """
    aim = 0.97 * target
    admissible = sorted((p for p in rises if p[1] <= target), key=lambda p: p[0])
    too_far = sorted((p for p in rises if p[1] > target), key=lambda p: p[0])
    low = admissible[-1] if admissible else (0.0, 0.0)
    high = too_far[0] if too_far else None
    if low[1] >= 0.95 * target or (high is not None and low[0] > 0 and high[0] / low[0] < 1.1):
        return None
    if high is None:
        candidates = admissible[-2:]
    elif admissible:
        candidates = [low, high]
    else:  # every probe overshot: the two smallest are the nearest the boundary, from above
        candidates = too_far[:2]
    anchors = [p for p in candidates if p[0] > 0 and 1e-9 < abs(p[1]) < math.inf]
    guess = None
    if len(anchors) == 2:
        (x1, y1), (x2, y2) = anchors
        c = (y2 / x2 - y1 / x1) / (x2 - x1)
        b = y1 / x1 - c * x1
        disc = b * b + 4 * c * aim
        if disc >= 0 and b + math.sqrt(disc) > 0:
            guess = 2 * aim / (b + math.sqrt(disc))
        elif y2 > 0:
            guess = x2 * aim / y2
    elif len(anchors) == 1 and anchors[0][1] > 0:
        x1, y1 = anchors[0]
        guess = x1 * (aim / y1) ** 0.75
    largest = max(p[0] for p in rises)
    if guess is None:
        guess = 4.0 * largest if high is None else 0.5 * high[0]
    elif high is None and low[1] <= 0:
        guess = min(guess, 16.0 * largest)
    if high is not None and not low[0] < guess < high[0]:
        guess = math.sqrt(max(low[0], 1e-3 * high[0]) * high[0])
    if any(abs(guess - p[0]) <= 1e-3 * guess for p in rises):
        return None
    return guess


def search_beta(make_delta: Callable[[float], RepairDelta], model: torch.nn.Module,
                perplexity: Callable[[torch.nn.Module], float], metric: Callable[[torch.nn.Module], float], *,
                tolerance: float = 0.01, beta0: float, max_probes: int = 5, baseline: BetaPoint | None = None,
                trace_metric: bool = False, progress: bool = False) -> tuple[BetaPoint, list[BetaPoint], BetaPoint]:
    """Largest step whose perplexity stays within ``tolerance`` of the post-SFT model and improves the
    trust objective (Eq. 1).

    The probes measure only ``perplexity(model)`` (cheap: the held-out SFT split), applying
    ``make_delta(beta)`` and restoring the model each time, and aim at the boundary
    d(beta) = log(ppl / ppl_post) = log(1 + tolerance) with a model d(beta) = b beta + c beta^2 through the
    origin: near theta_post the quadratic term is the curvature of the loss, and the linear one is there
    because raising the loss of SFT examples raises the held-out SFT loss to first order too (on the demo
    the rise was close to linear in beta). See :func:`_next_probe` for the steps. Probing stops after
    ``max_probes``, when the bracket of the boundary is within 10%, or when an admissible probe reaches
    95% of the allowed rise.

    The objective ``metric(model)`` (the query half's log-odds: the expensive measurement) is then taken
    at the admissible probes from the largest beta down, and the first that beats the baseline is chosen;
    beta = 0 (no repair) when none does. A Newton step lowers the objective about linearly in beta inside
    the tolerance (its first-order prediction matches the measured change:
    ../shared/notes/repair-feasibility.md), so this is the largest trust gain within the tolerance,
    normally at the cost of one objective evaluation. ``trace_metric=True`` measures the objective at every probe
    (for plotting it against beta); the choice is the same.

    ``baseline`` (the post-SFT point, beta = 0, with both values) is measured unless given, so searches
    along several directions from the same model can share it.

    Returns:
        (chosen point, every probe in beta order, the post-SFT point at beta = 0).
    """
    tolerance = finite("tolerance", tolerance, minimum=0, hint="a relative perplexity increase")
    beta0 = finite("beta0", beta0, positive=True, hint="the first step size probed")
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    if baseline is None:
        baseline = BetaPoint(0.0, metric(model), perplexity(model))
    if baseline.metric is None:
        raise ValueError("the baseline point needs its objective value (metric) to compare repairs against")
    ppl0 = baseline.perplexity
    target = math.log1p(tolerance)
    points: list[BetaPoint] = []
    beta = beta0
    for _ in tqdm(range(max_probes), desc="beta search", disable=not progress, leave=False):
        ppl = _measured(make_delta, model, beta, perplexity)
        value = _measured(make_delta, model, beta, metric) if trace_metric else None
        points.append(BetaPoint(beta, value, ppl))
        rises = [(p.beta, math.log(p.perplexity / ppl0) if math.isfinite(p.perplexity) and p.perplexity > 0
                  else math.inf) for p in points]
        beta = _next_probe(rises, target)
        if beta is None:
            break
    points.sort(key=lambda p: p.beta)
    admissible = [p for p in points if math.isfinite(p.perplexity) and math.log(p.perplexity / ppl0) <= target]
    for point in sorted(admissible, key=lambda p: -p.beta):
        if point.metric is None:
            point.metric = _measured(make_delta, model, point.beta, metric)
        if math.isfinite(point.metric) and point.metric < baseline.metric:
            return point, points, baseline
    return baseline, points, baseline


def repair(model: torch.nn.Module, factors, train: Sequence, subset, *, beta: float,
           method: str = "newton", damping: float | None = None, task: Task | None = None,
           batch_size: int = 8, kl_examples: Sequence | None = None, steps: int = 4, lr: float = 1.0,
           proximal: float | None = None, progress: bool = False, check_fingerprint: bool = True) -> RepairDelta:
    """Repair ``model`` on ``subset`` at step size ``beta``; returns the change (the model is unchanged).

    ``method="newton"``: beta * sum_S (G + lambda I)^{-1} grad L(z) with the EK-FAC ``factors`` and
    ``damping`` (None: 0.1 x mean eigenvalue correction per module). ``method="pbrf"``: ``steps``
    EK-FAC-preconditioned gradient steps (learning rate ``lr``) on the PBRF objective over the analysed
    modules' parameters from theta_post (:func:`pbrf_repair`; the first step at ``lr=1`` is the Newton step),
    the KL term on ``kl_examples``, the proximal weight ``proximal`` (None: the damping per module). Apply
    the result with ``delta.apply(model)``; undo with ``delta.revert(model)`` (exact: see
    :meth:`RepairDelta.revert`).

    ``subset`` is integer indices (distinct) or a boolean mask of length ``len(train)``. Every float
    argument must be finite. ``check_fingerprint=False`` lets factors fitted on other weights (same
    layers and shapes) precondition this model's step.
    """
    beta = finite("beta", beta, minimum=0, hint="the weight of the loss ascent on the subset")
    if method not in ("newton", "pbrf"):
        raise ValueError(f"unknown repair method {method!r}; choose 'newton' or 'pbrf'")
    if method == "pbrf":
        factors.check_model(model, weights=check_fingerprint)
        layers = find_modules(model, list(factors.modules))
        return pbrf_repair(model, train, subset, beta=beta, layers=layers, kl_examples=kl_examples or [],
                           proximal=proximal, steps=steps, lr=lr, task=task, batch_size=batch_size,
                           factors=factors, damping=damping, progress=progress)
    newton = newton_direction(model, factors, train, subset, task=task, damping=damping, batch_size=batch_size,
                              progress=progress, check_fingerprint=check_fingerprint).scaled(beta)
    newton.metadata.update(method="newton", beta=beta)
    return newton
