"""What a run analyses, from records to the :class:`~trustrepair.app.workspace.Workspace` the stages work
on; shared by a user's ``attribute`` run (:mod:`trustrepair.app.user_workspace`, which reads their files)
and the demo (:func:`trustrepair.app.demo_workspace.load_demo_workspace`, which reads HH and fine-tunes first).

:func:`prepare_workspace` tokenises the training examples (:func:`~trustrepair.data.tokenize_conversations`)
and the trust pairs (:func:`~trustrepair.data.tokenize_trust_pairs`) in one format, writes the splits as
the model sees them (``splits/<aspect>.{query,heldout}.jsonl``: texts and token ids;
``splits/perplexity.jsonl``: the perplexity examples, in a layout ``--eval`` reads), plans the fit
(:mod:`trustrepair.app.layer_plan`) and decides how the model runs: in full
(:class:`~trustrepair.task.CausalLMTask`) unless every analysed layer lies in blocks ``b ..`` with b > 0
of a decoder that :class:`~trustrepair.app.prefix_cache.TailLM` supports (no absolute position
embeddings) and the hidden states entering block b take at most :data:`HIDDEN_CACHE_SHARE` of the free
memory: then those hidden states are cached once and every pass runs blocks ``b ..`` only (exactly the
same losses, see :mod:`trustrepair.app.prefix_cache`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trustrepair.app.layer_plan import FitPlan, first_analysed_block, free_memory_bytes, plan
from trustrepair.app.rundir import RunDir
from trustrepair.app.records import HALVES
from trustrepair.app.workspace import Workspace, build_workspace
from trustrepair.data import Conversation, SFTRecord, TrustRecord, format_trust, tokenize_conversations, tokenize_trust_pairs
from trustrepair.task import IGNORE_INDEX

logger = logging.getLogger(__name__)

HIDDEN_CACHE_SHARE = 0.25
"""The prefix cache is used only when the cached hidden states take at most this share of free memory."""


@dataclass
class RunInputs:
    """Everything a run analyses, before tokenisation.

    Attributes:
        model, tokenizer: the causal LM (every parameter frozen) and its tokenizer.
        format: "chat" or "plain" (:func:`~trustrepair.data.resolve_format`).
        analysed: ``(index, example)`` of the training examples scored and repaired; ``index`` is the
            example's position in its source (the ``--train`` files).
        held: ``(index, example)`` of the examples perplexity is measured on.
        perplexity_source: what ``held`` is, in words, for the report.
        trust: aspect name -> (query pairs, held-out pairs).
        module_names: the analysed layers.
        trained_params: the parameters SFT and the repairs may change (names in ``model``).
        max_length, batch_size: token budget per sequence; sequences per pass.
        hidden_store: a prefix hidden-state store shared with other runs of the same model and blocks
            (:func:`~trustrepair.app.workspace.cache_hidden_states`); None = the run's own cache.
    """

    model: nn.Module
    tokenizer: object
    format: str
    analysed: list[tuple[int, Conversation]]
    held: list[tuple[int, Conversation]]
    perplexity_source: str
    trust: dict[str, tuple[list[TrustRecord], list[TrustRecord]]]
    module_names: list[str]
    trained_params: list[str]
    max_length: int
    batch_size: int
    hidden_store: Path | None = None


@dataclass
class PreparedRun:
    """A run ready for its stages: the workspace, the tokenizer, the format, where each analysed example
    came from (``train_index[i]``, ``train_sources[i]``), what perplexity is measured on, the aspects'
    names and the fit plan."""

    workspace: Workspace
    tokenizer: object
    format: str
    train_index: list[int]
    train_sources: list[str]
    perplexity_source: str
    aspects: list[str]
    fit_plan: FitPlan


def display_record(record: Conversation) -> SFTRecord:
    """The example as the report shows it: its verbatim (prompt, completion) for text layouts; for chat
    layouts the turns before the last trained one ("role: content" lines) and that turn's content."""
    if record.text is not None:
        prompt, response = record.text
    else:
        last = record.trained_turns[-1]
        prompt = "\n".join(f"{role}: {content}" for role, content in record.messages[:last])
        response = record.messages[last][1]
    return SFTRecord(prompt, response if response.strip() else "<empty>", source=record.source)


def _record_json(record: Conversation) -> dict:
    """A line :func:`~trustrepair.data.load_training_file` reads back as the same example."""
    if record.text is not None:
        return {"prompt": record.text[0], "completion": record.text[1], "source": record.source}
    if record.context:
        return {"prompt": [{"role": r, "content": c} for r, c in record.messages[:record.context]],
                "completion": [{"role": r, "content": c} for r, c in record.messages[record.context:]],
                "source": record.source}
    return {"messages": [{"role": r, "content": c} for r, c in record.messages], "source": record.source}


def _pair_json(record: TrustRecord, query: dict) -> dict:
    """A trust pair as the model sees it: formatted texts, the shared prompt's ids and each response's ids."""
    proponent, opponent = query["proponent"], query["opponent"]
    labelled = proponent["labels"] != IGNORE_INDEX
    prompt_len = int(labelled.nonzero()[0]) if bool(labelled.any()) else len(labelled)
    return {"prompt": record.prompt, "proponent": record.proponent, "opponent": record.opponent,
            "source": record.source, "prompt_ids": proponent["input_ids"][:prompt_len].tolist(),
            "proponent_ids": proponent["input_ids"][prompt_len:].tolist(),
            "opponent_ids": opponent["input_ids"][prompt_len:].tolist()}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from trustrepair.engine.storage import write_text

    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prepare_workspace(run: RunDir, inputs: RunInputs) -> PreparedRun:
    """Tokenise, write ``splits/``, plan the fit, cache the prefix (where it is used) and build the workspace."""
    fmt, tok, length = inputs.format, inputs.tokenizer, inputs.max_length
    with run.timed("tokenize"):
        train_ex = tokenize_conversations([r for _, r in inputs.analysed], tok, length, format=fmt)
        heldout_ex = tokenize_conversations([r for _, r in inputs.held], tok, length, format=fmt)
        trust, split_rows = {}, {}
        for name, halves in inputs.trust.items():
            tokenized_halves = []
            for half, records in zip(HALVES, halves):
                tokenized = tokenize_trust_pairs(records, tok, length, format=fmt)
                split_rows[f"{name}.{half}"] = [_pair_json(r, q) for r, q in
                                                zip(format_trust(records, tok, fmt), tokenized)]
                tokenized_halves.append(tokenized)
            trust[name] = tuple(tokenized_halves)

    split_rows["perplexity"] = [{"index": i, **_record_json(r)} for i, r in inputs.held]

    def write_splits():  # the settings fix their content, so files already there are kept
        for key, rows in split_rows.items():
            path = run.path("splits") / f"{key}.jsonl"
            if not path.is_file():
                _write_jsonl(path, rows)

    run.publish(write_splits)
    model = inputs.model
    first_block = _prefix_block(model, inputs.module_names, train_ex, heldout_ex, trust)
    fit_plan = plan(model, inputs.module_names, _running_parameters(model, first_block),
                    sum(len(e["input_ids"]) for e in train_ex))
    logger.info("analysing %s", fit_plan.describe())
    logger.info("%s", "running the whole model" if first_block is None else
                f"caching the hidden states entering block {first_block}; every pass runs the blocks after it")
    ws = build_workspace(run, model, tok, inputs.module_names, inputs.trained_params,
                         train_records=[display_record(r) for _, r in inputs.analysed],
                         heldout_records=[display_record(r) for _, r in inputs.held], train=train_ex,
                         heldout=heldout_ex, trust=trust, batch_size=inputs.batch_size, first_block=first_block,
                         hidden_store=inputs.hidden_store)
    return PreparedRun(ws, tok, fmt, [i for i, _ in inputs.analysed], [r.source for _, r in inputs.analysed],
                       inputs.perplexity_source, list(inputs.trust), fit_plan)


def _prefix_block(model, module_names, train_ex, heldout_ex, trust) -> int | None:
    """The block whose incoming hidden states are cached, or None to run the whole model (module doc)."""
    from trustrepair.app.prefix_cache import TailLM

    first = first_analysed_block(model, module_names)
    if not first:
        return None
    try:
        TailLM(model, first)
    except ValueError as err:
        logger.info("no prefix cache: %s", err)
        return None
    tokens = sum(len(e["input_ids"]) for e in [*train_ex, *heldout_ex])
    tokens += sum(len(q[s]["input_ids"]) for halves in trust.values() for h in halves for q in h
                  for s in ("proponent", "opponent"))
    weight = next(model.parameters())
    need = tokens * model.config.hidden_size * weight.element_size()
    free = free_memory_bytes(torch.device("cpu"))
    if free is not None and need > HIDDEN_CACHE_SHARE * free:
        logger.info("no prefix cache: its %.1f GiB would exceed %.0f%% of the free memory", need / 2**30,
                    100 * HIDDEN_CACHE_SHARE)
        return None
    return first


def _running_parameters(model, first_block: int | None) -> int:
    """Parameters that run per token: all but the input embedding, or with a prefix cache the blocks from
    ``first_block`` on and the LM head."""
    from trustrepair.app.models import transformer_blocks

    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    if first_block is None:
        embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
        return sum(p.numel() for p in model.parameters()) - embedding + head
    blocks = transformer_blocks(model)
    return sum(p.numel() for block in list(blocks)[first_block:] for p in block.parameters()) + head
