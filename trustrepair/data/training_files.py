"""Fine-tuning data in the layouts people use, read into :class:`~trustrepair.data.records.Conversation`
records that keep every turn.

Files: JSON lines (``.jsonl``, ``.jsonl.gz``), a parquet file (``.parquet``) and a directory written by
``datasets.Dataset.save_to_disk`` (both read through the Hugging Face ``datasets`` library). The layout
is recognised per line or row by its fields:

* chat: ``{"messages": [{"role", "content"}, ...]}``, roles system / user / assistant; the loss falls
  on every assistant turn. At least one assistant turn is required.
* conversational prompt/completion (TRL): ``{"prompt": [messages], "completion": [messages]}``; the
  loss falls on the assistant turns of ``completion`` only.
* prompt/completion: ``{"prompt": str, "completion": str}``, or ``"response"`` (or ``"chosen"``, as in
  the HH "static" files) in place of ``"completion"``; the loss falls on the completion.
* HH dialogue: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}``, split after the last
  "\\n\\nAssistant:" by :func:`~trustrepair.data.sft_files.split_dialogue`; the loss falls on the final
  assistant turn (earlier turns are the shared context of the preference pair).

The text layouts keep their verbatim ``(prompt, completion)`` in ``Conversation.text`` for the ``plain``
format and their turns in ``messages`` for the ``chat`` format (:func:`text_messages`). As
:func:`~trustrepair.data.sft_files.load_sft_jsonl` does, examples whose completion is blank carry no
loss: they are skipped and counted in a warning. Sources read "file:line" for JSON lines and
"path:row N" (N the 0-based dataset index) for parquet files and saved datasets.

    records = load_training_files(["train.jsonl", "more.parquet"])   # in order, each with its source
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

from .reading import DataError, iter_jsonl
from .records import ROLES, Conversation
from .sft_files import prompt_messages, split_dialogue

logger = logging.getLogger(__name__)

COMPLETION_KEYS = ("completion", "response", "chosen")
ACCEPTED = ('{"messages": [{"role", "content"}, ...]}', '{"prompt": [messages], "completion": [messages]}',
            '{"prompt", "completion"}', '{"prompt", "response"}', '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}')
"""The layouts :func:`load_training_file` recognises, as error messages list them."""


def text_messages(prompt: str, completion: str) -> tuple[tuple[str, str], ...]:
    """The turns of a text-layout example: :func:`~trustrepair.data.sft_files.prompt_messages` of the prompt
    (an HH transcript becomes its turns, a trailing "\\\\n\\\\nAssistant:" / "\\\\n\\\\nAnswer:" cue is dropped)
    and the completion, stripped of surrounding whitespace, as the final assistant turn."""
    return tuple(prompt_messages(prompt)) + (("assistant", completion.strip()),)


def _messages(value, where: str, field: str) -> list[tuple[str, str]]:
    """``[(role, content), ...]`` from a list of ``{"role", "content"}`` objects."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {message['role']!r}; accepted roles are {list(ROLES)}")
        turns.append((message["role"], message["content"]))
    return turns


def _text(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def conversation_from_row(row: dict, where: str) -> Conversation | None:
    """The example of one line or row (layout recognised by its fields); None when its completion is
    blank (no loss).

    Raises:
        DataError: an unknown layout (the accepted ones are listed), a malformed field, or a chat
            example without an assistant turn to train on.
    """
    if "messages" in row:
        return Conversation(tuple(_messages(row["messages"], where, "messages")), source=where)
    completion_key = next((key for key in COMPLETION_KEYS if key in row), None)
    if "prompt" in row and completion_key is not None:
        if isinstance(row["prompt"], (list, tuple)):
            prompt = _messages(row["prompt"], where, "prompt")
            completion = _messages(row[completion_key], where, completion_key)
            return Conversation(tuple(prompt + completion), source=where, context=len(prompt))
        prompt, completion = _text(row, "prompt", where), _text(row, completion_key, where)
    elif "chosen" in row:
        try:
            prompt, completion = split_dialogue(_text(row, "chosen", where))
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
    else:
        raise DataError(f"{where}: unknown layout (fields {sorted(row)}); accepted layouts: " + ", ".join(ACCEPTED))
    if not completion.strip():
        return None
    messages = text_messages(prompt, completion)
    return Conversation(messages, source=where, context=len(messages) - 1, text=(prompt, completion))


def _dataset_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(source, row)`` of a parquet file or a saved ``datasets`` dataset."""
    import datasets

    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as a saved datasets dataset or parquet file ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: a dataset with splits {list(dataset)}; pass one split's folder, e.g. "
                        f"{path / next(iter(dataset))}")
    for index, row in enumerate(dataset):
        yield f"{path}:row {index}", row


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    if path.is_dir() or path.suffix == ".parquet":
        yield from _dataset_rows(path)
    else:
        for line_no, obj in iter_jsonl(path):
            yield f"{path}:{line_no}", obj


def load_training_file(path: str | Path) -> list[Conversation]:
    """The examples of one file or saved dataset, in order (see the module doc for the layouts).

    Raises:
        DataError: a missing or unreadable file, an unknown layout, a malformed line or row, or no
            example with a non-blank completion (each names the file and line or row).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    records, skipped = [], 0
    for where, row in _rows(path):
        record = conversation_from_row(row, where)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    if skipped:
        logger.warning("%s: skipped %d examples with a blank completion", path, skipped)
    if not records:
        raise DataError(f"{path}: no training examples (the file is empty or every completion is blank); "
                        "accepted layouts: " + ", ".join(ACCEPTED))
    return records


def load_training_files(paths: Sequence[str | Path]) -> list[Conversation]:
    """The examples of several files concatenated in the given order, each remembering its source."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("load_training_files got no paths; pass at least one training file")
    return [record for path in paths for record in load_training_file(path)]
