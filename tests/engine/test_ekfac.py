"""EK-FAC fitting (trustrepair.engine.ekfac, trustrepair.engine.layers, trustrepair.engine.capture) against a brute-force float64
reference built example by example from explicit autograd gradients; preconditioning against the dense
EK-FAC matrix; saving, loading, resuming; bad inputs.

The brute-force helpers here are also used by tests/test_influence.py.
"""
import json
import os

import pytest
import torch
from torch import nn

from conftest import assert_rel, make_examples, make_queries, make_tiny_llama, make_tiny_neox, per_example_gradients
from trustrepair import EKFACFactors, fit_ekfac
from trustrepair.engine.layout import ROW_ALIGNMENT, is_aligned
from trustrepair.engine.layers import apply_deltas, find_modules
from trustrepair.task import IGNORE_INDEX, CausalLMTask, pad_batch


def make_tiny_gpt2(seed=0, dtype=torch.float64):
    """A random-init GPT-2, whose blocks use transformers' Conv1D (weight stored as (d_in, d_out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=24, n_layer=2, n_head=3, n_positions=64, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype).eval()


MODELS = {"neox": make_tiny_neox, "llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# Brute-force references (one example at a time, explicit autograd, float64, independent folding)
# ----------------------------------------------------------------------------------------------------

def token_factors(model, names, examples, labels=None):
    """Brute-force sums of a a^T and g g^T over every token of every example (one example per pass,
    no padding), activations taken by forward hooks, output gradients by autograd. ``labels`` optionally
    replaces each example's labels (sampled Fisher)."""
    modules = dict(model.named_modules())
    a_sum, s_sum, n_tokens = {}, {}, 0
    for i, ex in enumerate(examples):
        inputs, outputs = {}, {}

        def hook(module, args, output, name=None):
            inputs[name], outputs[name] = args[0][0].detach(), output

        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
        ex = dict(ex, labels=labels[i]) if labels is not None else ex
        loss = CausalLMTask().train_loss(model, pad_batch([ex]))[0]
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
        n_tokens += ex["input_ids"].shape[0]
        for n, grad in zip(names, grads):
            x = inputs[n].double()
            if modules[n].bias is not None:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            g = torch.zeros_like(outputs[n][0]) if grad is None else grad[0]
            a_sum[n] = a_sum.get(n, 0) + x.T @ x
            s_sum[n] = s_sum.get(n, 0) + g.double().T @ g.double()
    return a_sum, s_sum, n_tokens


def lambda_reference(factors, grads_per_example):
    """Lambda = mean over examples of (Q_S^T G_z Q_A) ** 2 with the given bases."""
    out = {}
    for name, f in factors.modules.items():
        q_a, q_s = f.q_a.double(), f.q_s.double()
        out[name] = sum((q_s.T @ grads[name] @ q_a) ** 2 for grads in grads_per_example) / len(grads_per_example)
    return out


class RecordingSampledTask(CausalLMTask):
    """Draws sampled-Fisher targets from the model's own distribution (as CausalLMTask does, one draw per
    position) and records them per example and pass, so the brute-force reference can reuse the same targets."""

    def __init__(self):
        self.drawn = []  # one dict per training_loss call: input_ids tuple -> labels

    def train_loss(self, model, batch, sample=False, generator=None):
        if not sample:
            return super().train_loss(model, batch)
        with torch.no_grad():
            logits = self.logits(model, batch)
            probs = torch.softmax(logits[:, :-1].float(), dim=-1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:2])
        labels = batch["labels"].clone()
        keep = labels[:, 1:] != IGNORE_INDEX
        labels[:, 1:] = torch.where(keep, drawn, torch.full_like(drawn, IGNORE_INDEX))
        record = {}
        for row in range(labels.shape[0]):
            n = int(batch["attention_mask"][row].sum())
            record[tuple(batch["input_ids"][row, :n].tolist())] = labels[row, :n].clone()
        self.drawn.append(record)
        return super().train_loss(model, dict(batch, labels=labels))


def check_factors_against_brute_force(factors, model, examples, cov_labels=None, lambda_labels=None, rtol=1e-6):
    names = list(factors.modules)
    a_sum, s_sum, n_tokens = token_factors(model, names, examples, cov_labels)
    for name, f in factors.modules.items():
        assert f.n_tokens == n_tokens and f.n_examples == len(examples), name
        for q, cov in ((f.q_a, a_sum[name] / n_tokens), (f.q_s, s_sum[name] / n_tokens)):
            rotated = q.double().T @ cov @ q.double()
            values = torch.linalg.eigvalsh(cov)
            assert_rel(rotated.diagonal(), values, rtol, f"{name}: eigenvalues of the covariance")
            off_diagonal = float((rotated - torch.diag(rotated.diagonal())).abs().max())
            assert off_diagonal <= rtol * float(cov.abs().max()), f"{name}: basis does not diagonalise the covariance"
            assert_rel(q.double().T @ q.double(), torch.eye(q.shape[0], dtype=torch.float64), 1e-10,
                       f"{name}: orthogonality")
    lam_examples = examples
    if lambda_labels is not None:
        lam_examples = [dict(ex, labels=lab) for ex, lab in zip(examples, lambda_labels)]
    grads = per_example_gradients(model, names, lam_examples)
    expected = lambda_reference(factors, grads)
    for name, f in factors.modules.items():
        assert_rel(f.lambda_, expected[name], rtol, f"{name}: Lambda")


# ----------------------------------------------------------------------------------------------------
# Modules and folding
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(MODELS))
def test_default_modules_are_the_block_linears(arch):
    model = MODELS[arch]()
    layers = find_modules(model)
    names = [layer.name for layer in layers]
    per_block = {"neox": 4, "llama": 7, "gpt2": 4}[arch]
    assert len(names) == 2 * per_block
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in names)
    supported = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert set(names) < set(supported)  # the LM head is a Linear outside the blocks


def test_module_selection_by_names_and_predicate_and_errors():
    model = make_tiny_neox()
    names = ["gpt_neox.layers.1.mlp.dense_4h_to_h", "gpt_neox.layers.0.attention.dense"]
    assert [l.name for l in find_modules(model, names)] == names[::-1]  # forward order
    assert [l.name for l in find_modules(model, lambda n, m: n.endswith("dense_h_to_4h"))] == [
        "gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_h_to_4h"]
    with pytest.raises(ValueError, match=r"no module named 'gpt_neox.layers.0.attention.dens'.*attention.dense"):
        find_modules(model, ["gpt_neox.layers.0.attention.dens"])
    with pytest.raises(ValueError, match="is a LayerNorm"):
        find_modules(model, ["gpt_neox.layers.0.input_layernorm"])
    with pytest.raises(ValueError, match="selected none"):
        find_modules(model, lambda n, m: False)
    with pytest.raises(ValueError, match="no nn.Linear / Conv1D inside an nn.ModuleList"):
        find_modules(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_folded_weight_and_deltas_round_trip(arch):
    """apply_deltas adds the folded delta to [weight | bias] (weight^T for Conv1D); alpha=-1 undoes it."""
    model = MODELS[arch]()
    layers = find_modules(model)
    before = {l.name: l.folded_weight() for l in layers}
    gen = torch.Generator().manual_seed(3)
    deltas = {l.name: torch.randn(*l.shape, generator=gen, dtype=torch.float64) for l in layers[:3]}
    apply_deltas(model, deltas, alpha=0.5)
    for l in layers:
        expected = before[l.name] + 0.5 * deltas[l.name] if l.name in deltas else before[l.name]
        assert torch.allclose(l.folded_weight(), expected, atol=1e-14)
    layer = layers[0]
    raw = layer.module.weight.detach()
    raw = raw if isinstance(layer.module, nn.Linear) else raw.T
    assert torch.allclose(layer.folded_weight()[:, :layer.d_in], raw)
    apply_deltas(model, deltas, alpha=-0.5)
    for l in layers:
        assert torch.allclose(l.folded_weight(), before[l.name], atol=1e-14)
    with pytest.raises(ValueError, match="delta for"):
        apply_deltas(model, {layers[0].name: torch.zeros(2, 2)})


# ----------------------------------------------------------------------------------------------------
# Test 1: factors equal the brute-force reference
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(MODELS))
def test_empirical_factors_match_brute_force(arch):
    model = MODELS[arch]()
    examples = make_examples(14, seed=11)
    factors = fit_ekfac(model, examples, fisher="empirical", batch_size=4, progress=False)
    check_factors_against_brute_force(factors, model, examples)
    assert set(factors.timings) == {"covariance", "eigendecomposition", "lambda"}


def test_zero_padded_covariances_give_the_same_factors():
    """The ``pad_widths`` setting (on for CUDA): the Gram products on zero-padded widths (the tiny NeoX's
    bias-folded widths are odd) give the unpadded fit's factors, in float64 to rounding."""
    from trustrepair.engine.tunables import override

    model = make_tiny_neox()
    examples = make_examples(9, seed=14)
    fits = {}
    for pad in (False, True):
        with override(pad_widths={"cpu": pad}):
            fits[pad] = fit_ekfac(model, examples, fisher="empirical", batch_size=4, progress=False)
    assert any(l % ROW_ALIGNMENT for m in fits[True].modules.values() for l in m.q_a.shape)
    for name, plain in fits[False].modules.items():
        padded = fits[True].modules[name]
        assert padded.q_a.shape == plain.q_a.shape and padded.n_tokens == plain.n_tokens
        torch.testing.assert_close(padded.lambda_, plain.lambda_, rtol=1e-8, atol=1e-12 * plain.lambda_.max().item())
    check_factors_against_brute_force(fits[True], model, examples)


def test_sampled_factors_match_brute_force_with_the_same_draws():
    """The sampled (true) Fisher draws fresh targets in each pass; with those draws recorded, covariances
    and Lambda equal the brute-force ones built from them."""
    model = make_tiny_neox()
    examples = make_examples(12, seed=12)
    task = RecordingSampledTask()
    factors = fit_ekfac(model, examples, task=task, fisher="sampled", batch_size=5, progress=False)
    n_batches = 3
    assert len(task.drawn) == 2 * n_batches
    cov_draws = {k: v for record in task.drawn[:n_batches] for k, v in record.items()}
    lambda_draws = {k: v for record in task.drawn[n_batches:] for k, v in record.items()}
    keys = [tuple(ex["input_ids"].tolist()) for ex in examples]
    assert any(not torch.equal(cov_draws[k], lambda_draws[k]) for k in keys)  # independent draws per pass
    check_factors_against_brute_force(factors, model, examples, [cov_draws[k] for k in keys],
                                      [lambda_draws[k] for k in keys])


def test_float32_model_factors_are_float32_and_close_to_float64():
    examples = make_examples(10, seed=13)
    f64 = fit_ekfac(make_tiny_neox(), examples, fisher="empirical", progress=False)
    f32 = fit_ekfac(make_tiny_neox(dtype=torch.float32), examples, fisher="empirical", progress=False)
    for name, f in f32.modules.items():
        assert f.q_a.dtype == f.q_s.dtype == f.lambda_.dtype == torch.float32
        assert_rel(f.lambda_, f64.modules[name].lambda_, 1e-3, name)


# ----------------------------------------------------------------------------------------------------
# Test 2: preconditioning equals the damped inverse of the dense EK-FAC matrix
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damping", [None, 0.3])
def test_precondition_equals_dense_damped_inverse(damping):
    model = make_tiny_neox()
    factors = fit_ekfac(model, make_examples(12, seed=14), fisher="empirical", progress=False,
                        modules=["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"])
    gen = torch.Generator().manual_seed(4)
    grads = {n: torch.randn(2, *f.lambda_.shape, generator=gen, dtype=torch.float64)
             for n, f in factors.modules.items()}
    got = factors.precondition(grads, damping=damping)
    for name, f in factors.modules.items():
        d_out, d_in = f.lambda_.shape
        # Row-major vec: vec(Q_S P Q_A^T) = (Q_S kron Q_A) vec(P), so G = K diag(vec Lambda) K^T.
        kron = torch.kron(f.q_s, f.q_a)
        dense = (kron * f.lambda_.reshape(1, -1)) @ kron.T
        lam = 0.1 * float(f.lambda_.mean()) if damping is None else damping
        assert factors.damping(name, damping) == pytest.approx(lam, rel=1e-12)
        expected = torch.linalg.solve(dense + lam * torch.eye(d_out * d_in, dtype=torch.float64),
                                      grads[name].reshape(2, -1).T).T.reshape(2, d_out, d_in)
        assert_rel(got[name], expected, 1e-9, name)
        projected = factors.precondition_projected({name: f.q_s.T @ grads[name] @ f.q_a}, damping=damping)
        assert_rel(projected[name], expected, 1e-9, f"{name} from the eigenbasis")


def test_with_damping_scale_changes_only_the_default_and_survives_the_move_the_scorers_make():
    model = make_tiny_neox()
    name = "gpt_neox.layers.0.attention.dense"
    factors = fit_ekfac(model, make_examples(8, seed=3), fisher="empirical", progress=False, modules=[name])
    scaled = factors.with_damping_scale(0.01)
    lam = factors.modules[name].lambda_
    assert scaled.damping(name) == pytest.approx(0.01 * float(lam.mean()), rel=1e-12)
    assert factors.damping(name) == pytest.approx(0.1 * float(lam.mean()), rel=1e-12), "the original is unchanged"
    assert scaled.damping(name, 0.25) == 0.25, "an absolute damping is used as given"
    assert scaled.modules[name].lambda_ is lam, "tensors are shared, not copied"
    moved = scaled.to("cpu")  # as scoring._prepare does
    assert moved.damping_scale == 0.01 and moved.damping(name) == scaled.damping(name)
    grad = {name: torch.randn(*lam.shape, generator=torch.Generator().manual_seed(1), dtype=lam.dtype)}
    assert_rel(scaled.precondition(grad)[name], factors.precondition(grad, damping=scaled.damping(name))[name],
               1e-12, name)
    with pytest.raises(ValueError, match="damping_scale"):
        factors.with_damping_scale(0.0)


def test_precondition_rejects_bad_inputs():
    model = make_tiny_neox()
    factors = fit_ekfac(model, make_examples(6), fisher="empirical", progress=False,
                        modules=["gpt_neox.layers.0.attention.dense"])
    name = "gpt_neox.layers.0.attention.dense"
    with pytest.raises(ValueError, match="no EK-FAC factors for module"):
        factors.precondition({"nope": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"\(\.\.\., 32, 33\)"):
        factors.precondition({name: torch.zeros(33, 32)})
    with pytest.raises(ValueError, match=r"damping = -1.0 must be a finite number >= 0"):
        factors.precondition({name: torch.zeros(32, 33)}, damping=-1.0)


# ----------------------------------------------------------------------------------------------------
# Test 7: bad input
# ----------------------------------------------------------------------------------------------------

def test_example_without_labelled_tokens_warns_counts_and_stays_finite():
    model = make_tiny_neox()
    examples = make_examples(9, seed=15)
    empty = dict(examples[4], labels=torch.full_like(examples[4]["labels"], IGNORE_INDEX))
    examples[4] = empty
    with pytest.warns(UserWarning, match=r"1 of 9 training examples have no labelled token \(indices \[4\]\)"):
        factors = fit_ekfac(model, examples, fisher="sampled", progress=False)
    for f in factors.modules.values():
        assert f.n_examples == 9
        assert torch.isfinite(f.lambda_).all() and torch.isfinite(f.q_a).all() and torch.isfinite(f.q_s).all()
    with pytest.raises(ValueError, match="no training example has a labelled token"):  # at the fit, not later
        fit_ekfac(model, [empty], fisher="empirical", progress=False)


def test_empty_dataset_and_bad_arguments():
    model = make_tiny_neox()
    with pytest.raises(ValueError, match="training set is empty"):
        fit_ekfac(model, [], progress=False)
    with pytest.raises(ValueError, match="fisher must be one of"):
        fit_ekfac(model, make_examples(2), fisher="true", progress=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        fit_ekfac(model, make_examples(2), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="'input_ids' must be a non-empty 1-D tensor"):
        fit_ekfac(model, [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], progress=False)
    with pytest.raises(ValueError, match="closest supported layers"):
        fit_ekfac(model, make_examples(2), modules=["gpt_neox.layers.0.mlp.dense_h_to_4"], progress=False)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_non_finite_weight_names_the_module_and_batch(fisher):
    """A NaN weight: the error names the batch and the first tracked module with a non-finite output (with
    sampled targets the draw itself fails on NaN probabilities; that error is explained the same way)."""
    model = make_tiny_neox()
    name = "gpt_neox.layers.1.attention.dense"
    with torch.no_grad():
        dict(model.named_modules())[name].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"in batch 0 of the training set .*first tracked module with a "
                                                 rf"non-finite output is '{name}'"):
        fit_ekfac(model, make_examples(6), fisher=fisher, progress=False)


class InfiniteGradientTask(CausalLMTask):
    """Finite loss whose gradient is infinite: d/dx sqrt(|x|) at x = 0."""

    def train_loss(self, model, batch, sample=False, generator=None):
        logits = self.logits(model, batch)
        loss = CausalLMTask.train_loss(self, model, batch)
        kink = (logits[:, :, 0] - logits[:, :, 0].detach()).abs().sqrt().sum(dim=1)
        return loss + kink


def test_non_finite_gradient_names_the_module_and_batch():
    model = make_tiny_neox()
    with pytest.raises(FloatingPointError, match=r"non-finite output gradient at module 'gpt_neox\.layers\.\d\..*' "
                                                 r"in batch 0 of the training set \(examples \["):
        fit_ekfac(model, make_examples(6), task=InfiniteGradientTask(), fisher="empirical", progress=False)


def test_capture_restores_requires_grad_and_training_mode():
    model = make_tiny_neox().train()
    flags = [p.requires_grad for p in model.parameters()]
    fit_ekfac(model, make_examples(3), fisher="empirical", progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


# ----------------------------------------------------------------------------------------------------
# Save / load (test 7: fingerprint) and test 8: atomic saves, resume
# ----------------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_fingerprint_mismatch(tmp_path):
    model = make_tiny_neox()
    factors = fit_ekfac(model, make_examples(8), fisher="empirical", progress=False)
    factors.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["factors.json", "factors.safetensors"]
    meta = json.loads((tmp_path / "factors.json").read_text())
    assert meta["arguments"]["fisher"] == "empirical" and "torch" in meta["versions"]
    assert set(meta["fingerprint"]) == {"modules", "weights_digest"}
    loaded = EKFACFactors.load(tmp_path, model=model)
    moved = loaded.to("cpu")
    assert any(f.q_a.shape[0] % ROW_ALIGNMENT for f in factors.modules.values())  # odd, bias-folded widths
    for name, f in factors.modules.items():
        g = loaded.modules[name]
        assert torch.equal(f.q_a, g.q_a) and torch.equal(f.q_s, g.q_s) and torch.equal(f.lambda_, g.lambda_)
        assert (f.n_tokens, f.n_examples) == (g.n_tokens, g.n_examples)
        for basis in (f.q_a, f.q_s, g.q_a, g.q_s, moved.modules[name].q_a, moved.modules[name].q_s):
            assert is_aligned(basis)  # fitted, loaded and moved eigenbases all have aligned rows
    changed = make_tiny_neox()
    with torch.no_grad():
        changed.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="fitted on a different model: the weights differ"):
        EKFACFactors.load(tmp_path, model=changed)
    with pytest.raises(ValueError, match="layer shapes differ"):
        EKFACFactors.load(tmp_path, model=make_tiny_neox(intermediate=48))
    with pytest.raises(ValueError, match="do not belong to this model"):
        EKFACFactors.load(tmp_path, model=make_tiny_llama())
    EKFACFactors.load(tmp_path)  # without a model: no check


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous save intact and no temporary file behind; tensors
    and metadata from two different saves are refused."""
    model = make_tiny_neox()
    first = fit_ekfac(model, make_examples(6, seed=1), fisher="empirical", progress=False)
    second = fit_ekfac(model, make_examples(6, seed=2), fisher="empirical", progress=False)
    first.save(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}

    import trustrepair.engine.storage as storage

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        second.save(tmp_path)
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before

    # Interrupted between the tensor file and the metadata: the save ids differ.
    real_write = storage.atomic_write

    def stop_before_json(path, write, **kwargs):
        if path.name == "factors.json":
            raise KeyboardInterrupt
        real_write(path, write, **kwargs)

    monkeypatch.setattr(storage, "atomic_write", stop_before_json)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path)
    monkeypatch.undo()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="come from different saves"):
        EKFACFactors.load(tmp_path)


class CountingTask(CausalLMTask):
    """Counts training-loss calls; raises after ``fail_after`` calls (an interruption)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def train_loss(self, model, batch, sample=False, generator=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted during the Lambda pass")
        self.calls += 1
        return super().train_loss(model, batch, sample=sample, generator=generator)


def test_fit_resumes_after_the_covariance_stage(tmp_path):
    model = make_tiny_neox()
    examples = make_examples(12, seed=16)
    reference = fit_ekfac(model, examples, batch_size=4, progress=False)  # sampled Fisher: 3 + 3 batches
    with pytest.raises(KeyboardInterrupt):
        fit_ekfac(model, examples, batch_size=4, progress=False, task=CountingTask(fail_after=4),
                  checkpoint_dir=tmp_path)
    assert {"covariances.json", "covariances.safetensors"} <= set(os.listdir(tmp_path))
    counting = CountingTask()
    resumed = fit_ekfac(model, examples, batch_size=4, progress=False, task=counting, checkpoint_dir=tmp_path)
    assert counting.calls == 3  # only the Lambda pass ran
    assert "covariance" not in resumed.timings
    for name, f in reference.modules.items():
        g = resumed.modules[name]
        assert torch.equal(f.q_a, g.q_a) and torch.equal(f.q_s, g.q_s) and torch.equal(f.lambda_, g.lambda_)
    with pytest.raises(ValueError, match=r"different model, data or arguments \(differs in \['n_examples', "
                                         r"'data_digest'\]\)"):
        fit_ekfac(model, examples[:10], batch_size=4, progress=False, checkpoint_dir=tmp_path)
