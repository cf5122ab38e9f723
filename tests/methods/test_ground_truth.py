"""Ranking metrics against a planted set, checked against brute force on random scores with ties."""
import numpy as np
import pytest

from trustrepair.methods.ground_truth import ranking_metrics


def _brute(scores, planted):
    planted = set(planted)
    clean = [i for i in range(len(scores)) if i not in planted]
    wins = sum((scores[p] > scores[c]) + 0.5 * (scores[p] == scores[c]) for p in planted for c in clean)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    k = len(planted)
    return {"precision_at_k": len(planted & set(order[:k])) / k, "recall_at_2k": len(planted & set(order[:2 * k])) / k,
            "auc": wins / (k * len(clean))}


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)
    planted = rng.choice(n, size=int(rng.integers(1, n - 1)), replace=False)
    got, want = ranking_metrics(scores, planted), _brute(list(scores), [int(i) for i in planted])
    assert got == pytest.approx(want, abs=1e-12)


def test_perfect_and_reversed_rankings():
    scores = np.arange(10.0)
    assert ranking_metrics(scores, [7, 8, 9]) == {"precision_at_k": 1.0, "recall_at_2k": 1.0, "auc": 1.0}
    assert ranking_metrics(-scores, [7, 8, 9])["auc"] == 0.0


@pytest.mark.parametrize("planted, message", [([], "at least one"), ([10], r"\[0, 10\)"), (range(10), "clean")])
def test_bad_planted_sets_are_refused(planted, message):
    with pytest.raises(ValueError, match=message):
        ranking_metrics(np.arange(10.0), planted)
