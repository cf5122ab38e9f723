"""EK-FAC's eigenvalue correction, fused: sum over examples of squared per-example projected gradients.

A layer's gradient on example b is ``G_b = sum_t g_bt a_bt^T = g_b^T a_b`` (d_out, d_in), from its
output gradients ``g_b`` (T, d_out) (zero at masked tokens) and inputs ``a_b`` (T, d_in). In the EK-FAC
eigenbasis it is ``P_b = Q_S^T G_b Q_A = (g_b Q_S)^T (a_b Q_A)``, and the kernel computes

    Lambda[i, j] = sum_b P_b[i, j]^2        -> (d_out, d_in)

without writing any P_b to memory:

1. The tokens are projected with two cuBLAS products in the operand dtype (:func:`project_tokens`): the
   transposed projections ``Gt_b = Q_S^T g_b^T`` (d_out, T) and ``At_b = Q_A^T a_b^T`` (d_in, T), tokens
   unit-stride, so both tensor-core operands of step 2 are K-major (what Hopper's TF32 wgmma needs).
   Under TF32 they are then rounded to nearest in place, once per element
   (:func:`trustrepair.kernels._launch.round_to_tf32_`), so step 2 feeds them to the tensor cores as
   loaded.
2. Each program owns a (BLOCK_M, BLOCK_N) tile of the (d_out, d_in) output and a contiguous range of
   examples; per example it accumulates ``P_b[I, J] = Gt_b[I, :] At_b[J, :]^T`` over token blocks in
   registers (``tl.dot``), then squares it into a running tile.
3. The reduction stays deterministic: one partial Lambda per example range, the ranges summed in a fixed
   order.

Multiply-adds per example: ``T (d_out^2 + d_in^2)`` for step 1, ``T d_out d_in`` for step 2. Operand
traffic: the operands differ per example and each product is short (inner dimension T), so every output
tile loads its rows of both operands for every example: about 2 BLOCK_M BLOCK_N / (bytes (BLOCK_M +
BLOCK_N)) FLOP per byte loaded, 32 for 128 x 128 TF32 tiles, which makes the kernel's rate a multiple of
the L2 bandwidth rather than of the tensor cores' peak (``benchmarks/benchmark_kernels.py``:
``tile_operand_bytes``; two register-resident accumulators rule out larger tiles).

The operands are used as given: the library's dispatcher
(:func:`trustrepair.engine.ops.projected_gradients.squares_on_triton`) hands them over with aligned rows,
or zero-padded to aligned widths on a GPU, and cuts the padding off the result. Precision and devices:
see :mod:`trustrepair.kernels._launch`; outputs are float32 (float64 for float64 operands). Reference:
:func:`trustrepair.engine.ops.projected_gradients.projected_gradient_squares_reference`.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from trustrepair.engine.ops.checks import accumulator_dtype, check_bases, check_floating, operand_dtype, uses_tf32
from trustrepair.kernels import _launch
from trustrepair.kernels._launch import round_to_tf32, round_to_tf32_

# (BLOCK_M, BLOCK_N, BLOCK_K, FLATTEN, num_warps, num_stages). Chosen from the sm_90 compiler's resource
# report (Triton 3.6): none of these spills registers for TF32 or bfloat16 operands. FLATTEN fuses the
# loop over examples with the loop over token blocks, so the copy pipeline runs on across examples
# instead of draining and refilling at each example's T / BLOCK_K steps; the autotuner keeps it only
# where it measures faster.
_SHAPES = [(128, 128, 32, False, 8, 3), (128, 64, 32, False, 8, 4), (64, 128, 32, False, 8, 4),
           (64, 64, 32, False, 4, 3), (64, 64, 64, False, 8, 3),
           (128, 128, 32, True, 8, 3), (128, 64, 32, True, 8, 4), (64, 128, 32, True, 8, 4)]
if _launch.INTERPRET:  # one small configuration (no tuning runs): the interpreter runs programs in Python
    _SHAPES = [(32, 32, 16, False, 4, 1)]

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "FLATTEN": flatten}, num_warps=w, num_stages=s)
           for m, n, k, flatten, w, s in _SHAPES]
"""The autotuner's candidate configurations."""

_LARGEST_TILE = max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in CONFIGS)


@triton.autotune(configs=CONFIGS, key=["d_out", "d_in", "INPUT_PRECISION", "ROUND_OPERANDS"])
@triton.jit(do_not_specialize=["B", "d_out", "d_in", "examples_per_program"])  # fewer recompilations
def _example_tiles_kernel(
    gt_ptr, at_ptr, out_ptr,
    B, T, d_out, d_in, examples_per_program,
    stride_gb, stride_gi, stride_gt,
    stride_ab, stride_aj, stride_at,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, ROUND_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLATTEN: tl.constexpr = False,
):
    """Grid (example ranges, d_out tiles, d_in tiles); out (ranges, d_out, d_in) receives each range's sum
    of squared tiles. FLATTEN: one software-pipelined loop over (example, token block) pairs
    (``tl.range(..., flatten=True)``) instead of a pipeline per example. ROUND_OPERANDS: round TF32 operands
    to nearest before each product (False when the caller already rounded them)."""
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < d_out
    mask_n = rn < d_in
    b_start = pid_split * examples_per_program
    b_end = tl.minimum(b_start + examples_per_program, B)
    squares = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for b in tl.range(b_start, b_end, 1, flatten=FLATTEN):
        g_rows = gt_ptr + tl.cast(b, tl.int64) * stride_gb + rm[:, None] * stride_gi
        a_rows = at_ptr + tl.cast(b, tl.int64) * stride_ab + rn[:, None] * stride_aj
        tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for t0 in range(0, T, BLOCK_K):
            rt = t0 + rk
            mask_t = rt < T
            x = tl.load(g_rows + rt[None, :] * stride_gt, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
            y = tl.load(a_rows + rt[None, :] * stride_at, mask=mask_n[:, None] & mask_t[None, :], other=0.0)
            if INPUT_PRECISION == "tf32" and ROUND_OPERANDS:
                x, y = round_to_tf32(x), round_to_tf32(y)
            tile = tl.dot(x, tl.trans(y), tile, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        squares += tile * tile
    out_tile = out_ptr + tl.cast(pid_split, tl.int64) * d_out * d_in + rm[:, None] * d_in + rn[None, :]
    tl.store(out_tile, squares, mask=mask_m[:, None] & mask_n[None, :])


def example_ranges(batch: int, d_out: int, d_in: int, tile_elements: int, device: torch.device) -> tuple[int, int]:
    """(number of example ranges, examples per range) so that ranges x output tiles gives about two
    programs per multiprocessor; the output tiles are counted at ``tile_elements`` per tile."""
    tiles = max(1, triton.cdiv(d_out * d_in, tile_elements))
    wanted = triton.cdiv(2 * _launch.parallel_units(device), tiles)
    per_range = triton.cdiv(batch, min(max(wanted, 1), batch))
    return triton.cdiv(batch, per_range), per_range


def contract_example_tiles(gt: torch.Tensor, at: torch.Tensor, config: triton.Config | None = None,
                           operands_rounded: bool = False) -> torch.Tensor:
    """Runs the tile kernel on token-major operands and reduces its partial results:
    ``sum_b (gt_b at_b^T) ** 2`` (elementwise square).

    Args:
        gt: (B, d_out, T) left operand (tokens along the last axis, unit stride preferred).
        at: (B, d_in, T) right operand, same dtype and device.
        config: run this configuration instead of the autotuner's choice (tests and benchmarks).
        operands_rounded: ``gt`` and ``at`` already hold TF32 values (:func:`round_to_tf32_`), so TF32
            products skip the kernel's own rounding; ignored outside TF32.
    Returns:
        (d_out, d_in) in float32, or float64 for float64 operands.
    """
    batch, d_out, tokens = gt.shape
    d_in = at.shape[1]
    acc = accumulator_dtype(gt.dtype)
    if batch == 0 or tokens == 0:
        return torch.zeros((d_out, d_in), dtype=acc, device=gt.device)
    ranges, per_range = example_ranges(batch, d_out, d_in, _LARGEST_TILE, gt.device)
    out = torch.empty((ranges, d_out, d_in), dtype=acc, device=gt.device)
    kernel, forced = (_example_tiles_kernel, {}) if config is None else (_example_tiles_kernel.fn, config.all_kwargs())

    def grid(meta):
        return ranges, triton.cdiv(d_out, meta["BLOCK_M"]), triton.cdiv(d_in, meta["BLOCK_N"])

    with torch.cuda.device(gt.device) if gt.is_cuda else contextlib.nullcontext():
        kernel[grid](
            gt, at, out,
            batch, tokens, d_out, d_in, per_range,
            gt.stride(0), gt.stride(1), gt.stride(2),
            at.stride(0), at.stride(1), at.stride(2),
            INPUT_PRECISION=_launch.input_precision(gt.dtype), ACC_DTYPE=_launch.tl_dtype(acc),
            ROUND_OPERANDS=not operands_rounded, **forced,
        )
    return out.sum(dim=0) if out.shape[0] > 1 else out[0]


def _check(a, g, q_a, q_s) -> torch.dtype:
    """Validates the operands (ValueError naming the problem, also for a dtype the kernel does not take);
    returns the operand dtype."""
    check_bases(a, g, q_a, q_s)
    check_floating(a=a, g=g, q_a=q_a, q_s=q_s)
    return operand_dtype(a, g, q_a, q_s)


def project_tokens(basis: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Q^T x_b^T`` for every example: (B, d, T) in ``dtype`` with unit-stride tokens, from a basis Q (d, d)
    and tokens x (B, T, d), as one batched product ``torch.matmul(Q^T, x^T)`` (the basis broadcast; the
    single-GEMM form measured no faster, benchmarks/RESULTS.md, decisions). Autocast is off: the operand
    dtype, not an enclosing autocast region, sets the precision."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(basis.to(dtype).T, x.to(dtype).transpose(1, 2))


def _squares(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    dtype = _check(a, g, q_a, q_s)
    _launch.check_device(a=a, g=g, q_a=q_a, q_s=q_s)
    gt, at = project_tokens(q_s, g, dtype), project_tokens(q_a, a, dtype)
    rounded = uses_tf32(dtype)
    if rounded:
        round_to_tf32_(gt)
        round_to_tf32_(at)
    return contract_example_tiles(gt, at, operands_rounded=rounded)


@torch.library.custom_op("trustrepair::projected_gradient_squares", mutates_args=())
def _squares_op(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    return _squares(a, g, q_a, q_s)


@_squares_op.register_fake
def _squares_fake(a, g, q_a, q_s):
    dtype = _check(a, g, q_a, q_s)
    return a.new_empty((g.shape[2], a.shape[2]), dtype=accumulator_dtype(dtype))


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
        traces under ``torch.compile``. Takes every dtype of
        :data:`trustrepair.engine.ops.checks.FLOAT_DTYPES` (ValueError for others); the library routes
        only tensor-core dtypes here (:mod:`trustrepair.engine.ops.routing`).
    """
    return _squares_op(a, g, q_a, q_s)
