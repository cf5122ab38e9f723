"""Ghost dot products: per-example inner products of a layer's gradient with K matrices, in PyTorch.

``scores[b, k] = <G_b, U_k> = sum_t g_bt^T U_k a_bt`` with ``G_b = g_b^T a_b`` (d_out, d_in), from the
activations ``a`` (B, T, d_in) and output gradients ``g`` (B, T, d_out) of one layer (zero at masked
tokens): no G_b has to be written out for the whole batch. :func:`ghost_dots` takes the matrices in
full, :func:`low_rank_ghost_dots` as rank-r factors. Both run cuBLAS / the CPU's BLAS on every device:
their Triton kernels lost to it (benchmarks/RESULTS.md, decisions).

Precision: float64 inputs are computed in float64; float32, bfloat16 and float16 inputs are upcast to
float32 before any product, so every sum accumulates in float32 at least.
"""
from __future__ import annotations

import torch

from trustrepair.engine.layout import aligned, empty_aligned, padded_width, pads_widths, zero_padded
from trustrepair.engine.ops import blocking
from trustrepair.engine.ops.checks import check_low_rank_factors, check_matrices, compute_dtype
from trustrepair.engine.tunables import current


def ghost_dots(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-example inner products with K matrices in the original basis ("ghost" dot products).

    ``scores[b, k] = <G_b, U_k> = sum_t g_bt^T U_k a_bt``, by the cheaper of (multiply-adds per example):

    * per token, ``(a_b U_k^T) . g_b`` (or ``(g_b U_k) . a_b``, whichever intermediate is narrower):
      K T d_out d_in; never forms G_b, wins for one or two matrices (aspects) or very few tokens;
    * gradient first, ``G_b = g_b^T a_b`` then one product with all U_k: T d_out d_in + K d_out d_in,
      plus the memory traffic of G_b (``memory_cost_per_entry``, :mod:`trustrepair.engine.tunables`): wins
      for K >= 3. G_b is formed a slab of rows at a time for the whole batch and consumed by the next
      product: cache-sized slabs (``tile_elements``) on a CPU, ``chunk_elements`` on a GPU
      (:func:`~trustrepair.engine.ops.blocking.cache_blocked`). On a CPU the slab meets all U_k in one
      (B, rows d_in) x (rows d_in, K) product. On a GPU that product is memory-bound with a huge inner
      dimension and an output of only B x K entries, which leaves most of the card idle; there the slab,
      stored with aligned rows, is contracted row by row instead, one batched product of (B, d_in) x
      (d_in, K) matrices per row, summed over the rows: the same multiply-adds, each operand still read
      once. Where the ``pad_widths`` setting is on (CUDA), an odd-width ``a`` is zero-padded to an aligned
      width first, so the slab products run on even dimensions, and their true columns are used.

    Args:
        a: (B, T, d_in) activations, zero at masked tokens.
        g: (B, T, d_out) output gradients, zero at masked tokens.
        u: (K, d_out, d_in) matrices, e.g. preconditioned query gradients.
    Returns:
        (B, K), float64 for float64 inputs, float32 otherwise.
    """
    check_matrices(a, g, u, "u")
    dtype = compute_dtype(a, g, u)
    a, g, u = aligned(a, dtype), aligned(g, dtype), u.to(dtype)
    batch, tokens, d_in = a.shape
    d_out, n_mats = g.shape[2], u.shape[0]
    out = torch.empty(batch, n_mats, dtype=dtype, device=a.device)
    if ghost_per_token_cost(tokens, d_out, d_in, n_mats) <= ghost_gradient_first_cost(tokens, d_out, d_in, n_mats):
        narrow = min(d_out, d_in)
        for rows in blocking.row_chunks(batch, tokens * max(n_mats * narrow, d_in + d_out)):
            out[rows] = _ghost_per_token(a[rows], g[rows], u)
    else:
        out.zero_()
        g_t = g.transpose(1, 2)
        blocked = blocking.cache_blocked(a.device)
        wide = zero_padded(a) if not blocked and pads_widths(a.device) else None  # even slab widths (layout)
        settings = current()
        slab_elements = settings.tile_elements if blocked else settings.chunk_elements
        step = max(1, slab_elements // max(1, batch * padded_width(d_in)))
        for start in range(0, d_out, step):  # a slab of rows of every G_b, then all U_k at once
            rows = slice(start, min(start + step, d_out))
            if blocked:
                slab = torch.bmm(g_t[:, rows], a)
                out.addmm_(slab.reshape(batch, -1), u[:, rows].reshape(n_mats, -1).T)
            else:
                if wide is None:
                    slab = torch.bmm(g_t[:, rows], a, out=empty_aligned(batch, rows.stop - start, d_in, dtype=dtype,
                                                                        device=a.device))
                else:
                    slab = torch.bmm(g_t[:, rows], wide)[..., :d_in]
                out += torch.bmm(slab.transpose(0, 1), u[:, rows].permute(1, 2, 0)).sum(dim=0)
    return out


def low_rank_ghost_dots(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor,
                        right: torch.Tensor) -> torch.Tensor:
    """Ghost dot products with rank-r matrices ``U_k = L_k R_k``, contracted through the tokens.

    ``scores[b, k] = sum_t (g_bt^T L_k) . (R_k a_bt)``: K T r (d_out + d_in) multiply-adds per example
    instead of K T d_out d_in; equal to ``ghost_dots(a, g, left @ right)``.

    Args:
        a: (B, T, d_in) activations, zero at masked tokens.
        g: (B, T, d_out) output gradients, zero at masked tokens.
        left: (K, d_out, r) and right: (K, r, d_in) factors of the matrices.
    Returns:
        (B, K), float64 for float64 inputs, float32 otherwise.
    """
    check_low_rank_factors(a, g, left, right)
    dtype = compute_dtype(a, g, left, right)
    a, g, left, right = aligned(a, dtype), aligned(g, dtype), left.to(dtype), right.to(dtype)
    batch, tokens, d_in = a.shape
    n_mats, d_out, rank = left.shape
    left_flat = left.permute(1, 0, 2).reshape(d_out, n_mats * rank)
    right_flat = right.reshape(n_mats * rank, d_in)
    out = torch.empty(batch, n_mats, dtype=dtype, device=a.device)
    for rows in blocking.row_chunks(batch, tokens * max(2 * n_mats * rank, d_in + d_out)):
        g_left = g[rows] @ left_flat
        a_right = a[rows] @ right_flat.T
        out[rows] = (g_left * a_right).view(-1, tokens, n_mats, rank).sum(dim=(1, 3))
    return out


def ghost_per_token_cost(tokens: int, d_out: int, d_in: int, n_mats: int) -> int:
    """Multiply-adds per example of sum_t g_t^T U_k a_t for K matrices, token by token."""
    return n_mats * tokens * d_out * d_in


def ghost_gradient_first_cost(tokens: int, d_out: int, d_in: int, n_mats: int) -> int:
    """Multiply-adds per example of forming G = g^T a, then <G, U_k> for K matrices, plus the setting
    ``memory_cost_per_entry`` per entry of G (written out, then read back by the second product)."""
    return (tokens + n_mats + current().memory_cost_per_entry) * d_out * d_in


def _ghost_per_token(a, g, u):
    """(B, K): sum_t g_t^T U_k a_t, through the narrower of a U^T (width d_out) and g U (width d_in)."""
    batch, tokens, d_in = a.shape
    n_mats, d_out, _ = u.shape
    if d_out <= d_in:
        mapped = (a.reshape(-1, d_in) @ u.reshape(n_mats * d_out, d_in).T).view(-1, n_mats, d_out)
        per_token = torch.bmm(mapped, g.reshape(-1, d_out, 1))
    else:
        mapped = (g.reshape(-1, d_out) @ u.permute(1, 0, 2).reshape(d_out, n_mats * d_in)).view(-1, n_mats, d_in)
        per_token = torch.bmm(mapped, a.reshape(-1, d_in, 1))
    return per_token.view(batch, tokens, n_mats).sum(dim=1)
