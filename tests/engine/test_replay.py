"""Prefix replay in the EK-FAC fit (trustrepair.engine.replay): the factors equal those of the fit that runs
the whole model in both passes (its reference twin, ``replay_prefix=False``), the prefix runs once per
batch, and the fit falls back to the whole model when the forward breaks the replay's conditions or the
recordings exceed the memory budget."""
import pytest
import torch

from conftest import make_examples, make_tiny_llama, make_tiny_neox
from test_ekfac import make_tiny_gpt2
from trustrepair import fit_ekfac
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


def test_replay_refuses_batches_that_differ_from_the_recorded_ones():
    model = make_tiny_llama()
    layers = [layer for layer in find_modules(model) if ".1." in layer.name]
    task = CausalLMTask()
    prefix = replay.PrefixReplay(model, layers)
    batch = task.collate(make_examples(4, seed=6))
    with torch.no_grad():
        with prefix.recording() as recording, recording.batch():
            task.train_loss(model, batch)
        assert len(prefix.outputs) == 1
        other = task.collate(make_examples(3, seed=7))
        with prefix.replaying(), pytest.raises(RuntimeError, match="batches differ"):
            task.train_loss(model, other)
    assert prefix.outputs == []
    assert "forward" not in vars(model.model.layers[0])
