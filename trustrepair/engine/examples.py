"""Checking the datasets the engine and the methods take: a training set (or subset) is a sequence of
example dicts with a 1-D ``input_ids`` and, optionally, ``labels`` of the same length (-100 where no loss
is taken). Errors name the dataset and the item, and name a batch by its example indices.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from trustrepair.task import IGNORE_INDEX, Example


def as_examples(data, what: str, max_examples: int | None = None) -> list[Example]:
    """The first ``max_examples`` examples of a sequence / map-style dataset, checked.

    Raises:
        ValueError: an empty dataset, a non-positive ``max_examples``, or an example that is not a dict
            with a 1-D ``input_ids`` (and ``labels`` of the same length when present).
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive number of examples or None; got {max_examples}")
    count = len(data)
    if max_examples is not None:
        count = min(count, max_examples)
    if count == 0:
        raise ValueError(f"the {what} is empty; pass at least one example dict with 'input_ids' and 'labels'")
    examples = [data[i] for i in range(count)]
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise ValueError(f"{what} item {i} is a {type(ex).__name__}; an example is a dict with 1-D "
                             f"'input_ids' and 'labels' (-100 where no loss is taken)")
        ids = ex["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{what} item {i}: 'input_ids' must be a non-empty 1-D tensor")
        labels = ex.get("labels")
        if labels is not None and tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(f"{what} item {i}: 'labels' {tuple(labels.shape)} and 'input_ids' {tuple(ids.shape)} "
                             f"differ in shape")
    return examples


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
