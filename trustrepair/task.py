"""What the model computes for trustrepair: the training loss and the trust measurement.

Data conventions (Hugging Face style, so other stacks can feed trustrepair directly):

* A training example is a dict of 1-D integer tensors ``input_ids`` and ``labels`` (``-100`` on tokens
  that carry no loss: prompt and padding) and optionally ``attention_mask``. Batches are right-padded.
* A trust query is ``{"proponent": example, "opponent": example}``; both start with the same prompt m,
  labelled -100, and continue with the trustworthy response p or the untrustworthy response o.
* Training loss of an example z: L(z) = sum over labelled tokens of the next-token cross-entropy.
* Measurement of a query: log P(o | m) - log P(p | m), each log-probability summed over the response's
  tokens (phrase level). Lower is better. The aspect's metric F^j is the mean over its queries (Eq. 3).

A :class:`Task` turns a model and a padded batch into these quantities, the way kronfluence's ``Task``
does, so any ``torch.nn.Module`` works; :class:`CausalLMTask` is the ready one for causal LMs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Example = Mapping[str, torch.Tensor]
Batch = dict


def pad_batch(examples: Sequence[Example], pad_token_id: int = 0) -> Batch:
    """Right-pad examples into a batch.

    Returns ``input_ids`` (B, T) long, ``labels`` (B, T) long with -100 on padding and
    ``attention_mask`` (B, T) long (1 on real tokens), T the longest example.
    """
    if len(examples) == 0:
        raise ValueError("pad_batch got no examples; pass at least one example dict")
    lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
    width = max(lengths)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = ex["input_ids"]
        labels[row, :n] = ex.get("labels", ex["input_ids"])
        mask = ex.get("attention_mask")
        attention_mask[row, :n] = 1 if mask is None else mask
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def stack_queries(queries: Sequence[Mapping[str, Example]], pad_token_id: int = 0, collate=None) -> Batch:
    """One padded batch of 2Q rows: proponents in rows [0, Q), opponents in rows [Q, 2Q).

    ``collate`` (default :func:`pad_batch`) turns the list of 2Q example dicts into the batch.

    Stacking both sides into one batch makes every hooked module run once per measurement (a two-pass
    measurement silently breaks per-module gradient capture in hook-based influence tools).
    """
    if len(queries) == 0:
        raise ValueError("no trust queries given; each aspect needs at least one {'proponent', 'opponent'} pair")
    for i, q in enumerate(queries):
        missing = {"proponent", "opponent"} - set(q)
        if missing:
            raise ValueError(f"trust query {i} lacks {sorted(missing)}; a query is {{'proponent': ex, 'opponent': ex}}")
    rows = [q["proponent"] for q in queries] + [q["opponent"] for q in queries]
    return collate(rows) if collate is not None else pad_batch(rows, pad_token_id)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row, from logits at every position.

    Args:
        logits: (B, T, V) next-token logits (position t predicts token t+1).
        labels: (B, T) target ids, -100 where no loss is taken.
    Returns:
        (B,) sum over t of log softmax(logits[:, t])[labels[:, t+1]], in the logits' dtype promoted to
        at least float32.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    return -token_nll.sum(dim=1)


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each (N,): the positions t whose next token t+1 carries a label, in row-major order.

    Position (rows[i], cols[i]) predicts ``labels[rows[i], cols[i] + 1]``.
    """
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


def summed_log_probs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int, *,
                     sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row sums of next-token log-probabilities, from logits at the labelled positions only.

    Args:
        logits: (N, V) logits at the labelled positions (:func:`labelled_positions` order).
        targets: (N,) the labelled next tokens.
        rows: (N,) the batch row of each position.
        n_rows: B, the number of rows in the batch.
        sample: replace ``targets`` by draws from softmax(logits) (true Fisher); the draws carry no gradient.
    Returns:
        (B,) sum over a row's positions of log softmax(logits)[target], float32 at least (half-precision
        logits are upcast before the softmax); 0 for a row without labels.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if sample:
        with torch.no_grad():
            targets = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator).squeeze(1)
    token_log_probs = -F.cross_entropy(logits, targets, reduction="none")
    return token_log_probs.new_zeros(n_rows).index_add(0, rows, token_log_probs)


class Task:
    """How to compute a model's training loss and trust measurement on a padded batch.

    Subclass it for models that are not Hugging Face causal LMs. Both methods return one value per row
    (per example, per query) so that per-example quantities can be read from one batched pass.
    Batches are built with :meth:`collate` (examples) and :meth:`collate_queries` (trust queries).
    """

    pad_token_id: int = 0

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded batch of examples (see :func:`pad_batch`)."""
        return pad_batch(examples, self.pad_token_id)

    def collate_queries(self, queries: Sequence[Mapping[str, Example]]) -> Batch:
        """Stacked proponent/opponent batch of 2Q rows (see :func:`stack_queries`)."""
        return stack_queries(queries, collate=self.collate)

    def train_loss(self, model: torch.nn.Module, batch: Batch, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) summed training loss per example; ``sample=True`` draws the targets from the model's own
        predictive distribution at the labelled positions (true Fisher) instead of using the labels."""
        raise NotImplementedError

    def measurement(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(Q,) log P(o|m) - log P(p|m) per query for a batch built by :func:`stack_queries`."""
        raise NotImplementedError

    def token_logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(N, V) next-token logits at the N labelled positions, in row-major (row, position) order."""
        raise NotImplementedError

    def token_mask(self, batch: Batch) -> torch.Tensor:
        """(B, T) bool, True on positions whose activations enter the covariances (non-padding)."""
        return batch["attention_mask"].bool()

    def vocab_size(self, model: torch.nn.Module) -> int | None:
        """Token ids the model accepts, [0, vocab_size), checked before any forward pass so that an id
        outside is reported with its example; ``None`` (the default) skips the check."""
        return None


class CausalLMTask(Task):
    """Task for Hugging Face causal LMs (``model(input_ids, attention_mask).logits``).

    With ``labelled_logits_only`` (the default) the LM head runs only at the N positions whose next token
    carries a label: a forward pre-hook on ``model.get_output_embeddings()`` gathers its (B, T, H) input
    to (1, N, H), so whatever the model does after the head (logit soft-capping, scaling) still applies.
    Positions without a label contribute nothing to any loss or measurement, so the values and gradients
    are those of the all-position logits (up to float reassociation), while the head's cost (V x H
    multiply-adds per token each way, and a (B, T, V) logits tensor) shrinks to the labelled share.
    Without an output embedding, or if the head's input is not (B, T, H), every position's logits are
    computed as before. Analysing the LM head itself needs its input at every position: pass
    ``labelled_logits_only=False`` then.
    """

    labelled_logits_only: bool = True

    def __init__(self, labelled_logits_only: bool = True):
        self.labelled_logits_only = labelled_logits_only

    def vocab_size(self, model):
        """Rows of the input embedding (``model.get_input_embeddings()``), or ``None`` without one."""
        try:
            embedding = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        return getattr(embedding, "num_embeddings", None)

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits output for ``batch`` ((B, T, V) unless a gathering hook is active)."""
        device = next(model.parameters()).device
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return out.logits if hasattr(out, "logits") else out

    def final_hidden(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T, H) hidden states after the last block and final norm (``base_model(...).last_hidden_state``),
        e.g. for the DPP's response embeddings."""
        device = next(model.parameters()).device
        return model.base_model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).last_hidden_state

    def labelled_logits(self, model: torch.nn.Module, batch: Batch
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, V), rows (N,), cols (N,)) at the :func:`labelled_positions` of ``batch``."""
        device = next(model.parameters()).device
        labels = batch["labels"].to(device)
        rows, cols = labelled_positions(labels)
        head = _output_embeddings(model) if self.labelled_logits_only else None
        gathered = []

        def gather(_module, args):
            hidden = args[0] if args else None
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
                return None
            gathered.append(True)
            return (hidden[rows, cols].unsqueeze(0), *args[1:])

        handle = head.register_forward_pre_hook(gather) if head is not None else None
        try:
            logits = self.logits(model, batch)
        finally:
            if handle is not None:
                handle.remove()
        if not gathered:
            return logits[:, :-1][rows, cols], rows, cols
        if len(gathered) != 1 or tuple(logits.shape[:2]) != (1, rows.shape[0]):
            raise RuntimeError(
                f"{type(model).__name__} ran its output embedding {len(gathered)} times or reshaped its output "
                f"(logits {tuple(logits.shape)} for {rows.shape[0]} labelled positions); use "
                "CausalLMTask(labelled_logits_only=False) for this model")
        return logits[0], rows, cols

    def _log_probs(self, model, batch, sample=False, generator=None) -> torch.Tensor:
        logits, rows, cols = self.labelled_logits(model, batch)
        targets = batch["labels"].to(logits.device)[:, 1:][rows, cols]
        return summed_log_probs(logits, targets, rows, batch["labels"].shape[0], sample=sample, generator=generator)

    def train_loss(self, model, batch, sample=False, generator=None):
        return -self._log_probs(model, batch, sample=sample, generator=generator)

    def token_logits(self, model, batch):
        return self.labelled_logits(model, batch)[0]

    def measurement(self, model, batch):
        log_probs = self._log_probs(model, batch)
        n_queries = log_probs.shape[0] // 2
        return log_probs[n_queries:] - log_probs[:n_queries]


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) else None
