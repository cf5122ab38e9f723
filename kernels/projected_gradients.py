"""Per-example projected gradients, fused: EK-FAC's eigenvalue correction and pairwise scores.

A layer's gradient on example b is ``G_b = sum_t g_bt a_bt^T = g_b^T a_b`` (d_out, d_in), from its
output gradients ``g_b`` (T, d_out) (zero at masked tokens) and inputs ``a_b`` (T, d_in). In the EK-FAC
eigenbasis it is ``P_b = Q_S^T G_b Q_A = (g_b Q_S)^T (a_b Q_A)``. One kernel, two modes (a constexpr):

* squares: ``Lambda[i, j] = sum_b P_b[i, j]^2``              -> (d_out, d_in)
* scores:  ``scores[b, q] = sum_ij P_b[i, j] W_q[i, j]``     -> (B, Q)

with query matrices ``W`` (Q, d_out, d_in) already in the eigenbasis (e.g. preconditioned query
gradients). No P_b is ever written to memory:

1. The tokens are projected with two cuBLAS products (operands in the operand dtype; :data:`PROJECTION`):
   the transposed projections ``Gt_b = Q_S^T g_b^T`` (d_out, T) and ``At_b = Q_A^T a_b^T`` (d_in, T), tokens
   unit-stride, so both tensor-core operands of step 2 are K-major (what Hopper's TF32 wgmma needs);
   on a GPU an odd width is first zero-padded to an even one (:data:`trustrepair.engine.layout.PAD_WIDTHS`)
   and step 2 reads the true rows. Under TF32 they are then rounded to nearest in place, or inside step 2 (:data:`TF32_ROUNDING`).
2. Each program owns a (BLOCK_M, BLOCK_N) tile of the (d_out, d_in) output and a contiguous range of
   examples; per example it accumulates ``P_b[I, J] = Gt_b[I, :] At_b[J, :]^T`` over token blocks in
   registers (``tl.dot``), then squares it into a running tile (squares) or contracts it with the
   queries' tiles (scores).
3. Reductions stay deterministic: squares writes one partial Lambda per example range and the ranges
   are summed in a fixed order; scores writes one partial (B, Q) per output tile, summed the same way.

Multiply-adds per example: ``T (d_out^2 + d_in^2)`` for step 1, ``T d_out d_in`` for step 2, plus
``Q d_out d_in`` in scores mode, which also reads every query tile once per example, or once per two
examples with the ``PAIRS`` configurations (two accumulators): for many queries that traffic, not the
arithmetic, bounds the scores mode. Operand traffic: the operands differ per example and each product is
short (inner dimension T), so every output tile loads its rows of both operands for every example: about
2 BLOCK_M BLOCK_N / (bytes (BLOCK_M + BLOCK_N)) FLOP per byte loaded, 32 for 128 x 128 TF32 tiles, which
makes the squares mode's rate a multiple of the L2 bandwidth rather than of the tensor cores' peak
(``benchmarks/benchmark_kernels.py``: ``tile_operand_bytes``; two register-resident accumulators rule out
larger tiles). Precision and devices: see :mod:`trustrepair.kernels._launch` (TF32
operands rounded to nearest before the products; float64 on CUDA runs the reference); outputs are float32
(float64 for float64 operands). References: ``projected_gradient_squares_reference`` and
``projected_gradient_scores_reference`` in :mod:`trustrepair.engine.contractions`.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from trustrepair.engine import contractions
from trustrepair.engine.layout import aligned, pads_widths, zero_padded
from trustrepair.kernels import _launch
from trustrepair.kernels._launch import round_to_tf32, round_to_tf32_

SQUARES = 0
SCORES = 1

TF32_ROUNDING = "pass"
"""Where the tile kernel's TF32 operands are rounded to nearest (``_launch`` explains why they must be):

* ``"pass"``: once per element, by an in-place pass over the projected tokens
  (:func:`trustrepair.kernels._launch.round_to_tf32_`: B T (d_out + d_in) floats read and written, about
  65-85 us per Pythia-160M layer and batch of 16 x 512 on an H100's 3.35 TB/s, 5-11 % of the measured
  squares op), after which the kernel's operands go from its asynchronous copies straight to the tensor
  cores;
* ``"kernel"``: inside the kernel before every product: each element is rounded once per output tile
  that reads it (7-25 times at Pythia's widths), and each operand tile makes a register round trip from
  shared memory back to shared memory. Compiled for sm_90 (Triton 3.6, 128 x 128 x 32 tile), that round
  trip also serialises the tensor cores: the loop waits for each ``wgmma`` to finish
  (``warp_group_dot_wait`` with 0 pending) before the next step, where the unrounded loop keeps one in
  flight (1 pending), and it adds a third shared-memory buffer and 4 stores and loads per step.

Measured on an H100 (benchmarks/RESULTS.md, second run): the squares op summed over Pythia-160M's four
layer shapes took 4.446 ms with ``"pass"`` and 4.417 ms with ``"kernel"``, the same within do_bench's
spread, and the pipeline's Lambda stage was no faster with ``"kernel"``; so ``"pass"`` stays.
Results are identical: the same rounding of the same values."""

PROJECTION = "batched"
"""How step 1 forms the token-major projections ``Q^T x_b^T`` (B, d, T) of a layer's B T tokens x (B, T, d):

* ``"batched"``: ``torch.matmul(Q^T, x^T)``, which PyTorch runs as one batched product of B (d, d) x (d, T)
  matrices (the basis broadcast); the result is contiguous;
* ``"gemm"``: one (d, d) x (d, B T) product ``Q^T (x reshaped to (B T, d))^T`` into a (d, B T) matrix, handed
  to the tile kernel as the (B, d, T) view with strides (T, B T, 1) (tokens still unit-stride).

Measured on an H100 (benchmarks/RESULTS.md, second run), TF32 over 16 examples of 512 tokens: batched
0.043 / 0.132 / 0.436 / 1.480 ms at widths 768 / 769 / 3072 / 3073, one GEMM 0.049 / 0.132 / 0.474 / 1.520;
so ``"batched"`` stays. (The first run's slow narrow projections came from the odd widths: 769 takes three
times 768's time in either form, see :mod:`trustrepair.engine.layout`.) Results agree to the products'
rounding (same algebra, possibly another GEMM algorithm)."""

# Scores mode keeps the output tile fixed, so the number of partial (B, Q) slices does not depend on
# the configuration the autotuner picks; squares mode tunes the tile shape too.
_SCORES_TILE = 32 if _launch.INTERPRET else 64

# (BLOCK_M, BLOCK_N, BLOCK_K, PAIRS, FLATTEN, num_warps, num_stages). Chosen from the sm_90 compiler's
# resource report (Triton 3.6): none of these spills registers for TF32 or bfloat16 operands. FLATTEN
# fuses the loop over examples with the loop over token blocks, so the copy pipeline runs on across
# examples instead of draining and refilling at each example's 512 / BLOCK_K = 16 steps; the autotuner
# keeps it only where it measures faster.
_SQUARES_SHAPES = [(128, 128, 32, False, False, 8, 3), (128, 64, 32, False, False, 8, 4),
                   (64, 128, 32, False, False, 8, 4), (64, 64, 32, False, False, 4, 3),
                   (64, 64, 64, False, False, 8, 3),
                   (128, 128, 32, False, True, 8, 3), (128, 64, 32, False, True, 8, 4),
                   (64, 128, 32, False, True, 8, 4)]
_SCORES_SHAPES = [(64, 64, 32, False, False, 8, 4), (64, 64, 64, False, False, 8, 3),
                  (64, 64, 32, True, False, 8, 3)]


def _configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PAIRS": pairs, "FLATTEN": flatten},
                          num_warps=w, num_stages=s)
            for m, n, k, pairs, flatten, w, s in shapes]


if _launch.INTERPRET:  # one small configuration (no tuning runs): the interpreter runs programs in Python
    _SQUARES_CONFIGS = _SCORES_CONFIGS = _ALL_CONFIGS = _configs([(_SCORES_TILE, _SCORES_TILE, 16, False, False, 4, 1)])
else:
    _SQUARES_CONFIGS, _SCORES_CONFIGS = _configs(_SQUARES_SHAPES), _configs(_SCORES_SHAPES)
    _ALL_CONFIGS = _SQUARES_CONFIGS + _SCORES_CONFIGS


def _keep_mode_configs(configs, named_args, **kwargs):
    """The autotuner tries the squares configurations in squares mode, the scores ones in scores mode."""
    return _SCORES_CONFIGS if kwargs["MODE"] == SCORES else _SQUARES_CONFIGS


_LARGEST_TILE = max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in _SQUARES_CONFIGS)


@triton.autotune(configs=_ALL_CONFIGS, key=["d_out", "d_in", "MODE", "INPUT_PRECISION", "ROUND_OPERANDS"],
                 prune_configs_by={"early_config_prune": _keep_mode_configs})
@triton.jit(do_not_specialize=["B", "d_out", "d_in", "Q", "examples_per_program"])  # fewer recompilations
def _example_tiles_kernel(
    gt_ptr, at_ptr, w_ptr, out_ptr,
    B, T, d_out, d_in, Q, examples_per_program,
    stride_gb, stride_gi, stride_gt,
    stride_ab, stride_aj, stride_at,
    stride_wq, stride_wi, stride_wj,
    MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, ROUND_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr,
    FLATTEN: tl.constexpr = False,
):
    """Grid (example ranges, d_out tiles, d_in tiles). Squares: out (ranges, d_out, d_in) receives the
    range's sum of squared tiles. Scores: out (d_out tiles * d_in tiles, B, Q) receives each tile's
    share of every score. PAIRS: two examples per step (two accumulators), so each query tile is read
    once per pair of examples instead of once per example. FLATTEN: one software-pipelined loop over
    (example, token block) pairs (``tl.range(..., flatten=True)``) instead of a pipeline per example.
    ROUND_OPERANDS: round TF32 operands to nearest before each product (False when the launcher's caller
    already rounded them; see :data:`TF32_ROUNDING`)."""
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < d_out
    mask_n = rn < d_in
    mask_mn = mask_m[:, None] & mask_n[None, :]
    b_start = pid_split * examples_per_program
    b_end = tl.minimum(b_start + examples_per_program, B)
    squares = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    slot = pid_m * tl.num_programs(2) + pid_n
    for b in tl.range(b_start, b_end, 2 if PAIRS else 1, flatten=FLATTEN):
        g_rows = gt_ptr + tl.cast(b, tl.int64) * stride_gb + rm[:, None] * stride_gi
        a_rows = at_ptr + tl.cast(b, tl.int64) * stride_ab + rn[:, None] * stride_aj
        tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        if PAIRS:  # rows of the second example: all masked when the range has no second example
            second = b + 1 < b_end
            mask_m2 = rm < tl.where(second, d_out, 0)
            mask_n2 = rn < tl.where(second, d_in, 0)
            tile2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for t0 in range(0, T, BLOCK_K):
            rt = t0 + rk
            mask_t = rt < T
            x = tl.load(g_rows + rt[None, :] * stride_gt, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
            y = tl.load(a_rows + rt[None, :] * stride_at, mask=mask_n[:, None] & mask_t[None, :], other=0.0)
            if INPUT_PRECISION == "tf32" and ROUND_OPERANDS:
                x, y = round_to_tf32(x), round_to_tf32(y)
            tile = tl.dot(x, tl.trans(y), tile, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if PAIRS:
                x2 = tl.load(g_rows + stride_gb + rt[None, :] * stride_gt, mask=mask_m2[:, None] & mask_t[None, :],
                             other=0.0)
                y2 = tl.load(a_rows + stride_ab + rt[None, :] * stride_at, mask=mask_n2[:, None] & mask_t[None, :],
                             other=0.0)
                if INPUT_PRECISION == "tf32" and ROUND_OPERANDS:
                    x2, y2 = round_to_tf32(x2), round_to_tf32(y2)
                tile2 = tl.dot(x2, tl.trans(y2), tile2, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if MODE == 0:
            squares += tile * tile
            if PAIRS:
                squares += tile2 * tile2
        else:
            w_tile = w_ptr + rm[:, None] * stride_wi + rn[None, :] * stride_wj
            out_row = out_ptr + (tl.cast(slot, tl.int64) * B + b) * Q
            for q in range(Q):
                w = tl.load(w_tile + tl.cast(q, tl.int64) * stride_wq, mask=mask_mn, other=0.0).to(ACC_DTYPE)
                tl.store(out_row + q, tl.sum(tile * w))
                if PAIRS:
                    tl.store(out_row + Q + q, tl.sum(tile2 * w), mask=second)
    if MODE == 0:
        out_tile = out_ptr + tl.cast(pid_split, tl.int64) * d_out * d_in + rm[:, None] * d_in + rn[None, :]
        tl.store(out_tile, squares, mask=mask_mn)


def example_ranges(batch: int, d_out: int, d_in: int, tile_elements: int, device: torch.device) -> tuple[int, int]:
    """(number of example ranges, examples per range) so that ranges x output tiles gives about two
    programs per multiprocessor; the output tiles are counted at ``tile_elements`` per tile."""
    tiles = max(1, triton.cdiv(d_out * d_in, tile_elements))
    wanted = triton.cdiv(2 * _launch.parallel_units(device), tiles)
    per_range = triton.cdiv(batch, min(max(wanted, 1), batch))
    return triton.cdiv(batch, per_range), per_range


def contract_example_tiles(gt: torch.Tensor, at: torch.Tensor, mode: int, weights: torch.Tensor | None = None,
                           config: triton.Config | None = None, operands_rounded: bool = False) -> torch.Tensor:
    """Runs the tile kernel on token-major operands and reduces its partial results.

    Args:
        gt: (B, d_out, T) left operand (tokens along the last axis, unit stride preferred).
        at: (B, d_in, T) right operand, same dtype and device.
        mode: :data:`SQUARES` for ``sum_b (gt_b at_b^T)^2`` (d_out, d_in), or :data:`SCORES` for
            ``<gt_b at_b^T, W_q>`` (B, Q).
        weights: (Q, d_out, d_in) matrices W of scores mode (any float dtype; read in the accumulator's).
        config: run this configuration instead of the autotuner's choice (tests and benchmarks); in
            scores mode its tile must be the fixed scores tile.
        operands_rounded: ``gt`` and ``at`` already hold TF32 values (:func:`round_to_tf32_`), so TF32
            products skip the kernel's own rounding; ignored outside TF32.
    Returns:
        The reduced result in float32, or float64 for float64 operands.
    """
    batch, d_out, tokens = gt.shape
    d_in = at.shape[1]
    acc = _launch.accumulator_dtype(gt.dtype)
    n_queries = weights.shape[0] if mode == SCORES else 0
    if batch == 0 or tokens == 0:
        shape = (d_out, d_in) if mode == SQUARES else (batch, n_queries)
        return torch.zeros(shape, dtype=acc, device=gt.device)
    tile_elements = _LARGEST_TILE if mode == SQUARES else _SCORES_TILE ** 2
    ranges, per_range = example_ranges(batch, d_out, d_in, tile_elements, gt.device)
    if mode == SQUARES:
        partial_shape = (ranges, d_out, d_in)
        weights = gt  # an unused pointer argument
    else:
        partial_shape = (triton.cdiv(d_out, _SCORES_TILE) * triton.cdiv(d_in, _SCORES_TILE), batch, n_queries)
    out = torch.empty(partial_shape, dtype=acc, device=gt.device)

    kernel, forced = _example_tiles_kernel, {}
    if config is not None:
        if mode == SCORES and not config.kwargs["BLOCK_M"] == config.kwargs["BLOCK_N"] == _SCORES_TILE:
            raise ValueError(f"scores mode runs {_SCORES_TILE} x {_SCORES_TILE} tiles; got {config}")
        kernel, forced = _example_tiles_kernel.fn, config.all_kwargs()

    def grid(meta):
        return ranges, triton.cdiv(d_out, meta["BLOCK_M"]), triton.cdiv(d_in, meta["BLOCK_N"])

    with torch.cuda.device(gt.device) if gt.is_cuda else contextlib.nullcontext():
        kernel[grid](
            gt, at, weights, out,
            batch, tokens, d_out, d_in, n_queries, per_range,
            gt.stride(0), gt.stride(1), gt.stride(2),
            at.stride(0), at.stride(1), at.stride(2),
            weights.stride(0), weights.stride(1), weights.stride(2),
            MODE=mode, INPUT_PRECISION=_launch.input_precision(gt.dtype), ACC_DTYPE=_launch.tl_dtype(acc),
            ROUND_OPERANDS=not operands_rounded, **forced,
        )
    return out.sum(dim=0) if out.shape[0] > 1 else out[0]


def _check(a, g, q_a, q_s, queries=None) -> torch.dtype:
    """Validates the operands (ValueError naming the problem); returns the operand dtype."""
    contractions.check_token_operands(a, g)
    d_in, d_out = a.shape[2], g.shape[2]
    if tuple(q_a.shape) != (d_in, d_in) or tuple(q_s.shape) != (d_out, d_out):
        raise ValueError(f"q_a must be ({d_in}, {d_in}) and q_s ({d_out}, {d_out}) for a {tuple(a.shape)} and "
                         f"g {tuple(g.shape)}; got {tuple(q_a.shape)} and {tuple(q_s.shape)}")
    tensors = {"a": a, "g": g, "q_a": q_a, "q_s": q_s}
    if queries is not None:
        if queries.dim() != 3 or tuple(queries.shape[1:]) != (d_out, d_in):
            raise ValueError(f"queries must be (Q, {d_out}, {d_in}) = (Q, d_out, d_in); got {tuple(queries.shape)}")
        tensors["queries"] = queries
    _launch.check_floating(**tensors)
    return _launch.operand_dtype(a, g, *tensors.values())


def project_tokens(basis: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                   projection: str | None = None, pad: bool | None = None) -> torch.Tensor:
    """``Q^T x_b^T`` for every example: (B, d', T) in ``dtype`` with unit-stride tokens, from a basis Q (d, d)
    and tokens x (B, T, d). ``d' = d`` with ``pad`` False: both operands used with aligned rows
    (:mod:`trustrepair.engine.layout`; a conversion to ``dtype`` is made aligned). With ``pad`` True (default:
    :func:`trustrepair.engine.layout.pads_widths` of ``x``'s device) the product runs on the zero-padded
    operands (Q widened to (d', d'), x to (B, T, d'), d' = ``padded_width(d)``), so rows d.. of the result
    are zero and ``result[:, :d]`` is the projection: even dimensions keep cuBLAS on its fast kernels.
    ``projection`` (default :data:`PROJECTION`) picks the product's form. Autocast is off: the operand
    dtype, not an enclosing autocast region, sets the precision."""
    projection = PROJECTION if projection is None else projection
    if projection not in ("batched", "gemm"):
        raise ValueError(f"projection must be 'batched' or 'gemm'; got {projection!r}")
    if pads_widths(x.device) if pad is None else pad:
        basis, x = zero_padded(basis, dtype, dims=2), zero_padded(x, dtype)
    else:
        basis, x = aligned(basis, dtype), aligned(x, dtype)
    with torch.autocast(x.device.type, enabled=False):
        if projection == "batched":
            return torch.matmul(basis.T, x.transpose(1, 2))
        batch, tokens, width = x.shape
        return (basis.T @ x.reshape(batch * tokens, width).T).view(width, batch, tokens).transpose(0, 1)


def _project(a, g, q_a, q_s, dtype, projection=None):
    """Token-major projections (Q_S^T g_b^T, Q_A^T a_b^T): (B, d_out', T) and (B, d_in', T) in ``dtype``,
    each possibly padded with zero rows (:func:`project_tokens`); the kernel reads their first d_out and
    d_in rows."""
    return project_tokens(q_s, g, dtype, projection), project_tokens(q_a, a, dtype, projection)


def _round_projected(gt: torch.Tensor, at: torch.Tensor, dtype: torch.dtype, rounding: str | None) -> bool:
    """Rounds the projected tokens in place when TF32 products round by a pass (:data:`TF32_ROUNDING`, or
    ``rounding`` when given); True when it did, i.e. the kernel must not round them again."""
    rounding = TF32_ROUNDING if rounding is None else rounding
    if rounding not in ("pass", "kernel"):
        raise ValueError(f"TF32 rounding must be 'pass' or 'kernel'; got {rounding!r}")
    if rounding == "kernel" or _launch.input_precision(dtype) != "tf32":
        return False
    round_to_tf32_(gt)
    round_to_tf32_(at)
    return True


def _squares(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
             rounding: str | None = None, projection: str | None = None) -> torch.Tensor:
    dtype = _check(a, g, q_a, q_s)
    device = _launch.check_device(a=a, g=g, q_a=q_a, q_s=q_s)
    if _launch.runs_reference(dtype, device):
        return contractions.projected_gradient_squares_reference(a, g, q_a, q_s)
    gt, at = _project(a, g, q_a, q_s, dtype, projection)
    rounded = _round_projected(gt, at, dtype, rounding)
    return contract_example_tiles(gt[:, :g.shape[2]], at[:, :a.shape[2]], SQUARES, operands_rounded=rounded)


def _scores(a, g, q_a, q_s, queries, rounding: str | None = None, projection: str | None = None) -> torch.Tensor:
    dtype = _check(a, g, q_a, q_s, queries)
    device = _launch.check_device(a=a, g=g, q_a=q_a, q_s=q_s, queries=queries)
    if _launch.runs_reference(dtype, device):
        return contractions.projected_gradient_scores_reference(a, g, q_a, q_s, queries)
    gt, at = _project(a, g, q_a, q_s, dtype, projection)
    rounded = _round_projected(gt, at, dtype, rounding)
    return contract_example_tiles(gt[:, :g.shape[2]], at[:, :a.shape[2]], SCORES, queries, operands_rounded=rounded)


@torch.library.custom_op("trustrepair::projected_gradient_squares", mutates_args=())
def _squares_op(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    return _squares(a, g, q_a, q_s)


@_squares_op.register_fake
def _squares_fake(a, g, q_a, q_s):
    dtype = _check(a, g, q_a, q_s)
    return a.new_empty((g.shape[2], a.shape[2]), dtype=_launch.accumulator_dtype(dtype))


@torch.library.custom_op("trustrepair::projected_gradient_scores", mutates_args=())
def _scores_op(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
               queries: torch.Tensor) -> torch.Tensor:
    return _scores(a, g, q_a, q_s, queries)


@_scores_op.register_fake
def _scores_fake(a, g, q_a, q_s, queries):
    dtype = _check(a, g, q_a, q_s, queries)
    return a.new_empty((a.shape[0], queries.shape[0]), dtype=_launch.accumulator_dtype(dtype))


def projected_gradient_squares_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor,
                                      q_s: torch.Tensor) -> torch.Tensor:
    """EK-FAC eigenvalue-correction numerator ``sum_b (Q_S^T g_b^T a_b Q_A) ** 2`` on Triton.

    Args:
        a: (B, T, d_in) layer inputs, zero at masked tokens (bias column included when the layer has one).
        g: (B, T, d_out) output gradients, zero at masked tokens.
        q_a: (d_in, d_in) activation eigenbasis; q_s: (d_out, d_out) gradient eigenbasis.
    Returns:
        (d_out, d_in), float32 (float64 for float64 operands): the sum over the batch, elementwise
        squares. A ``torch.library`` custom op (``trustrepair::projected_gradient_squares``), so it
        traces under ``torch.compile``. Twin of
        :func:`trustrepair.engine.contractions.projected_gradient_squares_reference`.
    """
    return _squares_op(a, g, q_a, q_s)


def projected_gradient_scores_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                                     queries: torch.Tensor) -> torch.Tensor:
    """Pairwise scores ``scores[b, q] = sum_ij (Q_S^T g_b^T a_b Q_A)[i, j] * W_q[i, j]`` on Triton.

    Args:
        a, g, q_a, q_s: as in :func:`projected_gradient_squares_triton`.
        queries: (Q, d_out, d_in) query matrices W in the eigenbasis (read in the accumulator dtype).
    Returns:
        (B, Q), float32 (float64 for float64 operands). Custom op
        ``trustrepair::projected_gradient_scores``; twin of
        :func:`trustrepair.engine.contractions.projected_gradient_scores_reference`.
    """
    return _scores_op(a, g, q_a, q_s, queries)
