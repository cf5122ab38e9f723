"""Run only the last transformer blocks of a causal LM from cached hidden states.

When fine-tuning, influence analysis and repair touch only blocks ``first_block ..`` of a model, the
hidden states entering ``first_block`` are identical before SFT, after SFT and after repair. Caching
them once per dataset turns every later pass (SFT, EK-FAC fit, scoring, the beta sweep, evaluation)
into a pass over the last few blocks only; on a 2-core CPU this is what makes the demo fit in minutes.

Exactness: the tail reuses the model's own base-model ``forward`` (causal and padding masks, rotary
position embeddings) on a shallow copy whose layer list holds only the last blocks, fed with
``inputs_embeds = cached hidden states``. For architectures whose embeddings carry no absolute
position term (Llama, Qwen2, Mistral, GPT-NeoX) this reproduces the full model's output exactly (up to
floating-point reassociation); models with absolute position embeddings (GPT-2's ``wpe``) are refused.

Logits are computed only at the positions that carry a label: the LM head (576 x 49,152 for SmolLM2)
costs more per token than two transformer blocks, and the trust metric and the training loss never
need the other positions.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trustrepair.task import CausalLMTask, labelled_positions, pad_batch


def _base_and_layers(model: torch.nn.Module):
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "wpe"):
        raise ValueError(
            f"{type(model).__name__} adds absolute position embeddings to its inputs, so cached hidden "
            "states cannot be fed back through `inputs_embeds`; analyse the full model with CausalLMTask."
        )
    layers = getattr(base, "layers", None)
    if base is None or base is model or not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `base_model.layers` block list; the tail runner supports "
            "Hugging Face decoders such as Llama, Qwen2, Mistral and GPT-NeoX. Analyse the full model with "
            "CausalLMTask instead."
        )
    return base, layers


class TailLM(torch.nn.Module):
    """The blocks ``first_block ..`` of a causal LM, its final norm and its LM head.

    Shares every parameter with ``model`` (nothing is copied): a change to the model's weights, such
    as a repair, is seen by the tail and vice versa.

    ``forward(hidden, attention_mask)`` maps hidden states entering ``first_block``, (B, T, H), to the
    final normed hidden states (B, T, H); :meth:`head` maps gathered rows (N, H) to logits (N, V).
    """

    def __init__(self, model: torch.nn.Module, first_block: int):
        super().__init__()
        base, layers = _base_and_layers(model)
        if not 0 <= first_block < len(layers):
            raise ValueError(f"first_block={first_block} is outside the model's {len(layers)} blocks")
        tail = copy.copy(base)
        tail._modules = dict(base._modules)
        tail.layers = torch.nn.ModuleList(list(layers)[first_block:])
        tail.config = copy.copy(base.config)
        tail.config.num_hidden_layers = len(tail.layers)
        if getattr(tail.config, "layer_types", None) is not None:
            tail.config.layer_types = list(tail.config.layer_types)[first_block:]
        self.body = tail
        self.lm_head = model.get_output_embeddings()
        self.first_block = first_block

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rows)


class _StopForward(Exception):
    pass


@torch.no_grad()
def cache_prefix_hidden(model: torch.nn.Module, examples: Sequence[dict], first_block: int, *,
                        batch_size: int = 8, pad_token_id: int = 0, progress: bool = True,
                        desc: str = "caching hidden states") -> list[dict]:
    """Hidden states entering block ``first_block`` for every example, as new example dicts.

    Each returned dict is the input example plus ``hidden``: (T_i, H) in the model's dtype. Batches
    are formed in length order to cut padding; results come back in input order. The forward stops at
    ``first_block`` (the later blocks are never run).
    """
    _, layers = _base_and_layers(model)
    captured = {}

    def grab(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = layers[first_block].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].shape[0]))
    out: list[dict | None] = [None] * len(examples)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            batch = pad_batch([examples[i] for i in idx], pad_token_id)
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
            except _StopForward:
                pass
            hidden = captured.pop("hidden").detach().cpu()
            for row, i in enumerate(idx):
                n = int(examples[i]["input_ids"].shape[0])
                out[i] = {**examples[i], "hidden": hidden[row, :n].clone()}
    finally:
        handle.remove()
    return out


def pad_hidden_batch(examples: Sequence[dict], pad_token_id: int = 0) -> dict:
    """:func:`pad_batch` plus the cached ``hidden`` states right-padded with zeros to (B, T, H)."""
    batch = pad_batch(examples, pad_token_id)
    width = batch["input_ids"].shape[1]
    first = examples[0]["hidden"]
    hidden = first.new_zeros((len(examples), width, first.shape[-1]))
    for row, ex in enumerate(examples):
        hidden[row, : ex["hidden"].shape[0]] = ex["hidden"]
    batch["hidden"] = hidden
    return batch


class TailTask(CausalLMTask):
    """:class:`CausalLMTask` for a :class:`TailLM` fed with batches that carry cached ``hidden`` states.

    Its :meth:`collate` is :func:`pad_hidden_batch`.
    """

    def collate(self, examples):
        return pad_hidden_batch(examples, self.pad_token_id)

    def final_hidden(self, model: TailLM, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(batch["hidden"].to(device), batch["attention_mask"].to(device))

    def labelled_logits(self, model: TailLM, batch: dict):
        hidden = self.final_hidden(model, batch)
        rows, cols = labelled_positions(batch["labels"].to(hidden.device))
        return model.head(hidden[rows, cols]), rows, cols
