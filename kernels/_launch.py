"""What every launcher of ``trustrepair.kernels`` checks and decides before a kernel runs.

* Where: CUDA tensors, or CPU tensors when the kernels were defined under the Triton interpreter
  (``TRITON_INTERPRET=1`` in the environment before this package was imported; the tests do that).
* What: the shapes and dtypes of :mod:`trustrepair.engine.ops.checks` (the checks the references apply
  too); a dtype outside float32, bfloat16, float16 and float64 is refused with ValueError.
* In what precision: the operands of a kernel's matrix products share one dtype, the promotion of the
  activations' and gradients' dtypes (float32, bfloat16 or float16), or float64 when any operand is
  float64 (:func:`trustrepair.engine.ops.checks.operand_dtype`). Products accumulate in float32, or in
  float64 for float64 operands, and results are returned in that accumulator dtype.
* TF32: a float32 product uses TF32 tensor cores exactly when PyTorch's own float32 matmuls do
  (``torch.get_float32_matmul_precision() != "highest"``). The kernels then round both operands of
  every ``tl.dot`` to the nearest TF32 value (:func:`round_to_tf32`) before the product, as cuBLAS does:
  fed raw float32, the tensor cores drop the 13 low mantissa bits (truncation, Triton's ``tl.dot``
  documentation), which shrinks every product towards zero and made the kernels' TF32 errors several
  times PyTorch's (benchmarks/RESULTS.md, decisions). With the rounding, a kernel and PyTorch multiply
  the same TF32 operands and differ only in the order of their float32 sums.
* float64 and exact float32 (no TF32) are computed by the kernels when they are called (``tl.dot(...,
  out_dtype=ACC_DTYPE)``; Triton refuses a float64 accumulator without it), which lets the interpreter
  tests check indexing and masking to rounding (1e-11) rather than to float32 tolerances. The library
  does not route them here on a GPU (:mod:`trustrepair.engine.ops.routing`): cuBLAS serves them.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from trustrepair.engine.ops.checks import check_one_device, uses_tf32

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs kernels in its CPU interpreter; read once, when the kernels are defined."""


def check_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors`` (keyword names appear in the errors); raises ValueError when they
    differ, when the device cannot run Triton kernels, or for bfloat16 in the interpreter."""
    device = check_one_device(**tensors)
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRET:
        if any(t.dtype == torch.bfloat16 for t in tensors.values()):
            raise ValueError("Triton's interpreter does not compute bfloat16 correctly; pass float32 or float64 "
                             "CPU tensors (bfloat16 kernels need a CUDA device)")
        return device
    hint = ("run them through trustrepair.engine.ops, whose PyTorch path serves CPU tensors, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter")
    raise ValueError(f"Triton kernels need CUDA tensors; got tensors on {device}: {hint}")


def tl_dtype(dtype: torch.dtype):
    """Triton's name of an accumulator dtype (a kernel constexpr)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "tf32" for float32 operands when PyTorch allows TF32 matmuls
    (:func:`trustrepair.engine.ops.checks.uses_tf32`; the kernels then round their operands with
    :func:`round_to_tf32`), else "ieee" (exact float32 / float64 products; ignored for 16-bit operands)."""
    return "tf32" if uses_tf32(dtype) else "ieee"


@triton.jit
def round_to_tf32(x):
    """float32 ``x`` rounded to the nearest TF32 value (10 mantissa bits; ties to even), still as float32:
    the 13 low bits of the IEEE pattern are rounded away. Infinities and NaNs pass unchanged; a finite
    value above the largest TF32 one rounds to infinity, as IEEE rounding does."""
    tl.static_assert(x.dtype == tl.float32, "round_to_tf32 takes float32 operands (TF32 applies to float32 only)")
    bits = x.to(tl.uint32, bitcast=True)
    # Adding 0xFFF plus the last kept bit carries into the kept bits exactly when the dropped ones exceed
    # half a TF32 unit, or equal it with an odd last kept bit (ties to even).
    rounded = (bits + (((bits >> 13) & 1) + 0xFFF)) & 0xFFFFE000
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)


_ROUND_BLOCK = 1024 if INTERPRET else 4096


@triton.jit
def _round_to_tf32_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(x_ptr + offsets, round_to_tf32(tl.load(x_ptr + offsets, mask=inside)), mask=inside)


def round_to_tf32_(x: torch.Tensor) -> torch.Tensor:
    """In place: every element of the float32 tensor ``x`` rounded to the nearest TF32 value
    (:func:`round_to_tf32`), one read and one write per element; returns ``x``. ``x`` must cover its memory
    densely in some order of its dimensions (contiguous, or a permutation of a contiguous tensor), which is
    then walked as one flat array. A kernel fed such values can skip its own rounding (its TF32 products then
    drop only zero bits). Twin: :func:`round_to_tf32_reference`."""
    dense = x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d))) if x.dim() else x
    if x.dtype != torch.float32 or not dense.is_contiguous():
        raise ValueError(f"round_to_tf32_ takes a float32 tensor that covers its memory densely (contiguous in "
                         f"some order of its dimensions); got {x.dtype}, shape {tuple(x.shape)}, strides {x.stride()}")
    check_device(x=x)
    if x.numel():
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _round_to_tf32_kernel[(triton.cdiv(x.numel(), _ROUND_BLOCK),)](x, x.numel(), BLOCK=_ROUND_BLOCK)
    return x


def round_to_tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest TF32 value (ties to even), by arithmetic in float64 rather than
    bit manipulation: x is a multiple of the TF32 spacing q = 2^(e - 11) after rounding, with 2^e > |x| >=
    2^(e - 1) from ``frexp``, and q at least 2^-136 (subnormals keep 10 stored bits, as in float32); the
    quotient x / q is exact and ``torch.round`` takes ties to even. Infinities and NaNs pass unchanged;
    values above the largest TF32 one become infinite in float32."""
    wide = x.double()
    _, exponent = torch.frexp(wide)
    spacing = torch.ldexp(torch.ones_like(wide), torch.clamp(exponent - 11, min=-136))
    return (torch.round(wide / spacing) * spacing).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 in the interpreter, so tests exercise splitting."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2
