"""Text records of the SFT and trust sets, and the seeded 80/20 split.

An SFT record is a (prompt x, response y) pair; a trust record is a (prompt m, proponent p, opponent o)
triple (paper Eq. 8: the metric is log P(o|m) - log P(p|m), lower is better); a :class:`Conversation`
keeps every turn of a fine-tuning example from a user's files (:mod:`trustrepair.data.training_files`).
SFT and trust texts are stored exactly as they will be tokenised: prompts end with their cue ("\\n\\nAssistant:",
"\\n\\nAnswer:") and responses start with the space that follows it, as in the HH dialogues. (The
paper prints its templates with "\\n\\n Assistant:"; the built-in loaders drop that space so the cue
is the one the HH-fine-tuned model saw.)

:func:`split` sends whole *groups* of records to one side (records with ``group=None`` are their own
group), so e.g. several answer pairs of one TruthfulQA question never straddle the query and held-out
halves.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

from .reading import DataError

R = TypeVar("R")


@dataclass(frozen=True)
class SFTRecord:
    """One supervised fine-tuning example; the loss is taken on ``response`` only.

    ``source`` says where it came from ("file:line") for messages.
    """

    prompt: str
    response: str
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not isinstance(self.response, str):
            raise DataError(f"{self.source or 'SFT record'}: prompt and response must be strings")
        if not self.response.strip():
            raise DataError(f"{self.source or 'SFT record'}: empty response (it would carry no loss)")


@dataclass(frozen=True)
class TrustRecord:
    """One trust triple: shared ``prompt``, trustworthy ``proponent``, untrustworthy ``opponent``.

    Records with the same non-None ``group`` stay on the same side of a :func:`split`.
    """

    prompt: str
    proponent: str
    opponent: str
    group: str | None = None
    source: str = ""

    def __post_init__(self):
        where = self.source or "trust record"
        for field in ("prompt", "proponent", "opponent"):
            if not isinstance(getattr(self, field), str):
                raise DataError(f"{where}: {field} must be a string")
        for field in ("proponent", "opponent"):
            if not getattr(self, field).strip():
                raise DataError(f"{where}: empty {field}")
        if self.proponent == self.opponent:
            raise DataError(f"{where}: proponent and opponent are identical ({self.proponent!r}); "
                            "the pair would carry no signal")


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One fine-tuning example with every turn: ``messages`` is a tuple of ``(role, content)`` pairs, role
    one of :data:`ROLES`, contents as the chat template receives them.

    The loss falls on the assistant turns at index ``>= context`` (earlier turns are context only).
    ``text`` is the verbatim ``(prompt, completion)`` of the text layouts (prompt/completion,
    prompt/response, HH dialogues); the ``plain`` format joins exactly these two strings, and
    ``messages`` then holds the same example as turns (see
    :func:`trustrepair.data.training_files.text_messages`). ``text`` is None for chat layouts.
    ``source`` says where it came from ("file:line" or "dataset:row N").
    """

    messages: tuple[tuple[str, str], ...]
    source: str = ""
    context: int = 0
    text: tuple[str, str] | None = None

    def __post_init__(self):
        where = self.source or "conversation"
        object.__setattr__(self, "messages", tuple((role, content) for role, content in self.messages))
        for role, content in self.messages:
            if role not in ROLES:
                raise DataError(f"{where}: unknown role {role!r}; accepted roles are {list(ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: the content of a {role!r} turn must be a string, got "
                                f"{type(content).__name__}")
        if not self.trained_turns:
            raise DataError(f"{where}: no assistant turn to train on (loss falls on assistant turns only); "
                            "every example needs at least one")

    @property
    def trained_turns(self) -> tuple[int, ...]:
        """Indices of the messages that carry the loss: the assistant turns at index >= ``context``."""
        return tuple(i for i, (role, _) in enumerate(self.messages) if role == "assistant" and i >= self.context)


def _group_ids(records: Sequence) -> list[int]:
    """Index of each record's group, numbered in order of first appearance (no hashing of Python objects
    beyond a dict lookup, so the result does not depend on PYTHONHASHSEED)."""
    first_seen: dict = {}
    ids = []
    for i, record in enumerate(records):
        key = getattr(record, "group", None)
        key = ("record", i) if key is None else ("group", key)
        ids.append(first_seen.setdefault(key, len(first_seen)))
    return ids


def split(records: Sequence[R], frac: float = 0.8, seed: int = 0) -> tuple[list[R], list[R]]:
    """Seeded split into a first part (about ``frac`` of the groups) and the rest, both in input order.

    The groups are permuted with ``random.Random(seed)`` (reproducible across runs, platforms and hash
    seeds); the first ``round(frac * n_groups)`` of the permutation form the first part. The paper's
    protocol uses the first part of every trust set for the influence queries and the rest for
    evaluation, and the rest of the SFT set for held-out perplexity.

    Raises:
        ValueError: ``frac`` not in (0, 1), or too few groups for both parts to be non-empty.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"split fraction must lie strictly between 0 and 1, got {frac}")
    group_of = _group_ids(records)
    n_groups = len(set(group_of))
    n_first = round(frac * n_groups)
    if n_first == 0 or n_first == n_groups:
        raise ValueError(f"cannot split {len(records)} records in {n_groups} groups at frac={frac}: one part would "
                         "be empty; give more records or a fraction nearer 0.5")
    order = list(range(n_groups))
    random.Random(seed).shuffle(order)
    first_groups = set(order[:n_first])
    first = [r for r, g in zip(records, group_of) if g in first_groups]
    rest = [r for r, g in zip(records, group_of) if g not in first_groups]
    return first, rest


def subsample(records: Sequence[R], n: int, seed: int = 0) -> list[R]:
    """A seeded random ``n`` of the groups (all their records), in input order; everything if ``n`` covers all.

    Prefer this to taking the first ``n`` rows: the files are ordered by topic or group, so a prefix is
    a biased sample.
    """
    if n < 1:
        raise ValueError(f"subsample size must be at least 1, got {n}")
    group_of = _group_ids(records)
    n_groups = len(set(group_of))
    if n >= n_groups:
        return list(records)
    keep = set(random.Random(seed).sample(range(n_groups), n))
    return [r for r, g in zip(records, group_of) if g in keep]
