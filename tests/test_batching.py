"""The one batcher (trustrepair.batching) that the fit, the scoring passes, the evaluation, the repair and
SFT all use: exact batches on lengths with ties (the demo's numbers depend on their composition and
order), properties on random lengths, and the padding it saves."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrepair.app.sft import epoch_batches
from trustrepair.batching import chunked, example_length, length_sorted_batches, padded_batches, padding_fraction

LENGTHS = [3, 1, 3, 2, 1, 3, 5, 2, 1, 5]   # ties at every length


def test_exact_batches_with_ties_to_the_lower_index():
    assert length_sorted_batches(LENGTHS, 3) == [[1, 4, 8], [3, 7, 0], [2, 5, 6], [9]]
    assert length_sorted_batches(LENGTHS, 3, longest_first=True) == [[6, 9, 0], [2, 5, 3], [7, 1, 4], [8]]
    assert length_sorted_batches(LENGTHS, 3, longest_first=True, max_tokens=8) == [
        [6], [9], [0, 2], [5, 3], [7, 1, 4], [8]]
    assert length_sorted_batches(LENGTHS, 3, max_tokens=8) == [[1, 4, 8], [3, 7], [0, 2], [5], [6], [9]]
    assert chunked(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert length_sorted_batches([], 3) == [] and chunked([], 2) == []


def test_padded_batches_collate_the_length_sorted_rows():
    examples = [{"input_ids": torch.arange(n)} for n in LENGTHS]
    out = list(padded_batches(examples, 3, collate=lambda rows: [len(r["input_ids"]) for r in rows]))
    assert [rows for rows, _ in out] == length_sorted_batches(LENGTHS, 3)
    assert [batch for _, batch in out] == [[1, 1, 1], [2, 2, 3], [3, 3, 5], [5]]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(padded_batches(examples, 0))


def test_sft_epochs_draw_the_same_batches_from_the_generator():
    generator = torch.Generator().manual_seed(0)
    assert [epoch_batches(LENGTHS, 3, "length", generator) for _ in range(2)] == [
        [[1, 4, 8], [3, 7, 0], [9], [2, 5, 6]], [[1, 4, 8], [2, 5, 6], [9], [3, 7, 0]]]
    generator = torch.Generator().manual_seed(0)
    assert [epoch_batches(LENGTHS, 3, "shuffle", generator) for _ in range(2)] == [
        [[4, 1, 7], [5, 3, 9], [0, 8, 6], [2]], [[3, 9, 4], [2, 7, 8], [6, 0, 5], [1]]]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 6), max_size=50), batch_size=st.integers(1, 9),
       max_tokens=st.one_of(st.none(), st.integers(1, 40)), longest_first=st.booleans())
def test_batches_are_sorted_runs_of_the_stable_length_order(lengths, batch_size, max_tokens, longest_first):
    batches = length_sorted_batches(lengths, batch_size, longest_first=longest_first, max_tokens=max_tokens)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=longest_first)  # stable: ties by index
    assert [i for b in batches for i in b] == order
    for b in batches:
        width = max(lengths[i] for i in b)
        assert 1 <= len(b) <= batch_size
        assert max_tokens is None or len(b) * width <= max_tokens or len(b) == 1
    if max_tokens is None:
        assert batches == chunked(order, batch_size)


def _random_examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.zeros(int(torch.randint(1, 97, (1,), generator=g)), dtype=torch.long)} for _ in range(n)]


@pytest.mark.parametrize("n, batch_size, max_tokens", [(1, 4, None), (37, 5, None), (64, 8, 300), (23, 50, 120)])
def test_length_sorted_batches(n, batch_size, max_tokens):
    items = _random_examples(n, seed=n)
    lengths = [example_length(x) for x in items]
    batches = length_sorted_batches(lengths, batch_size, longest_first=True, max_tokens=max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(n))
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)
    for b, w in zip(batches, widths):
        assert len(b) <= batch_size and lengths[b[0]] == w
        assert max_tokens is None or len(b) * w <= max_tokens or len(b) == 1
    sequential = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_tokens is None:
        assert padding_fraction(lengths, batches) <= padding_fraction(lengths, sequential)


def test_batching_measures_queries_by_their_longer_side():
    query = {"proponent": {"input_ids": torch.zeros(4)}, "opponent": {"input_ids": torch.zeros(9)}}
    assert example_length(query) == 9
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([example_length(query)], 0)
