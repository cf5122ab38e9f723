"""Running a model's frozen prefix once per fit: the blocks before the first analysed one (prefix replay).

When every analysed layer lies in blocks b, b + 1, ... of a model's block list (the outermost
``nn.ModuleList`` holding an analysed layer, e.g. ``model.layers`` of a Hugging Face decoder) with b > 0,
blocks 0 .. b - 1 compute the same output in both passes of an EK-FAC fit: their weights are frozen, the
model is in eval mode and the batches are the same. The covariance pass records the output of block
b - 1 for every batch; the eigenvalue-correction pass then replaces the forward of blocks 0 .. b - 1 by
a lookup of that output, so only the embeddings (a gather), blocks b .. and the head run. The result is
that of running the whole model, bit for bit as far as the recorded output equals a recomputed one (it
is the same computation on the same inputs).

Unlike the application's hidden-state cache (:mod:`trustrepair.app.prefix_cache`), nothing here depends
on the architecture's forward: the model's own forward runs, with absolute position embeddings, masks
and rotary embeddings computed as usual, and the skipped blocks return what block b - 1 returned (the
loop hands it on to block b). It needs only that, in every forward, the prefix blocks are called once
each in index order, that no analysed layer runs before block b - 1 has returned, and that block b - 1's
output alone carries the prefix's result on (no side channel between blocks; Hugging Face decoders
satisfy this). The covariance pass checks the first two conditions on every batch (a task that runs the
model twice per batch, or a block called twice, fails them) and gives up on replaying when either fails,
or when the recorded outputs would exceed the memory budget; the second pass then runs the whole model.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from trustrepair.engine.layers import TrackedLayer


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _leading_shape(value: Any) -> tuple | None:
    """The (batch, tokens) of the first tensor in ``value``."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[:2])
    if isinstance(value, (tuple, list)):
        for v in value:
            shape = _leading_shape(v)
            if shape is not None:
                return shape
    return None


def prefix_blocks(model: nn.Module, layers: list[TrackedLayer]) -> list[nn.Module]:
    """Blocks 0 .. b - 1 of the outermost ``nn.ModuleList`` of ``model`` that holds an analysed layer, b the
    first block holding one; empty when there is no such list, b = 0, or an analysed layer lies in a block
    list other than that one."""
    lists = sorted(((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name),
                   key=lambda item: item[0].count("."))
    for name, blocks in lists:
        indices = [int(l.name[len(name) + 1:].split(".")[0]) for l in layers
                   if l.name.startswith(name + ".") and l.name[len(name) + 1:].split(".")[0].isdigit()]
        if indices:
            return list(blocks)[:min(indices)]
    return []


def memory_budget(device: torch.device) -> int:
    """A quarter of the memory free on ``device`` now (the host's available memory for a CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


class PrefixReplay:
    """Records the output of the last prefix block per batch (:meth:`recording`) and replays it
    (:meth:`replaying`); see the module docstring.

    Args:
        model: the model of the fit.
        layers: its analysed layers.
        budget_bytes: the most the recorded outputs may occupy; ``None`` for :func:`memory_budget`.
    """

    def __init__(self, model: nn.Module, layers: list[TrackedLayer], budget_bytes: int | None = None):
        self.blocks = prefix_blocks(model, layers)
        self.layers = layers
        self.budget = memory_budget(layers[0].module.weight.device) if budget_bytes is None else budget_bytes
        self.outputs: list[Any] = []
        self.usable = bool(self.blocks)
        self.reason = "" if self.usable else "no block before the first analysed one"
        self._bytes = 0

    def _give_up(self, reason: str) -> None:
        self.usable, self.reason, self.outputs = False, reason, []

    # -- the first pass ----------------------------------------------------------------------------------

    def recording(self) -> "_Recording":
        """Context for the covariance pass; call its ``batch()`` around each batch's forward."""
        return _Recording(self)

    # -- the second pass ---------------------------------------------------------------------------------

    def replaying(self) -> "_Replaying":
        """Context for the eigenvalue-correction pass (a no-op when nothing usable was recorded): every
        forward of the model inside it takes the next recorded output instead of running the prefix."""
        return _Replaying(self)


class _Recording:
    def __init__(self, replay: PrefixReplay):
        self.replay = replay
        self.handles: list = []

    def __enter__(self) -> "_Recording":
        r = self.replay
        if not r.usable:
            return self
        self.calls: list[int] = []
        self.early = False
        for index, block in enumerate(r.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=index: self.calls.append(i)))
        self.handles.append(r.blocks[-1].register_forward_hook(self._keep))
        for layer in r.layers:
            self.handles.append(layer.module.register_forward_pre_hook(self._analysed))
        return self

    def _keep(self, module, args, output):
        self.output = _detached(output)

    def _analysed(self, module, args):
        if len(self.calls) != len(self.replay.blocks):
            self.early = True

    def batch(self):
        """Context around one batch's forward + backward."""
        return _Batch(self)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Batch:
    def __init__(self, recording: _Recording):
        self.recording = recording

    def __enter__(self):
        rec = self.recording
        rec.calls, rec.early, rec.output = [], False, None
        return self

    def __exit__(self, exc_type, *exc) -> None:
        rec, r = self.recording, self.recording.replay
        if exc_type is not None or not r.usable:
            return
        if rec.calls != list(range(len(r.blocks))):
            r._give_up("the prefix blocks did not run once each in order in one forward")
        elif rec.early:
            r._give_up("an analysed layer ran before the last prefix block")
        else:
            r._bytes += _nbytes(rec.output)
            if r._bytes > r.budget:
                r._give_up(f"the recorded prefix outputs would exceed {r.budget} bytes")
            else:
                r.outputs.append(rec.output)
        rec.output = None


class _Replaying:
    def __init__(self, replay: PrefixReplay):
        self.replay = replay

    def __enter__(self) -> "_Replaying":
        r = self.replay
        self.active = r.usable and bool(r.outputs)
        if self.active:
            self.next = 0
            self.current = None
            def stub(block_index):
                def forward(*args, **kwargs):
                    if block_index == 0:
                        if self.next >= len(r.outputs):
                            raise RuntimeError("prefix replay: more forward passes than recorded batches")
                        self.current = r.outputs[self.next]
                        self.next += 1
                        given = _leading_shape(args[0] if args else next(iter(kwargs.values()), None))
                        if given is not None and given != _leading_shape(self.current):
                            raise RuntimeError(f"prefix replay: batch {self.next - 1} has shape {given}, recorded "
                                               f"{_leading_shape(self.current)} (the passes' batches differ)")
                    return self.current
                return forward

            for index, block in enumerate(r.blocks):
                block.forward = stub(index)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            for block in self.replay.blocks:
                del block.forward
        self.replay.outputs = []
