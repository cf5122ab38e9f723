"""The tail runner reproduces the full model from cached hidden states."""
import pytest
import torch

from conftest import make_examples, make_queries, make_tiny_llama, make_tiny_neox
from trustrepair.task import CausalLMTask, pad_batch
from trustrepair.app.prefix_cache import TailLM, TailTask, cache_prefix_hidden


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_neox])
@pytest.mark.parametrize("first_block", [0, 1])
def test_tail_matches_full_model(make_model, first_block):
    model = make_model(layers=3)
    examples = make_examples(7, seed=3)
    cached = cache_prefix_hidden(model, examples, first_block, batch_size=3, progress=False)
    tail = TailLM(model, first_block)
    full, fast = CausalLMTask(), TailTask()
    want = full.train_loss(model, full.collate(examples))
    got = fast.train_loss(tail, fast.collate(cached))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)  # summed losses ~20: 5.5e-10 relative seen on AVX2

    queries = make_queries(4)
    cached_q = [dict(zip(q, cache_prefix_hidden(model, [q["proponent"], q["opponent"]], first_block,
                                                progress=False))) for q in queries]
    want_m = full.measurement(model, full.collate_queries(queries))
    got_m = fast.measurement(tail, fast.collate_queries(cached_q))
    torch.testing.assert_close(got_m, want_m, rtol=1e-10, atol=1e-10)


def test_tail_shares_parameters_and_sees_weight_changes():
    model = make_tiny_llama(layers=2)
    tail = TailLM(model, 1)
    names = {id(p) for p in model.parameters()}
    assert all(id(p) in names for p in tail.parameters())
    examples = make_examples(3, seed=5)
    cached = cache_prefix_hidden(model, examples, 1, progress=False)
    task = TailTask()
    before = task.train_loss(tail, task.collate(cached))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    after = task.train_loss(tail, task.collate(cached))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, CausalLMTask().train_loss(model, pad_batch(examples)), rtol=1e-10, atol=1e-10)


def test_tail_rejects_bad_block_and_absolute_positions():
    with pytest.raises(ValueError, match="outside"):
        TailLM(make_tiny_llama(layers=2), 2)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="absolute position"):
        TailLM(gpt2, 0)
