"""Temporary: the one batcher gives exactly the batches of the five copies it replaces (removed with them)."""
import random

import pytest
import torch

from trustrepair.app.sft import epoch_batches
from trustrepair.batching import chunked, length_sorted_batches, padded_batches, padding_fraction
from trustrepair.data.batching import length_sorted_batches as data_batches, padding_fraction as data_padding


def capture_batches(examples, batch_size, collate):   # engine/capture.py padded_batches, before (no bar)
    order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].shape[0]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, collate([examples[i] for i in rows])


def _length_sorted_chunks(lengths, batch_size):   # methods/metrics.py, before
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _batches(items, batch_size):                   # methods/repair_step.py, before
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _cases():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 60)
        lengths = [rng.randint(1, rng.choice([2, 3, 5, 40])) for _ in range(n)]   # many ties
        yield lengths, rng.randint(1, 9), rng.choice([None, 1, 10, 40, 120])


def test_equivalent_to_the_old_copies():
    for lengths, batch_size, max_tokens in _cases():
        examples = [{"input_ids": torch.zeros(n, dtype=torch.long)} for n in lengths]
        old = [rows for rows, _ in capture_batches(examples, batch_size, collate=lambda b: None)]
        new = [rows for rows, _ in padded_batches(examples, batch_size, collate=lambda b: None)]
        assert old == new == length_sorted_batches(lengths, batch_size)
        assert list(_length_sorted_chunks(lengths, batch_size)) == length_sorted_batches(lengths, batch_size)
        assert data_batches(examples, batch_size, max_tokens) == length_sorted_batches(
            lengths, batch_size, longest_first=True, max_tokens=max_tokens)
        batches = length_sorted_batches(lengths, batch_size, longest_first=True, max_tokens=max_tokens)
        assert data_padding(examples, batches) == padding_fraction(lengths, batches)
        assert list(_batches(list(range(len(lengths))), batch_size)) == chunked(list(range(len(lengths))), batch_size)
        assert list(_batches(examples, batch_size)) == chunked(examples, batch_size)


def _old_epoch_batches(lengths, batch_size, order, generator):
    n = len(lengths)
    if order == "shuffle":
        perm = torch.randperm(n, generator=generator).tolist()
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    by_length = sorted(range(n), key=lambda i: (lengths[i], i))
    batches = [by_length[i:i + batch_size] for i in range(0, n, batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


@pytest.mark.parametrize("order", ["length", "shuffle"])
def test_epoch_batches_equivalent(order):
    for lengths, batch_size, _ in _cases():
        old_gen, new_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for _epoch in range(3):   # the same generator draws, epoch after epoch
            assert _old_epoch_batches(lengths, batch_size, order, old_gen) == epoch_batches(lengths, batch_size, order, new_gen)
