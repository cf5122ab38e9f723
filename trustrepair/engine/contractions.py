"""Per-example gradient contractions of EK-FAC, in pure PyTorch, with a dispatch to Triton on CUDA.

Every influenced linear layer sees, per example b, activations ``a_b`` (T, d_in) (bias folded in as a
ones column, zero at masked tokens) and output gradients ``g_b`` (T, d_out) (zero at masked tokens).
The example's gradient of the layer's (d_out, d_in) weight matrix is

    G_b = sum_t g_bt a_bt^T = g_b^T a_b,

and EK-FAC needs three contractions of it, none of which has to write G_b out for a whole batch:

* :func:`projected_gradient_squares` -- the eigenvalue correction's numerator,
  sum_b (Q_S^T G_b Q_A) ** 2  (elementwise square), a (d_out, d_in) matrix;
* :func:`projected_gradient_scores` -- scores against Q query matrices given in the eigenbasis,
  s[b, q] = <Q_S^T G_b Q_A, W_q>  (Frobenius inner product);
* :func:`ghost_dots` -- scores against K matrices in the original basis,
  s[b, k] = <G_b, U_k> = sum_t g_bt^T U_k a_bt ("ghost" dot products: no G_b needed at all).

Because Q_A and Q_S are orthogonal, <Q_S^T G Q_A, W> = <G, Q_S W Q_A^T>, so the three are the same
algebra in different bases; which order of multiplication is cheapest depends on the number of tokens
T, the layer's widths and the number of query matrices. The ``*_reference`` functions are the
pure-PyTorch implementations (they are also the CPU path): each estimates the multiply-add count of its
candidate orders with the small cost functions below (plus the memory traffic of per-example matrices,
:data:`MEMORY_COST_PER_ENTRY`) and runs the cheapest one, processing the batch in chunks so that no
intermediate exceeds :data:`CHUNK_ELEMENTS` elements, and per-example matrices in cache-sized slabs of
rows (:data:`SLAB_ELEMENTS`, :data:`TILE_ELEMENTS`) on a CPU; on a GPU the same references issue one
batched product per chunk instead (:func:`cache_blocked`), so they are the cuBLAS path there. The public
functions of the same name without the suffix dispatch a CUDA tensor to the Triton kernels of
``trustrepair.kernels`` when the operation is in :data:`TRITON_OPS` and :func:`triton_enabled` says so,
and everything else to the reference.

Also here, without a Triton twin: :func:`projected_gradients` (few examples' gradients in the
eigenbasis, e.g. per-query gradients), :func:`low_rank_ghost_dots` (ghost dot products with rank-r
matrices; its reference is :func:`ghost_dots_reference` of the product) and :func:`add_gram_upper_`
(covariance updates, half the products of ``x^T x``; its reference is ``addmm``).

Layout: the token operands are used with aligned rows (:func:`trustrepair.engine.layout.aligned`: no copy
when they already are, as the activations :class:`trustrepair.engine.capture.TokenCapture` hands out), so the
products of odd-width (bias-folded) layers read 16-byte-aligned rows.

Precision: float64 inputs are computed in float64; float32, bfloat16 and float16 inputs are upcast to
float32 before any product, so every sum (over tokens, over examples, over matrix entries) accumulates
in float32 at least. The squares of the eigenvalue correction are summed over examples in that same
precision; they are non-negative, so the sum has no cancellation.
"""
from __future__ import annotations

import functools
import os

import torch

from trustrepair.engine.layout import aligned, empty_aligned, padded_width, pads_widths, zero_padded

CHUNK_ELEMENTS = 1 << 24
"""Largest intermediate (elements) one chunk of a contraction may allocate: 64 MiB in float32."""

SLAB_ELEMENTS = 1 << 17
"""Elements of one example's slab of projected-gradient rows that the eigenvalue-correction loop squares
into its sum right after computing it (512 KiB in float32, about a core's L2): 1.3-1.5x faster than
whole (d_out, d_in) tiles on the CPUs measured."""

TILE_ELEMENTS = 1 << 20
"""Elements of the slab of per-example gradients (B, rows, d_in) that the gradient-first ghost dot
products form at a time (4 MiB in float32): small enough to stay in cache for the product that
consumes it, large enough for efficient products (1.5-3x faster than forming whole G_b, measured)."""

MEMORY_COST_PER_ENTRY = 128
"""Multiply-adds that writing one entry of a per-example (d_out, d_in) matrix to memory and reading it
back costs, for the cost model: such a batched outer product (inner dimension T = 64) ran at about a
quarter of GEMM speed on the CPUs measured, so forming G_b first only pays off for K >= 3 matrices."""


TRITON_OPS = frozenset({"projected_gradient_squares"})
"""The dispatchers whose CUDA tensors go to Triton; the others run their reference (cuBLAS products) on
CUDA as well, because their kernels lost to it on the one GPU measurement so far (H100, Triton 3.6,
Pythia-160M layer shapes, 16 examples x 512 tokens, ``benchmarks/RESULTS.md``): ghost dot products with
32 matrices ran at 0.29-0.41x of the reference in TF32, with one matrix at 0.64-0.74x, scores in the
eigenbasis at 0.47-0.68x, while the eigenvalue correction's kernel ran at 1.3-1.7x (TF32) and 1.5-5.4x
(bfloat16). Those references were still the CPU-blocked ones (many small products); the kernels can
only look worse against the batched products they now issue on a GPU. The kernels stay importable from
``trustrepair.kernels`` and tested; an operation moves into this set when a GPU run shows it winning."""


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_enabled(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go to the Triton kernels: it lives on a CUDA device, ``triton``
    imports, and the environment variable ``TRUSTREPAIR_DISABLE_TRITON`` is not ``"1"``."""
    return (
        tensor.is_cuda
        and os.environ.get("TRUSTREPAIR_DISABLE_TRITON") != "1"
        and _triton_importable()
    )


def uses_triton(op: str, tensor: torch.Tensor) -> bool:
    """True when the dispatcher named ``op`` sends ``tensor`` to its Triton kernel: ``op`` is in
    :data:`TRITON_OPS` and :func:`triton_enabled` holds."""
    return op in TRITON_OPS and triton_enabled(tensor)


def cache_blocked(device: torch.device) -> bool:
    """True on a CPU, where the references walk per-example matrices in cache-sized slabs (1.3-3x faster
    there, measured); False on a GPU, where such slabs would be launch-bound small products and one
    batched product per chunk of examples (:data:`CHUNK_ELEMENTS`) keeps cuBLAS busy instead."""
    return device.type == "cpu"


def projected_gradient_squares(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                               q_s: torch.Tensor) -> torch.Tensor:
    """sum_b (Q_S^T g_b^T a_b Q_A) ** 2, on Triton for CUDA tensors (see :data:`TRITON_OPS`); see the
    reference for the contract."""
    check_token_operands(a, g)
    _check_bases(a, g, q_a, q_s)
    if uses_triton("projected_gradient_squares", a):
        from trustrepair.kernels.projected_gradients import projected_gradient_squares_triton

        return projected_gradient_squares_triton(a, g, q_a, q_s)
    return projected_gradient_squares_reference(a, g, q_a, q_s)


def projected_gradient_scores(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                              queries: torch.Tensor) -> torch.Tensor:
    """<Q_S^T g_b^T a_b Q_A, W_q> for every example b and query q, on Triton for CUDA tensors when
    :data:`TRITON_OPS` includes it; see the reference for the contract."""
    check_token_operands(a, g)
    _check_bases(a, g, q_a, q_s)
    check_matrices(a, g, queries, "queries")
    if uses_triton("projected_gradient_scores", a):
        from trustrepair.kernels.projected_gradients import projected_gradient_scores_triton

        return projected_gradient_scores_triton(a, g, q_a, q_s, queries)
    return projected_gradient_scores_reference(a, g, q_a, q_s, queries)


def ghost_dots(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sum_t g_bt^T U_k a_bt for every example b and matrix k, on Triton for CUDA tensors when
    :data:`TRITON_OPS` includes it; see the reference for the contract."""
    check_token_operands(a, g)
    check_matrices(a, g, u, "u")
    if uses_triton("ghost_dots", a):
        from trustrepair.kernels.ghost_dots import ghost_dots_triton

        return ghost_dots_triton(a, g, u)
    return ghost_dots_reference(a, g, u)


# ----------------------------------------------------------------------------------------------------
# References (also the CPU path)
# ----------------------------------------------------------------------------------------------------

def projected_gradient_squares_reference(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                                         q_s: torch.Tensor) -> torch.Tensor:
    """Eigenvalue-correction numerator: sum over examples of the squared projected gradient.

    Computes ``sum_b (Q_S^T G_b Q_A) ** 2`` with ``G_b = g_b^T a_b`` and the square taken elementwise,
    by the cheaper of two orders (multiply-adds per example):

    * tokens first, ``(g_b Q_S)^T (a_b Q_A)``: T (d_in^2 + d_out^2 + d_out d_in); wins when the example
      has fewer tokens than the layer is wide;
    * gradient first, ``Q_S^T (g_b^T a_b) Q_A``: T d_out d_in + d_out d_in (d_out + d_in).

    On a CPU each example's (d_out, d_in) tile is computed a slab of rows at a time
    (:data:`SLAB_ELEMENTS`) and squared into the sum while the slab is still in cache: writing all B
    tiles out and summing them afterwards is memory-bound there. On a GPU (:func:`cache_blocked`) a
    chunk of examples' tiles is formed by one batched product, squared in place and summed.

    Args:
        a: (B, T, d_in) activations, zero at masked tokens (bias column included when the layer has one).
        g: (B, T, d_out) output gradients, zero at masked tokens.
        q_a: (d_in, d_in) activation eigenbasis (orthogonal, eigenvectors in columns).
        q_s: (d_out, d_out) output-gradient eigenbasis.
    Returns:
        (d_out, d_in) in float64 for float64 inputs, float32 otherwise (see the module docstring).
    """
    check_token_operands(a, g)
    _check_bases(a, g, q_a, q_s)
    dtype = compute_dtype(a, g, q_a, q_s)
    a, g, q_a, q_s = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    out = torch.zeros(d_out, d_in, dtype=dtype, device=a.device)
    if not cache_blocked(a.device):
        for _, projected in _projected_chunks(a, g, q_a, q_s):
            out += projected.square_().sum(dim=0)
        return out
    tile = torch.empty(d_out, d_in, dtype=dtype, device=a.device)
    if squares_tokens_first_cost(tokens, d_out, d_in) <= squares_gradient_first_cost(tokens, d_out, d_in):
        g_rot, a_rot = g @ q_s, a @ q_a  # every token of the batch in one product per side
        step = max(1, SLAB_ELEMENTS // max(1, d_in))
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


def projected_gradients(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, ``P_b = Q_S^T (g_b^T a_b) Q_A``, written out in full.

    For few examples with few tokens each (e.g. per-query gradients of trust queries), this is much
    cheaper than rotating dense gradients: T (d_in^2 + d_out^2 + d_out d_in) per example against
    d_out d_in (d_out + d_in), by the cheaper order of :func:`projected_gradient_squares_reference`. Pure
    PyTorch on every device (the output is as large as its input gradients, so there is nothing to fuse).

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_reference`.
    Returns:
        (B, d_out, d_in), float64 for float64 inputs, float32 otherwise.
    """
    check_token_operands(a, g)
    _check_bases(a, g, q_a, q_s)
    dtype = compute_dtype(a, g, q_a, q_s)
    out = torch.empty(a.shape[0], g.shape[2], a.shape[2], dtype=dtype, device=a.device)
    for rows, projected in _projected_chunks(a, g, q_a, q_s):
        out[rows] = projected
    return out


def projected_gradient_scores_reference(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                                        q_s: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Scores of each example against query matrices expressed in the eigenbasis.

    ``scores[b, q] = sum_ij (Q_S^T G_b Q_A)[i, j] * W_q[i, j]`` with ``G_b = g_b^T a_b``. Two strategies,
    the cheaper one (multiply-adds) is run:

    * project every example, ``P_b = Q_S^T G_b Q_A`` by the cheaper order of
      :func:`projected_gradient_squares_reference`, then one (B, d_out d_in) x (d_out d_in, Q) product;
    * rotate the queries back once, ``U_q = Q_S W_q Q_A^T`` (Q d_out d_in (d_out + d_in)), then
      :func:`ghost_dots_reference` in the original basis (equal by orthogonality of Q_A, Q_S).

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_reference`.
        queries: (Q, d_out, d_in) query matrices in the eigenbasis, e.g. preconditioned query gradients
            ``(Q_S^T V_q Q_A) / (Lambda + damping)``.
    Returns:
        (B, Q), float64 for float64 inputs, float32 otherwise.
    """
    check_token_operands(a, g)
    _check_bases(a, g, q_a, q_s)
    check_matrices(a, g, queries, "queries")
    dtype = compute_dtype(a, g, q_a, q_s, queries)
    a, g, q_a, q_s, queries = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype), queries.to(dtype)
    batch, tokens, d_in = a.shape
    d_out, n_queries = g.shape[2], queries.shape[0]
    project_cost = (min(squares_tokens_first_cost(tokens, d_out, d_in), squares_gradient_first_cost(tokens, d_out, d_in))
                    + (n_queries + MEMORY_COST_PER_ENTRY) * d_out * d_in)
    rotate_cost = (n_queries * d_out * d_in * (d_out + d_in)
                   + batch * min(ghost_per_token_cost(tokens, d_out, d_in, n_queries),
                                 ghost_gradient_first_cost(tokens, d_out, d_in, n_queries)))
    if rotate_cost < batch * project_cost:
        return ghost_dots_reference(a, g, q_s @ queries @ q_a.T)
    flat_queries = queries.reshape(n_queries, d_out * d_in)
    out = torch.empty(batch, n_queries, dtype=dtype, device=a.device)
    for rows, projected in _projected_chunks(a, g, q_a, q_s):
        out[rows] = projected.reshape(projected.shape[0], d_out * d_in) @ flat_queries.T
    return out


def ghost_dots_reference(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-example inner products with K matrices in the original basis ("ghost" dot products).

    ``scores[b, k] = <G_b, U_k> = sum_t g_bt^T U_k a_bt``, by the cheaper of (multiply-adds per example):

    * per token, ``(a_b U_k^T) . g_b`` (or ``(g_b U_k) . a_b``, whichever intermediate is narrower):
      K T d_out d_in; never forms G_b, wins for one or two matrices (aspects) or very few tokens;
    * gradient first, ``G_b = g_b^T a_b`` then one product with all U_k: T d_out d_in + K d_out d_in,
      plus the memory traffic of G_b (see :data:`MEMORY_COST_PER_ENTRY`): wins for K >= 3. G_b is formed
      a slab of rows at a time for the whole batch and consumed by the next product: cache-sized slabs
      (:data:`TILE_ELEMENTS`) on a CPU, :data:`CHUNK_ELEMENTS` on a GPU (:func:`cache_blocked`). On a CPU
      the slab meets all U_k in one (B, rows d_in) x (rows d_in, K) product. On a GPU that product is
      memory-bound with a huge inner dimension and an output of B x K entries, which leaves most of the
      card idle (the first H100 run's version of it moved about 0.7 TB/s); there the slab, stored with
      aligned rows, is contracted row by row instead, one batched product of (B, d_in) x (d_in, K)
      matrices per row, summed over the rows: the same multiply-adds, each operand still read once. Where
      :data:`trustrepair.engine.layout.PAD_WIDTHS` is on (CUDA), an odd-width ``a`` is zero-padded to an
      even width first, so the slab products run on even dimensions, and their true columns are used.

    Args:
        a: (B, T, d_in) activations, zero at masked tokens.
        g: (B, T, d_out) output gradients, zero at masked tokens.
        u: (K, d_out, d_in) matrices, e.g. preconditioned query gradients.
    Returns:
        (B, K), float64 for float64 inputs, float32 otherwise.
    """
    check_token_operands(a, g)
    check_matrices(a, g, u, "u")
    dtype = compute_dtype(a, g, u)
    a, g, u = aligned(a, dtype), aligned(g, dtype), u.to(dtype)
    batch, tokens, d_in = a.shape
    d_out, n_mats = g.shape[2], u.shape[0]
    out = torch.empty(batch, n_mats, dtype=dtype, device=a.device)
    if ghost_per_token_cost(tokens, d_out, d_in, n_mats) <= ghost_gradient_first_cost(tokens, d_out, d_in, n_mats):
        narrow = min(d_out, d_in)
        for rows in _row_chunks(batch, tokens * max(n_mats * narrow, d_in + d_out)):
            out[rows] = _ghost_per_token(a[rows], g[rows], u)
    else:
        out.zero_()
        g_t = g.transpose(1, 2)
        blocked = cache_blocked(a.device)
        wide = zero_padded(a) if not blocked and pads_widths(a.device) else None  # even slab widths (alignment)
        step = max(1, (TILE_ELEMENTS if blocked else CHUNK_ELEMENTS) // max(1, batch * padded_width(d_in)))
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
    instead of K T d_out d_in; equal to ``ghost_dots_reference(a, g, left @ right)``, its reference twin.

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
    for rows in _row_chunks(batch, tokens * max(2 * n_mats * rank, d_in + d_out)):
        g_left = g[rows] @ left_flat
        a_right = a[rows] @ right_flat.T
        out[rows] = (g_left * a_right).view(-1, tokens, n_mats, rank).sum(dim=(1, 3))
    return out


GRAM_BLOCK = {"cpu": 256, "cuda": 1024}
"""Block width of :func:`add_gram_upper_` per device type (others use the CPU's): 256 keeps every product
wide enough to run near peak on a CPU. On a GPU fewer, larger products win despite the extra
multiply-adds (at 256 a 3073-wide factor makes 13 launches, the last one 1 x 1). Measured on an H100
(benchmarks/RESULTS.md, 2026-11-27), TF32, weighted over one Pythia-160M block's factor widths: 3.03 ms
at 1024, 3.19 at 256, 3.70 for the full product; the whole fit's covariance pass took 3.11 s at 1024
against 3.48 at 256 (TF32) and 2.94 against 3.30 (bf16 autocast) in the same run."""


def add_gram_upper_(out: torch.Tensor, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """In place, the upper block triangle of ``out += x^T x`` (a covariance update over token rows).

    Block row i gets ``x[:, i]^T x[:, i:]``, one wide product per block, so about half the multiply-adds
    of the full product (rows x d (d + block) / 2 instead of rows x d^2); entries strictly below the
    diagonal blocks are not touched. Every entry (i, j) with j >= i is exact, so
    :func:`symmetric_from_upper` recovers the full symmetric sum. Its reference twin is
    ``out.addmm_(x.T, x)``.

    Args:
        out: (d, d) accumulator, same dtype as ``x``.
        x: (rows, d) token rows (masked rows zero).
        block: block width (default: :data:`GRAM_BLOCK` of ``x``'s device type).
    Returns:
        ``out``.
    """
    if x.dim() != 2 or tuple(out.shape) != (x.shape[1], x.shape[1]):
        raise ValueError(f"add_gram_upper_ needs out (d, d) and x (rows, d); got {tuple(out.shape)} and {tuple(x.shape)}")
    block = GRAM_BLOCK.get(x.device.type, GRAM_BLOCK["cpu"]) if block is None else block
    if block < 1:
        raise ValueError(f"add_gram_upper_ needs a block width >= 1; got {block}")
    width = x.shape[1]
    for start in range(0, width, block):
        stop = min(start + block, width)
        out[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
    return out


def symmetric_from_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``m``."""
    return torch.triu(m) + torch.triu(m, diagonal=1).T


# ----------------------------------------------------------------------------------------------------
# Cost model (multiply-adds per example) and helpers
# ----------------------------------------------------------------------------------------------------

def squares_tokens_first_cost(tokens: int, d_out: int, d_in: int) -> int:
    """Multiply-adds per example of (g Q_S)^T (a Q_A)."""
    return tokens * (d_in * d_in + d_out * d_out + d_out * d_in)


def squares_gradient_first_cost(tokens: int, d_out: int, d_in: int) -> int:
    """Multiply-adds per example of Q_S^T (g^T a) Q_A."""
    return tokens * d_out * d_in + d_out * d_in * (d_out + d_in)


def ghost_per_token_cost(tokens: int, d_out: int, d_in: int, n_mats: int) -> int:
    """Multiply-adds per example of sum_t g_t^T U_k a_t for K matrices, token by token."""
    return n_mats * tokens * d_out * d_in


def ghost_gradient_first_cost(tokens: int, d_out: int, d_in: int, n_mats: int) -> int:
    """Multiply-adds per example of forming G = g^T a, then <G, U_k> for K matrices, plus
    :data:`MEMORY_COST_PER_ENTRY` per entry of G (written out, then read back by the second product)."""
    return (tokens + n_mats + MEMORY_COST_PER_ENTRY) * d_out * d_in


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any operand is float64, float32 otherwise (bfloat16 / float16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _projected_chunks(a, g, q_a, q_s):
    """Yield (rows, (chunk, d_out, d_in) projected gradients Q_S^T G_b Q_A) by the cheaper order, in
    chunks of at most CHUNK_ELEMENTS intermediate elements, in float32 / float64 (see the module)."""
    dtype = compute_dtype(a, g, q_a, q_s)
    a, g, q_a, q_s = aligned(a, dtype), aligned(g, dtype), q_a.to(dtype), q_s.to(dtype)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    if squares_tokens_first_cost(tokens, d_out, d_in) <= squares_gradient_first_cost(tokens, d_out, d_in):
        project = _project_tokens_first
    else:
        project = _project_gradient_first
    for rows in _row_chunks(batch, max(tokens * (d_in + d_out), d_out * d_in)):
        yield rows, project(a[rows], g[rows], q_a, q_s)


def _project_tokens_first(a, g, q_a, q_s):
    """(B, d_out, d_in): (g_b Q_S)^T (a_b Q_A) for each example of the chunk."""
    return torch.bmm((g @ q_s).transpose(1, 2), a @ q_a)


def _project_gradient_first(a, g, q_a, q_s):
    """(B, d_out, d_in): Q_S^T (g_b^T a_b) Q_A for each example of the chunk."""
    return q_s.T @ torch.bmm(g.transpose(1, 2), a) @ q_a


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


def _row_chunks(batch: int, elements_per_row: int):
    """Slices of the batch whose rows hold at most CHUNK_ELEMENTS intermediate elements (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_row))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def check_token_operands(a: torch.Tensor, g: torch.Tensor) -> None:
    """Raises ValueError unless a is (B, T, d_in) and g (B, T, d_out) with the same B and T (also the
    Triton launchers' check)."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"activations and output gradients must be (B, T, d_in) and (B, T, d_out) with the same "
                         f"B and T; got {tuple(a.shape)} and {tuple(g.shape)}")


def _check_bases(a, g, q_a, q_s) -> None:
    d_in, d_out = a.shape[2], g.shape[2]
    if tuple(q_a.shape) != (d_in, d_in) or tuple(q_s.shape) != (d_out, d_out):
        raise ValueError(f"eigenbases must be q_a ({d_in}, {d_in}) and q_s ({d_out}, {d_out}) for activations "
                         f"{tuple(a.shape)} and gradients {tuple(g.shape)}; got {tuple(q_a.shape)} and "
                         f"{tuple(q_s.shape)}")


def check_low_rank_factors(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """Raises ValueError unless a, g are token operands and left (K, d_out, r), right (K, r, d_in) their
    low-rank factors (also the Triton launcher's check)."""
    check_token_operands(a, g)
    d_in, d_out = a.shape[2], g.shape[2]
    if (left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]
            or left.shape[1] != d_out or right.shape[2] != d_in):
        raise ValueError(f"low-rank factors must be left (K, {d_out}, r) and right (K, r, {d_in}) for activations "
                         f"{tuple(a.shape)} and gradients {tuple(g.shape)}; got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")


def check_matrices(a, g, mats, name: str) -> None:
    """Raises ValueError unless ``mats`` (named ``name`` in the message) is (K, d_out, d_in) for a, g
    (also the ghost-dot kernel's launcher's check)."""
    d_in, d_out = a.shape[2], g.shape[2]
    if mats.dim() != 3 or tuple(mats.shape[1:]) != (d_out, d_in):
        raise ValueError(f"{name} must be (K, {d_out}, {d_in}) = (K, d_out, d_in) for activations "
                         f"{tuple(a.shape)} and gradients {tuple(g.shape)}; got {tuple(mats.shape)}")
