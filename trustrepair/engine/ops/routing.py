"""The one rule that decides whether an operation runs its Triton kernel or its PyTorch reference.

An operation named in :data:`KERNELS` runs its kernel exactly when all of these hold:

* its operands live on a CUDA device (the references serve every other device);
* ``triton`` imports;
* the environment variable ``TRUSTREPAIR_DISABLE_TRITON`` is not ``"1"`` (read at every call);
* the operation is in :attr:`trustrepair.engine.tunables.Tunables.triton_ops`;
* the operands compute in a tensor-core precision: bfloat16, float16, or float32 with TF32 allowed
  (:func:`trustrepair.engine.ops.checks.uses_tf32`). float64 and exact float32 run the reference (cuBLAS):
  float64 on a GPU is a correctness tool whose results must not depend on how a Triton version lowers a
  float64 product, and without tensor cores the kernels' loops lose to cuBLAS (benchmarks/RESULTS.md,
  decisions). The kernels themselves still take those dtypes when called directly (their tests do).

This is also the only module of the engine that imports :mod:`trustrepair.kernels`, lazily, when a kernel
is about to run, so the library never needs triton otherwise.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from trustrepair.engine.ops.checks import operand_dtype, uses_tf32
from trustrepair.engine.tunables import current

KERNELS = {"projected_gradient_squares": ("trustrepair.kernels.projected_gradients", "projected_gradient_squares_triton")}
"""Operation name -> (module, function) of its Triton kernel: the names ``triton_ops`` may hold."""


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_enabled(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` may go to a Triton kernel at all: it lives on a CUDA device, ``triton`` imports,
    and ``TRUSTREPAIR_DISABLE_TRITON`` is not ``"1"``."""
    return tensor.is_cuda and os.environ.get("TRUSTREPAIR_DISABLE_TRITON") != "1" and triton_importable()


def tensor_core_dtype(dtype: torch.dtype) -> bool:
    """True for operand dtypes the kernels run on tensor cores: bfloat16, float16, and float32 under TF32."""
    return dtype in (torch.bfloat16, torch.float16) or uses_tf32(dtype)


def uses_triton(op: str, a: torch.Tensor, g: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when the operation ``op`` on activations ``a``, gradients ``g`` and further operands runs its
    Triton kernel (the rule of the module docstring)."""
    return (op in current().triton_ops and triton_enabled(a)
            and tensor_core_dtype(operand_dtype(a, g, *others)))


def kernel(op: str) -> Callable:
    """The Triton kernel of ``op`` (importing its module, and with it triton)."""
    module, name = KERNELS[op]
    return getattr(importlib.import_module(module), name)
