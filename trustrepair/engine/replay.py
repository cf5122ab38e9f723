"""Running a model's frozen prefix once: the blocks before the first analysed one, recorded per batch and
replayed in later passes over the same batches (prefix replay).

When every analysed layer lies in blocks b, b + 1, ... of a model's block list (the outermost
``nn.ModuleList`` holding an analysed layer, e.g. ``model.layers`` of a Hugging Face decoder) with b > 0,
blocks 0 .. b - 1 compute the same output in every pass over a batch as long as the weights outside
blocks b .. are unchanged: both passes of an EK-FAC fit, and the training-set pass of influence scoring
with the fitted model. A :class:`PrefixStore` keeps the output of block b - 1 per batch, keyed by a digest
of the batch's tensors (:func:`batch_key`); in a pass given the store, a batch found there skips the
forward of blocks 0 .. b - 1 (only the embeddings, a gather, blocks b .. and the head run) and a batch
not found runs the whole model and is recorded. The result is that of running the whole model, bit for
bit as far as the recorded output equals a recomputed one (it is the same computation on the same inputs).

Unlike the application's hidden-state cache (:mod:`trustrepair.app.prefix_cache`), nothing here depends
on the architecture's forward: the model's own forward runs, with absolute position embeddings, masks
and rotary embeddings computed as usual, and the skipped blocks return what block b - 1 returned (the
loop hands it on to block b). It needs only that, in every forward, the prefix blocks are called once
each in index order, that no analysed layer runs before block b - 1 has returned, and that block b - 1's
output alone carries the prefix's result on (no side channel between blocks; Hugging Face decoders
satisfy this). Every recorded batch is checked for the first two conditions (a task that runs the model
twice per batch, or a block called twice, fails them); when either fails, or the recordings would exceed
the store's memory budget, the store stops (``reason`` says why) and every later batch runs the whole
model. A store is bound to one model and the state of every tensor outside blocks b ..: a pass with
another model, or after any of those tensors was replaced or changed in place (their version counters),
first empties it. Changing the analysed blocks (a repair) keeps it valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from typing import Any

import torch
from torch import nn

from trustrepair.engine.layers import TrackedLayer, tensor_versions


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
    return _split(model, layers)[0]


def _split(model: nn.Module, layers: list[TrackedLayer]) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks 0 .. b - 1, blocks b ..) of the block list of :func:`prefix_blocks`; ([], []) without one."""
    lists = sorted(((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name),
                   key=lambda item: item[0].count("."))
    for name, blocks in lists:
        indices = [int(l.name[len(name) + 1:].split(".")[0]) for l in layers
                   if l.name.startswith(name + ".") and l.name[len(name) + 1:].split(".")[0].isdigit()]
        if indices:
            return list(blocks)[:min(indices)], list(blocks)[min(indices):]
    return [], []


def memory_budget(device: torch.device) -> int:
    """A quarter of the memory free on ``device`` now (the host's available memory for a CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def batch_key(batch: Any) -> str:
    """BLAKE2b digest of every tensor in a batch (a dict, list or tensor): names, dtypes, shapes and values,
    i.e. everything the model's forward can read from it."""
    digest = hashlib.blake2b(digest_size=16)

    def add(value, name=""):
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                add(value[key], f"{name}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(v, f"{name}[{i}]")
        else:
            digest.update(f"{name}={value!r};".encode())

    add(batch)
    return digest.hexdigest()


class PrefixStore:
    """The output of a model's frozen prefix per batch, kept across passes (see the module docstring).

    Give one store to :func:`trustrepair.fit_ekfac` (``prefix_store=``) and then to
    :func:`trustrepair.influence` or :func:`trustrepair.pairwise_influence` with the same training set and
    ``batch_size``: scoring then runs blocks b .. only (the fit alone keeps a private store for its two
    passes). Memory: one (batch, tokens, hidden) output per batch, on the model's device.

    Args:
        budget_bytes: the most the recorded outputs may occupy; ``None`` for :func:`memory_budget` of the
            model's device when the first batch is recorded.

    Attributes:
        replayed, recorded: batches replayed from the store and recorded into it so far.
        reason: why the store stopped (``""`` while it works); it then replays and records nothing.
    """

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self.outputs: dict[str, Any] = {}
        self.replayed = 0
        self.recorded = 0
        self.reason = ""
        self._bytes = 0
        self._binding: tuple | None = None

    def __len__(self) -> int:
        return len(self.outputs)

    def passing(self, model: nn.Module, layers: list[TrackedLayer]) -> "_Pass":
        """Context for one pass of ``model`` whose analysed layers are ``layers``; call its
        ``batch(batch)`` around each batch's forward + backward."""
        return _Pass(self, model, layers)

    def _stop(self, reason: str) -> None:
        self.reason, self.outputs, self._bytes = reason, {}, 0

    def _bind(self, model: nn.Module, blocks: list[nn.Module], tail: list[nn.Module]) -> None:
        """Empties the store unless it was filled by this model with the same tensors outside ``tail``."""
        binding = (weakref.ref(model), tuple(id(b) for b in blocks), tensor_versions(model, skip=tail))
        if self._binding is None or self._binding[0]() is not model or self._binding[1:] != binding[1:]:
            self.outputs, self._bytes = {}, 0
        self._binding = binding

    def _record(self, key: str, output: Any, device: torch.device) -> None:
        if self.budget_bytes is None:
            self.budget_bytes = memory_budget(device)
        self._bytes += _nbytes(output)
        if self._bytes > self.budget_bytes:
            self._stop(f"the recorded prefix outputs would exceed {self.budget_bytes} bytes")
        else:
            self.outputs[key] = output
            self.recorded += 1


def prefix_pass(store: PrefixStore | None, model: nn.Module, layers: list[TrackedLayer]):
    """``store.passing(model, layers)``, or a pass whose ``batch(...)`` does nothing when ``store`` is None."""
    return store.passing(model, layers) if store is not None else _NoPass()


class _NoPass(contextlib.nullcontext):
    def __enter__(self) -> "_NoPass":
        return self

    def batch(self, batch: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class _Pass:
    def __init__(self, store: PrefixStore, model: nn.Module, layers: list[TrackedLayer]):
        self.store, self.model, self.layers = store, model, layers
        self.blocks, self.tail = _split(model, layers)
        self.active = False

    def __enter__(self) -> "_Pass":
        s = self.store
        if not self.blocks:
            s.reason = s.reason or "no block before the first analysed one"
        if s.reason:
            return self
        s._bind(self.model, self.blocks, self.tail)
        self.active, self.handles = True, []
        self.hit, self.output, self.calls, self.early = None, None, [], False
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=index: self.calls.append(i)))
            block.forward = self._stub(index, block.forward)
        self.handles.append(self.blocks[-1].register_forward_hook(self._keep))
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_pre_hook(self._analysed))
        return self

    def _stub(self, index: int, original):
        def forward(*args, **kwargs):
            if self.hit is None:
                return original(*args, **kwargs)
            if index == 0:
                given = _leading_shape(args[0] if args else next(iter(kwargs.values()), None))
                if given is not None and given != _leading_shape(self.hit):
                    raise RuntimeError(f"prefix replay: the batch's hidden states have shape {given}, the "
                                       f"recorded ones {_leading_shape(self.hit)} (a batch key collision)")
            return self.hit
        return forward

    def _keep(self, module, args, output):
        if self.hit is None:
            self.output = _detached(output)

    def _analysed(self, module, args):
        if len(self.calls) != len(self.blocks):
            self.early = True

    def batch(self, batch: Any) -> "_Batch":
        """Context around one batch's forward + backward: replays the prefix when the store holds this
        batch, runs and records it otherwise."""
        return _Batch(self, batch)

    def __exit__(self, *exc) -> None:
        if self.active:
            for handle in self.handles:
                handle.remove()
            for block in self.blocks:
                del block.forward
            self.active = False


class _Batch:
    def __init__(self, run: _Pass, batch: Any):
        self.run, self.batch = run, batch

    def __enter__(self) -> "_Batch":
        run = self.run
        if run.active and not run.store.reason:
            self.key = batch_key(self.batch)
            run.hit = run.store.outputs.get(self.key)
            run.calls, run.early, run.output = [], False, None
        return self

    def __exit__(self, exc_type, *exc) -> None:
        run, s = self.run, self.run.store
        if exc_type is not None or not run.active or s.reason:
            run.hit = None
            return
        if run.hit is not None:
            s.replayed += 1
        elif run.calls != list(range(len(run.blocks))):
            s._stop("the prefix blocks did not run once each in order in one forward")
        elif run.early:
            s._stop("an analysed layer ran before the last prefix block")
        elif run.output is not None:
            s._record(self.key, run.output, run.layers[0].module.weight.device)
        run.hit, run.output = None, None
