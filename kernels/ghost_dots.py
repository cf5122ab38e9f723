"""Ghost dot products: per-example inner products of a layer's gradient with K matrices, on Triton.

``scores[b, k] = sum_t g_bt^T U_k a_bt = <G_b, U_k>_F`` with ``G_b = g_b^T a_b`` (d_out, d_in), from the
output gradients ``g`` (B, T, d_out) (zero at masked tokens) and inputs ``a`` (B, T, d_in) that a layer's
hooks see inside one ordinary backward pass; ``U_k`` are, e.g., the preconditioned gradients of K trust
aspects, so one pass scores a whole training batch for every aspect.

Two kernels:

* full matrices ``u`` (K, d_out, d_in): the scores mode of the per-example tile kernel of
  :mod:`trustrepair.kernels.projected_gradients` with identity bases. Each program builds a tile of G_b
  over the tokens in registers (tensor cores) and dots it with the K matrices' tiles:
  ``T d_out d_in + K d_out d_in`` multiply-adds per example instead of the per-token order's
  ``K T d_out d_in``, and no G_b is written to memory.
* rank-r factors ``U_k = L_k R_k``: ``scores[b, k] = sum_t sum_s (g_b L_k)[t, s] (a_b R_k^T)[t, s]``.
  A program owns one example and a block of the K r factor columns; per token block it forms both
  (tokens x columns) products in registers and reduces their elementwise product over tokens:
  ``T K r (d_out + d_in)`` multiply-adds per example, neither product written to memory.

Precision and devices: see :mod:`trustrepair.kernels._launch` (TF32 operands rounded to nearest before
each product; float64 on CUDA runs the reference); outputs are float32 (float64 for float64 operands),
partial sums reduced in a fixed order (deterministic). References:
:func:`trustrepair.engine.contractions.ghost_dots_reference` and
:func:`trustrepair.engine.contractions.low_rank_ghost_dots` (whose own twin is the full reference).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from trustrepair.engine import contractions
from trustrepair.kernels import _launch
from trustrepair.kernels._launch import round_to_tf32
from trustrepair.kernels.projected_gradients import SCORES, contract_example_tiles


def _low_rank_configs() -> list[triton.Config]:
    if _launch.INTERPRET:  # one small configuration (no tuning runs): the interpreter runs programs in Python
        return [triton.Config({"BLOCK_T": 32, "BLOCK_C": 16, "BLOCK_K": 16})]
    # (BLOCK_T, BLOCK_C, BLOCK_K, num_warps, num_stages); none spills registers on sm_90 (Triton 3.6)
    # for TF32 or bfloat16 operands.
    shapes = [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 64, 8, 3)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_C": c, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for t, c, k, w, s in shapes]


@triton.jit
def _tokens_times_factor_rows(x_ptr, stride_t, stride_k, rt, mask_t, w_ptr, rc, mask_c, width,
                              INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_T, BLOCK_C) tile of x w^T: token rows ``rt`` of one example's x (T, width) times factor rows
    ``rc`` of the contiguous w (C, width), accumulated over ``width`` in blocks of BLOCK_K."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_K):
        rkk = k0 + rk
        mask_k = rkk < width
        x = tl.load(x_ptr + rt[:, None] * stride_t + rkk[None, :] * stride_k,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + rc[:, None] * width + rkk[None, :], mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        if INPUT_PRECISION == "tf32":
            x, w = round_to_tf32(x), round_to_tf32(w)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.autotune(configs=_low_rank_configs(), key=["d_out", "d_in", "C", "INPUT_PRECISION"])
@triton.jit(do_not_specialize=["C"])  # fewer recompilations
def _low_rank_kernel(
    g_ptr, a_ptr, lt_ptr, rt_ptr, out_ptr,
    T, d_out, d_in, C,
    stride_gb, stride_gt, stride_gi,
    stride_ab, stride_at, stride_aj,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (column blocks, examples): out[b, c] = sum_t (g_b lt^T)[t, c] (a_b rt^T)[t, c], with the K r
    factor columns as the rows of lt (C, d_out) and rt (C, d_in), contiguous (K-major tensor-core operands)."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    g_example = g_ptr + tl.cast(b, tl.int64) * stride_gb
    a_example = a_ptr + tl.cast(b, tl.int64) * stride_ab
    column_sums = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        mask_t = rt < T
        g_left = _tokens_times_factor_rows(g_example, stride_gt, stride_gi, rt, mask_t, lt_ptr, rc, mask_c, d_out,
                                           INPUT_PRECISION, ACC_DTYPE, BLOCK_T, BLOCK_C, BLOCK_K)
        a_right = _tokens_times_factor_rows(a_example, stride_at, stride_aj, rt, mask_t, rt_ptr, rc, mask_c, d_in,
                                            INPUT_PRECISION, ACC_DTYPE, BLOCK_T, BLOCK_C, BLOCK_K)
        column_sums += tl.sum(g_left * a_right, axis=0)
    tl.store(out_ptr + tl.cast(b, tl.int64) * C + rc, column_sums, mask=mask_c)


def _check_full(a, g, u) -> torch.dtype:
    contractions.check_token_operands(a, g)
    contractions.check_matrices(a, g, u, "u")
    _launch.check_floating(a=a, g=g, u=u)
    return _launch.operand_dtype(a, g, u)


def _check_low_rank(a, g, left, right) -> torch.dtype:
    contractions.check_low_rank_factors(a, g, left, right)
    _launch.check_floating(a=a, g=g, left=left, right=right)
    return _launch.operand_dtype(a, g, left, right)


def _ghost_dots(a, g, u) -> torch.Tensor:
    dtype = _check_full(a, g, u)
    device = _launch.check_device(a=a, g=g, u=u)
    if _launch.runs_reference(dtype, device):
        return contractions.ghost_dots_reference(a, g, u)
    gt = g.to(dtype).transpose(1, 2).contiguous()
    at = a.to(dtype).transpose(1, 2).contiguous()
    return contract_example_tiles(gt, at, SCORES, u)


def _low_rank_ghost_dots(a, g, left, right) -> torch.Tensor:
    dtype = _check_low_rank(a, g, left, right)
    device = _launch.check_device(a=a, g=g, left=left, right=right)
    if _launch.runs_reference(dtype, device):
        return contractions.low_rank_ghost_dots(a, g, left, right)
    batch, tokens, d_in = a.shape
    n_mats, d_out, rank = left.shape
    acc = _launch.accumulator_dtype(dtype)
    if batch == 0 or tokens == 0 or rank == 0:
        return torch.zeros(batch, n_mats, dtype=acc, device=a.device)
    a, g = a.to(dtype), g.to(dtype)
    columns = n_mats * rank
    lt = left.to(dtype).transpose(1, 2).reshape(columns, d_out).contiguous()
    rt = right.to(dtype).reshape(columns, d_in).contiguous()
    out = torch.empty(batch, columns, dtype=acc, device=a.device)

    def grid(meta):
        return triton.cdiv(columns, meta["BLOCK_C"]), batch

    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        _low_rank_kernel[grid](
            g, a, lt, rt, out, tokens, d_out, d_in, columns,
            g.stride(0), g.stride(1), g.stride(2),
            a.stride(0), a.stride(1), a.stride(2),
            INPUT_PRECISION=_launch.input_precision(dtype), ACC_DTYPE=_launch.tl_dtype(acc),
        )
    return out.view(batch, n_mats, rank).sum(dim=2)


@torch.library.custom_op("trustrepair::ghost_dots", mutates_args=())
def _ghost_dots_op(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _ghost_dots(a, g, u)


@_ghost_dots_op.register_fake
def _ghost_dots_fake(a, g, u):
    dtype = _check_full(a, g, u)
    return a.new_empty((a.shape[0], u.shape[0]), dtype=_launch.accumulator_dtype(dtype))


@torch.library.custom_op("trustrepair::low_rank_ghost_dots", mutates_args=())
def _low_rank_op(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return _low_rank_ghost_dots(a, g, left, right)


@_low_rank_op.register_fake
def _low_rank_fake(a, g, left, right):
    dtype = _check_low_rank(a, g, left, right)
    return a.new_empty((a.shape[0], left.shape[0]), dtype=_launch.accumulator_dtype(dtype))


def ghost_dots_triton(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``scores[b, k] = sum_t g_bt^T U_k a_bt`` for every example b and matrix k, on Triton.

    Args:
        a: (B, T, d_in) layer inputs, zero at masked tokens.
        g: (B, T, d_out) output gradients, zero at masked tokens.
        u: (K, d_out, d_in) matrices in the layer's own basis (read in the accumulator dtype).
    Returns:
        (B, K), float32 (float64 for float64 operands). Custom op ``trustrepair::ghost_dots``; twin of
        :func:`trustrepair.engine.contractions.ghost_dots_reference`.
    """
    return _ghost_dots_op(a, g, u)


def low_rank_ghost_dots_triton(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor,
                               right: torch.Tensor) -> torch.Tensor:
    """Ghost dot products with rank-r matrices ``U_k = L_k R_k``, fused, on Triton.

    ``scores[b, k] = sum_t (g_bt^T L_k) . (R_k a_bt)``.

    Args:
        a: (B, T, d_in) layer inputs, zero at masked tokens.
        g: (B, T, d_out) output gradients, zero at masked tokens.
        left: (K, d_out, r) and right: (K, r, d_in) factors (cast to the operand dtype).
    Returns:
        (B, K), float32 (float64 for float64 operands). Custom op ``trustrepair::low_rank_ghost_dots``;
        twin of :func:`trustrepair.engine.contractions.low_rank_ghost_dots`, and equal to
        ``ghost_dots_reference(a, g, left @ right)``.
    """
    return _low_rank_op(a, g, left, right)
