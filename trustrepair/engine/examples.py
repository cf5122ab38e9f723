"""Checking the datasets the engine and the methods take: a training set (or subset) is a sequence of
example dicts with a 1-D ``input_ids`` and, optionally, ``labels`` of the same length (-100 where no loss
is taken). Errors name the dataset and the item, and name a batch by its example indices.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from trustrepair.task import IGNORE_INDEX, Example


def as_examples(data, what: str, max_examples: int | None = None, vocab_size: int | None = None) -> list[Example]:
    """The first ``max_examples`` examples of a sequence / map-style dataset, checked (see :func:`as_example`).

    Args:
        vocab_size: if given, every ``input_ids`` entry and every label other than -100 must lie in
            [0, vocab_size) (checked with one min and max over the whole set when all are in range).

    Raises:
        ValueError: an empty dataset, a non-positive ``max_examples``, an example that :func:`as_example`
            refuses, or a token id outside the vocabulary (naming the item and the id).
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive number of examples or None; got {max_examples}")
    count = len(data)
    if max_examples is not None:
        count = min(count, max_examples)
    if count == 0:
        raise ValueError(f"the {what} is empty; pass at least one example dict with 'input_ids' and 'labels'")
    examples = [as_example(data[i], f"{what} item {i}") for i in range(count)]
    if vocab_size is not None:
        check_token_ids(examples, [f"{what} item {i}" for i in range(count)], vocab_size)
    return examples


def as_example(ex, what: str) -> Example:
    """One example, checked: a dict with a non-empty 1-D integer ``input_ids`` and, when present, ``labels``
    (and ``attention_mask``) of the same length. Python lists or numpy arrays of integers (a Hugging Face
    ``datasets`` row without ``set_format("torch")``) are converted to long tensors in a new dict; an
    example of tensors is returned as it is.

    Raises:
        ValueError: naming ``what`` (e.g. ``"training set item 3"``) and the problem.
    """
    if not isinstance(ex, Mapping) or "input_ids" not in ex:
        raise ValueError(f"{what} is a {type(ex).__name__}; an example is a dict with 1-D "
                         f"'input_ids' and 'labels' (-100 where no loss is taken)")
    converted = {key: _token_tensor(ex[key], key, what) for key in ("input_ids", "labels", "attention_mask")
                 if ex.get(key) is not None and not isinstance(ex[key], torch.Tensor)}
    if converted:
        ex = {**ex, **converted}
    ids = ex["input_ids"]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{what}: 'input_ids' must be a non-empty 1-D tensor")
    for key in ("input_ids", "labels"):
        value = ex.get(key)
        if value is not None and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise ValueError(f"{what}: '{key}' holds {value.dtype} values; token ids must be integers")
    for key in ("labels", "attention_mask"):
        value = ex.get(key)
        if value is not None and tuple(value.shape) != tuple(ids.shape):
            raise ValueError(f"{what}: '{key}' {tuple(value.shape)} and 'input_ids' {tuple(ids.shape)} "
                             f"differ in shape")
    return ex


def _token_tensor(value, key: str, what: str) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{what}: '{key}' must be integer token ids (a 1-D tensor or a list of ints); got "
                         f"{type(value).__name__} of {array.dtype}")
    return torch.as_tensor(array, dtype=torch.long)


def check_token_ids(examples: Sequence[Example], names: Sequence[str], vocab_size: int) -> None:
    """Refuse an ``input_ids`` entry or a label (other than -100) outside [0, vocab_size): the embedding
    lookup or the loss would fail later with an ``IndexError`` that names no example.

    Raises:
        ValueError: naming the first offending example (``names[i]``), the id and the vocabulary size.
    """
    ids = torch.cat([ex["input_ids"].reshape(-1) for ex in examples])
    labels = [ex["labels"].reshape(-1) for ex in examples if ex.get("labels") is not None]
    labels = torch.cat(labels) if labels else ids[:0]
    labels = labels[labels != IGNORE_INDEX]
    if _in_range(ids, vocab_size) and _in_range(labels, vocab_size):
        return
    for ex, name in zip(examples, names):
        for key in ("input_ids", "labels"):
            value = ex.get(key)
            if value is None:
                continue
            value = value[value != IGNORE_INDEX] if key == "labels" else value
            if not _in_range(value, vocab_size):
                bad = value[(value < 0) | (value >= vocab_size)]
                raise ValueError(f"{name}: '{key}' holds token id {int(bad[0])}, outside the model's vocabulary "
                                 f"of {vocab_size} ids [0, {vocab_size}); was it tokenized for another model?")


def _in_range(ids: torch.Tensor, vocab_size: int) -> bool:
    return ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size)


def unlabelled(examples: Sequence[Example]) -> list[int]:
    """Indices of examples with no labelled next-token target (``labels[1:]`` all -100): their loss and
    gradient are exactly zero."""
    out = []
    for i, ex in enumerate(examples):
        labels = ex.get("labels")
        if labels is not None and not bool((labels[1:] != IGNORE_INDEX).any()):
            out.append(i)
    return out


def describe_rows(kind: str, number: int, rows: Sequence[int]) -> str:
    """``"batch 3 of the training set (examples [7, 2, 9])"``, for error messages."""
    shown = list(rows[:8])
    more = ", ..." if len(rows) > 8 else ""
    return f"batch {number} of the {kind} (examples {str(shown)[:-1]}{more}])"
