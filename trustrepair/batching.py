"""Length-sorted batching: rows of similar length share a batch, so right padding wastes few token slots.

With right padding a batch costs (rows) x (longest row) token slots; sorting by length first makes the
waste small (:func:`padding_fraction` measures it). Batches are lists of row indices, so results computed
per batch are put back in input order. Ties in length go to the lower index, so the batches are a
function of the lengths alone (and every caller that sums over batches sums in the same order).

The fit, the scoring passes and the evaluation run :func:`length_sorted_batches` shortest rows first;
SFT shuffles its order (:func:`trustrepair.app.sft.epoch_batches`); batches over a caller's own order
(the repair's subset) are :func:`chunked`.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence, TypeVar

from tqdm.auto import tqdm

from trustrepair.task import Batch, Example, pad_batch

T = TypeVar("T")


def example_length(item: Mapping) -> int:
    """Tokens of an example, or of the longer side of a trust query (its row width when stacked)."""
    if "input_ids" in item:
        return len(item["input_ids"])
    return max(len(item["proponent"]["input_ids"]), len(item["opponent"]["input_ids"]))


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` cut into consecutive slices of ``size`` (the last one shorter), in their order."""
    _check_batch_size(size)
    return [items[start:start + size] for start in range(0, len(items), size)]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, *, longest_first: bool = False,
                          max_tokens: int | None = None) -> list[list[int]]:
    """Index lists covering ``range(len(lengths))`` once, in length order (ties: lower index first).

    Shortest rows first by default. ``longest_first`` puts the peak memory in the first batch, so an
    out-of-memory error shows at once. A batch closes at ``batch_size`` rows or when adding a row would
    make (rows x longest row) exceed ``max_tokens``; a row longer than ``max_tokens`` gets a batch of its
    own. Without ``max_tokens`` the batches are consecutive runs of ``batch_size`` in the sorted order.
    """
    _check_batch_size(batch_size)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    if longest_first:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    else:
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if max_tokens is None:
        return chunked(order, batch_size)
    batches: list[list[int]] = []
    width = 0
    for i in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * max(width, lengths[i]) <= max_tokens:
            batches[-1].append(i)
            width = max(width, lengths[i])
        else:
            batches.append([i])
            width = lengths[i]
    return batches


def padded_batches(examples: Sequence[Example], batch_size: int, desc: str = "", progress: bool = False,
                   collate=pad_batch) -> Iterator[tuple[list[int], Batch]]:
    """Yield (row indices, right-padded batch) over :func:`length_sorted_batches` (shortest first); a tqdm
    bar counts examples when ``progress``. ``collate`` builds each batch (pass ``task.collate``)."""
    batches = length_sorted_batches([example_length(ex) for ex in examples], batch_size)
    with tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress) as bar:
        for rows in batches:
            yield rows, collate([examples[i] for i in rows])
            bar.update(len(rows))


def padded_slots(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Token slots of right-padded ``batches``: the sum over batches of rows x longest row."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded token slots (:func:`padded_slots`) that are padding."""
    real = sum(lengths[i] for batch in batches for i in batch)
    slots = padded_slots(lengths, batches)
    return 1.0 - real / slots if slots else 0.0


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
