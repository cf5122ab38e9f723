"""The gradient-similarity baselines (trustrepair.methods.baselines) against explicit per-example autograd
gradients, on awkward shapes (examples of 3..12 tokens, batches that split unevenly, two models)."""
import pytest
import torch

from conftest import FLOAT64_MODEL_RTOL, assert_rel, make_examples, make_queries, make_tiny_llama, make_tiny_neox, per_example_gradients
from trustrepair.methods.baselines import gradient_norms_squared, gradient_similarity
from trustrepair.task import CausalLMTask, stack_queries

pytestmark = pytest.mark.usefixtures("one_thread")


def _explicit(model, names, train, trust):
    task = CausalLMTask()
    train_grads = per_example_gradients(model, names, train)
    expected = {"gradient_dot": {}, "gradient_cosine": {}}
    for aspect, queries in trust.items():
        q_grads = per_example_gradients(model, names, queries,
                                        lambda q: task.measurement(model, stack_queries([q]))[0])
        mean = {n: sum(g[n] for g in q_grads) / len(q_grads) for n in names}
        q_norm = sum(float(mean[n].pow(2).sum()) for n in names) ** 0.5
        dots = torch.tensor([-sum(float((mean[n] * g[n]).sum()) for n in names) for g in train_grads],
                            dtype=torch.float64)
        norms = torch.tensor([sum(float(g[n].pow(2).sum()) for n in names) ** 0.5 for g in train_grads],
                             dtype=torch.float64)
        expected["gradient_dot"][aspect] = dots
        expected["gradient_cosine"][aspect] = dots / (norms * q_norm)
    return expected


@pytest.mark.parametrize("make_model", [make_tiny_neox, make_tiny_llama])
def test_baselines_equal_explicit_per_example_gradients(make_model):
    model = make_model(seed=5)
    train = make_examples(11, seed=31)
    queries = make_queries(5, seed=32)
    trust = {"one": queries[:1], "rest": queries[1:]}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "embed_out" not in n
             and "lm_head" not in n][:3]
    got = gradient_similarity(model, train, trust, modules=names, batch_size=4)
    expected = _explicit(model, names, train, trust)
    for method in expected:
        for aspect in trust:
            assert_rel(got[method][aspect], expected[method][aspect], FLOAT64_MODEL_RTOL, f"{method} {aspect}")
    cosine = torch.stack(list(got["gradient_cosine"].values()))
    assert bool((cosine.abs() <= 1 + 1e-12).all())


def test_gram_identity_equals_the_formed_gradient_norm():
    gen = torch.Generator().manual_seed(7)
    a, g = torch.randn(3, 13, 17, generator=gen, dtype=torch.float64), torch.randn(3, 13, 5, generator=gen,
                                                                                    dtype=torch.float64)
    formed = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2))
    assert_rel(gradient_norms_squared(a, g), formed, 1e-12, "Gram identity")


def test_empty_trust_is_refused():
    with pytest.raises(ValueError, match="trust must map"):
        gradient_similarity(make_tiny_neox(), make_examples(2), {})
