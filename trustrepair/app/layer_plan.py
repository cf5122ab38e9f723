"""Which linear layers a user's run analyses and repairs, and what fitting their factors will cost.

* :func:`choose_layers`: glob patterns over module names (``--layers``), the layers of the last N blocks
  (``--last-blocks``), or by default every supported layer inside the transformer blocks.
* :func:`plan`: the factor memory and an estimated time, printed before the fit, and refused (with the
  option that narrows it) when the factors would not fit in the free memory of the model's device.

Memory of one layer with folded width d_in' (= d_in + 1 with a bias) and d_out, in the factors' dtype of
b bytes: the covariances A (d_in'^2) and S (d_out^2), their eigenbases (the same again) and the corrected
eigenvalues Lambda (d_out d_in'), so b (2 d_in'^2 + 2 d_out^2 + d_out d_in'), plus the float64
eigendecomposition workspace of the widest factor, 3 x 8 x max(d_in', d_out)^2 (input, eigenvectors and
LAPACK's workspace), which is live for one factor at a time.

Time: a fit is two passes (covariances, then Lambda) and scoring one more over the training tokens, each
a forward and backward pass of about 6 P FLOPs per token for the P parameters that run (every
parameter from the first analysed block on, the LM head included); the estimate divides that by the
device's float32 matmul rate, measured here on a 1024 x 1024 product. It is a lower bound: attention,
the per-example contractions and the eigendecompositions come on top.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from trustrepair.app.models import block_layer_names, transformer_blocks
from trustrepair.engine.layers import TrackedLayer, is_supported_layer

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.8
"""Share of the free memory the factors may take (the passes need activations and gradients too)."""


def supported_layers(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / GPT-2 ``Conv1D`` in ``model``, in module order."""
    return [name for name, module in model.named_modules() if is_supported_layer(module)]


def choose_layers(model: nn.Module, patterns: Sequence[str] = (), last_blocks: int | None = None) -> list[str]:
    """The analysed layers' names, in module order.

    Args:
        patterns: ``fnmatch`` globs over module names (``"model.layers.2?.mlp.*"``); a layer is analysed
            when any pattern matches it. Empty: see ``last_blocks``.
        last_blocks: the layers inside the last N transformer blocks; None with no patterns: every
            supported layer inside the blocks.
    Raises:
        ValueError: a pattern that matches no supported layer (naming some that exist), or a
            ``last_blocks`` beyond the model's depth.
    """
    if not patterns:
        return block_layer_names(model, last_blocks)
    names = supported_layers(model)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"--layers pattern {pattern!r} matches no linear layer of this model; its linear "
                             f"layers are named like {shown}")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def first_analysed_block(model: nn.Module, names: Sequence[str]) -> int | None:
    """Index of the first transformer block holding an analysed layer; None when a layer lies outside the
    blocks (or the model has no block list), so the whole model must run."""
    try:
        blocks = transformer_blocks(model)
    except ValueError:
        return None
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    modules = dict(model.named_modules())
    found = [owner.get(id(modules[name])) for name in names]
    return None if any(i is None for i in found) else min(found)


@dataclass
class FitPlan:
    """What the fit of ``layers`` will need: bytes of factors, bytes free, the estimate in seconds."""

    layers: list[TrackedLayer]
    factor_bytes: int
    free_bytes: int | None
    seconds: float
    matmul_flops: float

    def describe(self) -> str:
        widths = ", ".join(sorted({f"{l.d_out}x{l.folded_in}" for l in self.layers}))
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / 2**30:.1f} GiB free"
        return (f"{len(self.layers)} layers ({widths}); factors about {self.factor_bytes / 2**30:.2f} GiB "
                f"({free}); fit and scoring at least {_duration(self.seconds)} at the measured "
                f"{self.matmul_flops / 1e9:.0f} GFLOP/s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def factor_bytes(layers: Sequence[TrackedLayer], element_bytes: int) -> int:
    """Bytes of the fitted factors plus the float64 eigendecomposition workspace (module docstring)."""
    stored = sum(2 * l.folded_in ** 2 + 2 * l.d_out ** 2 + l.d_out * l.folded_in for l in layers)
    widest = max(max(l.folded_in, l.d_out) for l in layers)
    return stored * element_bytes + 3 * 8 * widest ** 2


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's ``mem_get_info``, or the host's ``MemAvailable``; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def matmul_rate(device: torch.device, size: int = 1024, repeats: int = 3) -> float:
    """Measured float32 FLOP/s of a (size x size) product on ``device`` (best of ``repeats``)."""
    a = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def plan(model: nn.Module, names: Sequence[str], run_params: int, train_tokens: int) -> FitPlan:
    """The :class:`FitPlan` of analysing ``names`` with ``run_params`` parameters running per token.

    Raises:
        ValueError: the factors would take more than :data:`MEMORY_HEADROOM` of the free memory, naming
            the options that narrow the layer set.
    """
    modules = dict(model.named_modules())
    layers = [TrackedLayer.of(name, modules[name]) for name in names]
    weight = layers[0].module.weight
    element = 8 if weight.dtype == torch.float64 else 4  # covariances accumulate in float32 at least
    need = factor_bytes(layers, element)
    free = free_memory_bytes(weight.device)
    if free is not None and need > MEMORY_HEADROOM * free:
        raise ValueError(f"the EK-FAC factors of the {len(layers)} chosen layers need about {need / 2**30:.1f} GiB, "
                         f"more than {MEMORY_HEADROOM:.0%} of the {free / 2**30:.1f} GiB free; analyse fewer layers "
                         "with --last-blocks N or --layers PATTERN (e.g. only the MLP projections)")
    rate = matmul_rate(weight.device)
    return FitPlan(layers, need, free, 3 * 6 * run_params * train_tokens / rate, rate)
