"""How the references split their work: chunks of examples, and cache-sized slabs on a CPU.

Every reference processes the batch in chunks of examples whose intermediates hold at most
:attr:`~trustrepair.engine.tunables.Tunables.chunk_elements` elements. On a CPU they also walk per-example
matrices in cache-sized slabs of rows (``slab_elements``, ``tile_elements``); on a GPU they issue one
batched product per chunk instead, so there they are the cuBLAS path.
"""
from __future__ import annotations

import torch

from trustrepair.engine.tunables import current


def cache_blocked(device: torch.device) -> bool:
    """True on a CPU, where the references walk per-example matrices in cache-sized slabs; False on a GPU,
    where such slabs would be launch-bound small products and one batched product per chunk of examples
    keeps cuBLAS busy instead (benchmarks/RESULTS.md, decisions)."""
    return device.type == "cpu"


def row_chunks(batch: int, elements_per_row: int) -> list[slice]:
    """Slices of the batch whose rows hold at most ``chunk_elements`` intermediate elements (at least one
    row per slice)."""
    step = max(1, current().chunk_elements // max(1, elements_per_row))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]
