"""SFT data: JSON lines in the "static" layout or raw Anthropic HH dialogues (``.jsonl`` / ``.jsonl.gz``).

Per line, the layout is recognised by its keys:

* static (Dahoas rm-static style): ``prompt`` plus ``response`` (preferred) or ``chosen``; both used
  verbatim (the prompt ends with "\\n\\nAssistant:", the response starts with a space).
* raw HH: ``chosen`` only, a whole dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is
  everything up to and including the final "\\n\\nAssistant:", the response is what follows it.

:func:`prompt_messages` reads such a prompt (or a trust prompt ending in "\\n\\nAnswer:") back into
the turns a chat template takes.

Dialogues whose final assistant turn is empty (4 of the 2,312 harmless-base test dialogues) carry no
loss: they are skipped and counted in a warning.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from .reading import DataError, iter_jsonl, text_field
from .records import SFTRecord

logger = logging.getLogger(__name__)

ASSISTANT_CUE = "\n\nAssistant:"
HUMAN_CUE = "\n\nHuman:"
ANSWER_CUE = "\n\nAnswer:"
_TURN_CUE = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF_CUE = {"Human": "user", "Assistant": "assistant"}


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt, response) of an HH dialogue: the split falls right after the last "\\n\\nAssistant:".

    Raises:
        ValueError: the text has no "\\n\\nHuman:" turn before an "\\n\\nAssistant:" turn.
    """
    cut = dialogue.rfind(ASSISTANT_CUE)
    if cut < 0 or HUMAN_CUE not in dialogue[:cut]:
        raise ValueError('not an HH dialogue: expected "\\n\\nHuman: ..." followed by "\\n\\nAssistant: ..."')
    cut += len(ASSISTANT_CUE)
    return dialogue[:cut], dialogue[cut:]


def prompt_messages(prompt: str) -> list[tuple[str, str]]:
    """The ``(role, content)`` turns a prompt text stands for, to be rendered with a chat template's
    generation prompt.

    A trailing "\\n\\nAssistant:" or "\\n\\nAnswer:" cue is dropped (the template's generation prompt
    takes its place). What remains is an HH transcript when it holds a "\\n\\nHuman:" cue: each
    "\\n\\nHuman:" / "\\n\\nAssistant:" segment becomes a user / assistant turn and any text before the
    first cue a system turn; otherwise the whole text is one user turn. Whitespace around each turn's
    text is dropped (the template supplies its own separators).

        prompt_messages("What is 2+2?\\n\\nAnswer:")                 # [("user", "What is 2+2?")]
        prompt_messages("\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:")
        # [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    """
    body = prompt.rstrip()
    for cue in (ASSISTANT_CUE, ANSWER_CUE):
        if body.endswith(cue):
            body = body[: -len(cue)]
            break
    if HUMAN_CUE not in body:
        return [("user", body.strip())]
    head, *rest = _TURN_CUE.split(body)
    turns = [("system", head.strip())] if head.strip() else []
    turns += [(_ROLE_OF_CUE[cue], text.strip()) for cue, text in zip(rest[::2], rest[1::2])]
    return turns


def load_sft_jsonl(path: str | Path) -> list[SFTRecord]:
    """SFT records from a static-layout or raw-HH JSON-lines file, in file order.

    Raises:
        DataError: a malformed line, a line with neither ``prompt`` nor ``chosen``, a non-dialogue
            ``chosen``, or no usable record at all (each names the file and line).
    """
    records, skipped = [], 0
    for line_no, obj in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if "prompt" in obj:
            key = "response" if "response" in obj else "chosen"
            if key not in obj:
                raise DataError(f"{where}: static layout needs 'response' or 'chosen' beside 'prompt'; "
                                f"the line has {sorted(obj)}")
            prompt = obj["prompt"]
            if not isinstance(prompt, str):
                raise DataError(f"{where}: field 'prompt' must be a string")
            response = obj[key]
            if not isinstance(response, str):
                raise DataError(f"{where}: field {key!r} must be a string")
        elif "chosen" in obj:
            try:
                prompt, response = split_dialogue(text_field(path, line_no, obj, "chosen"))
            except ValueError as err:
                raise DataError(f"{where}: {err}") from None
        else:
            raise DataError(f"{where}: missing keys: need 'prompt' + 'response'/'chosen' (static) or 'chosen' "
                            f"(HH dialogue); the line has {sorted(obj)}")
        if not response.strip():
            skipped += 1
            continue
        records.append(SFTRecord(prompt, response, source=where))
    if skipped:
        logger.warning("%s: skipped %d examples with an empty response", path, skipped)
    if not records:
        raise DataError(f"{path}: no SFT examples with a non-empty response")
    return records
