"""What every launcher of ``trustrepair.kernels`` checks and decides before a kernel runs.

* Where: CUDA tensors, or CPU tensors when the kernels were defined under the Triton interpreter
  (``TRITON_INTERPRET=1`` in the environment before this package was imported; the tests do that).
* In what precision: the operands of a kernel's matrix products share one dtype, the promotion of the
  activations' and gradients' dtypes (float32, bfloat16 or float16), or float64 when any operand is
  float64 (as in :func:`trustrepair.engine.contractions.compute_dtype`). Products accumulate in float32, or in
  float64 for float64 operands, and results are returned in that accumulator dtype.
* TF32: a float32 product uses TF32 tensor cores exactly when PyTorch's own float32 matmuls do
  (``torch.get_float32_matmul_precision() != "highest"``). The kernels then round both operands of
  every ``tl.dot`` to the nearest TF32 value (:func:`round_to_tf32`) before the product, as cuBLAS does:
  fed raw float32, the tensor cores drop the 13 low mantissa bits (truncation, Triton's ``tl.dot``
  documentation), which shrinks every product towards zero. Measured on an H100 (Triton 3.6) before the
  rounding was added, that bias made the kernels' largest TF32 errors 2.4-4.4x those of PyTorch on the
  same inputs (1.3-1.8e-3 relative at the worst entries, each one towards zero). With the rounding, a
  kernel and PyTorch multiply the same TF32 operands and differ only in the order of their float32 sums.
* float64 on CUDA is not a speed path, only a correctness tool: :func:`runs_reference` sends it to the
  PyTorch reference, so float64 results on a GPU never depend on how a Triton version lowers a float64
  ``tl.dot`` (tensor-core DMMA or FMA) and no GPU time goes to autotuning float64 kernels. The kernels
  themselves are float64-clean (``tl.dot(..., out_dtype=ACC_DTYPE)``; Triton 3.6 refuses a float64
  accumulator without it) and do run in float64 in the interpreter, which lets the CPU tests check their
  indexing and masking to rounding (1e-11) rather than to float32 tolerances.
* Exact float32 on CUDA (``torch.get_float32_matmul_precision() == "highest"``) runs the reference too:
  without tensor cores the kernels' FMA loops lost to cuBLAS's float32 GEMMs on the first H100 run
  (eigenvalue correction 0.77-0.97x including its projections, its tile kernel alone 0.43-0.49x, ghost
  dot products 0.14-0.26x). The kernels keep an exact-float32 mode (``input_precision`` "ieee"), which
  the interpreter runs, :func:`trustrepair.kernels.projected_gradients.contract_example_tiles` runs when
  called directly, and the launchers run on CUDA with :data:`EXACT_FLOAT32_USES_REFERENCE` off (the GPU
  tests do that, so the compiled exact-float32 kernels stay tested).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs kernels in its CPU interpreter; read once, when the kernels are defined."""

OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

EXACT_FLOAT32_USES_REFERENCE = True
"""Exact float32 operands on CUDA go to the PyTorch reference (see the module docstring); False runs the
kernels' exact-float32 mode instead."""


def check_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors`` (keyword names appear in the errors); raises ValueError when they
    differ, when the device cannot run Triton kernels, or for bfloat16 in the interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all operands must be on one device; got {listing}")
    if first.type == "cuda":
        return first
    if first.type == "cpu" and INTERPRET:
        if any(t.dtype == torch.bfloat16 for t in tensors.values()):
            raise ValueError("Triton's interpreter does not compute bfloat16 correctly; pass float32 or float64 "
                             "CPU tensors (bfloat16 kernels need a CUDA device)")
        return first
    hint = ("run them through trustrepair.engine.contractions, whose PyTorch path serves CPU tensors, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter")
    raise ValueError(f"Triton kernels need CUDA tensors; got tensors on {first}: {hint}")


def check_floating(**tensors: torch.Tensor) -> None:
    """Raises ValueError naming any tensor whose dtype is not one the kernels compute with."""
    for name, t in tensors.items():
        if t.dtype not in OPERAND_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the kernels take float32, bfloat16, float16 or float64")


def operand_dtype(a: torch.Tensor, g: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """dtype of the matrix-product operands: float64 if any tensor is float64, else promote(a, g)."""
    if any(t.dtype == torch.float64 for t in (a, g, *others)):
        return torch.float64
    return torch.promote_types(a.dtype, g.dtype)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 operands, float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """Triton's name of an accumulator dtype (a kernel constexpr)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def runs_reference(dtype: torch.dtype, device: torch.device) -> bool:
    """True on a CUDA device for float64 operands and for exact float32 ones (no TF32): the launcher
    returns the PyTorch reference instead of running its kernel (see the module docstring). False
    everywhere else, the interpreter included."""
    if device.type != "cuda":
        return False
    exact_float32 = dtype == torch.float32 and input_precision(dtype) == "ieee"
    return dtype == torch.float64 or (exact_float32 and EXACT_FLOAT32_USES_REFERENCE)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "tf32" for float32 operands when PyTorch allows TF32 matmuls (the
    kernels then round their operands with :func:`round_to_tf32`), else "ieee" (exact float32 / float64
    products; ignored for 16-bit operands)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


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
