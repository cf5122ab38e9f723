"""Selection strategies other than the DPP engine itself: normalisation, the median-heuristic bandwidth,
top-k, random, the common-subset scores and the strategy dispatcher."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrepair.methods.selection import (STRATEGIES, common_scores, median_heuristic_gamma, normalize_scores, select,
                                select_dpp, select_random, select_topk)


def direct_median_gamma(rows):
    """1 / median over pairs i < j of sum_l (x_il - x_jl)^2, by explicit differences in float64."""
    x = np.asarray(rows, dtype=np.float64)
    dist = [((x[i] - x[j]) ** 2).sum() for i in range(len(x)) for j in range(i + 1, len(x))]
    return 1.0 / np.median(dist)


@pytest.mark.parametrize("n,d,dtype", [(2, 3, np.float64), (97, 5, np.float32), (400, 33, np.float64)])
def test_median_heuristic_matches_explicit_differences(n, d, dtype):
    x = (np.random.default_rng(n).normal(size=(n, d)) * 3 + 7).astype(dtype)
    assert median_heuristic_gamma(x) == pytest.approx(direct_median_gamma(x), rel=1e-10)


def test_median_heuristic_samples_1000_rows_deterministically():
    x = np.random.default_rng(0).normal(size=(1500, 4))
    rows = np.sort(np.random.default_rng(0).choice(1500, size=1000, replace=False))
    assert median_heuristic_gamma(x) == pytest.approx(direct_median_gamma(x[rows]), rel=1e-10)
    assert median_heuristic_gamma(x) == median_heuristic_gamma(x.copy())
    small = x[:300]
    assert median_heuristic_gamma(small, max_points=100) == pytest.approx(
        direct_median_gamma(small[np.sort(np.random.default_rng(0).choice(300, size=100, replace=False))]),
        rel=1e-10)


def test_median_heuristic_counts_duplicates_as_zero_and_refuses_a_zero_median():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 3)) * 1e3  # large norms: the Gram formula alone would leave rounding noise
    some = np.vstack([base, base[:2]])
    assert median_heuristic_gamma(some) == pytest.approx(direct_median_gamma(some), rel=1e-10)
    mostly = np.vstack([np.repeat(base[:1], 9, axis=0), base[1:3]])
    with pytest.raises(ValueError, match="pass gamma explicitly"):
        median_heuristic_gamma(mostly)
    assert median_heuristic_gamma(base[:1]) == 1.0


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(2, 60), d=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_median_heuristic_ignores_row_order(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    assert median_heuristic_gamma(x[rng.permutation(n)]) == pytest.approx(median_heuristic_gamma(x), rel=1e-12)


def test_normalize_scores():
    np.testing.assert_array_equal(normalize_scores([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(normalize_scores(np.full(4, -2.5)), np.ones(4))
    extreme = normalize_scores([-1e308, 0.0, 1e308])  # max - min overflows float64 if taken directly
    np.testing.assert_allclose(extreme, [0.0, 0.5, 1.0], rtol=1e-15)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        normalize_scores([0.0, np.inf])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(values=st.lists(st.integers(-5, 5), min_size=1, max_size=40), k=st.integers(0, 45))
def test_topk_is_a_stable_sort_by_descending_score(values, k):
    expected = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    got = select_topk(np.array(values, dtype=float), k)
    assert got.dtype == np.int64 and got.tolist() == expected


def test_random_subset_is_seeded_distinct_and_in_range():
    a = select_random(50, 10, seed=3)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, select_random(50, 10, seed=3))
    assert not np.array_equal(a, select_random(50, 10, seed=4))
    assert sorted(select_random(7, 100, seed=0).tolist()) == list(range(7))
    assert select_random(7, 0).shape == (0,)
    for bad, match in [(dict(n=0), "n = 0"), (dict(k=-1), "negative"), (dict(seed=1.5), "seed")]:
        args = dict(n=5, k=2, seed=0)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            select_random(**args)


def test_common_scores_sum_normalised_aspects():
    scores = {"truthfulness": np.array([0.0, 5.0, 10.0]), "bias": np.array([-1.0, -3.0, -2.0]),
              "ethics": np.full(3, 7.0)}
    np.testing.assert_allclose(common_scores(scores), [0.0 + 1.0 + 1.0, 0.5 + 0.0 + 1.0, 1.0 + 0.5 + 1.0])
    reordered = dict(reversed(list(scores.items())))
    assert np.array_equal(common_scores(reordered), common_scores(scores))
    with pytest.raises(ValueError, match="'truthfulness' has 3 scores but aspect 'bias' has 2"):
        common_scores({"truthfulness": np.ones(3), "bias": np.ones(2)})
    with pytest.raises(ValueError, match="non-empty dict"):
        common_scores({})
    with pytest.raises(ValueError, match=r"aspect 'ethics': scores\[0\]"):
        common_scores({"ethics": np.array([np.nan, 1.0])})


def test_select_dispatches_each_strategy():
    rng = np.random.default_rng(2)
    scores, emb = rng.normal(size=80), rng.normal(size=(80, 6))
    assert np.array_equal(select("dpp", scores, 9, embeddings=emb, eta=1.0, gamma=0.3),
                          select_dpp(scores, emb, 9, eta=1.0, gamma=0.3))
    assert np.array_equal(select("topk", scores, 9), select_topk(scores, 9))
    assert np.array_equal(select("random", scores, 9, seed=5), select_random(80, 9, seed=5))
    assert set(STRATEGIES) == {"dpp", "topk", "random"}
    with pytest.raises(ValueError, match="needs embeddings"):
        select("dpp", scores, 9)
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        select("best", scores, 9)


def test_a_large_eta_approaches_topk():
    """With eta large the score term dominates every diversity gain (<= log 2) unless scores tie."""
    rng = np.random.default_rng(7)
    scores = rng.permutation(np.linspace(0.0, 1.0, 300))
    emb = rng.normal(size=(300, 4))
    assert np.array_equal(select_dpp(scores, emb, 20, eta=1e6), select_topk(scores, 20))
