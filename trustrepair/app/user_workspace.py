"""A user's run (``trustrepair attribute``): their fine-tuned model, the files it was tuned on and the trust
aspects, read into :class:`~trustrepair.app.inputs.RunInputs` and prepared for the stages.

* Training data: :func:`~trustrepair.data.load_training_files` (chat messages, prompt/completion, HH,
  parquet, saved datasets), tokenised in the chat or plain format
  (:func:`~trustrepair.data.tokenize_conversations`). Perplexity is measured on ``--eval`` or on a seeded
  ``perplexity_fraction`` of the training examples, which the analysis then never sees
  (``splits/perplexity.jsonl``).
* Trust pairs: each aspect's pairs (a built-in set or a user's file, at most ``max_pairs``, drawn by
  group) split by group into a query part and a held-out part, formatted like the training data
  (:func:`~trustrepair.data.format_trust`) and written to ``splits/<aspect>.{query,heldout}.jsonl`` as
  the model sees them: texts and token ids.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trustrepair.app.inputs import PreparedRun, RunInputs, prepare_workspace
from trustrepair.app.layer_plan import choose_layers
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import BUILTIN_ASPECTS, AttributeConfig
from trustrepair.data import (DataError, aspect_file, load_aspect, load_training_file, load_training_files, load_trust_file,
                              resolve_format, split)

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
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


def _trust_set(value: str, cfg: AttributeConfig):
    if value in BUILTIN_ASPECTS:
        return load_aspect(value, cfg.data_dir, max_pairs=cfg.max_pairs, seed=cfg.seed)
    return load_trust_file(value, aspect_name(value)).subsample(cfg.max_pairs, cfg.seed)


def input_files(cfg: AttributeConfig) -> dict[str, str]:
    """Every file or directory the run reads, by the option that names it (for the run's fingerprints)."""
    files = {"--model": str(check_model_dir(cfg.model))}
    if cfg.base_model is not None:
        files["--base-model"] = str(check_model_dir(cfg.base_model, "--base-model"))
    for i, path in enumerate(cfg.train):
        if not Path(path).exists():
            raise FileNotFoundError(f"--train {path}: no such file or directory")
        files[f"--train {i + 1}"] = path
    if cfg.eval is not None:
        if not Path(cfg.eval).exists():
            raise FileNotFoundError(f"--eval {cfg.eval}: no such file or directory")
        files["--eval"] = cfg.eval
    for value, name in zip(cfg.aspects, aspect_names(cfg)):
        files[f"aspect {name}"] = str(aspect_file(value, cfg.data_dir) if value in BUILTIN_ASPECTS else value)
    return files


def load_user_workspace(run: RunDir, cfg: AttributeConfig) -> PreparedRun:
    """Load the model, the data and the trust sets of ``cfg`` and prepare the run
    (:func:`~trustrepair.app.inputs.prepare_workspace`: tokenised, ``splits/`` written, fit planned).

    Raises:
        ValueError / FileNotFoundError / DataError: bad input, one line naming the file or option.
    """
    names = aspect_names(cfg)
    device = resolve_device(cfg.device)
    run.check_inputs(input_files(cfg))
    with run.timed("load_model"):
        model, tokenizer = load_model(cfg.model, device, cfg.dtype)
    fmt = resolve_format(tokenizer, cfg.format)
    module_names = choose_layers(model, cfg.layers, cfg.last_blocks)
    modules = dict(model.named_modules())
    trained_params = [f"{name}.{p}" for name in module_names for p, _ in modules[name].named_parameters()]
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
        trust = {}
        for value, name in zip(cfg.aspects, names):
            query, heldout = _trust_set(value, cfg).split(cfg.query_fraction, cfg.seed)
            trust[name] = (list(query.records), list(heldout.records))
    return prepare_workspace(run, RunInputs(model, tokenizer, fmt, analysed, held, perplexity_source, trust,
                                            module_names, trained_params, cfg.max_length, cfg.batch_size))
