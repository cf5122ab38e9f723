"""Per-example gradients in the EK-FAC eigenbasis: the eigenvalue correction's squares, few examples'
projected gradients, scores against queries given in the eigenbasis, and weighted squared norms.

A layer's gradient on example b is ``G_b = sum_t g_bt a_bt^T = g_b^T a_b`` (d_out, d_in), from its
activations ``a_b`` (T, d_in) (bias folded in as a ones column, zero at masked tokens) and output
gradients ``g_b`` (T, d_out) (zero at masked tokens). In the eigenbasis it is ``P_b = Q_S^T G_b Q_A``.
Four contractions of it, none of which writes G_b out for a whole batch:

* :func:`projected_gradient_squares` -- the eigenvalue correction's numerator, sum_b P_b ** 2
  (elementwise), a (d_out, d_in) matrix; its CUDA tensors go to the Triton kernel
  :func:`trustrepair.kernels.projected_gradients.projected_gradient_squares_triton` under the rule of
  :mod:`trustrepair.engine.ops.routing`, everything else to :func:`projected_gradient_squares_reference`;
* :func:`projected_gradients` -- P_b written out, for few examples (e.g. per-query gradients);
* :func:`projected_gradient_scores` -- s[b, q] = <P_b, W_q> against Q query matrices in the eigenbasis
  (:func:`projected_scores`: always by projecting the examples);
* :func:`projected_square_norms` -- s[b] = sum P_b ** 2 W, e.g. each example's self-influence.

Because Q_A and Q_S are orthogonal, <Q_S^T G Q_A, W> = <G, Q_S W Q_A^T>, so these and the ghost dot
products of :mod:`trustrepair.engine.ops.ghost_dots` are the same algebra in different bases; which order
of multiplication is cheapest depends on the number of tokens T, the layer's widths and the number of
query matrices. Each function estimates the multiply-add count of its candidate orders with the cost
functions below and runs the cheapest, in chunks of examples (:mod:`trustrepair.engine.ops.blocking`).

Layout: the token operands are used with aligned rows (:func:`trustrepair.engine.layout.aligned`: no copy
when they already are, as the activations :class:`trustrepair.engine.capture.TokenCapture` hands out).

Precision: float64 inputs are computed in float64; float32, bfloat16 and float16 inputs are upcast to
float32 before any product, so every sum (over tokens, over examples, over matrix entries) accumulates
in float32 at least. The squares are non-negative, so their sum has no cancellation.
"""
from __future__ import annotations

import torch

from trustrepair.engine.layout import aligned, pads_widths, zero_padded
from trustrepair.engine.ops import blocking, routing
from trustrepair.engine.ops import ghost_dots as ghost
from trustrepair.engine.ops.checks import check_bases, check_matrices, compute_dtype, operand_dtype
from trustrepair.engine.tunables import current


def projected_gradient_squares(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                               q_s: torch.Tensor) -> torch.Tensor:
    """sum_b (Q_S^T g_b^T a_b Q_A) ** 2: on the Triton kernel where :mod:`trustrepair.engine.ops.routing`
    says so (:func:`squares_on_triton`), else by :func:`projected_gradient_squares_reference`, whose
    docstring has the contract."""
    check_bases(a, g, q_a, q_s)
    if routing.uses_triton("projected_gradient_squares", a, g, q_a, q_s):
        return squares_on_triton(a, g, q_a, q_s)
    return projected_gradient_squares_reference(a, g, q_a, q_s)


def squares_on_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """The squares by the Triton kernel, on operands this library lays out for it: converted to the
    kernel's operand dtype with aligned rows, or, where the ``pad_widths`` setting is on for the device,
    zero-padded to aligned widths (bases on both sides), so the kernel's cuBLAS projections run on even
    dimensions. The zero rows and columns add only zero entries, which are cut off: the result is the
    (d_out, d_in) block of the padded one."""
    dtype = operand_dtype(a, g, q_a, q_s)
    if pads_widths(a.device):
        operands = (zero_padded(a, dtype), zero_padded(g, dtype), zero_padded(q_a, dtype, dims=2),
                    zero_padded(q_s, dtype, dims=2))
    else:
        operands = (aligned(a, dtype), aligned(g, dtype), aligned(q_a, dtype), aligned(q_s, dtype))
    out = routing.kernel("projected_gradient_squares")(*operands)
    return out[:g.shape[2], :a.shape[2]]


def projected_gradient_squares_reference(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                                         q_s: torch.Tensor) -> torch.Tensor:
    """Eigenvalue-correction numerator: sum over examples of the squared projected gradient.

    Computes ``sum_b (Q_S^T G_b Q_A) ** 2`` with ``G_b = g_b^T a_b`` and the square taken elementwise,
    by the cheaper of two orders (multiply-adds per example):

    * tokens first, ``(g_b Q_S)^T (a_b Q_A)``: T (d_in^2 + d_out^2 + d_out d_in); wins when the example
      has fewer tokens than the layer is wide;
    * gradient first, ``Q_S^T (g_b^T a_b) Q_A``: T d_out d_in + d_out d_in (d_out + d_in).

    On a CPU each example's (d_out, d_in) tile is computed a slab of rows at a time (the ``slab_elements``
    setting) and squared into the sum while the slab is still in cache: writing all B tiles out and
    summing them afterwards is memory-bound there. On a GPU
    (:func:`~trustrepair.engine.ops.blocking.cache_blocked`) a chunk of examples' tiles is formed by one
    batched product, squared in place and summed.

    Args:
        a: (B, T, d_in) activations, zero at masked tokens (bias column included when the layer has one).
        g: (B, T, d_out) output gradients, zero at masked tokens.
        q_a: (d_in, d_in) activation eigenbasis (orthogonal, eigenvectors in columns).
        q_s: (d_out, d_out) output-gradient eigenbasis.
    Returns:
        (d_out, d_in) in float64 for float64 inputs, float32 otherwise (see the module docstring).
    """
    check_bases(a, g, q_a, q_s)
    dtype = compute_dtype(a, g, q_a, q_s)
    a, g, q_a, q_s = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    out = torch.zeros(d_out, d_in, dtype=dtype, device=a.device)
    if not blocking.cache_blocked(a.device):
        for _, projected in _projected_chunks(a, g, q_a, q_s):
            out += projected.square_().sum(dim=0)
        return out
    tile = torch.empty(d_out, d_in, dtype=dtype, device=a.device)
    if squares_tokens_first_cost(tokens, d_out, d_in) <= squares_gradient_first_cost(tokens, d_out, d_in):
        g_rot, a_rot = g @ q_s, a @ q_a  # every token of the batch in one product per side
        step = max(1, current().slab_elements // max(1, d_in))
        for start in range(0, d_out, step):  # rows of the tiles, kept in cache between product and square
            rows = slice(start, min(start + step, d_out))
            slab = tile[: rows.stop - rows.start]
            for b in range(batch):
                torch.mm(g_rot[b, :, rows].T, a_rot[b], out=slab)
                out[rows].addcmul_(slab, slab)
    else:
        grad = torch.empty(d_out, d_in, dtype=dtype, device=a.device)
        for b in range(batch):
            torch.mm(g[b].T, a[b], out=grad)
            torch.mm(q_s.T @ grad, q_a, out=tile)
            out.addcmul_(tile, tile)
    return out


def projected_gradients(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, ``P_b = Q_S^T (g_b^T a_b) Q_A``, written out in full.

    For few examples with few tokens each (e.g. per-query gradients of trust queries), this is much
    cheaper than rotating dense gradients: T (d_in^2 + d_out^2 + d_out d_in) per example against
    d_out d_in (d_out + d_in), by the cheaper order of :func:`projected_gradient_squares_reference`. Pure
    PyTorch on every device (the output is as large as its input gradients, so there is nothing to fuse).

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_reference`.
        out: written in place if given (a (B, d_out, d_in) tensor of the result's dtype, e.g. a slice of a
            larger buffer: no second copy of the result).
    Returns:
        (B, d_out, d_in), float64 for float64 inputs, float32 otherwise (``out`` when given).
    """
    check_bases(a, g, q_a, q_s)
    dtype = compute_dtype(a, g, q_a, q_s)
    shape = (a.shape[0], g.shape[2], a.shape[2])
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=a.device)
    elif tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must be {shape} {dtype}; got {tuple(out.shape)} {out.dtype}")
    for rows, projected in _projected_chunks(a, g, q_a, q_s):
        out[rows] = projected
    return out


def projected_gradient_scores(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                              q_s: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Scores of each example against query matrices expressed in the eigenbasis.

    ``scores[b, q] = sum_ij (Q_S^T G_b Q_A)[i, j] * W_q[i, j]`` with ``G_b = g_b^T a_b``. Two strategies,
    the cheaper one (multiply-adds) is run:

    * project every example, ``P_b = Q_S^T G_b Q_A`` by the cheaper order of
      :func:`projected_gradient_squares_reference`, then one (B, d_out d_in) x (d_out d_in, Q) product;
    * rotate the queries back once, ``U_q = Q_S W_q Q_A^T`` (Q d_out d_in (d_out + d_in)), then
      :func:`trustrepair.engine.ops.ghost_dots.ghost_dots` in the original basis (equal by orthogonality
      of Q_A, Q_S).

    PyTorch on every device: its Triton kernel lost to cuBLAS (benchmarks/RESULTS.md, decisions).

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_reference`.
        queries: (Q, d_out, d_in) query matrices in the eigenbasis, e.g. preconditioned query gradients
            ``(Q_S^T V_q Q_A) / (Lambda + damping)``.
    Returns:
        (B, Q), float64 for float64 inputs, float32 otherwise.
    """
    check_bases(a, g, q_a, q_s)
    check_matrices(a, g, queries, "queries")
    dtype = compute_dtype(a, g, q_a, q_s, queries)
    a, g, q_a, q_s, queries = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype), queries.to(dtype)
    batch, tokens, d_in = a.shape
    d_out, n_queries = g.shape[2], queries.shape[0]
    project_cost = (min(squares_tokens_first_cost(tokens, d_out, d_in), squares_gradient_first_cost(tokens, d_out, d_in))
                    + (n_queries + current().memory_cost_per_entry) * d_out * d_in)
    rotate_cost = (n_queries * d_out * d_in * (d_out + d_in)
                   + batch * min(ghost.ghost_per_token_cost(tokens, d_out, d_in, n_queries),
                                 ghost.ghost_gradient_first_cost(tokens, d_out, d_in, n_queries)))
    if rotate_cost < batch * project_cost:
        return ghost.ghost_dots(a, g, q_s @ queries @ q_a.T)
    return projected_scores(a, g, q_a, q_s, queries)


def projected_scores(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                     queries: torch.Tensor) -> torch.Tensor:
    """The first strategy of :func:`projected_gradient_scores` alone: every example projected,
    ``P_b = Q_S^T G_b Q_A`` (the cheaper order), then one (B, d_out d_in) x (d_out d_in, Q) product. For a
    caller that rotates the queries back or not once for a whole pass (not per batch), e.g.
    :func:`trustrepair.methods.scoring.pairwise_influence`. Arguments and result as there."""
    check_bases(a, g, q_a, q_s)
    check_matrices(a, g, queries, "queries")
    dtype = compute_dtype(a, g, q_a, q_s, queries)
    d_out, d_in = queries.shape[1], queries.shape[2]
    flat_queries = queries.to(dtype).reshape(queries.shape[0], d_out * d_in)
    out = torch.empty(a.shape[0], queries.shape[0], dtype=dtype, device=a.device)
    for rows, projected in _projected_chunks(a, g, q_a, q_s):
        out[rows] = projected.reshape(projected.shape[0], d_out * d_in) @ flat_queries.T
    return out


def projected_square_norms(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """Weighted squared norms of each example's gradient in the eigenbasis, ``s[b] = sum_ij
    (Q_S^T G_b Q_A)[i, j] ** 2 * W[i, j]``; with W = 1 / (Lambda + lambda) this is the example's
    self-influence G_b^T (G + lambda I)^{-1} G_b under EK-FAC. Projections as in :func:`projected_gradients`.

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_reference`.
        weights: (d_out, d_in), non-negative.
    Returns:
        (B,), float64 for float64 inputs, float32 otherwise.
    """
    check_bases(a, g, q_a, q_s)
    check_matrices(a, g, weights[None], "weights")
    dtype = compute_dtype(a, g, q_a, q_s, weights)
    weights = weights.to(dtype)
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for rows, projected in _projected_chunks(a, g, q_a, q_s):
        out[rows] = (projected.square() * weights).sum((1, 2))
    return out


def squares_tokens_first_cost(tokens: int, d_out: int, d_in: int) -> int:
    """Multiply-adds per example of (g Q_S)^T (a Q_A)."""
    return tokens * (d_in * d_in + d_out * d_out + d_out * d_in)


def squares_gradient_first_cost(tokens: int, d_out: int, d_in: int) -> int:
    """Multiply-adds per example of Q_S^T (g^T a) Q_A."""
    return tokens * d_out * d_in + d_out * d_in * (d_out + d_in)


def _projected_chunks(a, g, q_a, q_s):
    """Yield (rows, (chunk, d_out, d_in) projected gradients Q_S^T G_b Q_A) by the cheaper order, in
    chunks of at most ``chunk_elements`` intermediate elements, in float32 / float64 (see the module)."""
    dtype = compute_dtype(a, g, q_a, q_s)
    a, g, q_a, q_s = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    if squares_tokens_first_cost(tokens, d_out, d_in) <= squares_gradient_first_cost(tokens, d_out, d_in):
        project = _project_tokens_first
    else:
        project = _project_gradient_first
    for rows in blocking.row_chunks(batch, max(tokens * (d_in + d_out), d_out * d_in)):
        yield rows, project(a[rows], g[rows], q_a, q_s)


def _project_tokens_first(a, g, q_a, q_s):
    """(B, d_out, d_in): (g_b Q_S)^T (a_b Q_A) for each example of the chunk."""
    return torch.bmm((g @ q_s).transpose(1, 2), a @ q_a)


def _project_gradient_first(a, g, q_a, q_s):
    """(B, d_out, d_in): Q_S^T (g_b^T a_b) Q_A for each example of the chunk."""
    return q_s.T @ torch.bmm(g.transpose(1, 2), a) @ q_a
