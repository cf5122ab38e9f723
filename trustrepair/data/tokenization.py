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


def _cut(prompt: list[int], response: list[int], overflow: int) -> tuple[list[int], list[int]]:
    """Drop ``overflow`` tokens from the left of prompt + response."""
    from_prompt = min(overflow, len(prompt))
    return prompt[from_prompt:], response[overflow - from_prompt:]


def _log_truncation(count: int, total: int, what: str, max_length: int) -> None:
    if count:
        logger.warning("left-truncated %d of %d %s to max_length=%d tokens", count, total, what, max_length)


def tokenize_sft(records: Sequence[SFTRecord], tokenizer, max_length: int, *, add_bos: bool = False,
                 add_eos: bool = True) -> list[dict[str, torch.Tensor]]:
    """Training examples: ``input_ids`` (T,) and ``labels`` (T,), T <= max_length.

    ``add_eos`` (default on) appends the EOS token to the response so the model learns to stop; it is
    part of the loss.
    """
    budget = _check_max_length(max_length, add_bos)
    prompts = encode_texts(tokenizer, [r.prompt for r in records])
    responses = encode_texts(tokenizer, [r.response for r in records])
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    eos = [_special_id(tokenizer, "eos")] if add_eos else []
    out, truncated = [], 0
    for record, p_ids, r_ids in zip(records, prompts, responses):
        if not r_ids:
            raise DataError(f"{record.source or 'SFT record'}: the response tokenises to no tokens")
        r_ids = r_ids + eos
        overflow = len(p_ids) + len(r_ids) - budget
        if overflow > 0:
            p_ids, r_ids = _cut(p_ids, r_ids, overflow)
            truncated += 1
        out.append(make_example(bos + p_ids, r_ids))
    _log_truncation(truncated, len(records), "SFT examples", max_length)
    return out


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
