"""Shape, device and dtype checks of the gradient contractions, and the dtypes they compute in.

Written once, used by the pure-PyTorch references of :mod:`trustrepair.engine.ops` and by the Triton
launchers of :mod:`trustrepair.kernels` (the one module of the library those import). Every check raises
``ValueError`` with the shapes it expected and got. Imports only torch.

Operands: activations ``a`` (B, T, d_in) and output gradients ``g`` (B, T, d_out) of one layer, zero at
masked tokens; eigenbases ``q_a`` (d_in, d_in) and ``q_s`` (d_out, d_out); matrices (K, d_out, d_in);
low-rank factors left (K, d_out, r) and right (K, r, d_in).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes the contractions compute with."""


def check_token_operands(a: torch.Tensor, g: torch.Tensor) -> None:
    """Raises ValueError unless a is (B, T, d_in) and g (B, T, d_out) with the same B and T."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"activations and output gradients must be (B, T, d_in) and (B, T, d_out) with the same "
                         f"B and T; got {tuple(a.shape)} and {tuple(g.shape)}")


def check_bases(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> None:
    """Raises ValueError unless a, g are token operands and q_a (d_in, d_in), q_s (d_out, d_out) their bases."""
    check_token_operands(a, g)
    d_in, d_out = a.shape[2], g.shape[2]
    if tuple(q_a.shape) != (d_in, d_in) or tuple(q_s.shape) != (d_out, d_out):
        raise ValueError(f"q_a must be ({d_in}, {d_in}) and q_s ({d_out}, {d_out}) for activations {tuple(a.shape)} "
                         f"and gradients {tuple(g.shape)}; got {tuple(q_a.shape)} and {tuple(q_s.shape)}")


def check_matrices(a: torch.Tensor, g: torch.Tensor, mats: torch.Tensor, name: str) -> None:
    """Raises ValueError unless a, g are token operands and ``mats`` (named ``name`` in the message) is
    (K, d_out, d_in) for them."""
    check_token_operands(a, g)
    d_in, d_out = a.shape[2], g.shape[2]
    if mats.dim() != 3 or tuple(mats.shape[1:]) != (d_out, d_in):
        raise ValueError(f"{name} must be (K, {d_out}, {d_in}) = (K, d_out, d_in) for activations "
                         f"{tuple(a.shape)} and gradients {tuple(g.shape)}; got {tuple(mats.shape)}")


def check_low_rank_factors(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """Raises ValueError unless a, g are token operands and left (K, d_out, r), right (K, r, d_in) their
    low-rank factors."""
    check_token_operands(a, g)
    d_in, d_out = a.shape[2], g.shape[2]
    if (left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]
            or left.shape[1] != d_out or right.shape[2] != d_in):
        raise ValueError(f"low-rank factors must be left (K, {d_out}, r) and right (K, r, {d_in}) for activations "
                         f"{tuple(a.shape)} and gradients {tuple(g.shape)}; got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")


def check_floating(**tensors: torch.Tensor) -> None:
    """Raises ValueError naming any tensor (by its keyword) whose dtype is not in :data:`FLOAT_DTYPES`."""
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the contractions take float32, bfloat16, float16 or "
                             f"float64")


def check_one_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``; raises ValueError naming each tensor's device (by its keyword) when
    they differ."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all operands must be on one device; got {listing}")
    return first


def operand_dtype(a: torch.Tensor, g: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """dtype of a kernel's matrix-product operands: float64 when any tensor is float64, else the promotion
    of the activations' and gradients' dtypes (float32, bfloat16 or float16)."""
    if any(t.dtype == torch.float64 for t in (a, g, *others)):
        return torch.float64
    return torch.promote_types(a.dtype, g.dtype)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What products of ``dtype`` operands accumulate and return in: float64 for float64, float32 for every
    narrower float (bfloat16 and float16 are never summed in their own precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(a: torch.Tensor, g: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in: float64 when any operand is float64, float32 otherwise
    (bfloat16 / float16 are upcast before any product)."""
    return accumulator_dtype(operand_dtype(a, g, *others))


def uses_tf32(dtype: torch.dtype) -> bool:
    """True when float32 products of ``dtype`` operands run on TF32 tensor cores: the dtype is float32 and
    PyTorch allows TF32 matmuls (``torch.get_float32_matmul_precision() != "highest"``)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
