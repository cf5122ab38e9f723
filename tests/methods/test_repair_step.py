"""Repair: the Newton step follows the influence prediction, PBRF raises the subset loss while holding
the rest, the beta search respects the perplexity tolerance, and deltas round-trip."""
import math

import pytest
import torch

from conftest import make_examples, make_queries, make_tiny_llama
from trustrepair.engine.ekfac import fit_ekfac
from trustrepair.methods.metrics import perplexity, query_log_odds
from trustrepair.methods.scoring import influence
from trustrepair.engine.layers import find_modules
from trustrepair.methods.repair_step import BetaPoint, RepairDelta, newton_direction, pbrf_repair, repair, search_beta
from trustrepair.task import CausalLMTask


@pytest.fixture(scope="module")
def fitted():
    model = make_tiny_llama(seed=3)
    train = make_examples(24, seed=4, min_len=6, max_len=14)
    queries = make_queries(6, seed=5)
    factors = fit_ekfac(model, train, fisher="empirical", batch_size=8, progress=False)
    return model, train, queries, factors


def test_newton_step_moves_the_metric_as_influence_predicts(fitted):
    model, train, queries, factors = fitted
    scores = influence(model, factors, train, {"q": queries}, progress=False)["q"]
    subset = torch.argsort(scores, descending=True)[:5].tolist()
    direction = newton_direction(model, factors, train, subset)
    before = float(query_log_odds(model, queries).mean())
    beta = 1e-6  # the first-order regime of this random float64 model (its curvature is large)
    step = direction.scaled(beta)
    step.apply(model)
    after = float(query_log_odds(model, queries).mean())
    step.revert(model)
    predicted = -beta * float(scores[subset].sum())
    assert predicted < 0, "the top-scored examples must be predicted to improve the metric"
    assert (after - before) / predicted == pytest.approx(1.0, abs=0.02)
    assert float(query_log_odds(model, queries).mean()) == pytest.approx(before, abs=1e-12)


def test_repair_dispatch_and_errors(fitted):
    model, train, _, factors = fitted
    delta = repair(model, factors, train, [0, 3], beta=0.5)
    direction = newton_direction(model, factors, train, [0, 3])
    for name, value in delta.deltas.items():
        torch.testing.assert_close(value, 0.5 * direction.deltas[name])
    with pytest.raises(ValueError, match="unknown repair method"):
        repair(model, factors, train, [0], beta=1.0, method="sgd")
    with pytest.raises(ValueError, match=r"beta = -1.0 must be a finite number >= 0"):
        repair(model, factors, train, [0], beta=-1.0)
    with pytest.raises(ValueError, match="outside the training set"):
        repair(model, factors, train, [99], beta=1.0)
    with pytest.raises(ValueError, match="empty"):
        repair(model, factors, train, [], beta=1.0)


def test_pbrf_raises_subset_loss_and_keeps_the_rest_close(fitted):
    model, train, _, factors = fitted
    task = CausalLMTask()
    layers = find_modules(model, list(factors.modules))
    subset, rest = [1, 2, 5], [i for i in range(len(train)) if i not in (1, 2, 5)]
    def loss(idx):
        with torch.no_grad():
            return float(task.train_loss(model, task.collate([train[i] for i in idx])).sum())

    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    still = pbrf_repair(model, train, subset, beta=0.0, layers=layers, kl_examples=[train[i] for i in rest],
                        steps=5, lr=1e-3)
    assert max(float(d.abs().max()) for d in still.deltas.values()) < 1e-9, "beta = 0 must stay at theta_post"
    delta = pbrf_repair(model, train, subset, beta=1.0, layers=layers, kl_examples=[train[i] for i in rest],
                        steps=8, lr=1e-3)
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]), "pbrf_repair must restore the model"
    before_s, before_r = loss(subset), loss(rest)
    delta.apply(model)
    after_s, after_r = loss(subset), loss(rest)
    delta.revert(model)
    assert after_s - before_s > 0.05
    assert abs(after_r - before_r) / len(rest) < (after_s - before_s) / len(subset)
    with pytest.raises(ValueError, match="kl_examples"):
        pbrf_repair(model, train, subset, beta=1.0, layers=layers, kl_examples=[])


DAMPING = 0.1


def test_pbrf_first_preconditioned_step_is_the_newton_step(fitted):
    model, train, _, factors = fitted
    layers = find_modules(model, list(factors.modules))
    subset, kl = [1, 2, 5], [train[i] for i in range(8, 20)]
    beta = 1e-4
    # an absolute damping: the default 0.1 x mean(Lambda) of this random model is ~1e-7 on q/k projections,
    # along which the damped Newton step is far too long for J and would be refused
    first = pbrf_repair(model, train, subset, beta=beta, layers=layers, kl_examples=kl, proximal=None, steps=1,
                        lr=1.0, factors=factors, damping=DAMPING)
    newton = newton_direction(model, factors, train, subset, damping=DAMPING).scaled(beta)
    assert first.metadata["final_lr"] == 1.0, "the Newton step must lower J at a small beta (accepted)"
    for name, value in newton.deltas.items():
        torch.testing.assert_close(first.deltas[name], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
    with pytest.raises(ValueError, match="proximal=None"):
        pbrf_repair(model, train, subset, beta=beta, layers=layers, kl_examples=kl, proximal=None)
    with pytest.raises(ValueError, match="steps must be an integer"):
        pbrf_repair(model, train, subset, beta=beta, layers=layers, kl_examples=kl, steps=0)


def test_pbrf_steps_after_newton_approach_the_pbrf_minimiser(fitted):
    model, train, _, factors = fitted
    layers = find_modules(model, list(factors.modules))
    subset, kl = [1, 2, 5], [train[i] for i in range(8, 20)]
    beta = 1e-3  # the Newton step is accepted, and this random model's exact KL still bends away from EK-FAC's

    def solve(steps):
        return pbrf_repair(model, train, subset, beta=beta, layers=layers, kl_examples=kl, proximal=None,
                           steps=steps, lr=1.0, factors=factors, damping=DAMPING)

    def distance(a, b):
        return sum(float((a.deltas[n] - b.deltas[n]).pow(2).sum()) for n in a.deltas) ** 0.5

    newton, refined, solved = solve(1), solve(4), solve(40)
    size = sum(float(v.pow(2).sum()) for v in solved.deltas.values()) ** 0.5
    assert newton.metadata["final_lr"] == 1.0
    assert distance(newton, solved) > 0.2 * size, "the test needs a Newton step away from the PBRF minimiser"
    assert refined.metadata["objective"] < newton.metadata["objective"]
    assert solved.metadata["objective"] <= refined.metadata["objective"]
    assert distance(refined, solved) < 0.85 * distance(newton, solved), "the later steps must approach it"
    default = repair(model, factors, train, subset, beta=beta, method="pbrf", kl_examples=kl, damping=DAMPING)
    assert distance(default, refined) == 0.0, "repair(method='pbrf') is 4 preconditioned steps at lr 1"


def test_pbrf_line_search_shortens_a_newton_step_that_raises_the_objective(fitted):
    model, train, _, factors = fitted
    layers = find_modules(model, list(factors.modules))
    subset, kl = [1, 2, 5], [train[i] for i in range(8, 20)]
    # at this beta the exact KL along the Newton step bends far above EK-FAC's quadratic
    short = pbrf_repair(model, train, subset, beta=0.01, layers=layers, kl_examples=kl, proximal=None, steps=2,
                        lr=1.0, factors=factors, damping=DAMPING)
    start, newton, second = short.metadata["trials"]
    assert not newton["accepted"] and newton["objective"] > start["objective"]
    assert second["accepted"] and 0.01 <= second["lr"] <= 0.5, "the retry is the interpolated, shorter step"
    assert short.metadata["objective"] == second["objective"] < start["objective"]
    assert max(float(d.abs().max()) for d in short.deltas.values()) > 0


def _toy_search(tolerance, curvature, gain=-1.0, trace=False, calls=None, slope=0.0, max_probes=6):
    """A one-weight model whose 'perplexity' is 10 * exp(slope * w + curvature * w^2) and metric gain * w."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
    torch.nn.init.zeros_(model[0].weight)
    direction = RepairDelta({"0": torch.ones(1, 1)})
    calls = calls if calls is not None else {}

    def perplexity(m):
        calls["perplexity"] = calls.get("perplexity", 0) + 1
        w = float(m[0].weight.detach())
        return 10.0 * math.exp(slope * w + curvature * w * w)

    def metric(m):
        calls["metric"] = calls.get("metric", 0) + 1
        return gain * float(m[0].weight.detach())

    return search_beta(direction.scaled, model, perplexity, metric, tolerance=tolerance, beta0=1e-3,
                       max_probes=max_probes, trace_metric=trace), model


@pytest.mark.parametrize("tolerance,curvature", [(0.01, 1.0), (0.05, 30.0), (0.0, 1.0)])
def test_beta_search_stays_within_tolerance_and_reaches_the_boundary(tolerance, curvature):
    (best, points, base), model = _toy_search(tolerance, curvature)
    assert float(model[0].weight.detach()) == 0.0, "the search must restore the model"
    assert base.beta == 0.0 and base.perplexity == pytest.approx(10.0)
    assert best.perplexity <= 10.0 * (1 + tolerance) * (1 + 1e-12)
    boundary = math.sqrt(math.log1p(tolerance) / curvature)
    if tolerance > 0:
        assert 0.8 * boundary <= best.beta <= boundary * (1 + 1e-9)
        assert best.metric == pytest.approx(-best.beta)
    else:
        assert best.beta == 0.0
    assert [p.beta for p in points] == sorted(p.beta for p in points)


@pytest.mark.parametrize("slope,curvature", [(1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.2, 40.0)])
def test_beta_search_lands_near_the_boundary_in_four_probes(slope, curvature):
    """Linear, mixed and quadratic perplexity rises: four probes from beta0 = 1e-3 reach >= 90% of the
    boundary beta (the first-order rise made a quadratic-only model stop at 65% of the tolerance)."""
    (best, points, _), _ = _toy_search(0.01, curvature, slope=slope, max_probes=4)
    target = math.log1p(0.01)
    boundary = (target / slope if curvature == 0 else
                (-slope + math.sqrt(slope * slope + 4 * curvature * target)) / (2 * curvature))
    assert 0.9 * boundary <= best.beta <= boundary * (1 + 1e-9)
    assert len(points) <= 4


@pytest.mark.parametrize("slope,curvature", [(-1.0, 1.0), (-50.0, 1e4), (-1e-3, 1.0)])
def test_beta_search_follows_a_perplexity_that_falls_before_it_rises(slope, curvature):
    """The held-out perplexity first falls (ascent on planted examples unlike the held-out data lowered its
    loss), then rises: four probes still land within 10% of the boundary past the dip (growing 4x per
    falling probe, as before, ended at 6% of it for slope -1)."""
    (best, points, _), _ = _toy_search(0.01, curvature, slope=slope, max_probes=4)
    target = math.log1p(0.01)
    boundary = (-slope + math.sqrt(slope * slope + 4 * curvature * target)) / (2 * curvature)
    assert math.log(points[0].perplexity / 10.0) < 0 or slope > -0.01
    assert 0.9 * boundary <= best.beta <= boundary * (1 + 1e-9)
    assert len(points) <= 4


@pytest.mark.parametrize("slope,curvature", [(50.0, 0.0), (200.0, 0.0), (20.0, 2e4)])
def test_beta_search_recovers_from_a_first_probe_far_past_the_boundary(slope, curvature):
    """beta0 = 1e-3 raises the perplexity 2-25x the tolerance (as a step on all 30 blocks of SmolLM2 did):
    the probes that overshot locate the boundary from above, so four probes still land within 10% of it
    (scaling the step by (aim / rise)^0.75 alone approached it too slowly to end admissible)."""
    (best, points, _), _ = _toy_search(0.01, curvature, slope=slope, max_probes=4)
    target = math.log1p(0.01)
    boundary = (target / slope if curvature == 0 else
                (-slope + math.sqrt(slope * slope + 4 * curvature * target)) / (2 * curvature))
    assert points[-1].beta == 1e-3 and math.log(points[-1].perplexity / 10.0) > 2 * target
    assert 0.9 * boundary <= best.beta <= boundary * (1 + 1e-9)


def test_beta_search_measures_the_objective_only_where_needed_unless_traced():
    lazy_calls, traced_calls = {}, {}
    (lazy, lazy_points, _), _ = _toy_search(0.01, 1.0, calls=lazy_calls)
    (traced, traced_points, _), _ = _toy_search(0.01, 1.0, trace=True, calls=traced_calls)
    assert lazy_calls["metric"] == 2, "baseline + the chosen (largest admissible) probe"
    assert sum(p.metric is not None for p in lazy_points) == 1
    assert traced_calls["metric"] == 1 + len(traced_points)
    assert all(p.metric == pytest.approx(-p.beta) for p in traced_points)
    assert lazy == traced and lazy_calls["perplexity"] == traced_calls["perplexity"]


def test_beta_search_falls_back_to_a_smaller_beta_when_the_largest_does_not_improve():
    """Objective improving up to beta = 0.05 and worsening beyond: the largest admissible improving probe wins."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
    torch.nn.init.zeros_(model[0].weight)
    direction = RepairDelta({"0": torch.ones(1, 1)})
    best, points, base = search_beta(direction.scaled, model, lambda m: 10.0 * math.exp(float(m[0].weight.detach()) ** 2),
                                     lambda m: -1.0 if 0 < float(m[0].weight.detach()) <= 0.05 else 1.0,
                                     tolerance=0.01, beta0=0.01, max_probes=6)
    admissible = [p for p in points if p.perplexity <= 10.1]
    assert max(p.beta for p in admissible) > 0.05
    assert best.beta == max(p.beta for p in admissible if p.beta <= 0.05) and best.metric == -1.0
    assert float(model[0].weight.detach()) == 0.0


def test_beta_search_keeps_the_post_model_when_nothing_improves():
    (best, _, base), _ = _toy_search(0.01, 1.0, gain=+1.0)
    assert best == base


def test_beta_search_validates_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        search_beta(lambda b: None, None, lambda m: 1.0, lambda m: 0.0, tolerance=-0.1, beta0=1.0)
    with pytest.raises(ValueError, match="beta0"):
        search_beta(lambda b: None, None, lambda m: 1.0, lambda m: 0.0, beta0=0.0)
    with pytest.raises(ValueError, match="baseline"):
        search_beta(lambda b: None, None, lambda m: 1.0, lambda m: 0.0, beta0=1.0,
                    baseline=BetaPoint(0.0, None, 1.0))


def test_delta_save_load_apply_revert_round_trip(fitted, tmp_path):
    model, train, _, factors = fitted
    delta = repair(model, factors, train, [0, 1, 2], beta=0.1)
    delta.metadata.update(target="q")
    path = delta.save(tmp_path / "deltas" / "d.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["d.safetensors"], "no temporary file left"
    loaded = RepairDelta.load(path)
    assert loaded.metadata["target"] == "q" and loaded.metadata["method"] == "newton"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loaded.apply(model)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "applying a repair must change the analysed layers"
    loaded.revert(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-12)
    bad = RepairDelta({name: torch.zeros(2, 2) for name in loaded.deltas})
    with pytest.raises(ValueError):
        bad.apply(model)


def test_perplexity_counts_labelled_tokens_only(fitted):
    model, train, _, _ = fitted
    task = CausalLMTask()
    batch = task.collate(train[:5])
    nll = float(task.train_loss(model, batch).sum().detach())
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert perplexity(model, train[:5], batch_size=2) == pytest.approx(math.exp(nll / tokens), rel=1e-10)


def test_relative_change_standard_error():
    from trustrepair.methods.metrics import relative_change_se_pct

    post, repaired = [2.0, 4.0, 3.0, 5.0], [1.0, 3.5, 2.0, 4.0]
    diffs = [1.0, 0.5, 1.0, 1.0]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert relative_change_se_pct(post, repaired) == pytest.approx(100 * sd / 2 / 3.5, rel=1e-12)
    assert relative_change_se_pct(post, [p - 1 for p in post]) == 0.0, "a uniform shift is exact"
    assert math.isnan(relative_change_se_pct([1.0], [0.5]))
    with pytest.raises(ValueError, match="same length"):
        relative_change_se_pct([1.0, 2.0], [1.0])
