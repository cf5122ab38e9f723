"""Length-sorted batching for evaluation passes: rows of similar length share a batch, cutting padding.

With right padding a batch costs (batch size) x (longest row) token slots; sorting by length first
makes the waste small (``padding_fraction`` measures it). Results computed per batch are put back in
input order with the returned index lists.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def example_length(item: Mapping) -> int:
    """Tokens of an example, or of the longer side of a trust query (its row width in :func:`stack_queries`)."""
    if "input_ids" in item:
        return int(item["input_ids"].shape[0])
    return max(int(item["proponent"]["input_ids"].shape[0]), int(item["opponent"]["input_ids"].shape[0]))


def length_sorted_batches(items: Sequence[Mapping], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Index lists covering ``range(len(items))`` once, longest rows first (ties by index).

    A batch closes at ``batch_size`` rows or when adding a row would make (rows x longest row) exceed
    ``max_tokens``; a row longer than ``max_tokens`` gets a batch of its own. Longest-first puts the
    peak memory in the first batch, so an out-of-memory error shows at once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    lengths = [example_length(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]]   # the first row of a batch is its longest
            if len(batch) < batch_size and (max_tokens is None or (len(batch) + 1) * width <= max_tokens):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def padding_fraction(items: Sequence[Mapping], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded token slots (sum over batches of rows x longest row) that are padding."""
    lengths = [example_length(item) for item in items]
    real = sum(lengths[i] for batch in batches for i in batch)
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - real / slots if slots else 0.0
