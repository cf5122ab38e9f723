"""Prefix replay (trustrepair.engine.replay): the factors equal those of the fit that runs the whole model
in both passes (its reference twin, ``replay_prefix=False``) and the prefix runs once per batch; scores
from a store the fit filled equal scores without it while the prefix does not run again; the store falls
back to the whole model when the forward breaks the replay's conditions or the recordings exceed the
memory budget, and empties itself when the weights outside the analysed blocks change."""
import pytest
import torch

from conftest import make_examples, make_queries, make_tiny_llama, make_tiny_neox
from test_ekfac import make_tiny_gpt2
from trustrepair import PrefixStore, fit_ekfac, influence, pairwise_influence
from trustrepair.engine import replay
from trustrepair.engine.layers import find_modules
from trustrepair.task import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"neox": make_tiny_neox, "llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def blocks_of(model):
    return next(m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and name)


def count_prefix_runs(model):
    """A counter of real forwards of block 0 (its first child runs only when the block is not replayed)."""
    runs = []
    first_child = next(iter(blocks_of(model)[0].children()))
    first_child.register_forward_pre_hook(lambda *args: runs.append(1))
    return runs


def assert_same_factors(a, b):
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        for field in ("q_a", "q_s", "lambda_"):
            x, y = getattr(a.modules[name], field), getattr(b.modules[name], field)
            assert torch.equal(x, y), f"{name}.{field} differs by up to {float((x - y).abs().max()):.3e}"


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_replay_equals_the_whole_model_and_runs_the_prefix_once(kind, fisher):
    model = MODELS[kind]()
    names = [layer.name for layer in find_modules(model) if ".1." in layer.name]  # the second of two blocks
    examples = make_examples(11, seed=3)  # 3 batches of 4, the last one short
    runs = count_prefix_runs(model)
    fast = fit_ekfac(model, examples, modules=names, fisher=fisher, batch_size=4, progress=False)
    assert len(runs) == 3
    runs.clear()
    reference = fit_ekfac(model, examples, modules=names, fisher=fisher, batch_size=4, progress=False,
                          replay_prefix=False)
    assert len(runs) == 6
    assert_same_factors(fast, reference)


def test_prefix_blocks():
    model = make_tiny_llama()
    layers = find_modules(model)
    assert replay.prefix_blocks(model, layers) == []
    later = [layer for layer in layers if ".1." in layer.name]
    assert replay.prefix_blocks(model, later) == [model.model.layers[0]]


class TwiceTask(CausalLMTask):
    """Runs the model twice per batch (the prefix blocks then run twice in one objective)."""

    def train_loss(self, model, batch, sample=False, generator=None):
        return (super().train_loss(model, batch) + super().train_loss(model, batch)) / 2


def test_falls_back_when_the_prefix_runs_twice_per_batch():
    model = make_tiny_llama()
    names = [layer.name for layer in find_modules(model) if ".1." in layer.name]
    examples = make_examples(6, seed=4)
    runs = count_prefix_runs(model)
    fast = fit_ekfac(model, examples, modules=names, task=TwiceTask(), fisher="empirical", batch_size=4,
                     progress=False)
    assert len(runs) == 2 * 2 * 2  # two batches, two forwards each, in both passes
    reference = fit_ekfac(model, examples, modules=names, task=TwiceTask(), fisher="empirical", batch_size=4,
                          progress=False, replay_prefix=False)
    assert_same_factors(fast, reference)


def test_falls_back_beyond_the_memory_budget(monkeypatch):
    model = make_tiny_neox()
    names = [layer.name for layer in find_modules(model) if ".1." in layer.name]
    examples = make_examples(6, seed=5)
    monkeypatch.setattr(replay, "memory_budget", lambda device: 1)
    runs = count_prefix_runs(model)
    fast = fit_ekfac(model, examples, modules=names, fisher="empirical", batch_size=4, progress=False)
    assert len(runs) == 4
    reference = fit_ekfac(model, examples, modules=names, fisher="empirical", batch_size=4, progress=False,
                          replay_prefix=False)
    assert_same_factors(fast, reference)


def test_a_batch_not_in_the_store_runs_the_whole_model_and_is_recorded():
    model = make_tiny_llama()
    layers = [layer for layer in find_modules(model) if ".1." in layer.name]
    task = CausalLMTask()
    store = PrefixStore()
    batch, other = task.collate(make_examples(4, seed=6)), task.collate(make_examples(3, seed=7))
    runs = count_prefix_runs(model)
    with torch.no_grad():
        expected = task.train_loss(model, other)
        runs.clear()
        for b in (batch, other, batch, other):
            with store.passing(model, layers) as prefix, prefix.batch(b):
                loss = task.train_loss(model, b)
        assert torch.equal(loss, expected)
    assert (len(runs), store.recorded, store.replayed, len(store)) == (2, 2, 2, 2)
    assert "forward" not in vars(model.model.layers[0])
    assert replay.batch_key(batch) != replay.batch_key(other)


def scores_and_prefix_runs(model, examples, names, queries, store):
    """(aggregated scores, pairwise scores, prefix forwards during scoring) with factors fitted into ``store``."""
    factors = fit_ekfac(model, examples, modules=names, fisher="empirical", batch_size=4, progress=False,
                        prefix_store=store)
    runs = count_prefix_runs(model)
    aggregated = influence(model, factors, examples, {"a": queries}, batch_size=4, progress=False,
                           prefix_store=store)
    pairwise = pairwise_influence(model, factors, examples, queries, batch_size=4, progress=False,
                                  prefix_store=store)
    return aggregated["a"], pairwise, len(runs)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_scores_replayed_from_the_fits_store_equal_the_whole_models(kind):
    model = MODELS[kind]()
    names = [layer.name for layer in find_modules(model) if ".1." in layer.name]
    examples = make_examples(11, seed=8)
    queries = make_queries(3, seed=9)
    store = PrefixStore()
    fast = scores_and_prefix_runs(model, examples, names, queries, store)
    reference = scores_and_prefix_runs(model, examples, names, queries, None)
    assert fast[2] == 2 * 1 and reference[2] == 2 * 4  # the query passes only / queries + 3 training batches
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])
    assert (store.recorded, store.replayed) == (3, 3 + 2 * 3)


def test_the_store_empties_when_the_weights_before_the_analysed_blocks_change():
    model = make_tiny_llama()
    layers = [layer for layer in find_modules(model) if ".1." in layer.name]
    task = CausalLMTask()
    store = PrefixStore()
    batch = task.collate(make_examples(4, seed=10))
    runs = count_prefix_runs(model)

    def one_pass():
        with torch.no_grad(), store.passing(model, layers) as prefix, prefix.batch(batch):
            return task.train_loss(model, batch)

    one_pass()
    with torch.no_grad():
        layers[0].module.weight.mul_(1.5)  # an analysed layer (a repair): the store stays valid
    one_pass()
    assert (len(runs), store.replayed) == (1, 1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    changed = one_pass()
    assert (len(runs), store.replayed, store.recorded) == (2, 1, 2)
    with torch.no_grad():
        assert torch.equal(changed, task.train_loss(model, batch))


def test_prefix_store_needs_replay():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="replay_prefix"):
        fit_ekfac(model, make_examples(4, seed=11), fisher="empirical", progress=False, replay_prefix=False,
                  prefix_store=PrefixStore())
