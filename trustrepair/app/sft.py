"""Plain supervised fine-tuning: AdamW on the response tokens only, producing the post-SFT model.

Objective of one optimiser step over the examples B it sees (``batch_size * grad_accum`` of them):

    J(theta) = sum_{z in B} L(z) / N_B,   L(z) = sum_{t in response(z)} -log p_theta(y_t | y_<t),

N_B the number of response tokens in B (a token mean over the whole accumulated batch, exactly as if
it were one batch; the task's ``train_loss`` gives the per-example sums L(z)). Defaults follow the
paper's appendix A (Table 3): batch 4, gradient accumulation 4, 3 epochs, AdamW with weight decay
0.01, a constant learning rate (its 1024-token context is the tokenisation's ``max_length``). The
paper's rates (1e-6 for 1.4B down to 2e-8 for 7B models) barely
move a 135M model that trains only a few blocks for a few dozen steps; the default here is
``DEFAULT_LR`` = 1e-4. Measured on SmolLM2-135M-Instruct, last 2 blocks trained, 80 HH dialogues
(<= 128 tokens), 3 epochs of 5 steps: the held-out token NLL went 2.748 -> 2.711 at lr 1e-5 and
2.748 -> 2.583 at 1e-4 (training NLL 2.730 -> 2.446), so 1e-4 fits without over-fitting at this scale.
Weight decay applies to matrices only (biases and norm scales are not decayed).

``trainable=k`` trains only the last k transformer blocks (everything else gets ``requires_grad``
False and stays bit-identical), which also stops every backward pass at the first of those blocks.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trustrepair.app.models import freeze_all_but_last_blocks, save_causal_lm
from trustrepair.batching import chunked, length_sorted_batches
from trustrepair.task import IGNORE_INDEX, CausalLMTask, Task

DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class SFTArguments:
    """Settings of :func:`supervised_finetune` (validated on creation)."""

    epochs: int = 3
    """Passes over the training examples (paper: 3)."""
    lr: float = DEFAULT_LR
    """AdamW learning rate, constant (paper: 1e-6 to 2e-8 for 1.4B-7B models; 1e-4 here for 135M, see the
    module doc)."""
    batch_size: int = 4
    """Examples per forward/backward pass (paper: 4)."""
    grad_accum: int = 4
    """Passes accumulated per optimiser step (paper: 4)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay on weight matrices (paper: 0.01)."""
    trainable: int | str = "all"
    """"all", or k: train only the last k transformer blocks."""
    order: str = "length"
    """"length": batches of similar length (less padding), batch order shuffled each epoch;
    "shuffle": a random permutation cut into batches."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value before each step (None: no clipping, as in the paper)."""
    seed: int = 0
    """Seed of the batch order and of any dropout."""

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"epochs, batch_size and grad_accum must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}, {self.grad_accum}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.trainable != "all" and not (isinstance(self.trainable, int) and self.trainable >= 1):
            raise ValueError(f"trainable must be 'all' or a number of last blocks >= 1, got {self.trainable!r}")
        if self.order not in ("length", "shuffle"):
            raise ValueError(f"order must be 'length' or 'shuffle', got {self.order!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")


@dataclass
class SFTHistory:
    """What a fine-tuning run did: the token-mean loss of every optimiser step and of every epoch."""

    args: SFTArguments
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    tokens_per_epoch: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def loss_tokens(example) -> int:
    """Response tokens of an example that carry loss: labelled positions t >= 1 (position 0 has no
    prediction)."""
    return int((example["labels"][1:] != IGNORE_INDEX).sum())


def epoch_batches(lengths: Sequence[int], batch_size: int, order: str, generator: torch.Generator) -> list[list[int]]:
    """Index batches for one epoch (see ``SFTArguments.order``); every index appears once."""
    if order == "shuffle":
        return chunked(torch.randperm(len(lengths), generator=generator).tolist(), batch_size)
    batches = length_sorted_batches(lengths, batch_size)
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": rest, "weight_decay": 0.0}) if group["params"]]


def supervised_finetune(model: nn.Module, train_examples: Sequence[dict], *, epochs: int = 3, lr: float = DEFAULT_LR,
                        batch_size: int = 4, grad_accum: int = 4, weight_decay: float = 0.01,
                        trainable: int | str = "all", order: str = "length", max_grad_norm: float | None = None,
                        seed: int = 0, task: Task | None = None, pad_token_id: int = 0,
                        progress: bool = True) -> tuple[nn.Module, SFTHistory]:
    """Fine-tune ``model`` in place on ``train_examples`` (dicts of 1-D ``input_ids``/``labels``).

    Args: see :class:`SFTArguments`; ``task`` supplies the per-example loss (default
    :class:`~trustrepair.task.CausalLMTask`) and builds the batches (``task.collate``);
    ``pad_token_id`` fills the default task's padding (masked, any id works).
    Returns:
        (the model, in eval mode; parameters outside the trained blocks keep ``requires_grad`` False),
        and the :class:`SFTHistory`.
    Raises:
        ValueError: no examples, or an example without any labelled token after the first position.
    """
    args = SFTArguments(epochs, lr, batch_size, grad_accum, weight_decay, trainable, order, max_grad_norm, seed)
    if len(train_examples) == 0:
        raise ValueError("supervised_finetune got no training examples")
    tokens = [loss_tokens(ex) for ex in train_examples]
    empty = [i for i, n in enumerate(tokens) if n == 0]
    if empty:
        raise ValueError(f"{len(empty)} training examples (first: index {empty[0]}) have no labelled response "
                         "token after position 0; drop them or raise max_length")
    if task is None:
        task = CausalLMTask()
        task.pad_token_id = pad_token_id
    if trainable == "all":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        freeze_all_but_last_blocks(model, trainable)
    groups = _param_groups(model, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    lengths = [int(ex["input_ids"].shape[0]) for ex in train_examples]
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / batch_size) / grad_accum)
    history = SFTHistory(args, trainable_parameters=sum(p.numel() for g in groups for p in g["params"]),
                         tokens_per_epoch=sum(tokens))
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="SFT", unit="step", disable=not progress)
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(epochs):
                batches = epoch_batches(lengths, batch_size, order, generator)
                epoch_loss = 0.0
                for first in range(0, len(batches), grad_accum):
                    step = batches[first:first + grad_accum]
                    n_tokens = sum(tokens[i] for batch in step for i in batch)
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for batch in step:
                        padded = task.collate([train_examples[i] for i in batch])
                        loss = task.train_loss(model, padded).sum() / n_tokens
                        loss.backward()
                        step_loss += loss.item()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], max_grad_norm)
                    optimizer.step()
                    history.step_losses.append(step_loss)
                    epoch_loss += step_loss * n_tokens
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
                history.epoch_losses.append(epoch_loss / sum(tokens))
    finally:
        bar.close()
        model.eval()
    history.seconds = time.perf_counter() - start
    return model, history


def save_finetuned(model: nn.Module, tokenizer, path: str | Path, history: SFTHistory, *,
                   overwrite: bool = False) -> Path:
    """Save the fine-tuned model atomically with its SFT settings and losses in ``trustrepair.json``
    (read back with :func:`trustrepair.app.models.read_metadata`; load with
    :func:`trustrepair.app.models.load_causal_lm`)."""
    return save_causal_lm(model, tokenizer, path, metadata={"sft": history.to_dict()}, overwrite=overwrite)
