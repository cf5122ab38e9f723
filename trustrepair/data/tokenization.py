"""Text records -> the tensor conventions of :mod:`trustrepair.task`.

Prompt and response are tokenised *separately* and their ids concatenated, so the prompt/response
boundary is exact and a trust query's proponent and opponent carry identical prompt ids:

    input_ids = [BOS]? + ids(prompt) + ids(response) + [EOS]?
    labels    = -100 on [BOS]? + ids(prompt);  labels = input_ids on ids(response) + [EOS]?

Special tokens are never added by the tokenizer (``add_special_tokens=False`` is always passed:
transformers 4.x prepends BOS for SmolLM2 by itself and 5.x does not); ``add_bos`` / ``add_eos``
decide explicitly.

Tokenizer interface: any callable ``tokenizer(list_of_str, add_special_tokens=False)`` returning a
mapping whose ``"input_ids"`` is a list of int lists (every Hugging Face tokenizer), plus the
attributes ``bos_token_id`` / ``eos_token_id`` when ``add_bos`` / ``add_eos`` are used.

Left truncation: a sequence longer than ``max_length`` loses tokens from its start (prompt first, then
the start of the response), keeping the BOS when one is added; the count is logged as a warning.
For a trust query the prompt is cut by the same amount on both sides (set by the longer response), so
the shared-prompt property survives truncation.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from trustrepair.task import IGNORE_INDEX
from .reading import DataError
from .records import SFTRecord, TrustRecord

logger = logging.getLogger(__name__)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (one batched tokenizer call)."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(map(int, row)) for row in ids]


def _special_id(tokenizer, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise ValueError(f"add_{name}=True but the tokenizer has no {name} token; pass add_{name}=False")
    return int(value)


def make_example(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` (1-D long) with -100 on the prompt positions."""
    input_ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def _check_max_length(max_length: int, add_bos: bool) -> int:
    """Token budget left for prompt + response once the BOS (kept through truncation) is counted."""
    budget = int(max_length) - int(add_bos)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a response token; use at least {2 + add_bos}")
    return budget


def left_truncate(input_ids: list[int], labels: list[int], keep: int, budget: int, source: str
                  ) -> tuple[dict[str, torch.Tensor], bool]:
    """The example ``{"input_ids", "labels"}`` of a token sequence, cut from the left (after its first
    ``keep`` tokens, the BOS) to ``keep + budget`` tokens, and whether it was cut.

    Raises:
        DataError: no trainable label (one other than -100) is left, naming ``source``.
    """
    overflow = len(input_ids) - keep - budget
    if overflow > 0:
        input_ids = input_ids[:keep] + input_ids[keep + overflow:]
        labels = labels[:keep] + labels[keep + overflow:]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{source}: no trainable token left after left-truncation to {keep + budget} tokens; "
                        "raise max_length or drop the example")
    return ({"input_ids": torch.tensor(input_ids, dtype=torch.long),
             "labels": torch.tensor(labels, dtype=torch.long)}, overflow > 0)


def tokenize_pieces(examples: Sequence[Sequence[tuple[str, bool]]], sources: Sequence[str], tokenizer,
                    max_length: int, *, add_bos: bool = False, add_eos: bool = True,
                    what: str = "SFT examples") -> list[dict[str, torch.Tensor]]:
    """Examples made of text pieces ``(text, trained)``, each tokenised separately and concatenated;
    labels are -100 on untrained pieces. ``add_eos`` appends the EOS token after the last piece (in
    the loss: every caller ends an example with a trained piece).

    Raises:
        DataError: a trained piece that tokenises to no tokens, naming its source.
    """
    budget = _check_max_length(max_length, add_bos)
    ids = iter(encode_texts(tokenizer, [text for pieces in examples for text, _ in pieces]))
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    eos = [_special_id(tokenizer, "eos")] if add_eos else []
    out, truncated = [], 0
    for pieces, source in zip(examples, sources):
        input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for _, trained in pieces:
            piece = next(ids)
            if trained and not piece:
                raise DataError(f"{source}: the response tokenises to no tokens")
            input_ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        example, cut = left_truncate(input_ids + eos, labels + eos, len(bos), budget, source)
        out.append(example)
        truncated += cut
    _log_truncation(truncated, len(examples), what, max_length)
    return out


def _log_truncation(count: int, total: int, what: str, max_length: int) -> None:
    if count:
        logger.warning("left-truncated %d of %d %s to max_length=%d tokens", count, total, what, max_length)


def tokenize_sft(records: Sequence[SFTRecord], tokenizer, max_length: int, *, add_bos: bool = False,
                 add_eos: bool = True) -> list[dict[str, torch.Tensor]]:
    """Training examples: ``input_ids`` (T,) and ``labels`` (T,), T <= max_length.

    ``add_eos`` (default on) appends the EOS token to the response so the model learns to stop; it is
    part of the loss.
    """
    return tokenize_pieces([[(r.prompt, False), (r.response, True)] for r in records],
                           [r.source or "SFT record" for r in records], tokenizer, max_length,
                           add_bos=add_bos, add_eos=add_eos)


def tokenize_trust(records: Sequence[TrustRecord], tokenizer, max_length: int, *,
                   add_bos: bool = False) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Trust queries ``{"proponent": example, "opponent": example}`` sharing identical prompt ids.

    No EOS is appended: the metric is the log-probability of the statement itself (phrase level).
    """
    budget = _check_max_length(max_length, add_bos)
    prompts = encode_texts(tokenizer, [r.prompt for r in records])
    pros = encode_texts(tokenizer, [r.proponent for r in records])
    opps = encode_texts(tokenizer, [r.opponent for r in records])
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    out, truncated = [], 0
    for record, p_ids, pro, opp in zip(records, prompts, pros, opps):
        if not pro or not opp:
            raise DataError(f"{record.source or 'trust record'}: a response tokenises to no tokens")
        overflow = len(p_ids) + max(len(pro), len(opp)) - budget
        if overflow > 0:
            truncated += 1
            cut = min(overflow, len(p_ids))
            p_ids = p_ids[cut:]
            pro = pro[max(0, len(pro) + len(p_ids) - budget):]
            opp = opp[max(0, len(opp) + len(p_ids) - budget):]
        out.append({"proponent": make_example(bos + p_ids, pro), "opponent": make_example(bos + p_ids, opp)})
    _log_truncation(truncated, len(records), "trust queries", max_length)
    return out
