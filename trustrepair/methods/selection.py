"""Choosing the training examples to repair on (paper Eq. 7 / Eq. 20, Tables 2 and 4).

Strategies, all returning numpy int64 row indices in selection order:

* ``select_dpp``: greedy MAP of the score-weighted log-det DPP objective

      f(S) = log det(K_S + I) + eta * log(sum_{i in S} s_i),    |S| <= k,

  with K_ij = exp(-gamma * ||e_i - e_j||^2) an RBF kernel on the (N, d) embeddings and s the influence
  scores min-max normalised to [0, 1]. Runs in C++ (``trustrepair._dpp``: incremental Cholesky,
  lazy evaluation, OpenMP). ``dpp_reference`` is its plain eager numpy twin, same signature and
  semantics: the test oracle and the benchmark baseline.
* ``select_topk``: the k largest scores (the eta -> infinity limit of the DPP).
* ``select_random``: k rows uniformly without replacement, seeded (the paper's Table 4 baseline).
* ``common_scores``: one score per example from several aspects, the sum of each aspect's normalised
  scores (the paper's Table 2 common subset); feed it to any strategy.

Greedy rule (both DPP engines). With L = K + I, S_t the first t picks and T_t = sum of their s:
the first pick maximises f({i}) = log(1 + K_ii) + eta * log(s_i) = log 2 + eta * log(s_i); every later
pick maximises the marginal gain log(d2_i) + eta * log1p(s_i / T_t), where d2_i is the Schur complement
of L_ii given L_{S_t} (Chen, Zhang & Zhou, NeurIPS 2018). With eta = 0 the score term is dropped.
Ties go to the lowest index. Stopping rule: the greedy stops after min(k, N) picks, or earlier, from
the second pick on, when the best gain is not > 0. Because K is positive semidefinite, every d2_i >= 1
in exact arithmetic, so that happens only when rounding has brought a candidate's residual d2_i - 1
to <= 0 and its score term is 0; k >= N therefore selects all N rows in greedy order in practice.

Cost (C++): about 8 N min(k, N) bytes for the candidates' Cholesky rows beside the embeddings; at most
N min(k, N) kernel entries of d multiply-adds each (eager greedy), usually far fewer with lazy evaluation
(see benchmarks/benchmark_dpp.py). The candidate updates use the widest SIMD variant the CPU has
(``trustrepair._dpp.simd_variant()``; the environment variable TRUSTREPAIR_DPP_SIMD=avx512|avx2|baseline
forces one) and OpenMP threads (OMP_NUM_THREADS); neither changes the selection.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from trustrepair import _dpp
from trustrepair.engine.arguments import finite

STRATEGIES = ("dpp", "topk", "random")
MEDIAN_SAMPLE = 1000  # rows sampled (deterministically) for the median-heuristic bandwidth


@dataclass(frozen=True)
class DPPResult:
    """A DPP selection with what it cost.

    Attributes:
        indices: (m,) int64 selected rows in selection order; m = min(k, N) unless the greedy stopped.
        gains: (m,) float64 marginal gains: gains[0] = f({indices[0]}) and gains[t] = f(S_{t+1}) - f(S_t),
            so ``np.cumsum(gains)[t]`` is the objective of the first t + 1 picks.
        gamma: the RBF bandwidth used (the median heuristic's value when none was given).
        kernel_entries: kernel values K_ij the greedy needed (each a d-dimensional distance): N - t per step
            for the eager greedy, far fewer for the lazy one. (The numpy reference computes all N per step.)
        row_reads: candidate updates, each reading the candidate's embedding row once.
    """

    indices: np.ndarray
    gains: np.ndarray
    gamma: float
    kernel_entries: int
    row_reads: int


def select_dpp(scores, embeddings, k: int, *, eta: float = 1e4, gamma: float | None = None,
               normalize: bool = True) -> np.ndarray:
    """Greedy diverse high-score subset (paper Eq. 7), computed in C++.

    Args:
        scores: (N,) influence scores, higher = more detrimental (see ``trustrepair`` for the sign).
        embeddings: (N, d) float32 or float64 (other real dtypes are converted to float64); float32 is
            read as float32, every distance, kernel value and Schur complement is float64.
        k: subset size; k >= N selects all N rows, k = 0 returns an empty array.
        eta: weight of the score term (>= 0; 0 = pure diversity, large = close to top-k).
        gamma: RBF bandwidth > 0; None = ``median_heuristic_gamma(embeddings)``.
        normalize: min-max normalise the scores to [0, 1] (all equal -> all 1). With False the scores
            are used as given and must be >= 0.

    Returns:
        (m,) int64 row indices in selection order (see the module docstring for the stopping rule).

    Raises:
        ValueError: empty or mismatched input, a non-finite value (naming the first bad row), k < 0,
            eta < 0, gamma <= 0, or (normalize=False) a negative score or all scores 0 with eta > 0.
    """
    return dpp_greedy(scores, embeddings, k, eta=eta, gamma=gamma, normalize=normalize).indices


def dpp_reference(scores, embeddings, k: int, *, eta: float = 1e4, gamma: float | None = None,
                  normalize: bool = True) -> np.ndarray:
    """``select_dpp`` computed by the plain eager numpy greedy (same arguments, same result)."""
    return dpp_greedy(scores, embeddings, k, eta=eta, gamma=gamma, normalize=normalize,
                      engine="reference").indices


def dpp_greedy(scores, embeddings, k: int, *, eta: float = 1e4, gamma: float | None = None,
               normalize: bool = True, engine: str = "cpp", lazy: bool = True,
               num_threads: int | None = None) -> DPPResult:
    """``select_dpp`` with its gains and costs, on either engine.

    Args:
        scores, embeddings, k, eta, gamma, normalize: as in ``select_dpp``.
        engine: "cpp" (``trustrepair._dpp``) or "reference" (numpy, eager, float64 throughout).
        lazy: C++ only: lazy (True) or eager (False) greedy; the picks are identical.
        num_threads: C++ only: OpenMP threads (None = OpenMP default); the picks do not depend on it.
    """
    if engine not in ("cpp", "reference"):
        raise ValueError(f"engine={engine!r}: use 'cpp' or 'reference'")
    k = _check_k(k)
    eta = _check_eta(eta)
    x = _as_scores(scores)
    # The C++ engine scans the embeddings for non-finite values itself (same message): one pass, not two.
    emb = _as_embeddings(embeddings, len(x), check_finite=engine == "reference")
    s = _min_max(x) if normalize else _check_nonnegative(x, eta)
    gamma = median_heuristic_gamma(emb) if gamma is None else _check_gamma(gamma)
    if engine == "reference":
        if not lazy or num_threads is not None:
            raise ValueError("lazy and num_threads apply to engine='cpp' only")
        indices, gains, entries, reads = _greedy_reference(s, emb, k, eta, gamma)
    else:
        threads = 0 if num_threads is None else _check_threads(num_threads)
        indices, gains, entries, reads = _dpp.greedy(s, emb, k, eta, gamma, bool(lazy), threads)
    return DPPResult(indices=indices, gains=gains, gamma=gamma, kernel_entries=int(entries),
                     row_reads=int(reads))


def _greedy_reference(s: np.ndarray, emb: np.ndarray, k: int, eta: float, gamma: float):
    """The eager greedy of Chen, Zhang & Zhou (2018), vectorised over candidates, in float64.

    C[m, i] holds entry m of candidate i's Cholesky row c_i = V^{-1} L_{S,i} (L_S = V V^T) and d2[i] its
    Schur complement L_ii - ||c_i||^2. After pick j (the t-th):
        e = (K[:, j] - C[:t].T @ C[:t, j]) / sqrt(d2[j]),   C[t] = e,   d2 -= e^2,
    with K[:, j] = exp(-gamma * max(||e||^2 + ||e_j||^2 - 2 <e, e_j>, 0)) for every row.
    """
    n = len(s)
    kk = min(k, n)
    x = emb.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    chol = np.empty((kk, n))
    d2 = np.full(n, 2.0)  # L_ii = 1 + K_ii
    taken = np.zeros(n, dtype=bool)
    picks, gains = [], []
    total, entries = 0.0, 0
    with np.errstate(divide="ignore"):  # s_i = 0 at the first pick: eta * log(0) = -inf
        gain = np.log(d2) + (eta * np.log(s) if eta > 0 else 0.0)
    for t in range(kk):
        gain[taken] = -np.inf
        j = int(np.argmax(gain))
        if t > 0 and not gain[j] > 0:
            break
        picks.append(j)
        gains.append(gain[j])
        taken[j] = True
        total += s[j]
        if t == kk - 1:
            break
        dist = np.maximum((sq + sq[j]) - 2.0 * (x @ x[j]), 0.0)
        e = (np.exp(-gamma * dist) - chol[:t].T @ chol[:t, j]) / np.sqrt(d2[j])
        chol[t] = e
        d2 = d2 - e * e
        entries += n
        with np.errstate(invalid="ignore", divide="ignore"):  # taken rows only (masked above)
            gain = np.log(d2) + (eta * np.log1p(s / total) if eta > 0 else 0.0)
    return np.array(picks, dtype=np.int64), np.array(gains, dtype=np.float64), entries, entries


def median_heuristic_gamma(embeddings, *, max_points: int = MEDIAN_SAMPLE) -> float:
    """RBF bandwidth gamma = 1 / median squared distance between distinct sampled rows' pairs.

    The sample is every row when N <= max_points, else max_points rows drawn without replacement by
    ``numpy.random.default_rng(0)`` (deterministic for a given N; only those rows are read). Distances are
    float64, ||a||^2 + ||b||^2 - 2 <a, b> clamped at 0, and exactly 0 for identical rows. With one row the
    kernel is [[1]] whatever gamma is, and 1.0 is returned.

    Raises:
        ValueError: a sampled row holds a nan or inf (named by its index), or at least half of the sampled
            pairs are identical rows (the median is 0): pass gamma explicitly then.
    """
    emb = _as_embeddings(embeddings, None, check_finite=False)
    n = len(emb)
    if n < 2:
        _check_finite_rows(emb)
        return 1.0
    rows = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(0).choice(n, max_points, replace=False))
    x = emb[rows].astype(np.float64)
    _check_finite_rows(x, rows)
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    _, group = np.unique(x, axis=0, return_inverse=True)
    group = group.reshape(-1)
    dist[group[:, None] == group[None, :]] = 0.0
    median = float(np.median(dist[np.triu_indices(len(x), k=1)]))
    if not median > 0.0:
        raise ValueError(
            "at least half of the sampled pairs of embeddings are identical rows, so the median heuristic "
            "gives no bandwidth: pass gamma explicitly (e.g. 1 / a typical squared distance)")
    return 1.0 / median


def normalize_scores(scores):
    """Min-max normalisation to [0, 1], per aspect for a dict: s = (x - min) / (max - min).

    Order and sign convention are kept (for influence scores, 1 = most detrimental); all equal -> all 1
    (every example equally influential) rather than a division by zero. Computed in float64; when
    max - min overflows float64, every term is divided by max |x| first, so huge scores still map to
    [0, 1].

    Args:
        scores: (N,) real numbers (array-like or torch tensor), or {aspect: (N,) scores}.
    Returns:
        (N,) float64 numpy array; for a tensor, a tensor on its device, of its dtype when floating
        (float64 otherwise); for a dict, a dict in its order.
    Raises:
        ValueError: empty or not 1-D scores, or a non-finite score (named by its index and aspect).
    """
    if isinstance(scores, Mapping):
        out = {}
        for aspect, values in scores.items():
            try:
                out[aspect] = normalize_scores(values)
            except ValueError as err:
                raise ValueError(f"aspect {aspect!r}: {err}") from None
        return out
    if isinstance(scores, torch.Tensor):
        s = _min_max(_as_scores(scores.detach().to("cpu", torch.float64).numpy()))
        return torch.from_numpy(s).to(scores.device, scores.dtype if scores.is_floating_point() else torch.float64)
    return _min_max(_as_scores(scores))


def _min_max(x: np.ndarray) -> np.ndarray:
    """:func:`normalize_scores` of checked (N,) float64 scores."""
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return np.ones_like(x)
    if np.isfinite(hi - lo):
        return (x - lo) / (hi - lo)
    c = max(abs(lo), abs(hi))
    return (x / c - lo / c) / (hi / c - lo / c)


def common_scores(scores_by_aspect: dict) -> np.ndarray:
    """One score per example for a subset shared by all aspects (paper Table 2).

    Args:
        scores_by_aspect: {aspect name: (N,) scores}, at least one aspect, all of the same length.

    Returns:
        (N,) float64: the sum over aspects (in sorted name order) of ``normalize_scores`` of each, in
        [0, number of aspects].
    """
    if not isinstance(scores_by_aspect, dict) or not scores_by_aspect:
        raise ValueError("scores_by_aspect must be a non-empty dict {aspect name: (N,) scores}")
    total, first = None, None
    for name in sorted(scores_by_aspect):
        try:
            s = _min_max(_as_scores(scores_by_aspect[name]))
        except ValueError as err:
            raise ValueError(f"aspect {name!r}: {err}") from None
        if total is None:
            total, first = s.copy(), name
        elif len(s) != len(total):
            raise ValueError(f"aspect {name!r} has {len(s)} scores but aspect {first!r} has {len(total)}: score "
                             "every aspect on the same training examples")
        else:
            total += s
    return total


def select_topk(scores, k: int) -> np.ndarray:
    """The k rows with the largest scores, in descending score order, ties to the lowest index."""
    k = _check_k(k)
    x = _as_scores(scores)
    return np.argsort(-x, kind="stable")[:k].astype(np.int64)


def select_random(n: int, k: int, seed: int = 0) -> np.ndarray:
    """min(k, n) distinct rows of range(n), uniformly at random, from ``numpy.random.default_rng(seed)``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n = {n!r} must be an integer >= 1 (the number of training examples)")
    k = _check_k(k)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed = {seed!r} must be an integer, so that the subset can be reproduced")
    return np.random.default_rng(int(seed)).choice(int(n), size=min(k, int(n)), replace=False).astype(np.int64)


def select(strategy: str, scores, k: int, *, embeddings=None, eta: float = 1e4, gamma: float | None = None,
           seed: int = 0) -> np.ndarray:
    """Dispatch to ``select_dpp`` ("dpp", needs embeddings), ``select_topk`` ("topk") or
    ``select_random`` ("random", over len(scores) rows with ``seed``)."""
    if strategy == "dpp":
        if embeddings is None:
            raise ValueError("strategy 'dpp' needs embeddings (N, d); use 'topk' to select by score alone")
        return select_dpp(scores, embeddings, k, eta=eta, gamma=gamma)
    if strategy == "topk":
        return select_topk(scores, k)
    if strategy == "random":
        return select_random(len(_as_scores(scores)), k, seed)
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k = {k!r} must be an integer (the subset size)")
    if k < 0:
        raise ValueError(f"k = {k} is negative: ask for k >= 0 rows")
    return int(k)


def _check_eta(eta) -> float:
    return finite("eta", eta, minimum=0, hint="eta = 0 is pure diversity")


def _check_gamma(gamma) -> float:
    return finite("gamma", gamma, positive=True, hint="the RBF bandwidth; None for the median heuristic")


def _check_threads(num_threads) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1:
        raise ValueError(f"num_threads = {num_threads!r} must be an integer >= 1, or None for the OpenMP default")
    return int(num_threads)


def _as_scores(scores) -> np.ndarray:
    """(N,) float64 copy-free view when possible; N >= 1 and every value finite."""
    x = np.asarray(scores)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {x.shape}")
    if len(x) == 0:
        raise ValueError("scores is empty: there is nothing to select from (N = 0)")
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"scores[{i}] = {x[i]} is not finite: drop or impute that example")
    return x


def _as_embeddings(embeddings, n: int | None, check_finite: bool = True) -> np.ndarray:
    """(N, d) C-contiguous float32 (kept) or float64 (anything else real); N = n when given; finite unless
    check_finite is False (the caller then checks, or reads only part of the rows)."""
    e = np.asarray(embeddings)
    if e.dtype.kind not in "biuf":
        raise ValueError(f"embeddings must be real numbers, got dtype {e.dtype}")
    e = np.ascontiguousarray(e, dtype=np.float32 if e.dtype == np.float32 else np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, d), got shape {e.shape}")
    if n is not None and e.shape[0] != n:
        raise ValueError(f"embeddings have {e.shape[0]} rows but scores has {n} entries: give one embedding "
                         "row per score")
    if e.shape[0] == 0:
        raise ValueError("embeddings have no rows: there is nothing to select from (N = 0)")
    if e.shape[1] == 0:
        raise ValueError("embeddings have 0 columns: give at least one feature per row")
    if check_finite:
        _check_finite_rows(e)
    return e


def _check_finite_rows(e: np.ndarray, row_ids: np.ndarray | None = None) -> None:
    """ValueError naming the first row (as numbered by row_ids, if given) that holds a nan or inf.

    One pass without an (N, d) temporary: a row with a nan or inf has a non-finite sum (a finite row whose
    sum overflows is then checked element by element and passes)."""
    with np.errstate(over="ignore", invalid="ignore"):
        row_sums = e.sum(axis=1)
    for row in np.flatnonzero(~np.isfinite(row_sums)):
        bad = np.flatnonzero(~np.isfinite(e[row]))
        if len(bad):
            name = int(row if row_ids is None else row_ids[row])
            raise ValueError(f"embeddings row {name} has a non-finite value ({e[row, bad[0]]} in column {bad[0]}): "
                             "drop or recompute that example")


def _check_nonnegative(s: np.ndarray, eta: float) -> np.ndarray:
    """Scores used as given (normalize=False): all >= 0, and some > 0 when eta > 0."""
    if (s < 0).any():
        i = int(np.flatnonzero(s < 0)[0])
        raise ValueError(f"scores[{i}] = {s[i]} is negative: with normalize=False the scores must be >= 0 "
                         "(or pass normalize=True)")
    if eta > 0 and not (s > 0).any():
        raise ValueError("every score is 0, so eta * log(sum s) = -inf for every subset: give some positive "
                         "score, use eta = 0, or pass normalize=True")
    return s
