"""The planted report's statistics: the fraction of damage undone and its delta-method standard error,
and the combination over seeds."""
import math

import numpy as np
import pytest

from trustrepair.app.planted_report import over_seeds, fraction_undone


def test_fraction_undone_is_one_at_the_gold_and_zero_at_the_post():
    rng = np.random.default_rng(0)
    post = rng.normal(size=37)
    gold = post - 0.5 - 0.1 * rng.normal(size=37)
    assert fraction_undone(post, gold, gold) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    assert fraction_undone(post, post, gold)[0] == 0.0
    halfway = post - 0.5 * (post - gold)
    assert fraction_undone(post, halfway, gold)[0] == pytest.approx(0.5)


def test_fraction_undone_standard_error_matches_its_sampling_spread():
    """Over many draws of n = 53 pairs, the delta-method SE agrees with the std of the estimates."""
    rng = np.random.default_rng(1)
    estimates, ses = [], []
    for _ in range(2000):
        g = 0.8 + rng.normal(size=53)
        d = 0.6 * g + 0.7 * rng.normal(size=53) + 0.2
        post = rng.normal(size=53)
        f, se = fraction_undone(post, post - d, post - g)
        estimates.append(f)
        ses.append(se)
    assert np.median(ses) == pytest.approx(np.std(estimates), rel=0.15)


def test_fraction_undone_refuses_too_few_or_mismatched_pairs():
    with pytest.raises(ValueError, match="2 pairs"):
        fraction_undone([1.0], [0.5], [0.0])
    with pytest.raises(ValueError, match="2 pairs"):
        fraction_undone([1.0, 2.0], [0.5], [0.0, 1.0])
    assert all(math.isnan(x) for x in fraction_undone([1.0, 2.0], [0.5, 1.0], [1.0, 2.0]))


def test_combine_over_seeds():
    row = over_seeds([1.0, 2.0, 4.0], [0.3, 0.4, 0.0])
    assert row["mean"] == pytest.approx(7 / 3) and (row["min"], row["max"]) == (1.0, 4.0)
    assert row["se"] == pytest.approx(0.5 / 3)
    assert row["seed_se"] == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert over_seeds([2.0], [0.1])["seed_se"] is None
