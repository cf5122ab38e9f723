"""Rank-r factors (trustrepair.engine.lowrank): exact truncated SVD where the sketch covers the matrix, the
randomized one near the optimum otherwise, deterministic, and bad input."""
import pytest
import torch

from trustrepair.engine.lowrank import low_rank_factors, rotate_factors


def decaying(k, rows, cols, decay, seed):
    """(k, rows, cols) float64 matrices with singular values decay**i and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    n = min(rows, cols)
    u = torch.linalg.qr(torch.randn(k, rows, n, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, cols, n, generator=gen, dtype=torch.float64)).Q
    s = decay ** torch.arange(n, dtype=torch.float64)
    return (u * s) @ v.mT, s


def truncated(m, rank):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


@pytest.mark.parametrize("k,rows,cols,rank", [(1, 1, 17, 1), (2, 17, 5, 3), (3, 9, 65, 8)])
def test_small_matrices_get_the_exact_truncated_svd(k, rows, cols, rank):
    m = torch.randn(k, rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    left, right = low_rank_factors(m, rank)
    r = min(rank, rows, cols)
    assert left.shape == (k, rows, r) and right.shape == (k, r, cols)
    torch.testing.assert_close(left @ right, truncated(m, r), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows,cols,rank,decay", [(130, 65, 8, 0.8), (65, 300, 16, 0.9), (200, 200, 4, 0.5)])
def test_randomized_factors_are_near_optimal_and_deterministic(rows, cols, rank, decay):
    m, s = decaying(2, rows, cols, decay, seed=rows + cols)
    left, right = low_rank_factors(m, rank)
    assert left.shape == (2, rows, rank) and right.shape == (2, rank, cols)
    optimal = float(s[rank:].pow(2).sum().sqrt())  # Eckart-Young: Frobenius error of the best rank-r
    for i in range(2):
        error = float(torch.linalg.matrix_norm(m[i] - left[i] @ right[i]))
        assert optimal <= error * (1 + 1e-9) and error <= 1.01 * optimal, (error, optimal)
    torch.testing.assert_close(right @ right.mT, torch.eye(rank, dtype=torch.float64).expand(2, -1, -1),
                               rtol=0, atol=1e-10)
    again = low_rank_factors(m, rank)
    assert torch.equal(again[0], left) and torch.equal(again[1], right)


def test_randomized_approximation_does_not_depend_on_the_eigenbasis():
    """The same U = Q_S M Q_A^T seen through two different (Q_S, Q_A): with the sketch drawn in the original
    coordinates the rank-r approximation of U is the same (as when Q_A's eigenvectors are picked
    differently inside a degenerate eigenspace)."""
    u, _ = decaying(1, 120, 70, 0.9, seed=3)
    gen = torch.Generator().manual_seed(4)
    products = []
    for _ in range(2):
        q_s = torch.linalg.qr(torch.randn(120, 120, generator=gen, dtype=torch.float64)).Q
        q_a = torch.linalg.qr(torch.randn(70, 70, generator=gen, dtype=torch.float64)).Q
        left, right = rotate_factors(*low_rank_factors(q_s.T @ u @ q_a, 5, column_basis=q_a), q_s, q_a)
        products.append(left @ right)
    torch.testing.assert_close(products[0], products[1], rtol=0, atol=1e-10)


def test_rotating_the_factors_is_rotating_the_product():
    gen = torch.Generator().manual_seed(5)
    q_s = torch.linalg.qr(torch.randn(17, 17, generator=gen, dtype=torch.float64)).Q
    q_a = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64)).Q
    left, right = torch.randn(3, 17, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, 9, generator=gen,
                                                                                          dtype=torch.float64)
    l, r = rotate_factors(left, right, q_s, q_a)
    torch.testing.assert_close(l @ r, q_s @ (left @ right) @ q_a.T, rtol=0, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        low_rank_factors(torch.zeros(1, 3, 3), 0)
    with pytest.raises(ValueError, match=r"\(K, rows, cols\)"):
        low_rank_factors(torch.zeros(3, 3), 1)
