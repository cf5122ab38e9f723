"""How well a ranking of training examples finds the ones known to be harmful (a planted set).

For scores s (higher = more detrimental, the library's convention) over N examples of which the set P
(|P| = k) is planted:

* precision at k: |top-k by s  ∩ P| / k;
* recall at 2k: |top-2k by s ∩ P| / k;
* rank AUC: the probability that a planted example outranks a clean one, ties counting one half
  (the Mann-Whitney statistic U / (|P| (N - |P|))), computed from average ranks in O(N log N).

Ties in the top-k are broken by index (lowest first), as :func:`numpy.argsort` with ``kind="stable"``
on -s does, so a constant ranking scores its first k examples.
"""
from __future__ import annotations

import numpy as np


def _check(scores, planted) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    mask = np.zeros(len(s), dtype=bool)
    idx = np.asarray(sorted(set(int(i) for i in planted)), dtype=np.int64)
    if idx.size == 0:
        raise ValueError("planted must name at least one example")
    if idx.min() < 0 or idx.max() >= len(s):
        raise ValueError(f"planted indices must lie in [0, {len(s)}), got {int(idx.min())}..{int(idx.max())}")
    if idx.size == len(s):
        raise ValueError("every example is planted: a ranking needs clean examples too")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    mask[idx] = True
    return s, mask


def ranking_metrics(scores, planted) -> dict[str, float]:
    """``{"precision_at_k", "recall_at_2k", "auc"}`` of ``scores`` (N,) against the ``planted`` indices."""
    s, mask = _check(scores, planted)
    k = int(mask.sum())
    order = np.argsort(-s, kind="stable")
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    for value in np.unique(s):  # average ranks of ties
        tied = s == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[mask].sum() - k * (k + 1) / 2
    return {"precision_at_k": float(mask[order[:k]].sum() / k),
            "recall_at_2k": float(mask[order[:2 * k]].sum() / k),
            "auc": float(u / (k * (len(s) - k)))}
