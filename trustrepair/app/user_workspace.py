"""A user's run (``trustrepair attribute``): their fine-tuned model, the files it was tuned on and the trust
aspects, loaded into the :class:`~trustrepair.app.workspace.Workspace` the stages work on.

* Training data: :func:`~trustrepair.data.load_training_files` (chat messages, prompt/completion, HH,
  parquet, saved datasets), tokenised in the chat or plain format
  (:func:`~trustrepair.data.tokenize_conversations`). Perplexity is measured on ``--eval`` or on a seeded
  ``perplexity_fraction`` of the training examples, which the analysis then never sees
  (``splits/perplexity.jsonl``).
* Trust pairs: each aspect's pairs (a built-in set or a user's file, at most ``max_pairs``, drawn by
  group) split by group into a query part and a held-out part, formatted like the training data
  (:func:`~trustrepair.data.format_trust`) and written to ``splits/<aspect>.{query,heldout}.jsonl`` as
  the model sees them: texts and token ids.
* The model runs in full (:class:`~trustrepair.task.CausalLMTask`) unless every analysed layer lies in
  blocks ``b ..`` with b > 0 of a decoder that :class:`~trustrepair.app.prefix_cache.TailLM` supports
  (no absolute position embeddings) and the hidden states entering block b fit in a quarter of the free
  memory: then those hidden states are cached once and every pass runs blocks ``b ..`` only (exactly the
  same losses, see :mod:`trustrepair.app.prefix_cache`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trustrepair.app.layer_plan import FitPlan, choose_layers, first_analysed_block, free_memory_bytes, plan
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import BUILTIN_ASPECTS, AttributeConfig
from trustrepair.app.workspace import Workspace, build_workspace
from trustrepair.data import (Conversation, DataError, SFTRecord, TrustRecord, format_trust, load_aspect,
                              load_training_file, load_training_files, load_trust_file, resolve_format, split,
                              tokenize_conversations, tokenize_trust_pairs)
from trustrepair.task import IGNORE_INDEX

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HIDDEN_CACHE_SHARE = 0.25
"""The prefix cache is used only when the cached hidden states take at most this share of free memory."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def aspect_name(value: str) -> str:
    """A built-in aspect's name, or the stem of a trust file's path (``pairs/my_pairs.jsonl`` -> ``my_pairs``)."""
    if value in BUILTIN_ASPECTS:
        return value
    name = Path(value).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def aspect_names(cfg: AttributeConfig) -> list[str]:
    """The aspects' names in the order given.

    Raises:
        ValueError: two aspects with the same name (e.g. two files with one stem).
    """
    names = [aspect_name(a) for a in cfg.aspects]
    if len(set(names)) != len(names):
        raise ValueError(f"two aspects share a name {names}: rename one of the trust files (an aspect is named "
                         "after its file's stem)")
    return names


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU.

    Raises:
        ValueError: ``cuda`` asked for on a machine without a CUDA device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def check_model_dir(path: str, option: str = "--model") -> Path:
    """A Hugging Face causal-LM directory with a tokenizer.

    Raises:
        FileNotFoundError: no such directory, or no ``config.json``.
        ValueError: no tokenizer files in it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {folder}: no such directory")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{option} {folder} is not a Hugging Face model directory (no config.json); pass "
                                "a folder written by save_pretrained")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{option} {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it there with "
                         "tokenizer.save_pretrained(DIR)")
    return folder


def load_model(path: str, device: torch.device, dtype: str, option: str = "--model"):
    """(model on ``device`` in eval mode with every parameter frozen, tokenizer)."""
    from trustrepair.app.models import load_causal_lm

    folder = check_model_dir(path, option)
    try:
        model, tokenizer = load_causal_lm(folder, dtype=DTYPES[dtype])
    except (OSError, KeyError) as err:  # transformers' answer to a config it cannot map to a causal LM
        raise ValueError(f"{option} {folder} cannot be loaded as a causal LM with AutoModelForCausalLM ({err})") from None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


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


def _trust_set(value: str, cfg: AttributeConfig):
    if value in BUILTIN_ASPECTS:
        return load_aspect(value, cfg.data_dir, max_pairs=cfg.max_pairs, seed=cfg.seed)
    return load_trust_file(value, aspect_name(value)).subsample(cfg.max_pairs, cfg.seed)


@dataclass
class UserInputs:
    """A user's run loaded: the workspace, the tokenizer, the format, where each analysed example came
    from (``train_index[i]``: its position in the ``--train`` files, ``train_sources[i]``: file:line),
    what perplexity is measured on, the aspects' names, and the fit plan."""

    workspace: Workspace
    tokenizer: object
    format: str
    train_index: list[int]
    train_sources: list[str]
    perplexity_source: str
    aspects: list[str]
    fit_plan: FitPlan


def load_user_workspace(run: RunDir, cfg: AttributeConfig) -> UserInputs:
    """Load the model, the data and the trust sets of ``cfg``, write ``splits/``, and plan the fit.

    Raises:
        ValueError / FileNotFoundError / DataError: bad input, one line naming the file or option.
    """
    names = aspect_names(cfg)
    device = resolve_device(cfg.device)
    with run.timed("load_model"):
        model, tokenizer = load_model(cfg.model, device, cfg.dtype)
    fmt = resolve_format(tokenizer, cfg.format)
    with run.timed("load_data"):
        records = load_training_files(cfg.train)
        if cfg.eval is not None:
            analysed, held = list(enumerate(records)), list(enumerate(load_training_file(cfg.eval)))
            perplexity_source = f"--eval {cfg.eval} ({len(held)} examples)"
        else:
            if len(records) < 2:
                raise DataError(f"{cfg.train[0]}: one training example; holding out a perplexity share needs at "
                                "least two (or pass --eval FILE)")
            analysed, held = split(list(enumerate(records)), 1.0 - cfg.perplexity_fraction, cfg.seed)
            perplexity_source = (f"a seeded {cfg.perplexity_fraction:.0%} of the training data ({len(held)} examples, "
                                 "held out of the analysis; splits/perplexity.jsonl)")
        train_ex = tokenize_conversations([r for _, r in analysed], tokenizer, cfg.max_length, format=fmt)
        heldout_ex = tokenize_conversations([r for _, r in held], tokenizer, cfg.max_length, format=fmt)
        trust, split_rows = {}, {}
        for value, name in zip(cfg.aspects, names):
            query, heldout = _trust_set(value, cfg).split(cfg.query_fraction, cfg.seed)
            halves = []
            for half, records_half in (("query", query), ("heldout", heldout)):
                tokenized = tokenize_trust_pairs(records_half.records, tokenizer, cfg.max_length, format=fmt)
                split_rows[f"{name}.{half}"] = [_pair_json(r, q) for r, q in
                                                zip(format_trust(records_half.records, tokenizer, fmt), tokenized)]
                halves.append(tokenized)
            trust[name] = tuple(halves)

    module_names = choose_layers(model, cfg.layers, cfg.last_blocks)

    def write_splits():
        for key, rows in split_rows.items():
            _write_jsonl(run.path("splits") / f"{key}.jsonl", rows)
        _write_jsonl(run.path("splits") / "perplexity.jsonl",
                     [{"index": i, **_record_json(r)} for i, r in held])

    run.publish(write_splits)
    modules = dict(model.named_modules())
    trained_params = [f"{name}.{p}" for name in module_names for p, _ in modules[name].named_parameters()]
    first_block = _prefix_block(model, module_names, train_ex, heldout_ex, trust)
    run_params = _running_parameters(model, first_block)
    fit_plan = plan(model, module_names, run_params, sum(len(e["input_ids"]) for e in train_ex))
    logger.info("analysing %s", fit_plan.describe())
    logger.info("%s", "running the whole model" if first_block is None else
                f"caching the hidden states entering block {first_block}; every pass runs the blocks after it")
    ws = build_workspace(run, model, tokenizer, module_names, trained_params,
                         train_records=[display_record(r) for _, r in analysed],
                         heldout_records=[display_record(r) for _, r in held], train=train_ex, heldout=heldout_ex,
                         trust=trust, batch_size=cfg.batch_size, first_block=first_block)
    return UserInputs(ws, tokenizer, fmt, [i for i, _ in analysed], [r.source for _, r in analysed],
                      perplexity_source, names, fit_plan)


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

