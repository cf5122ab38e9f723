"""What every launcher of ``trustrepair.kernels`` checks and decides before a kernel runs.

* Where: CUDA tensors, or CPU tensors when the kernels were defined under the Triton interpreter
  (``TRITON_INTERPRET=1`` in the environment before this package was imported; the tests do that).
* In what precision: the operands of a kernel's matrix products share one dtype, the promotion of the
  activations' and gradients' dtypes (float32, bfloat16 or float16), or float64 when any operand is
  float64 (as in :func:`trustrepair.contractions.compute_dtype`). Products accumulate in float32, or in
  float64 for float64 operands, and results are returned in that accumulator dtype. A float32 product
  uses TF32 tensor cores exactly when PyTorch's own float32 matmuls do
  (``torch.get_float32_matmul_precision() != "highest"``), so a kernel and the PyTorch path it replaces
  round the same way.
"""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs kernels in its CPU interpreter; read once, when the kernels are defined."""

OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    hint = ("run them through trustrepair.contractions, whose PyTorch path serves CPU tensors, or set "
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


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "tf32" for float32 operands when PyTorch allows TF32 matmuls, else
    "ieee" (exact float32 / float64 products; ignored for 16-bit operands)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 in the interpreter, so tests exercise splitting."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2
