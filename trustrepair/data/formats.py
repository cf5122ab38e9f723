"""How prompts and responses are joined into tokens: the ``chat`` and ``plain`` formats, for training
examples (:class:`~trustrepair.data.records.Conversation`) and trust pairs alike, so an instruct model is
measured in the format it was tuned on.

``chat``: the tokenizer's chat template (``apply_chat_template``), as SFT trainers use it.

* Training examples: the conversation up to its last trained assistant turn is rendered and tokenised
  (later turns carry no loss and, the model being causal, change no gradient). Labels are -100
  everywhere except on each trained assistant turn's content and its end-of-turn token: the span runs
  from the end of the rendered prefix before the turn (with the generation prompt) to the end of the
  rendered prefix through the turn, and stops after the last EOS token inside it when it holds one
  (SmolLM2's "<|im_end|>" is trained, the "\\n" the template writes after it is not). Each rendered
  prefix's ids must be a prefix of the whole conversation's ids; a template for which they are not
  (e.g. one that rewrites earlier turns) raises a DataError: use the plain format.
* Trust pairs: the prompt becomes turns by :func:`~trustrepair.data.sft_files.prompt_messages` (the
  built-in prompts' trailing "\\n\\nAnswer:" / "\\n\\nAssistant:" cue is dropped, the template's
  generation prompt takes its place; an HH transcript becomes its turns) and is rendered with the
  generation prompt; proponent and opponent lose their surrounding whitespace (the leading space
  belonged to the cue) and are the assistant content with no end-of-turn token (the metric is the
  log-probability of the statement itself).

``plain``: text joined the way the library does for HH, every piece tokenised separately:

* text layouts (prompt/completion, prompt/response, HH): the verbatim prompt, then the completion
  and the EOS token in the loss; exactly :func:`~trustrepair.data.tokenization.tokenize_sft`.
* chat layouts: a system turn's text, each user turn as "\\n\\nHuman: {content}", each assistant turn as
  "\\n\\nAssistant:" then " {content}" (in the loss when the turn is trained), the EOS token after the
  last trained turn (in the loss); later turns are dropped.
* trust pairs: the texts verbatim (:func:`~trustrepair.data.tokenization.tokenize_trust`).

The default (``format=None``) is ``chat`` when the tokenizer has a chat template, else ``plain``.
Sequences longer than ``max_length`` lose tokens from their start, as in
:mod:`~trustrepair.data.tokenization`; the chat format adds no BOS of its own (a template that wants
one writes it).
"""
from __future__ import annotations

from typing import Sequence

import torch

from trustrepair.task import IGNORE_INDEX
from .reading import DataError
from .records import Conversation, TrustRecord
from .sft_files import ASSISTANT_CUE, HUMAN_CUE, prompt_messages
from .tokenization import (
    _check_max_length, _log_truncation, encode_texts, left_truncate, tokenize_pieces, tokenize_trust,
)

FORMATS = ("chat", "plain")


def resolve_format(tokenizer, format: str | None = None) -> str:
    """``format`` checked against the tokenizer, or the default: "chat" when it has a chat template,
    else "plain".

    Raises:
        ValueError: an unknown format, or "chat" for a tokenizer without a chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if format is None:
        return "chat" if has_template else "plain"
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {list(FORMATS)}")
    if format == "chat" and not has_template:
        raise ValueError("format 'chat' needs a tokenizer with a chat template, and this one has none; "
                         "use format 'plain'")
    return format


def render_chat(tokenizer, messages: Sequence[tuple[str, str]], *, generation_prompt: bool, source: str = "") -> str:
    """The chat template's text of ``(role, content)`` turns (with the assistant generation prompt
    appended when ``generation_prompt``).

    Raises:
        DataError: the template fails on these turns (e.g. it demands alternating roles), naming ``source``.
    """
    try:
        return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages],
                                             tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError and the template's own raise_exception calls
        raise DataError(f"{source or 'conversation'}: the chat template cannot render it ({err}); "
                        "use format 'plain'") from None


def _plain_pieces(record: Conversation) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of a record in the plain format, adjacent untrained text merged."""
    if record.text is not None:
        return [(record.text[0], False), (record.text[1], True)]
    trained = set(record.trained_turns)
    pieces: list[tuple[str, bool]] = []
    for i, (role, content) in enumerate(record.messages[: max(trained) + 1]):
        if role == "system":
            parts = [(content, False)]
        elif role == "user":
            parts = [(f"{HUMAN_CUE} {content}", False)]
        else:
            parts = [(ASSISTANT_CUE, False), (f" {content}", i in trained)]
        for text, in_loss in parts:
            if pieces and not in_loss and not pieces[-1][1]:
                pieces[-1] = (pieces[-1][0] + text, False)
            else:
                pieces.append((text, in_loss))
    return pieces


def _assistant_spans(tokenizer, records: Sequence[Conversation]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Per record: the token ids of its rendering through the last trained turn, and the ``[start, end)``
    token span of each trained turn (content and end-of-turn token)."""
    texts, layout = [], []
    for record in records:
        trained = record.trained_turns
        full = render_chat(tokenizer, record.messages[: trained[-1] + 1], generation_prompt=False, source=record.source)
        prefixes = []
        for i in trained:
            prefixes += [render_chat(tokenizer, record.messages[:i], generation_prompt=True, source=record.source),
                         render_chat(tokenizer, record.messages[: i + 1], generation_prompt=False, source=record.source)]
        layout.append(len(prefixes))
        texts += [full] + prefixes
    ids = encode_texts(tokenizer, texts)
    eos = getattr(tokenizer, "eos_token_id", None)
    out, at = [], 0
    for record, n_prefixes in zip(records, layout):
        full_ids, prefix_ids = ids[at], ids[at + 1: at + 1 + n_prefixes]
        at += 1 + n_prefixes
        for j, prefix in enumerate(prefix_ids):
            if full_ids[: len(prefix)] != prefix:
                turn = record.trained_turns[j // 2]
                raise DataError(f"{record.source or 'conversation'}: the chat template renders the conversation before "
                                f"or through turn {turn} as a text whose tokens are not a prefix of the whole "
                                "conversation's, so the assistant tokens cannot be located; use format 'plain'")
        spans = []
        for start, through in zip(prefix_ids[::2], prefix_ids[1::2]):
            end = len(through)
            turn_ids = full_ids[len(start): end]
            if eos is not None and eos in turn_ids:
                end = len(start) + len(turn_ids) - turn_ids[::-1].index(eos)
            spans.append((len(start), end))
        out.append((full_ids, spans))
    return out


def tokenize_conversations(records: Sequence[Conversation], tokenizer, max_length: int, *, format: str | None = None,
                           add_bos: bool = False, add_eos: bool = True) -> list[dict[str, torch.Tensor]]:
    """Training examples ``{"input_ids", "labels"}`` (1-D long, T <= max_length), one per record in input
    order (so ``records[i].source`` names example i), the loss on trained assistant turns only.

    Args:
        records: from :func:`~trustrepair.data.training_files.load_training_files`.
        tokenizer: a Hugging Face tokenizer (``apply_chat_template`` for the chat format).
        max_length: longest example; longer ones lose tokens from their start.
        format: "chat", "plain" or None (see :func:`resolve_format`).
        add_bos, add_eos: plain format only, as in :func:`~trustrepair.data.tokenization.tokenize_sft`.

    Raises:
        DataError: a template whose prefixes do not tokenise as prefixes, or an example with no
            trainable token after truncation (each names the record's source).
    """
    if resolve_format(tokenizer, format) == "plain":
        return tokenize_pieces([_plain_pieces(r) for r in records], [r.source or "conversation" for r in records],
                               tokenizer, max_length, add_bos=add_bos, add_eos=add_eos, what="training examples")
    budget = _check_max_length(max_length, False)
    out, truncated = [], 0
    for record, (ids, spans) in zip(records, _assistant_spans(tokenizer, records)):
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        example, cut = left_truncate(ids, labels, 0, budget, record.source or "conversation")
        out.append(example)
        truncated += cut
    _log_truncation(truncated, len(records), "training examples", max_length)
    return out


def format_trust(records: Sequence[TrustRecord], tokenizer, format: str | None = None) -> list[TrustRecord]:
    """The trust records with their texts as the model sees them: in the chat format the prompt is the
    rendered template (with the generation prompt) and the responses are stripped; in the plain format
    the records are returned unchanged."""
    if resolve_format(tokenizer, format) == "plain":
        return list(records)
    return [TrustRecord(render_chat(tokenizer, prompt_messages(r.prompt), generation_prompt=True, source=r.source),
                        r.proponent.strip(), r.opponent.strip(), group=r.group, source=r.source) for r in records]


def tokenize_trust_pairs(records: Sequence[TrustRecord], tokenizer, max_length: int, *, format: str | None = None,
                         add_bos: bool = False) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Trust queries ``{"proponent": example, "opponent": example}`` with identical prompt ids, formatted
    like the training data (:func:`format_trust`, then
    :func:`~trustrepair.data.tokenization.tokenize_trust`; ``add_bos`` applies to the plain format only)."""
    fmt = resolve_format(tokenizer, format)
    return tokenize_trust(format_trust(records, tokenizer, fmt), tokenizer, max_length,
                          add_bos=add_bos and fmt == "plain")
