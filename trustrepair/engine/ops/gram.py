"""Covariance updates over half the products: the upper block triangle of ``x^T x``, then its symmetric
completion. The reference of :func:`add_gram_upper_` is ``out.addmm_(x.T, x)``."""
from __future__ import annotations

import torch

from trustrepair.engine.tunables import current


def add_gram_upper_(out: torch.Tensor, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """In place, the upper block triangle of ``out += x^T x`` (a covariance update over token rows).

    Block row i gets ``x[:, i]^T x[:, i:]``, one wide product per block, so about half the multiply-adds
    of the full product (rows x d (d + block) / 2 instead of rows x d^2); entries strictly below the
    diagonal blocks are not touched. Every entry (i, j) with j >= i is exact, so
    :func:`symmetric_from_upper` recovers the full symmetric sum.

    Args:
        out: (d, d) accumulator, same dtype as ``x``.
        x: (rows, d) token rows (masked rows zero).
        block: block width (default: the ``gram_block`` setting of ``x``'s device type, see
            :mod:`trustrepair.engine.tunables`; None there means one block, the full product).
    Returns:
        ``out``.
    """
    if x.dim() != 2 or tuple(out.shape) != (x.shape[1], x.shape[1]):
        raise ValueError(f"add_gram_upper_ needs out (d, d) and x (rows, d); got {tuple(out.shape)} and {tuple(x.shape)}")
    width = x.shape[1]
    if block is None:
        blocks = current().gram_block
        block = blocks.get(x.device.type, blocks["cpu"])
        block = max(width, 1) if block is None else block
    if block < 1:
        raise ValueError(f"add_gram_upper_ needs a block width >= 1; got {block}")
    for start in range(0, width, block):
        stop = min(start + block, width)
        out[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
    return out


def symmetric_from_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``m``."""
    return torch.triu(m) + torch.triu(m, diagonal=1).T
