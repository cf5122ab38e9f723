"""Rank-r factors of preconditioned query gradients, computed in the EK-FAC eigenbasis.

A preconditioned gradient is U = Q_S M Q_A^T with M = (Q_S^T V Q_A) / (Lambda + lambda) (d_out, d_in).
Q_S and Q_A are orthogonal, so the best rank-r approximation of U (Eckart-Young) is Q_S M_r Q_A^T with
M_r the best rank-r approximation of M: factorising M = L R and rotating only the factors,

    U_r = (Q_S L) (R Q_A^T),     L: (d_out, r),  R: (r, d_in),

costs r (d_out^2 + d_in^2) multiply-adds for the rotations instead of the d_out d_in (d_out + d_in) of
rotating the dense M back, and a score against a training example then costs T r (d_out + d_in) per
example instead of T d_out d_in (:func:`trustrepair.engine.ops.ghost_dots.low_rank_ghost_dots`).

M_r comes from a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011,
"Finding structure with randomness", Alg. 4.4 then Alg. 5.1): Y = M Omega for a Gaussian
Omega (d_in, r + p), ``power_iterations`` rounds of re-orthonormalised multiplication by M^T and M,
then the exact SVD of the small (r + p, d_in) matrix B = Basis^T M. It costs about
(2 + 2 q) d_out d_in (r + p) multiply-adds for q power iterations, against the O(d_out d_in min(d_out, d_in))
of a dense SVD. When r + p covers the smaller side of M the dense truncated SVD is used (then exact).

Precision: everything runs in M's dtype (the factors' dtype: float32 for a float32 model); the
orthonormalisations are Householder QR, stable in float32. The sketch uses a fixed seed, so the
factors (and the scores built on them) are deterministic.
"""
from __future__ import annotations

import torch

from trustrepair.engine.tunables import current


def low_rank_factors(m: torch.Tensor, rank: int, *, column_basis: torch.Tensor | None = None,
                     oversample: int | None = None, power_iterations: int | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of each matrix of ``m`` (K, rows, cols): ``m ~ left @ right`` with left
    (K, rows, r) holding the singular values and right (K, r, cols) orthonormal rows.

    Exact truncated SVD when ``rank + oversample >= min(rows, cols)``; the randomized one otherwise.
    ``oversample`` and ``power_iterations`` default to the ``lowrank_oversample`` and
    ``lowrank_power_iterations`` settings (:mod:`trustrepair.engine.tunables`).
    ``column_basis`` (cols, cols), orthogonal: the basis in which ``m``'s columns are coordinates (Q_A).
    The Gaussian sketch is then drawn in the original coordinates and rotated into that basis, so the
    approximation Q_S (left @ right) Q_A^T does not depend on which eigenvectors were picked inside a
    degenerate eigenspace (every later step is equivariant under orthogonal changes of basis).
    """
    if m.dim() != 3:
        raise ValueError(f"expected a (K, rows, cols) stack of matrices, got shape {tuple(m.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    settings = current()
    oversample = settings.lowrank_oversample if oversample is None else oversample
    power_iterations = settings.lowrank_power_iterations if power_iterations is None else power_iterations
    rows, cols = m.shape[-2:]
    rank = min(rank, rows, cols)
    sketch = rank + oversample
    if sketch >= min(rows, cols):
        left, singular, right = torch.linalg.svd(m, full_matrices=False)
    else:
        generator = torch.Generator(device=m.device).manual_seed(seed)
        omega = torch.randn(cols, sketch, generator=generator, dtype=m.dtype, device=m.device)
        if column_basis is not None:
            omega = column_basis.T.to(m.dtype) @ omega
        basis = torch.linalg.qr(m @ omega).Q
        for _ in range(power_iterations):
            basis = torch.linalg.qr(m @ torch.linalg.qr(m.mT @ basis).Q).Q
        small_left, singular, right = torch.linalg.svd(basis.mT @ m, full_matrices=False)
        left = basis @ small_left
    return (left[..., :rank] * singular[..., None, :rank]).contiguous(), right[..., :rank, :].contiguous()


def rotate_factors(left: torch.Tensor, right: torch.Tensor, q_s: torch.Tensor,
                   q_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenbasis factors back to the original basis: (Q_S L, R Q_A^T)."""
    return q_s @ left, right @ q_a.T
