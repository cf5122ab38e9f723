"""The loaded state every stage works on: the model, the tokenised splits and their cached hidden states.

When only blocks ``first_block ..`` are trained, analysed and repaired, the hidden states entering them
are the same for the model before and after fine-tuning and repair: they are computed once per dataset
and cached in ``cache/hidden.pt`` or a store shared by several runs (:func:`cache_hidden_states`; see :mod:`trustrepair.app.prefix_cache`), and every later pass runs
only those blocks (:attr:`Workspace.tail`). Built by :func:`trustrepair.app.inputs.prepare_workspace`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from trustrepair.app.prefix_cache import TailLM, TailTask
from trustrepair.app.records import HALVES, AspectLogOdds, Evaluation
from trustrepair.app.rundir import RunDir
from trustrepair.data import SFTRecord
from trustrepair.methods.metrics import perplexity, query_log_odds

logger = logging.getLogger(__name__)


@dataclass
class Workspace:
    """Built once per command by :func:`build_workspace`.

    Attributes:
        model: the whole causal LM; only ``trained_params`` are ever changed (by SFT and repairs).
        tail: the blocks from ``first_block`` on and the head, fed the cached hidden states (or the whole
            model, when no prefix is cached).
        task: the loss and batching of ``tail``.
        first_block: index of the first trained block.
        module_names: the analysed linear layers, as names in ``model``.
        trained_params: the trained parameters, as names in ``model``.
        train_records, heldout_records: the SFT dialogues (80 / 20 split); train is scored and repaired,
            held-out measures perplexity.
        train, heldout: those dialogues tokenised, each with its cached ``hidden`` states.
        trust: ``trust[aspect][half]`` (half ``query`` or ``heldout``) = trust pairs, each
            ``{"proponent": example, "opponent": example}`` with cached hidden states.
        batch_size: sequences per batch of every pass.
        progress: whether passes show progress bars.
    """

    model: nn.Module
    tail: TailLM
    task: TailTask
    first_block: int
    module_names: list[str]
    trained_params: list[str]
    train_records: list[SFTRecord]
    heldout_records: list[SFTRecord]
    train: list[dict]
    heldout: list[dict]
    trust: dict[str, dict[str, list[dict]]]
    batch_size: int
    progress: bool

    # -- measurements --------------------------------------------------------------------------------
    def perplexity(self) -> float:
        """Held-out SFT perplexity of the model as it is."""
        return perplexity(self.tail, self.heldout, task=self.task, batch_size=self.batch_size)

    def log_odds_pairs(self, aspect: str, half: str) -> list[float]:
        """Per trust pair of ``aspect``'s ``half``: log P(o|m) - log P(p|m), in the split's order."""
        return query_log_odds(self.tail, self.trust[aspect][half], task=self.task,
                              batch_size=self.batch_size).tolist()

    def log_odds(self, aspect: str, half: str) -> float:
        values = self.log_odds_pairs(aspect, half)
        return sum(values) / len(values)

    def evaluation(self, aspects: Sequence[str]) -> Evaluation:
        """Both halves of ``aspects`` and the held-out perplexity, for the model as it is."""
        return Evaluation({a: AspectLogOdds(*(self.log_odds(a, half) for half in ("query", "heldout")))
                           for a in aspects}, self.perplexity())

    @torch.no_grad()
    def response_embeddings(self, examples: Sequence[dict]) -> np.ndarray:
        """(N, H) float32: final hidden state averaged over each example's response tokens (Eq. 7)."""
        rows = []
        for start in range(0, len(examples), self.batch_size):
            batch = self.task.collate(examples[start:start + self.batch_size])
            hidden = self.task.final_hidden(self.tail, batch)
            mask = (batch["labels"] != -100).to(hidden.dtype).unsqueeze(-1)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
        return torch.cat(rows).float().cpu().numpy()

    def tail_module_names(self) -> list[str]:
        """The analysed layers' names inside :class:`TailLM` (``body.layers.{i - first_block}...``)."""
        tail_names = {id(m): n for n, m in self.tail.named_modules()}
        model_modules = dict(self.model.named_modules())
        return [tail_names[id(model_modules[name])] for name in self.module_names]

    def sizes(self, trained_blocks: int, subset_size: int) -> dict:
        """Split and model sizes, as the report shows them."""
        return {"sft_train": len(self.train), "sft_heldout": len(self.heldout),
                "sft_train_tokens": int(sum(len(e["input_ids"]) for e in self.train)),
                "trained_blocks": trained_blocks, "first_block": self.first_block,
                "analysed_modules": len(self.module_names),
                "aspects": {a: {h: len(v) for h, v in halves.items()} for a, halves in self.trust.items()},
                "subset_size": subset_size}


def _token_digest(example: dict) -> str:
    return hashlib.sha256(torch.as_tensor(example["input_ids"], dtype=torch.int64).numpy().tobytes()).hexdigest()


def cache_hidden_states(run: RunDir, model: nn.Module, first_block: int, pad_token_id: int, batch_size: int,
                        train: list[dict], heldout: list[dict], trust: dict[str, tuple[list, list]],
                        store: Path | None = None) -> dict:
    """Hidden states entering block ``first_block`` of every example: ``{"train": [...], "heldout": [...],
    "<aspect>/query": [...], "<aspect>/heldout": [...]}``, one (T, H) tensor per sequence; a trust half lists
    each pair's proponent then its opponent.

    Without ``store`` they are cached in the run's ``cache/hidden.pt`` and read back when present. With
    ``store`` (a file shared by runs of one model, ``first_block`` and tokenisation, as the seeds of a
    planted demo; the caller guarantees that) they are kept there by the SHA-256 of each sequence's token
    ids: only sequences missing from it are run (deduplicated), then added to it atomically, and the run's
    own cache is not written. A state is the same whichever run computed it, up to the float32 rounding of
    the batch it ran in."""
    from trustrepair.app.prefix_cache import cache_prefix_hidden
    from trustrepair.engine.storage import load_torch, save_torch

    def prefix(examples, desc):
        rows = cache_prefix_hidden(model, examples, first_block, batch_size=batch_size,
                                   pad_token_id=pad_token_id, progress=run.progress, desc=desc)
        return [r["hidden"] for r in rows]

    groups = {"train": train, "heldout": heldout}
    for aspect, halves in trust.items():
        for half_name, queries in zip(HALVES, halves):
            groups[f"{aspect}/{half_name}"] = [q[side] for q in queries for side in ("proponent", "opponent")]
    with run.timed("cache_hidden_states"):
        if store is None:
            cache = run.path(RunDir.HIDDEN_CACHE)
            if cache.is_file():
                return load_torch(cache)
            hidden = {name: prefix(examples, f"hidden: {name}") for name, examples in groups.items()}
            run.publish(lambda: save_torch(cache, hidden))
            return hidden
        states = load_torch(store) if store.is_file() else {}
        keys = {name: [_token_digest(e) for e in examples] for name, examples in groups.items()}
        missing = {}
        for name, examples in groups.items():
            missing.update((k, e) for k, e in zip(keys[name], examples) if k not in states)
        if missing:
            logger.info("prefix store %s: %d of %d sequences to compute", store, len(missing),
                        sum(map(len, keys.values())))
            states.update(zip(missing, prefix(list(missing.values()), "hidden: new sequences")))
            run.publish(lambda: save_torch(store, states))
    return {name: [states[k] for k in ks] for name, ks in keys.items()}


def _attach(examples, states):
    return [{**ex, "hidden": h} for ex, h in zip(examples, states)]


def _attach_queries(queries, states):
    it = iter(states)
    return [{side: {**q[side], "hidden": next(it)} for side in ("proponent", "opponent")} for q in queries]


def build_workspace(run: RunDir, model: nn.Module, tokenizer, module_names: list[str], trained_params: list[str], *,
                    train_records: list[SFTRecord], heldout_records: list[SFTRecord], train: list[dict],
                    heldout: list[dict], trust: dict[str, tuple[list, list]], batch_size: int,
                    first_block: int | None, hidden_store: Path | None = None) -> Workspace:
    """The workspace of tokenised splits (``trust[aspect] = (query, heldout)``); with ``first_block`` every
    pass runs only blocks ``first_block ..`` from cached hidden states (:func:`cache_hidden_states`), with
    None the whole model runs (:class:`~trustrepair.task.CausalLMTask`)."""
    from trustrepair.task import CausalLMTask

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(model=model, module_names=module_names, trained_params=trained_params,
                  train_records=train_records, heldout_records=heldout_records, batch_size=batch_size,
                  progress=run.progress)
    if first_block is None:
        task = CausalLMTask()
        task.pad_token_id = int(pad)
        return Workspace(tail=model, task=task, first_block=0, train=train, heldout=heldout,
                         trust={a: dict(zip(HALVES, halves)) for a, halves in trust.items()}, **common)
    task = TailTask()
    task.pad_token_id = int(pad)
    hidden = cache_hidden_states(run, model, first_block, task.pad_token_id, batch_size, train, heldout, trust,
                                 hidden_store)
    return Workspace(
        tail=TailLM(model, first_block), task=task, first_block=first_block,
        train=_attach(train, hidden["train"]), heldout=_attach(heldout, hidden["heldout"]),
        trust={a: {half: _attach_queries(queries, hidden[f"{a}/{half}"]) for half, queries in zip(HALVES, halves)}
               for a, halves in trust.items()}, **common)
