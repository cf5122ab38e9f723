"""Choosing the analysed layers and planning the fit: globs, last blocks, the first analysed block, the
factor-memory formula and the refusal when the factors would not fit."""
import pytest

from conftest import make_tiny_llama
from trustrepair.app import layer_plan
from trustrepair.engine.layers import TrackedLayer


def test_globs_last_blocks_and_the_default():
    model = make_tiny_llama(layers=3)
    default = layer_plan.choose_layers(model)
    assert len(default) == 21 and all(n.startswith("model.layers.") for n in default)
    assert layer_plan.choose_layers(model, last_blocks=1) == [n for n in default if n.startswith("model.layers.2.")]
    mlp = layer_plan.choose_layers(model, ["model.layers.*.mlp.*"])
    assert len(mlp) == 9 and all(".mlp." in n for n in mlp)
    both = layer_plan.choose_layers(model, ["*.q_proj", "model.layers.0.mlp.down_proj"])
    assert both == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                    "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    with pytest.raises(ValueError, match="'nothing' matches no linear layer.*model.layers.0.self_attn.q_proj"):
        layer_plan.choose_layers(model, ["*.q_proj", "nothing"])
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
        layer_plan.choose_layers(model, last_blocks=4)


def test_first_analysed_block():
    model = make_tiny_llama(layers=3)
    assert layer_plan.first_analysed_block(model, layer_plan.choose_layers(model, last_blocks=2)) == 1
    assert layer_plan.first_analysed_block(model, ["model.layers.2.mlp.up_proj", "model.layers.1.mlp.up_proj"]) == 1
    assert layer_plan.first_analysed_block(model, ["lm_head"]) is None


def test_factor_bytes_formula():
    model = make_tiny_llama(layers=1)
    modules = dict(model.named_modules())
    layers = [TrackedLayer.of(n, modules[n]) for n in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")]
    (up, down) = [(l.d_out, l.folded_in) for l in layers]
    stored = sum(2 * i * i + 2 * o * o + o * i for o, i in (up, down))
    assert layer_plan.factor_bytes(layers, 4) == 4 * stored + 24 * max(max(up), max(down)) ** 2


def test_plan_refuses_factors_beyond_the_free_memory(monkeypatch):
    model = make_tiny_llama(layers=2)
    names = layer_plan.choose_layers(model)
    fitting = layer_plan.plan(model, names, run_params=1000, train_tokens=100)
    assert fitting.factor_bytes > 0 and fitting.seconds > 0 and "14 layers" in fitting.describe()
    monkeypatch.setattr(layer_plan, "free_memory_bytes", lambda device: int(fitting.factor_bytes / 0.9))
    with pytest.raises(ValueError, match="more than 80% of the .* free; analyse fewer layers with --last-blocks"):
        layer_plan.plan(model, names, run_params=1000, train_tokens=100)
    monkeypatch.setattr(layer_plan, "free_memory_bytes", lambda device: int(fitting.factor_bytes / 0.7))
    assert layer_plan.plan(model, names, run_params=1000, train_tokens=100).factor_bytes == fitting.factor_bytes
