"""The greedy log-det DPP selector: C++ (trustrepair._dpp) against its numpy reference and brute force.

Objective f(S) = log det(K_S + I) + eta * log(sum_S s), K_ij = exp(-gamma ||e_i - e_j||^2).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrepair import _dpp
from trustrepair.methods.selection import dpp_greedy, dpp_reference, median_heuristic_gamma, normalize_scores, select_dpp

ETAS = (0.0, 1.0, 1e4)


def clustered(n, d, seed, clusters=6, spread=0.35, dtype=np.float64):
    """n points around `clusters` random centres in R^d, and n distinct scores with a heavy upper tail."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    emb = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    scores = rng.standard_exponential(n) - 0.3 * rng.normal(size=n)
    return scores, emb.astype(dtype)


def objective(s, emb, subset, eta, gamma):
    """f(S) from scratch: slogdet of K_S + I in float64 plus eta * log(sum_S s)."""
    x = emb[list(subset)].astype(np.float64)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    sign, logdet = np.linalg.slogdet(np.exp(-gamma * dist) + np.eye(len(subset)))
    assert sign > 0
    if eta == 0:
        return logdet
    with np.errstate(divide="ignore"):
        return logdet + eta * np.log(s[list(subset)].sum())


def assert_same_selection(fast, ref, where):
    if not np.array_equal(fast.indices, ref.indices):
        first = int(np.flatnonzero(fast.indices[: len(ref.indices)] != ref.indices[: len(fast.indices)])[0]) \
            if min(len(fast.indices), len(ref.indices)) else 0
        raise AssertionError(
            f"{where}: selections differ at pick {first} (of {len(fast.indices)} vs {len(ref.indices)}): "
            f"C++ {fast.indices[first:first + 5]}, reference {ref.indices[first:first + 5]}; "
            f"gains there {fast.gains[first:first + 2]} vs {ref.gains[first:first + 2]}")
    scale = np.maximum(1.0, np.abs(ref.gains))
    err = np.abs(fast.gains - ref.gains) / scale
    assert err.max(initial=0.0) < 1e-10, f"{where}: gain mismatch, worst {err.max():.3g} at pick {err.argmax()}"


@pytest.mark.parametrize("n", [1, 7, 500, 2000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpp_matches_numpy_reference(n, dtype):
    scores, emb = clustered(n, 37, seed=n, dtype=dtype)  # d = 37: not a multiple of any SIMD width
    k = min(n, 60)
    for eta in ETAS:
        ref = dpp_greedy(scores, emb, k, eta=eta, engine="reference")
        fast = dpp_greedy(scores, emb, k, eta=eta)
        assert fast.indices.dtype == np.int64 and len(fast.indices) == k
        assert_same_selection(fast, ref, f"n={n} {np.dtype(dtype).name} eta={eta}")
        assert np.array_equal(select_dpp(scores, emb, k, eta=eta), fast.indices)
        assert np.array_equal(dpp_reference(scores, emb, k, eta=eta), ref.indices)


@pytest.mark.parametrize("d", [1, 8, 256])
def test_cpp_matches_reference_across_widths(d):
    """Row lengths at, below and well above the vector widths (1, one AVX-512 vector, many)."""
    scores, emb = clustered(300, d, seed=d, dtype=np.float32)
    for eta in ETAS:
        assert_same_selection(dpp_greedy(scores, emb, 40, eta=eta),
                              dpp_greedy(scores, emb, 40, eta=eta, engine="reference"), f"d={d} eta={eta}")


@pytest.mark.parametrize("variant", _dpp.simd_variants())
@pytest.mark.parametrize("n,d", [(9, 1), (17, 7), (31, 9), (63, 15), (130, 17), (257, 33)])
def test_awkward_shapes_match_the_reference_and_the_eager_twin(n, d, variant, monkeypatch):
    """Widths around the 8-double padding and row counts around the 8-pick blocks and lane groups, with k
    at and just below N (the last picks see nearly every candidate), on fresh random inputs per shape."""
    monkeypatch.setenv("TRUSTREPAIR_DPP_SIMD", variant)
    scores, emb = clustered(n, d, seed=1000 + n * d, dtype=np.float32 if d % 2 else np.float64)
    for k in (n - 1, n):
        for eta in ETAS:
            lazy = dpp_greedy(scores, emb, k, eta=eta)
            assert_same_selection(lazy, dpp_greedy(scores, emb, k, eta=eta, engine="reference"),
                                  f"{variant} n={n} d={d} k={k} eta={eta}")
            eager = dpp_greedy(scores, emb, k, eta=eta, lazy=False)
            assert np.array_equal(lazy.indices, eager.indices) and np.array_equal(lazy.gains, eager.gains)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 40, 63, 64, 65])
@pytest.mark.parametrize("eta", ETAS)
def test_group_boundaries_match_the_reference_until_every_group_is_emptied(n, eta):
    """Candidates are updated in groups of 8 (consecutive rows when eta = 0, by score otherwise): N below, at
    and just past multiples of 8 (a short last group, a group of one), and k = N, so that every group loses
    all its rows to picks."""
    scores, emb = clustered(n, 11, seed=500 + n, dtype=np.float32 if n % 2 else np.float64)
    lazy = dpp_greedy(scores, emb, n, eta=eta)
    assert_same_selection(lazy, dpp_greedy(scores, emb, n, eta=eta, engine="reference"), f"n={n} eta={eta}")
    eager = dpp_greedy(scores, emb, n, eta=eta, lazy=False)
    assert np.array_equal(lazy.indices, eager.indices) and np.array_equal(lazy.gains, eager.gains)
    assert sorted(lazy.indices.tolist()) == list(range(n))


@pytest.mark.parametrize("eta", ETAS[1:])
def test_tied_scores_across_groups_match_the_reference(eta):
    """With eta > 0 groups are formed by score, ties by index: runs of equal scores longer than a group and
    straddling group boundaries, and a few top scores, each appearing more than once."""
    _, emb = clustered(203, 19, seed=31)
    scores = np.repeat(np.array([5.0, 5.0, 4.0, 3.0, 3.0, 2.0, 1.0]), 29)[np.random.default_rng(31).permutation(203)]
    for k in (40, 203):
        fast = dpp_greedy(scores, emb, k, eta=eta)
        assert_same_selection(fast, dpp_greedy(scores, emb, k, eta=eta, engine="reference"), f"eta={eta} k={k}")
        eager = dpp_greedy(scores, emb, k, eta=eta, lazy=False)
        assert np.array_equal(fast.indices, eager.indices) and np.array_equal(fast.gains, eager.gains)


@pytest.mark.parametrize("copies_at", [(0, 1, 2), (6, 7, 8, 9), (3, 11, 19), (15, 16), (7, 8, 23, 24)])
def test_exact_copies_within_and_across_groups_tie_to_the_lowest_index(copies_at):
    """Copies of one row placed inside a group, across a group boundary and in separate groups, among far
    apart distinct rows (K about 0 between distinct rows, eta = 0): the copies tie exactly at every step,
    so the first is taken with the distinct rows in index order and the others one round at a time, in
    index order, whichever groups they sit in."""
    n = 26
    emb = 10.0 * np.random.default_rng(7).normal(size=(n, 5))
    emb[list(copies_at)] = emb[copies_at[0]]
    fast = dpp_greedy(np.zeros(n), emb, n, eta=0.0, gamma=1e3)
    rest = list(copies_at[1:])
    assert fast.indices.tolist() == [i for i in range(n) if i not in rest] + rest
    np.testing.assert_allclose(fast.gains[n - len(rest):], np.log1p(1.0 / np.arange(2, len(rest) + 2)), rtol=1e-12)
    eager = dpp_greedy(np.zeros(n), emb, n, eta=0.0, gamma=1e3, lazy=False)
    assert np.array_equal(eager.indices, fast.indices) and np.array_equal(eager.gains, fast.gains)
    ref = dpp_greedy(np.zeros(n), emb, n, eta=0.0, gamma=1e3, engine="reference")
    np.testing.assert_allclose(ref.gains, fast.gains, rtol=1e-6)


@pytest.mark.parametrize("eta", ETAS)
def test_lazy_equals_eager_and_does_less_work(eta):
    scores, emb = clustered(1500, 24, seed=3)
    lazy = dpp_greedy(scores, emb, 80, eta=eta)
    eager = dpp_greedy(scores, emb, 80, eta=eta, lazy=False)
    assert np.array_equal(lazy.indices, eager.indices)
    assert np.array_equal(lazy.gains, eager.gains)  # same operations per candidate: bit for bit
    assert eager.kernel_entries == sum(1500 - t for t in range(1, 80))
    assert lazy.kernel_entries < eager.kernel_entries
    if eta == 1e4:
        assert lazy.kernel_entries < 0.2 * eager.kernel_entries


@pytest.mark.parametrize("eta", ETAS)
def test_thread_count_does_not_change_the_result(eta):
    scores, emb = clustered(3000, 40, seed=11, dtype=np.float32)
    one = dpp_greedy(scores, emb, 70, eta=eta, num_threads=1)
    for threads in (2, 3):
        many = dpp_greedy(scores, emb, 70, eta=eta, num_threads=threads)
        assert np.array_equal(one.indices, many.indices)
        assert np.array_equal(one.gains, many.gains)
        assert one.kernel_entries == many.kernel_entries


def test_omp_num_threads_environment_gives_the_same_selection():
    code = ("import numpy as np; from trustrepair.methods.selection import dpp_greedy; "
            "r = np.random.default_rng(5); e = r.normal(size=(2500, 33)).astype(np.float32); "
            "s = r.random(2500); g = dpp_greedy(s, e, 50, eta=1.0); "
            "print(','.join(map(str, g.indices)), g.gains.tobytes().hex())")
    outputs = set()
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_each_pick_maximises_the_objective_from_scratch(eta, engine):
    """Brute force on N <= 10: pick t is the argmax of f(S_t + i) over the remaining i, by slogdet."""
    for seed in range(6):
        n = 4 + seed
        scores, emb = clustered(n, 3, seed=100 + seed, clusters=2, spread=0.6)
        s = normalize_scores(scores)
        gamma = median_heuristic_gamma(emb)
        result = dpp_greedy(scores, emb, n, eta=eta, gamma=gamma, engine=engine)
        assert sorted(result.indices) == list(range(n))
        chosen = []
        for t, pick in enumerate(result.indices):
            rest = [i for i in range(n) if i not in chosen]
            values = np.array([objective(s, emb, chosen + [i], eta, gamma) for i in rest])
            best = values.max()
            assert values[rest.index(pick)] >= best - 1e-9 * max(1.0, abs(best)), (seed, t)
            runner_up = np.sort(values)[-2] if len(values) > 1 else -np.inf
            if best - runner_up > 1e-9 * max(1.0, abs(best)):
                assert pick == rest[int(values.argmax())], (seed, t)
            chosen.append(int(pick))
            total = objective(s, emb, chosen, eta, gamma)
            assert abs(result.gains[: t + 1].sum() - total) <= 1e-9 * max(1.0, abs(total)), (seed, t)


def test_first_pick_is_the_best_score_and_zero_scores_come_last_when_scores_dominate():
    _, emb = clustered(200, 5, seed=8)
    scores = 1.0 + np.random.default_rng(8).random(200)
    scores[:50] = 0.0  # normalised to s = 0: eta * log(0) = -inf at the first pick, then a score gain of 0
    for engine in ("cpp", "reference"):
        picks = dpp_greedy(scores, emb, 200, eta=1e4, engine=engine).indices
        assert picks[0] == int(np.argmax(scores))
        assert set(picks[-50:]) == set(range(50))


def test_duplicates_are_picked_round_by_round_with_ties_to_the_lowest_index():
    """Isolated groups of exact copies (K = 0 between groups, eta = 0): every candidate in round r has the
    same gain log(1 + 1/(r+1)), so the greedy takes, round by round, the lowest remaining index of each
    group in index order. Exercises exact ties, duplicate rows and k > N. The C++ engine evaluates
    identical rows with identical operations, so its ties are exact; the numpy reference's BLAS dot
    products leave ~1e-8 noise on K = 1 at this gamma, so it is held to the rounds, not the order."""
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 5, size=23)
    groups[:5] = np.arange(5)
    emb = 10.0 * rng.normal(size=(5, 6))[groups]
    expected, remaining = [], list(range(23))
    while remaining:
        seen = set()
        for i in list(remaining):
            if groups[i] not in seen:
                seen.add(groups[i])
                expected.append(i)
                remaining.remove(i)
    rounds = np.array([sum(1 for j in expected[:t] if groups[j] == groups[i]) for t, i in enumerate(expected)])
    fast = dpp_greedy(np.zeros(23), emb, 30, eta=0.0, gamma=1e3)
    assert fast.indices.tolist() == expected
    np.testing.assert_allclose(fast.gains, np.log1p(1.0 / (rounds + 1)), rtol=1e-12)
    ref = dpp_greedy(np.zeros(23), emb, 30, eta=0.0, gamma=1e3, engine="reference")
    starts = np.flatnonzero(np.diff(rounds, prepend=-1))
    for a, b in zip(starts, list(starts[1:]) + [23]):
        assert sorted(groups[ref.indices[a:b]]) == sorted(groups[fast.indices[a:b]])
    np.testing.assert_allclose(ref.gains, fast.gains, rtol=1e-6)


def test_all_equal_scores_select_by_diversity_alone():
    _, emb = clustered(400, 12, seed=9)
    diversity = select_dpp(np.zeros(400), emb, 50, eta=0.0)
    for eta in (1.0, 1e4):
        assert np.array_equal(select_dpp(np.full(400, 3.5), emb, 50, eta=eta), diversity)
        assert np.array_equal(dpp_reference(np.full(400, 3.5), emb, 50, eta=eta), diversity)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(2, 80), d=st.integers(1, 9), k=st.integers(0, 90), eta=st.sampled_from(ETAS[1:]),
       seed=st.integers(0, 2**32 - 1), f32=st.booleans())
def test_permuting_the_inputs_permutes_the_selection(n, d, k, eta, seed, f32):
    """Distinct rows and scores, eta > 0 (with eta = 0 the first pick is a tie among all rows, which the
    lowest index breaks, so it is not permutation-equivariant)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32 if f32 else np.float64)
    scores = rng.normal(size=n)
    gamma = 0.5 / d
    perm = rng.permutation(n)
    base = dpp_greedy(scores, emb, k, eta=eta, gamma=gamma)
    moved = dpp_greedy(scores[perm], emb[perm], k, eta=eta, gamma=gamma)
    assert np.array_equal(perm[moved.indices], base.indices)
    assert np.array_equal(moved.gains, base.gains)
    assert len(base.indices) == min(k, n) and len(set(base.indices.tolist())) == len(base.indices)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), d=st.integers(1, 6), copies=st.integers(2, 4), eta=st.sampled_from(ETAS),
       seed=st.integers(0, 2**32 - 1))
def test_duplicated_rows_match_the_reference(n, d, copies, eta, seed):
    """With eta = 0, copies of a row tie exactly, and so can whole groups of copies in symmetric positions
    (two rows with two copies each selected): the engines may break such ties differently, after which
    their states are mirror images. There the objective's trajectory (the gains) must agree; with eta > 0
    the distinct scores break every tie and the picks must agree too."""
    rng = np.random.default_rng(seed)
    emb = np.repeat(rng.normal(size=(n, d)), copies, axis=0)[rng.permutation(n * copies)]
    scores = rng.normal(size=n * copies)
    gamma = 1.0 / d
    fast = dpp_greedy(scores, emb, n * copies, eta=eta, gamma=gamma)
    ref = dpp_greedy(scores, emb, n * copies, eta=eta, gamma=gamma, engine="reference")
    assert sorted(fast.indices.tolist()) == list(range(n * copies))
    if eta > 0:
        assert_same_selection(fast, ref, f"n={n} copies={copies} eta={eta}")
    else:
        np.testing.assert_allclose(fast.gains, ref.gains, rtol=1e-9, atol=1e-12)


def test_k_zero_and_k_at_least_n():
    scores, emb = clustered(30, 4, seed=2)
    for engine in ("cpp", "reference"):
        empty = dpp_greedy(scores, emb, 0, engine=engine)
        assert empty.indices.dtype == np.int64 and empty.indices.shape == (0,) and empty.gains.shape == (0,)
        full = dpp_greedy(scores, emb, 30, engine=engine).indices
        assert sorted(full.tolist()) == list(range(30))
        assert np.array_equal(dpp_greedy(scores, emb, 1000, engine=engine).indices, full)


def test_median_heuristic_is_the_default_gamma():
    scores, emb = clustered(150, 7, seed=6)
    result = dpp_greedy(scores, emb, 20)
    assert result.gamma == median_heuristic_gamma(emb)
    assert np.array_equal(result.indices, dpp_greedy(scores, emb, 20, gamma=result.gamma).indices)


def test_unnormalised_scores_are_used_as_given():
    scores, emb = clustered(120, 5, seed=12)
    raw = np.abs(scores)
    a = dpp_greedy(raw, emb, 25, eta=1.0, normalize=False)
    b = dpp_greedy(raw, emb, 25, eta=1.0, normalize=False, engine="reference")
    assert_same_selection(a, b, "normalize=False")
    assert a.indices[0] == np.argmax(raw)
    assert a.gains[0] == pytest.approx(np.log(2.0) + np.log(raw.max()), rel=1e-14)  # raw, not min-max, scores


BAD_INPUTS = [
    (dict(scores=np.zeros(0), embeddings=np.zeros((0, 3))), "N = 0"),
    (dict(k=-1), "k = -1"),
    (dict(k=2.5), "integer"),
    (dict(scores=np.ones(9)), "9 entries"),
    (dict(embeddings=np.ones((10, 3, 1))), "2-D"),
    (dict(scores=np.ones((10, 1))), "1-D"),
    (dict(embeddings=np.ones((10, 0))), "0 columns"),
    (dict(scores=np.r_[np.ones(4), np.nan, np.ones(5)]), "scores[4]"),
    (dict(embeddings=np.where(np.arange(30).reshape(10, 3) == 22, np.inf, 1.0)), "row 7"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=np.inf), "gamma"),
    (dict(eta=-1.0), "eta"),
    (dict(eta=np.nan), "eta"),
    (dict(normalize=False, scores=np.r_[np.ones(3), -1.0, np.ones(6)]), "scores[3]"),
    (dict(normalize=False, scores=np.zeros(10)), "every score is 0"),
    (dict(embeddings=np.ones((10, 3), dtype=complex)), "real"),
]


@pytest.mark.parametrize("bad,message", BAD_INPUTS)
@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_bad_inputs_raise_an_actionable_error(bad, message, engine):
    args = dict(scores=np.arange(10.0), embeddings=np.arange(30.0).reshape(10, 3), k=3, eta=1.0, gamma=0.1,
                normalize=True)
    args.update(bad)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dpp_greedy(args.pop("scores"), args.pop("embeddings"), args.pop("k"), engine=engine, **args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(scores=np.zeros(0), embeddings=np.zeros((0, 2))), "N = 0"),
    (dict(k=-2), "negative"),
    (dict(embeddings=np.ones((5, 2))), "5 rows"),
    (dict(scores=np.r_[np.ones(2), np.inf, np.ones(3)]), r"scores\[2\]"),
    (dict(scores=np.r_[np.ones(5), -0.5]), "negative"),
    (dict(scores=np.zeros(6)), "every score is 0"),
    (dict(embeddings=np.where(np.arange(12).reshape(6, 2) == 9, np.nan, 0.5).astype(np.float32)), "row 4"),
    (dict(gamma=-1.0), "gamma"),
    (dict(eta=np.inf), "eta"),
    (dict(embeddings=np.ones((6, 0))), "0 columns"),
])
def test_compiled_module_validates_its_own_input(kwargs, message):
    args = dict(scores=np.linspace(0, 1, 6), embeddings=np.arange(12.0).reshape(6, 2), k=2, eta=1.0, gamma=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        _dpp.greedy(**args)


def test_other_real_dtypes_and_layouts_are_accepted():
    scores, emb = clustered(90, 6, seed=13)
    want = select_dpp(scores, emb, 15, gamma=0.2)
    fortran = np.asfortranarray(emb)
    assert np.array_equal(select_dpp(list(scores), fortran, 15, gamma=0.2), want)
    ints = np.round(emb * 100).astype(np.int32)
    assert np.array_equal(select_dpp(scores, ints, 15, gamma=2e-5),
                          select_dpp(scores, ints.astype(np.float64), 15, gamma=2e-5))


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_a_non_finite_row_is_named_by_its_index_when_gamma_is_estimated(engine):
    """With N > 1000 the median heuristic reads a sample of rows; an error must still name the real row."""
    emb = np.random.default_rng(0).normal(size=(1500, 3))
    sample = np.sort(np.random.default_rng(0).choice(1500, size=1000, replace=False))
    outside = int(np.setdiff1d(np.arange(1500), sample)[0])
    for row in (int(sample[700]), outside):
        bad = emb.copy()
        bad[row, 1] = np.nan
        with pytest.raises(ValueError, match=f"embeddings row {row} has a non-finite value"):
            dpp_greedy(np.arange(1500.0), bad, 5, engine=engine)


def test_huge_finite_embeddings_are_not_mistaken_for_non_finite_ones():
    emb = np.full((5, 4), 3e38, dtype=np.float32)  # every row sum overflows float32
    emb[np.arange(5), np.arange(5) % 4] = np.arange(5, dtype=np.float32)
    for engine in ("cpp", "reference"):
        assert len(dpp_greedy(np.arange(5.0), emb, 3, gamma=1e-80, engine=engine).indices) == 3
    emb[3, 2] = np.nan
    with pytest.raises(ValueError, match="row 3 has a non-finite value \\(nan in column 2\\)"):
        select_dpp(np.arange(5.0), emb, 3, gamma=1e-80)


@pytest.mark.parametrize("variant", _dpp.simd_variants())
def test_every_simd_variant_matches_the_reference(variant, monkeypatch):
    """Each compiled variant (lanes of 8, 4 or 2 candidates) against numpy; forced through the environment."""
    monkeypatch.setenv("TRUSTREPAIR_DPP_SIMD", variant)
    assert _dpp.simd_variant() == variant
    scores, emb = clustered(700, 29, seed=21, dtype=np.float32)
    for eta in ETAS:
        fast = dpp_greedy(scores, emb, 45, eta=eta)
        assert_same_selection(fast, dpp_greedy(scores, emb, 45, eta=eta, engine="reference"), f"{variant} eta={eta}")
        eager = dpp_greedy(scores, emb, 45, eta=eta, lazy=False)
        assert np.array_equal(fast.indices, eager.indices) and np.array_equal(fast.gains, eager.gains)


def test_an_unknown_simd_variant_is_refused(monkeypatch):
    monkeypatch.setenv("TRUSTREPAIR_DPP_SIMD", "sse9")
    with pytest.raises(ValueError, match="TRUSTREPAIR_DPP_SIMD=sse9"):
        select_dpp(np.arange(5.0), np.eye(5), 2)


@pytest.mark.parametrize("variant", _dpp.simd_variants())
def test_kernel_exp_is_within_one_ulp_of_numpy(variant, monkeypatch):
    monkeypatch.setenv("TRUSTREPAIR_DPP_SIMD", variant)
    rng = np.random.default_rng(3)
    x = np.concatenate([-rng.random(20_000) * 708.0, -rng.random(2_000) * 1e-3, -np.logspace(-300, 2, 301),
                        [0.0, -0.0, -708.39, -708.4]])
    got, want = _dpp._kernel_exp(x), np.exp(x)
    ulps = np.abs(got - want) / np.spacing(want)
    assert ulps.max() <= 1.0, f"worst {ulps.max():.2f} ulp at x = {x[ulps.argmax()]!r}"
    assert _dpp._kernel_exp(np.array([0.0]))[0] == 1.0  # K_ii and duplicate rows: exactly 1
    assert np.all(_dpp._kernel_exp(np.array([-708.6, -745.2, -1e6, -np.inf])) == 0.0)  # flushed, not subnormal
    with pytest.raises(ValueError, match="x <= 0"):
        _dpp._kernel_exp(np.array([0.5]))


def test_engine_options_are_checked():
    scores, emb = clustered(20, 3, seed=1)
    with pytest.raises(ValueError, match="engine"):
        dpp_greedy(scores, emb, 3, engine="torch")
    with pytest.raises(ValueError, match="cpp"):
        dpp_greedy(scores, emb, 3, engine="reference", lazy=False)
    with pytest.raises(ValueError, match="num_threads"):
        dpp_greedy(scores, emb, 3, num_threads=0)
