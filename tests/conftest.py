"""Shared fixtures: tiny causal LMs built from configs and random SFT / trust data in the library's
conventions (dicts of 1-D ``input_ids`` / ``labels`` with -100 on prompt tokens)."""
import os
from pathlib import Path

import benchmarks  # noqa: F401  (first: keeps this checkout's kernels/ from shadowing the installed `kernels`)
import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and do not fight other processes for the cores);
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real datasets (read-only, never copied into the repository)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def make_tiny_neox(seed=0, hidden=32, layers=2, heads=4, intermediate=64, vocab=97, dtype=torch.float64):
    """A random-init GPT-NeoX (Pythia architecture) small enough for float64 brute-force references."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=128, rotary_pct=0.25,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(cfg).to(dtype).eval()


def make_tiny_llama(seed=0, hidden=32, layers=2, heads=4, intermediate=48, vocab=97, dtype=torch.float64):
    """A random-init Llama (SmolLM2 architecture) small enough for float64 brute-force references."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=2, intermediate_size=intermediate, max_position_embeddings=128,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_examples(n, vocab=97, min_len=3, max_len=12, seed=0):
    """Random SFT examples of awkward lengths: the first ~half of each sequence is prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: max(1, length // 2)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def make_queries(n, vocab=97, prompt_len=4, resp_len=3, seed=1):
    """Random trust queries: proponent and opponent share a prompt and differ in the response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
        pair = {}
        for side in ("proponent", "opponent"):
            resp = torch.randint(0, vocab, (resp_len,), generator=g)
            ids = torch.cat([prompt, resp])
            labels = ids.clone()
            labels[:prompt_len] = -100
            pair[side] = {"input_ids": ids, "labels": labels}
        out.append(pair)
    return out


@pytest.fixture
def tiny_neox():
    return make_tiny_neox()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def make_byte_tokenizer():
    """An offline byte-level tokenizer (no merges: one token per UTF-8 byte) with the Hugging Face call
    interface. Ids: 0 <pad>, 1 <s> (BOS), 2 </s> (EOS), then the 256 bytes (vocab 259). Like SmolLM2's
    tokenizer under transformers 4.x it prepends BOS when ``add_special_tokens=True``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


# ---- explicit gradients without trustrepair's code (engine and methods tests compare against them) ----

def folded_param_grad(module):
    """d loss / d [weight | bias] from .grad, folded without trustrepair's code."""
    weight = module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.T
    if module.bias is None:
        return weight.clone()
    return torch.cat([weight, module.bias.grad[:, None]], dim=1)


def per_example_gradients(model, names, examples, objective=None):
    """List over items of {module name: explicit (d_out, d_in [+ 1]) gradient of objective(item)} (default:
    the example's summed training loss)."""
    modules = dict(model.named_modules())
    from trustrepair.task import CausalLMTask, pad_batch

    objective = objective or (lambda ex: CausalLMTask().train_loss(model, pad_batch([ex]))[0])
    out = []
    for ex in examples:
        model.zero_grad()
        objective(ex).backward()
        out.append({n: folded_param_grad(modules[n]).double() for n in names})
    model.zero_grad()
    return out


FLOAT64_MODEL_RTOL = 1e-6
"""Relative tolerance of float64 comparisons between two differently batched passes through a tiny
transformers model (fast path against per-example autograd): on an AVX2-only AMD EPYC (2026-12-08) they
differ by up to 2.3e-7 relative (under 1e-8 on the machines before); one such test passed at 1e-8 with the
scalar ATen kernels (ATEN_CPU_CAPABILITY=default), and the kernel responsible is not isolated. A real error (a lost damping
term, token or example) is of the order of 1e-3 or more."""


def assert_rel(actual, expected, rtol, what):
    err = float((actual.double() - expected.double()).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} x {scale:.3e}"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, with a chat template), offline; the first use
    on a machine de-quantises the model (~30 s, cached after)."""
    from transformers import AutoTokenizer

    from trustrepair.app.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def save_tiny_model_dir(path, tokenizer, kind="llama", seed=0):
    """A tiny causal-LM directory with ``tokenizer`` saved beside it: "llama" (tied embeddings) or "gpt2"
    (Conv1D layers, absolute position embeddings); float32."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             tie_word_embeddings=True, max_position_embeddings=256))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=256))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A three-block Llama (hidden 32) with the byte tokenizer, saved once per session (the demo pipelines'
    tiny model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
