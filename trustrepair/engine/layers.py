"""Which layers EK-FAC analyses, and the one place that knows how their weights are laid out.

EK-FAC treats every influenced layer as a matrix ``W`` of shape (d_out, d_in [+ 1]) acting on token
activations: ``y_t = W [x_t; 1]``, the bias folded in as the last column when the layer has one. Two
layer types are supported:

* ``torch.nn.Linear``: ``weight`` is (d_out, d_in), so ``W = [weight | bias]``;
* transformers' GPT-2 ``Conv1D``: ``weight`` is (d_in, d_out) (``y = x @ weight + bias``), so
  ``W = [weight^T | bias]``.

:class:`TrackedLayer` folds and unfolds these layouts (activations, weights, weight deltas); nothing
else in trustrepair touches a layer's parameters directly. :func:`find_modules` picks the layers:
by default every supported layer inside the model's transformer blocks (the ``nn.ModuleList`` that
holds them), never the embeddings or the LM head.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Union

import torch
from torch import nn

from trustrepair.engine.layout import empty_aligned

ModuleSelection = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (matched by class name and its ``nf`` attribute, so that
    transformers need not be imported)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_supported_layer(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass(frozen=True)
class TrackedLayer:
    """A layer EK-FAC analyses, seen as the folded matrix W (d_out, d_in + has_bias).

    Attributes:
        name: the module's qualified name in ``model.named_modules()``.
        module: the module itself.
        d_in: input features (without the bias column).
        d_out: output features.
        has_bias: whether the layer has a bias (then activations get a ones column).
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool

    @classmethod
    def of(cls, name: str, module: nn.Module) -> "TrackedLayer":
        if isinstance(module, nn.Linear):
            d_out, d_in = module.weight.shape
        elif _is_conv1d(module):
            d_in, d_out = module.weight.shape
        else:
            raise ValueError(f"module {name!r} is a {type(module).__name__}; EK-FAC supports nn.Linear and "
                             f"transformers' Conv1D")
        return cls(name, module, int(d_in), int(d_out), module.bias is not None)

    @property
    def folded_in(self) -> int:
        """Columns of the folded matrix: d_in + 1 with a bias, d_in without."""
        return self.d_in + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, folded_in), the shape of every per-layer gradient, delta and factor-space matrix."""
        return (self.d_out, self.folded_in)

    def fold_activations(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Activations a (B, T, folded_in): the layer input with a ones column appended when the layer
        has a bias, zeroed (ones column included) where ``mask`` (B, T) is False. ``mask=None`` means
        every token counts, and then a bias-free layer's input is returned without a copy. With a bias,
        ``a`` is a view of row-padded storage (:func:`trustrepair.engine.layout.empty_aligned`): its odd
        width would otherwise misalign the rows of every product that reads it."""
        if self.has_bias:
            a = empty_aligned(*x.shape[:-1], self.folded_in, dtype=x.dtype, device=x.device)
            a[..., :-1] = x
            a[..., -1] = 1
            if mask is not None:
                a.mul_(mask.unsqueeze(-1).to(a.dtype))
            return a
        return x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)

    def _fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``weight`` (the module's own layout) and ``bias`` as one (d_out, folded_in) matrix (a copy)."""
        weight = weight if isinstance(self.module, nn.Linear) else weight.T
        if self.has_bias:
            return torch.cat([weight, bias.unsqueeze(1)], dim=1)
        return weight.clone()

    def folded_weight(self) -> torch.Tensor:
        """The layer's parameters as one (d_out, folded_in) matrix (a copy)."""
        bias = self.module.bias.detach() if self.has_bias else None
        return self._fold(self.module.weight.detach(), bias)

    def folded_grad(self) -> torch.Tensor:
        """The parameters' ``.grad`` as one (d_out, folded_in) matrix, the layout of :meth:`folded_weight`
        (zeros where a parameter has no gradient)."""
        def grad(p):
            return p.grad if p.grad is not None else torch.zeros_like(p)
        return self._fold(grad(self.module.weight), grad(self.module.bias) if self.has_bias else None)

    @torch.no_grad()
    def add_(self, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """In place: W <- W + alpha * delta, delta (d_out, folded_in); the last column goes to the bias."""
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"delta for {self.name!r} must be {self.shape} = (d_out, d_in{' + 1' if self.has_bias else ''}); "
                             f"got {tuple(delta.shape)}")
        weight = self.module.weight
        delta = delta.to(device=weight.device, dtype=weight.dtype)
        weight_delta = delta[:, : self.d_in]
        weight.add_(weight_delta if isinstance(self.module, nn.Linear) else weight_delta.T, alpha=alpha)
        if self.has_bias:
            self.module.bias.add_(delta[:, self.d_in], alpha=alpha)


def find_modules(model: nn.Module, modules: ModuleSelection = None) -> list[TrackedLayer]:
    """The layers to analyse, in ``model.named_modules()`` order.

    Args:
        model: any ``nn.Module``.
        modules: ``None`` for every ``nn.Linear`` / ``Conv1D`` inside the model's transformer blocks
            (any ``nn.ModuleList``; embeddings and the LM head sit outside it); a list of qualified
            module names; or a predicate ``(name, module) -> bool`` applied to every supported layer.
    Raises:
        ValueError: unknown names (with the closest matches), a named module of an unsupported type,
            a selection that is empty, or a selected layer whose parameter a module outside the selection
            shares (an LM head tied to the input embedding, ``tie_word_embeddings=True``: fitting or
            repairing it would move the embedding through the shared tensor).
    """
    supported = {name: m for name, m in model.named_modules() if name and is_supported_layer(m)}
    if modules is None:
        in_blocks = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList):
                prefix = f"{name}." if name else ""
                in_blocks.update(f"{prefix}{sub}" for sub, m in module.named_modules() if sub and is_supported_layer(m))
        chosen = [name for name in supported if name in in_blocks]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear / Conv1D inside an nn.ModuleList of blocks; pass "
                f"modules=[...] (names) or a predicate. Supported layers: {_preview(supported)}")
    elif callable(modules):
        chosen = [name for name, m in supported.items() if modules(name, m)]
        if not chosen:
            raise ValueError(f"the module predicate selected none of the supported layers: {_preview(supported)}")
    else:
        names = [modules] if isinstance(modules, str) else list(modules)
        if not names:
            raise ValueError("modules=[] selects nothing; pass None for every layer in the transformer blocks")
        all_modules = dict(model.named_modules())
        for name in names:
            if name not in all_modules:
                close = difflib.get_close_matches(name, list(supported), n=5, cutoff=0.4)
                hint = f"closest supported layers: {close}" if close else f"supported layers: {_preview(supported)}"
                raise ValueError(f"model has no module named {name!r}; {hint}")
            if name not in supported:
                raise ValueError(f"module {name!r} is a {type(all_modules[name]).__name__}; EK-FAC supports "
                                 f"nn.Linear and transformers' Conv1D")
        if len(set(names)) != len(names):
            raise ValueError(f"module names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        order = {name: i for i, name in enumerate(supported)}
        chosen = sorted(names, key=order.__getitem__)
    _refuse_shared_parameters(model, {name: supported[name] for name in chosen})
    return [TrackedLayer.of(name, supported[name]) for name in chosen]


def _refuse_shared_parameters(model: nn.Module, chosen: Mapping[str, nn.Module]) -> None:
    """Refuse a selected layer whose weight or bias is also a parameter of a module outside the selection,
    e.g. an LM head tied to the input embedding: EK-FAC would see the parameter only as that layer, and
    a repair would move the other module through the shared tensor too."""
    selected = {id(m) for m in chosen.values()}
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in selected:
            for param in module.parameters(recurse=False):
                holders.setdefault(id(param), []).append(name)
    for name, module in chosen.items():
        for kind, param in (("weight", module.weight), ("bias", module.bias)):
            if param is not None and id(param) in holders:
                others = holders[id(param)]
                raise ValueError(
                    f"module {name!r} shares its {kind} with {others[:3]} (a tied input embedding and LM head?): "
                    f"EK-FAC would see that parameter only as {name!r}, and a repair would move {others[0]!r} "
                    f"too. Leave {name!r} out of modules, or untie the weights first")


def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], alpha: float = 1.0) -> None:
    """In place, for every named layer: W <- W + alpha * delta, with ``delta`` (d_out, d_in [+ 1]) in
    the folded layout (bias in the last column). Used by repair: ``alpha=beta`` applies a preconditioned
    ascent step, ``alpha=-beta`` undoes it."""
    for layer in find_modules(model, list(deltas)):
        layer.add_(deltas[layer.name], alpha=alpha)


def tensor_versions(model: nn.Module, skip: Iterable[nn.Module] = ()) -> tuple:
    """Identity, storage and in-place version counter of every parameter and buffer of ``model`` outside the
    ``skip`` submodules: unchanged exactly when none of them was replaced or modified in place since."""
    skipped = {id(t) for module in skip for t in list(module.parameters()) + list(module.buffers())}
    return tuple((id(t), t.data_ptr(), t._version) for t in list(model.parameters()) + list(model.buffers())
                 if id(t) not in skipped)


def model_fingerprint(model: nn.Module, layers: list[TrackedLayer]) -> dict:
    """What identifies the model EK-FAC factors belong to: the analysed layers (name -> [d_out, d_in,
    has_bias]) and a BLAKE2b digest of every parameter and buffer (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        if data.numel():
            digest.update(data.view(-1).view(torch.uint8).numpy())
    return {
        "modules": {layer.name: [layer.d_out, layer.d_in, layer.has_bias] for layer in layers},
        "weights_digest": digest.hexdigest(),
    }


def _preview(names: Mapping[str, nn.Module] | list[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
