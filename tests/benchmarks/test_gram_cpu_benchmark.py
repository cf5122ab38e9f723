"""benchmarks.benchmark_gram_cpu: the weighted sum and the table it reports."""
from benchmarks.benchmark_gram_cpu import block_times, table, weighted


def test_weighted_sums_factor_widths_by_their_counts():
    times = {576: {256: 2.0, None: 1.0}, 192: {256: 0.5, None: 0.25}}
    assert weighted(times, {576: 9, 192: 2}) == {256: 19.0, None: 9.5}
    text = table(times, {576: 9, 192: 2})
    assert "block full ms" in text and "**19.0**" in text and "| 192 (2) | 0.50 | 0.25 |" in text


def test_block_times_times_every_block():
    times = block_times(40, 16, [8, None], repeats=2)
    assert set(times) == {8, None} and all(t > 0 for t in times.values())
