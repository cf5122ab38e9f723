"""Row-aligned matrices for the GEMMs of EK-FAC: padded storage, unpadded views.

A layer with a bias is analysed as the folded matrix ``W [x; 1]``, so its activations and activation
eigenbasis have an odd width (769 and 3073 for Pythia-160M). Stored contiguously, such a matrix's rows
start at multiples of 769 elements: its leading dimension is not a multiple of 16 bytes, and
tensor-core GEMM libraries then cannot use their vectorised / TMA loads for it (cuBLAS documents 16-byte
alignment as a condition of its fastest kernels; a slow fallback for odd bf16 dimensions is reported in
pytorch/pytorch#146817). Here such matrices live in storage whose rows are padded to
:data:`ROW_ALIGNMENT` elements and are handed out as views of their true width, so every consumer sees
the same shapes and values while the products read aligned rows. The padding elements are never read.

Aligned rows are not enough on a GPU: cuBLAS runs products on an odd width several times slower than on
the even width below it, however the rows are stored, so it picks slower kernels for the dimension
itself (benchmarks/RESULTS.md, decisions). Where the ``pad_widths`` setting is on for a device type
(:mod:`trustrepair.engine.tunables`; CUDA by default) the fit's products and the scoring pass's slabs run
on :func:`zero_padded` operands, whose odd dimensions are widened with zeros to :func:`padded_width`: the
zero rows and columns add nothing to the sums they enter and the result is read back at the true width.
"""
from __future__ import annotations

import torch

from trustrepair.engine.tunables import current

ROW_ALIGNMENT = 8
"""Elements a row start is a multiple of: 16 bytes for 16-bit dtypes, 32 for float32, 64 for float64."""


def pads_widths(device: torch.device) -> bool:
    """The ``pad_widths`` setting for ``device``'s type (False for types it does not name): whether the
    fit's Gram and projection products and the scoring pass's per-example slabs
    (:func:`trustrepair.engine.ops.ghost_dots.ghost_dots`) run on :func:`zero_padded` operands."""
    return current().pad_widths.get(device.type, False)


def padded_width(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`ROW_ALIGNMENT`."""
    return -(-width // ROW_ALIGNMENT) * ROW_ALIGNMENT


def empty_aligned(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose last-dimension rows start at multiples of
    :data:`ROW_ALIGNMENT` elements: a view of the first ``shape[-1]`` columns of a padded buffer."""
    buffer = torch.empty(*shape[:-1], padded_width(shape[-1]), dtype=dtype, device=device)
    return buffer[..., : shape[-1]]


def is_aligned(x: torch.Tensor) -> bool:
    """True when ``x`` (at least 2-D) starts a multiple of :data:`ROW_ALIGNMENT` elements into its storage
    (PyTorch's allocations themselves are aligned to 64 bytes or more), its last dimension is unit-stride
    and every other stride of a dimension longer than one is a multiple of :data:`ROW_ALIGNMENT`."""
    return (x.storage_offset() % ROW_ALIGNMENT == 0 and x.stride(-1) == 1
            and all(s % ROW_ALIGNMENT == 0 for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1))


def aligned(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` converted to ``dtype`` (default: its own) with aligned rows: ``x`` itself when it already
    has that dtype and :func:`is_aligned` holds, otherwise one copy into :func:`empty_aligned` storage
    (which also performs the conversion, so an aligned conversion costs what ``x.to(dtype)`` does).
    While ``torch.compile`` traces, it is ``x.to(dtype)``: layouts are then the compiler's to choose (and
    a storage offset cannot be traced)."""
    dtype = x.dtype if dtype is None else dtype
    if torch.compiler.is_compiling():
        return x.to(dtype)
    if x.dtype == dtype and is_aligned(x):
        return x
    out = empty_aligned(*x.shape, dtype=dtype, device=x.device)
    out.copy_(x)
    return out


def zero_padded(x: torch.Tensor, dtype: torch.dtype | None = None, dims: int = 1) -> torch.Tensor:
    """``x`` converted to ``dtype`` (default: its own) with each of its last ``dims`` dimensions widened to
    :func:`padded_width` by zeros: the true values in the leading block, zeros after them; aligned rows.
    When every such dimension is already a multiple of :data:`ROW_ALIGNMENT` this is :func:`aligned`
    (no copy where none is needed); otherwise one copy of ``x`` plus the zeros of the new entries."""
    dtype = x.dtype if dtype is None else dtype
    sizes = x.shape[x.dim() - dims:]
    if all(n == padded_width(n) for n in sizes):
        return aligned(x, dtype)
    out = torch.empty(*x.shape[:x.dim() - dims], *(padded_width(n) for n in sizes), dtype=dtype, device=x.device)
    lead = (slice(None),) * (x.dim() - dims)
    out[lead + tuple(slice(0, n) for n in sizes)].copy_(x)
    for k, n in enumerate(sizes):
        if n != padded_width(n):
            out[lead + (slice(None),) * k + (slice(n, None),)].zero_()
    return out
