"""Influence scores (trustrepair.methods.scoring) against explicit per-example autograd gradients, the
aggregated / pairwise identity, the large-damping limit, planted examples and bad inputs."""
import pytest
import torch

from conftest import FLOAT64_MODEL_RTOL, assert_rel, make_examples, make_queries, make_tiny_llama, make_tiny_neox, per_example_gradients
from trustrepair import fit_ekfac, influence, normalized_influence, pairwise_influence, self_influence
from trustrepair.engine.layers import find_modules
from trustrepair.methods.scoring import (_pass_tokens, eigenbasis_is_cheaper, measurement_gradient, normalize_scores,
                                       summed_gradient)
from trustrepair.methods import selection
from trustrepair.engine.lowrank import low_rank_factors
from trustrepair.task import IGNORE_INDEX, CausalLMTask, stack_queries

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_measurement_gradients(model, names, queries):
    """Per query, {name: gradient of log P(o|m) - log P(p|m)} by plain autograd on the parameters, each
    query run on its own (proponent and opponent stacked, as in a real measurement)."""
    task = CausalLMTask()
    return per_example_gradients(model, names, queries, lambda q: task.measurement(model, stack_queries([q]))[0])


def dot(u, grads):
    return sum(float((u[n] * grads[n]).sum()) for n in u)


@pytest.fixture(scope="module")
def setting():
    """A float64 tiny GPT-NeoX, empirical-Fisher factors, training examples and trust queries."""
    model = make_tiny_neox(seed=3)
    train = make_examples(15, seed=21)
    queries = make_queries(5, seed=22)
    factors = fit_ekfac(model, train, fisher="empirical", batch_size=4, progress=False)
    names = list(factors.modules)
    train_grads = per_example_gradients(model, names, train)
    query_grads = explicit_measurement_gradients(model, names, queries)
    return model, train, queries, factors, train_grads, query_grads


def test_query_and_training_gradients_equal_plain_autograd(setting):
    model, train, queries, factors, train_grads, query_grads = setting
    names = list(factors.modules)
    got = measurement_gradient(model, queries, modules=names, batch_size=2)  # chunks of 2, 2, 1 queries
    summed = summed_gradient(model, train[:7], modules=names, batch_size=3)
    for n in names:
        assert_rel(got[n], sum(g[n] for g in query_grads) / len(queries), 1e-10, f"query gradient {n}")
        assert_rel(summed[n], sum(g[n] for g in train_grads[:7]), 1e-10, f"summed training gradient {n}")


def test_aggregated_scores_equal_explicit_gradient_dot_products(setting):
    """Ghost dot products (one aspect: the per-token path; two aspects: the gradient-first path) equal
    -<(G + lambda I)^{-1} grad F, grad L(z)> from explicit per-example gradients."""
    model, train, queries, factors, train_grads, query_grads = setting
    names = list(factors.modules)
    members_of = {"one": [0], "rest": [1, 2, 3, 4]}
    trust = {aspect: [queries[i] for i in members] for aspect, members in members_of.items()}
    for aspects in (["one"], ["one", "rest"]):
        timings = {}
        scores = influence(model, factors, train, {a: trust[a] for a in aspects}, batch_size=4, progress=False,
                           timings=timings)
        assert set(timings) == {"query_gradients", "precondition", "scores"}
        for aspect in aspects:
            members = [query_grads[i] for i in members_of[aspect]]
            grad_f = {n: sum(g[n] for g in members) / len(members) for n in names}
            u = factors.precondition(grad_f)
            expected = torch.tensor([-dot(u, g) for g in train_grads], dtype=torch.float64)
            assert scores[aspect].shape == (len(train),)
            assert_rel(scores[aspect], expected, FLOAT64_MODEL_RTOL, f"aspect {aspect} of {aspects}")


def test_pairwise_scores_equal_explicit_and_low_rank_equals_truncated_svd(setting):
    model, train, queries, factors, train_grads, query_grads = setting
    damping = 0.05
    pairwise = pairwise_influence(model, factors, train, queries, damping=damping, batch_size=4, progress=False)
    low = pairwise_influence(model, factors, train, queries, damping=damping, query_rank=3, batch_size=4,
                             progress=False)
    exact = torch.zeros(len(queries), len(train), dtype=torch.float64)
    truncated = torch.zeros_like(exact)
    for q, grads in enumerate(query_grads):
        u = factors.precondition(grads, damping)
        scaled = factors.divide_projected(factors.project(grads), damping)
        u_low = {}
        for n, m in scaled.items():
            f = factors.modules[n]
            left, right = low_rank_factors(m[None], 3, column_basis=f.q_a)
            u_low[n] = f.q_s @ (left @ right)[0] @ f.q_a.T
        for z, g in enumerate(train_grads):
            exact[q, z], truncated[q, z] = -dot(u, g), -dot(u_low, g)
    assert_rel(pairwise, exact, FLOAT64_MODEL_RTOL, "pairwise")
    assert_rel(low, truncated, FLOAT64_MODEL_RTOL, "rank-3 pairwise")
    full_rank = pairwise_influence(model, factors, train, queries[:2], damping=damping, query_rank=1000,
                                   progress=False)
    assert_rel(full_rank, exact[:2], FLOAT64_MODEL_RTOL, "query_rank above every layer's rank is exact")


def test_scores_equal_explicit_in_either_basis(setting):
    """Few training tokens against many directions contract in the eigenbasis, many tokens against one in
    the original basis (the choice is asserted), and both equal the explicit scores, pairwise and aggregated."""
    model, train, queries, factors, train_grads, query_grads = setting
    shapes = [layer.shape for layer in find_modules(model, list(factors.modules))]
    damping = 0.05
    for n_train, n_query, eigen in ((2, 5, True), (15, 1, False)):
        assert all(eigenbasis_is_cheaper(_pass_tokens(train[:n_train], 4), n_query, shape) == eigen for shape in shapes)
        got = pairwise_influence(model, factors, train[:n_train], queries[:n_query], damping=damping, batch_size=4,
                                 progress=False)
        u = [factors.precondition(query_grads[q], damping) for q in range(n_query)]
        expected = torch.tensor([[-dot(u[q], train_grads[z]) for z in range(n_train)] for q in range(n_query)],
                                dtype=torch.float64)
        assert_rel(got, expected, FLOAT64_MODEL_RTOL, f"pairwise, {n_train} examples x {n_query} queries")
    one_example = influence(model, factors, train[:1], {"all": queries}, damping=damping, progress=False)["all"]
    assert all(eigenbasis_is_cheaper(_pass_tokens(train[:1], 8), 1, shape) for shape in shapes)
    grad_f = {n: sum(g[n] for g in query_grads) / len(queries) for n in query_grads[0]}
    expected = torch.tensor([-dot(factors.precondition(grad_f, damping), train_grads[0])], dtype=torch.float64)
    assert_rel(one_example, expected, 1e-8, "aggregated, one example")


def test_pairwise_scores_of_queries_of_awkward_lengths_equal_explicit(setting):
    """Queries whose sides differ in length (so a stacked batch pads some rows) and whose batches mix
    lengths: their gathered token gradients still equal plain autograd's."""
    model, train, _, factors, train_grads, _ = setting
    queries = [q for prompt, response, seed in ((2, 1, 30), (7, 4, 31), (3, 6, 32)) for q in
               make_queries(2, prompt_len=prompt, resp_len=response, seed=seed)]
    queries[1] = {**queries[1], "opponent": make_queries(1, prompt_len=2, resp_len=5, seed=33)[0]["opponent"]}
    queries[1]["opponent"]["input_ids"][:2] = queries[1]["proponent"]["input_ids"][:2]
    names = list(factors.modules)
    query_grads = explicit_measurement_gradients(model, names, queries)
    got = pairwise_influence(model, factors, train, queries, damping=0.05, batch_size=4, progress=False)
    expected = torch.tensor([[-dot(factors.precondition(q, 0.05), z) for z in train_grads] for q in query_grads],
                            dtype=torch.float64)
    assert_rel(got, expected, FLOAT64_MODEL_RTOL, "pairwise, awkward query lengths")


def test_self_influence_equals_explicit_and_normalizes_scores(setting):
    """sigma(z) = grad L(z)^T (G + lambda I)^{-1} grad L(z) from explicit per-example gradients; the
    normalised scores divide by its root; an unlabelled example gets sigma 0 and a normalised score 0."""
    model, train, queries, factors, train_grads, _ = setting
    damping = 0.05
    sigma = self_influence(model, factors, train, damping=damping, batch_size=4, progress=False)
    expected = torch.tensor([dot(factors.precondition(g, damping), g) for g in train_grads], dtype=torch.float64)
    assert_rel(sigma, expected, 1e-8, "self-influence")
    scores = pairwise_influence(model, factors, train, queries, damping=damping, progress=False)
    assert_rel(normalized_influence(scores, sigma), scores / expected.sqrt(), 1e-8, "normalised pairwise")
    unlabelled = {**train[0], "labels": torch.full_like(train[0]["labels"], IGNORE_INDEX)}
    with pytest.warns(UserWarning):
        sigma0 = self_influence(model, factors, [unlabelled, train[1]], damping=damping, progress=False)
    assert sigma0[0] == 0 and sigma0[1] > 0
    assert normalized_influence(torch.tensor([2.0, 3.0]), sigma0)[0] == 0
    for bad, match in ((sigma[:3], "one self-influence per training example"), (-sigma, "non-negative")):
        with pytest.raises(ValueError, match=match):
            normalized_influence(scores, bad)


def test_aggregated_equals_mean_of_pairwise_in_float32():
    model = make_tiny_llama(seed=4, dtype=torch.float32)
    train = make_examples(13, seed=23)
    queries = make_queries(4, seed=24)
    factors = fit_ekfac(model, train, progress=False)
    scores = influence(model, factors, train, {"aspect": queries}, progress=False)["aspect"]
    pairwise = pairwise_influence(model, factors, train, queries, progress=False)
    assert scores.dtype == pairwise.dtype == torch.float32
    assert_rel(scores * len(queries), pairwise.sum(dim=0), 1e-5, "aggregated x Q vs sum of pairwise")


def test_large_damping_gives_plain_gradient_dot_products(setting):
    """With lambda >> Lambda, (G + lambda I)^{-1} -> I / lambda: scores x lambda -> -<grad F, grad L(z)>."""
    model, train, queries, factors, train_grads, query_grads = setting
    damping = 1e7 * max(float(f.lambda_.max()) for f in factors.modules.values())
    scores = influence(model, factors, train, {"a": queries}, damping=damping, progress=False)["a"]
    grad_f = {n: sum(g[n] for g in query_grads) / len(queries) for n in factors.modules}
    plain = torch.tensor([-dot(grad_f, g) for g in train_grads], dtype=torch.float64)
    assert_rel(scores * damping, plain, 1e-6, "large-damping limit")


def test_planted_copies_rank_most_detrimental():
    """A training example that copies a query's (prompt, opponent) teaches the untrustworthy answer: it must
    be the top-scoring (most detrimental) example for that query, pairwise and aggregated."""
    model = make_tiny_neox(seed=5)
    queries = make_queries(4, seed=25)
    train = make_examples(30, seed=26)
    planted = {}
    for q in range(3):
        opponent = queries[q]["opponent"]
        planted[q] = len(train)
        train.append({"input_ids": opponent["input_ids"].clone(), "labels": opponent["labels"].clone()})
    factors = fit_ekfac(model, train, fisher="empirical", progress=False)
    pairwise = pairwise_influence(model, factors, train, queries, progress=False)
    aggregated = influence(model, factors, train, {f"q{q}": [queries[q]] for q in planted}, progress=False)
    for q, index in planted.items():
        assert int(pairwise[q].argmax()) == index, f"query {q}: top example {int(pairwise[q].argmax())}, planted {index}"
        assert int(aggregated[f"q{q}"].argmax()) == index


def test_unlabelled_example_scores_zero_with_a_warning(setting):
    model, train, queries, factors, _, _ = setting
    train = list(train)
    train[2] = dict(train[2], labels=torch.full_like(train[2]["labels"], IGNORE_INDEX))
    with pytest.warns(UserWarning, match=r"no labelled token \(indices \[2\]\)"):
        scores = influence(model, factors, train, {"a": queries}, progress=False)["a"]
    with pytest.warns(UserWarning):
        pairwise = pairwise_influence(model, factors, train, queries, progress=False)
    assert float(scores[2]) == 0.0 and bool((pairwise[:, 2] == 0).all())
    assert torch.isfinite(scores).all() and torch.isfinite(pairwise).all()


def test_bad_inputs(setting):
    model, train, queries, factors, _, _ = setting
    with pytest.raises(ValueError, match="trust must map each aspect"):
        influence(model, factors, train, {}, progress=False)
    with pytest.raises(ValueError, match="aspect 'x' has no trust queries"):
        influence(model, factors, train, {"x": []}, progress=False)
    with pytest.raises(ValueError, match="trust query 0 must be a dict with 'proponent' and 'opponent'"):
        pairwise_influence(model, factors, train, [{"proponent": queries[0]["proponent"]}], progress=False)
    with pytest.raises(ValueError, match="training set is empty"):
        influence(model, factors, [], {"a": queries}, progress=False)
    with pytest.raises(ValueError, match="query_rank must be"):
        pairwise_influence(model, factors, train, queries, query_rank=0, progress=False)
    with pytest.raises(ValueError, match="do not belong to this model"):
        influence(make_tiny_llama(), factors, train, {"a": queries}, progress=False)


def test_normalize_scores():
    scores = {"a": torch.tensor([-2.0, 0.0, 2.0]), "flat": torch.tensor([3.0, 3.0])}
    out = normalize_scores(scores)
    assert torch.equal(out["a"], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(out["flat"], torch.ones(2))


def test_normalize_scores_of_tensors_handles_extremes_and_refuses_non_finite_scores():
    """scoring and selection share one normalize_scores. Its tensor path keeps the dtype and device, maps a
    range that overflows float64 to [0, 1] (scoring's former copy returned [0, 0, nan] there) and refuses
    a non-finite score by aspect and index (the former copy returned all ones for a NaN, NaN for an inf)."""
    assert normalize_scores is selection.normalize_scores
    extreme = normalize_scores(torch.tensor([-1e308, 0.0, 1e308], dtype=torch.float64))
    assert extreme.dtype == torch.float64
    torch.testing.assert_close(extreme, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), rtol=1e-15, atol=0)
    assert torch.equal(normalize_scores(torch.tensor([1, 3, 2])), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"aspect 'a': scores\[1\] = .* is not finite"):
            normalize_scores({"a": torch.tensor([0.0, bad])})


def test_fit_and_scores_under_bf16_autocast_keep_float32_statistics():
    """Inside a caller's bf16 autocast region (the CPU has one too) the model's matmuls run in bf16 but the
    library's own statistics and preconditioning stay float32: every path returns float32 scores that
    rank like the float32 run's (the first GPU run's bf16 stage failed on a bf16 preconditioned gradient)."""
    model = make_tiny_neox(seed=3, dtype=torch.float32)
    train, queries = make_examples(24, seed=21), make_queries(4, seed=22)
    exact = pairwise_influence(model, fit_ekfac(model, train, batch_size=8, progress=False), train, queries,
                               batch_size=8, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        factors = fit_ekfac(model, train, batch_size=8, progress=False)
        pairwise = pairwise_influence(model, factors, train, queries, batch_size=8, progress=False)
        low_rank = pairwise_influence(model, factors, train, queries, batch_size=8, progress=False, query_rank=2)
        aggregated = influence(model, factors, train, {"a": queries}, batch_size=8, progress=False)["a"]
    assert all(f.lambda_.dtype == torch.float32 for f in factors.modules.values())
    rank = lambda v: torch.argsort(torch.argsort(v.flatten())).double()
    spearman = lambda x, y: float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])
    for scores in (pairwise, low_rank, aggregated):
        assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    assert spearman(pairwise, exact) >= 0.99
    assert spearman(aggregated, exact.mean(0)) >= 0.99
