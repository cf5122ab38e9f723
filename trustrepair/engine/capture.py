"""Capturing per-token activations and output gradients of the tracked layers, one batch at a time.

For a padded batch and an objective v (a 1-D tensor: one training loss per row, or one measurement per
stacked query), :class:`TokenCapture` runs one forward pass and one backward pass of ``v.sum()`` and
hands every tracked layer's

    a (B, T, d_in [+ 1])  -- its input, bias column appended, zero at masked (padding) tokens,
    g (B, T, d_out)       -- d (sum v) / d y_t, the gradient at its output, zero at masked tokens,

to a callback as soon as that layer's gradient is complete (so ``a`` is freed layer by layer during the
backward pass, and memory stays one batch's activations). Rows of a batch are independent, so row b of
``g`` is the gradient of the entries of v that depend on row b, and ``g_b^T a_b`` is that row's
weight gradient (for training losses: the per-example gradient).

The backward pass is the cheapest one that yields these: every parameter is frozen for the duration
(no weight gradients are formed; ``requires_grad`` is restored afterwards) and the graph starts at the
outputs of the first tracked layers, so nothing upstream of them is differentiated. The model runs in
eval mode (no dropout) and its mode is restored on exit. Forward calls made under ``torch.no_grad()``
(e.g. a task drawing sampled targets from an extra forward pass) are not captured. A layer called
several times in one forward pass (shared parameters) gets its calls concatenated along the token axis,
which is exactly its per-example gradient sum_calls sum_t g_t a_t^T.

Non-finite objectives and gradients raise ``FloatingPointError`` naming the batch and the module. The
gradients are checked once per batch, after every callback ran (one device synchronisation per batch, not
one per layer), so a callback may see non-finite values of a batch that then raises.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from trustrepair.engine.layers import TrackedLayer

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``on_layer(layer_index, a, g)`` with a (B, T, d_in [+ 1]) and g (B, T, d_out), masked tokens zero."""


class TokenCapture:
    """Context manager that hooks ``layers`` of ``model``; :meth:`run` processes one batch.

    Example::

        with TokenCapture(model, layers) as capture:
            for rows, batch in trustrepair.batching.padded_batches(examples, 8):
                capture.run(lambda: task.train_loss(model, batch), task.token_mask(batch),
                            f"rows {rows}", on_layer)
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer]):
        self.model = model
        self.layers = list(layers)
        self._handles: list = []
        self._mask: torch.Tensor | None = None

    def __enter__(self) -> "TokenCapture":
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        self._was_training = self.model.training
        self.model.eval()
        self._handles = [layer.module.register_forward_hook(partial(self._forward_hook, i))
                         for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._was_training)
        self._mask = None

    def run(self, objective: Callable[[], torch.Tensor], mask: torch.Tensor, label: str,
            on_layer: LayerCallback) -> torch.Tensor:
        """Forward ``objective()`` (a 1-D tensor), check it, backward its sum, feed ``on_layer``.

        Args:
            objective: runs the model on the batch and returns a 1-D tensor whose entries each depend on
                their own rows only (one loss per example, or one measurement per stacked query).
            mask: (B, T) bool, True on tokens that count (non-padding).
            label: names the batch in error messages, e.g. ``"batch 3 (training examples [7, 2])"``.
            on_layer: called once per tracked layer with that layer's (a, g).
        Returns:
            The detached objective values (B,).
        Raises:
            FloatingPointError: a non-finite objective value or output gradient.
        """
        if not self._handles:
            raise RuntimeError("TokenCapture.run must be called inside `with TokenCapture(...)`")
        self._mask = mask.bool()
        self._all_valid = bool(self._mask.all())
        self._masks_by_device: dict = {}
        self._label, self._on_layer = label, on_layer
        self._calls: list[list[dict]] = [[] for _ in self.layers]
        self._order: list[tuple[int, int]] = []
        self._leaves: list[torch.Tensor] = []
        self._gradient_sums: list[tuple[int, torch.Tensor]] = []
        try:
            with torch.enable_grad():
                try:
                    values = objective()
                except RuntimeError as err:
                    culprit = self._first_non_finite_output()
                    if culprit is None:
                        raise
                    raise FloatingPointError(f"the objective failed in {label} ({err}); the first tracked module "
                                             f"with a non-finite output is {culprit!r}") from err
            if values.dim() != 1:
                raise ValueError(f"the objective must return a 1-D tensor (one loss per example or one "
                                 f"measurement per query); got shape {tuple(values.shape)} for {label}")
            finite = torch.isfinite(values.detach())
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise FloatingPointError(f"non-finite objective (loss or measurement) in {label}, at entries "
                                         f"{bad} of the batch; {self._diagnose()}")
            for calls in self._calls:  # outputs were kept for the diagnosis only; free them for the backward
                for call in calls:
                    call["output"] = None
            if self._leaves and values.requires_grad:
                torch.autograd.grad(values.sum(), self._leaves, allow_unused=True)
            for index, calls in enumerate(self._calls):
                if calls:
                    self._finish_layer(index)
            self._check_gradients_finite()
            return values.detach()
        finally:
            self._mask = None
            self._calls, self._order, self._leaves, self._gradient_sums = [], [], [], []

    # -- hooks -----------------------------------------------------------------------------------------

    def _token_mask(self, device: torch.device) -> torch.Tensor | None:
        if self._all_valid:
            return None
        if device not in self._masks_by_device:
            self._masks_by_device[device] = self._mask.to(device)
        return self._masks_by_device[device]

    def _forward_hook(self, index: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._mask is None or not torch.is_grad_enabled():
            return
        layer = self.layers[index]
        x = inputs[0]
        if tuple(x.shape[:-1]) != tuple(self._mask.shape):
            raise ValueError(f"module {layer.name!r} got an input of shape {tuple(x.shape)}; token capture needs "
                             f"(batch, tokens, d_in) matching the token mask {tuple(self._mask.shape)}; "
                             "to analyse a model's LM head, pass task=CausalLMTask(labelled_logits_only=False) "
                             "(by default the head runs on the labelled positions only)")
        a = layer.fold_activations(x.detach(), self._token_mask(x.device))
        if not output.requires_grad:
            output.requires_grad_(True)
            self._leaves.append(output)
        call = len(self._calls[index])
        self._calls[index].append({"a": a, "output": output, "g": None,
                                   "g_shape": (tuple(output.shape), output.dtype, output.device)})
        self._order.append((index, call))
        output.register_hook(partial(self._grad_hook, index, call))

    def _grad_hook(self, index: int, call: int, grad: torch.Tensor) -> None:
        calls = self._calls[index]
        mask = self._token_mask(grad.device)
        grad = grad.detach()
        calls[call]["g"] = grad if mask is None else torch.where(mask.unsqueeze(-1), grad, grad.new_zeros(()))
        if all(c["g"] is not None for c in calls):
            self._finish_layer(index)

    def _finish_layer(self, index: int) -> None:
        """Hand the layer's (a, g) to the callback; a call whose output never received a gradient (not
        used by the objective) has g = 0."""
        calls = self._calls[index]
        self._calls[index] = []
        grads = []
        for c in calls:
            shape, dtype, device = c["g_shape"]
            grads.append(c["g"] if c["g"] is not None else torch.zeros(shape, dtype=dtype, device=device))
        a = calls[0]["a"] if len(calls) == 1 else torch.cat([c["a"] for c in calls], dim=1)
        g = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        del calls, grads
        # One reduction instead of an elementwise test: a NaN or infinity anywhere makes the sum
        # non-finite (float32 / float64 accumulation, so finite float16 gradients cannot overflow it).
        # It is checked once per batch (_check_gradients_finite): a check here would synchronise a GPU
        # at every layer of the backward pass.
        self._gradient_sums.append((index, g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)))
        # The contractions are the library's own float32/float64 statistics: an enclosing autocast
        # region (bf16 forward/backward) must not lower their precision.
        with torch.autocast(a.device.type, enabled=False):
            self._on_layer(index, a, g)

    def _check_gradients_finite(self) -> None:
        """Raises FloatingPointError naming every tracked module whose output gradient in this batch had a
        non-finite entry (its callback already ran, on those values: the caller's sums are void)."""
        if not self._gradient_sums:
            return
        device = self._gradient_sums[0][1].device
        finite = torch.isfinite(torch.stack([s.to(device, torch.float64) for _, s in self._gradient_sums]))
        if bool(finite.all()):
            return
        bad = [self.layers[index].name for (index, _), ok in zip(self._gradient_sums, finite.tolist()) if not ok]
        raise FloatingPointError("; ".join(f"non-finite output gradient at module {name!r} in {self._label}"
                                           for name in bad))

    def _first_non_finite_output(self) -> str | None:
        """Name of the first tracked module (in forward order) whose output has a non-finite entry."""
        for index, call in self._order:
            output = self._calls[index][call]["output"] if self._calls[index] else None
            if output is not None and not bool(torch.isfinite(output.detach()).all()):
                return self.layers[index].name
        return None

    def _diagnose(self) -> str:
        culprit = self._first_non_finite_output()
        if culprit is not None:
            return f"the first tracked module with a non-finite output is {culprit!r}"
        return ("no tracked module has a non-finite output, so the cause is outside them (embeddings, "
                "normalisation, LM head, or the loss itself)")
