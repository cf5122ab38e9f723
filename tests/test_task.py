"""CausalLMTask's LM head at the labelled positions only equals the all-position logits."""
import pytest
import torch

from conftest import make_examples, make_queries, make_tiny_llama, make_tiny_neox
from trustrepair import fit_ekfac
from trustrepair.task import CausalLMTask, labelled_positions, pad_batch, sequence_log_probs


def make_tiny_gemma2(seed=0):
    """Gemma2 soft-caps its logits after the head (tanh(logits / c) * c): the gather must keep that."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=128,
                       final_logit_softcapping=3.0, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).to(torch.float64).eval()


def examples_with_an_unlabelled_row(seed):
    examples = make_examples(6, min_len=2, max_len=15, seed=seed)
    examples[2] = {"input_ids": examples[2]["input_ids"], "labels": torch.full_like(examples[2]["labels"], -100)}
    return examples


def head_inputs(model):
    """Shapes of every input the output embedding sees, recorded by a forward hook."""
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_neox, make_tiny_gemma2])
def test_labelled_logits_equal_all_position_logits(make_model):
    model = make_model()
    batch = pad_batch(examples_with_an_unlabelled_row(seed=4))
    rows, _ = labelled_positions(batch["labels"])
    fast, full = CausalLMTask(), CausalLMTask(labelled_logits_only=False)

    shapes, handle = head_inputs(model)
    got = fast.train_loss(model, batch)
    handle.remove()
    assert shapes == [(1, rows.shape[0], model.config.hidden_size)], "the head did not run on the gathered rows"
    want = -sequence_log_probs(full.logits(model, batch), batch["labels"])
    torch.testing.assert_close(full.train_loss(model, batch), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[2] == 0

    torch.testing.assert_close(fast.token_logits(model, batch), full.token_logits(model, batch), rtol=1e-10, atol=1e-10)
    queries = fast.collate_queries(make_queries(5, seed=7))
    torch.testing.assert_close(fast.measurement(model, queries), full.measurement(model, queries), rtol=1e-10, atol=1e-10)


def test_labelled_logits_give_the_same_parameter_gradients():
    model = make_tiny_llama(seed=2)
    batch = pad_batch(examples_with_an_unlabelled_row(seed=9))
    grads = []
    for task in (CausalLMTask(), CausalLMTask(labelled_logits_only=False)):
        model.zero_grad()
        (task.train_loss(model, batch) * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for fast, full in zip(*grads):
        torch.testing.assert_close(fast, full, rtol=1e-9, atol=1e-12)


def test_sampled_targets_are_drawn_at_labelled_positions_only():
    model = make_tiny_llama(seed=3)
    batch = pad_batch(examples_with_an_unlabelled_row(seed=1))
    task = CausalLMTask()
    a = task.train_loss(model, batch, sample=True, generator=torch.Generator().manual_seed(0))
    b = task.train_loss(model, batch, sample=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a[2] == 0 and bool((a[[0, 1, 3, 4, 5]] > 0).all())
    assert not torch.allclose(a, task.train_loss(model, batch)), "sampled targets equal the labels everywhere"


def test_analysing_the_head_needs_every_position():
    model = make_tiny_neox(seed=1)
    examples = make_examples(4, seed=2)
    with pytest.raises(ValueError, match="labelled_logits_only=False"):
        fit_ekfac(model, examples, modules=["lm_head"], progress=False)
    factors = fit_ekfac(model, examples, modules=["lm_head"], task=CausalLMTask(labelled_logits_only=False),
                        progress=False)
    assert list(factors.modules) == ["lm_head"]
