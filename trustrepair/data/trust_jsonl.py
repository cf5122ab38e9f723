"""A trust set of any aspect from JSON lines: ``{"prompt", "proponent", "opponent"}`` per line.

Texts are used verbatim (so a prompt ending in "\\n\\nAssistant:" wants responses starting with a
space). An optional string ``group`` keeps related lines on the same side of a split.
"""
from __future__ import annotations

from pathlib import Path

from .reading import DataError, iter_jsonl, text_field
from .records import TrustRecord

FIELDS = ("prompt", "proponent", "opponent")


def load_trust_jsonl(path: str | Path) -> list[TrustRecord]:
    """Trust records in file order.

    Raises:
        DataError: a malformed line, missing keys (listed), a non-string or blank response, identical
            proponent and opponent, a non-string group, or an empty file.
    """
    records = []
    for line_no, obj in iter_jsonl(path, required=FIELDS):
        where = f"{path}:{line_no}"
        if not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
        group = obj.get("group")
        if group is not None and not isinstance(group, str):
            raise DataError(f"{where}: field 'group' must be a string, got {type(group).__name__}")
        records.append(TrustRecord(obj["prompt"], text_field(path, line_no, obj, "proponent"),
                                   text_field(path, line_no, obj, "opponent"), group=group, source=where))
    if not records:
        raise DataError(f"{path}: no trust records (the file has no non-blank lines)")
    return records
