"""Reading third-party files with errors a user can act on.

Every reader reports problems as :class:`DataError` (a ``ValueError``) naming the file and the line:
a malformed JSON line, a CSV row with the wrong number of fields, missing columns or keys (all of
them listed), an empty or non-string field. ``.gz`` files are decompressed on the fly; nothing is
copied anywhere.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """A data file that cannot be turned into records; the message names the file and the line."""


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a UTF-8 text file for reading, gunzipping ``*.gz``; a leading BOM is dropped (``utf-8-sig``).
    Bytes that are not UTF-8 raise ``UnicodeDecodeError`` while reading; the readers below turn it
    into a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path or pass --data-dir pointing at the datasets")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def iter_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSON-lines file (``.jsonl``/``.jsonl.gz``).

    Raises:
        DataError: bytes that are not UTF-8, a line that is not a JSON object, or one that lacks any
            key of ``required`` (all missing keys are listed).
    """
    line_no = 0
    with open_text(path) as f:
        lines = iter(f)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text after line {line_no} ({err.reason})") from None
            line_no += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            missing = [key for key in required if key not in obj]
            if missing:
                raise DataError(f"{path}:{line_no}: missing keys {missing}; the line has {sorted(obj)}")
            yield line_no, obj


def iter_csv(path: str | Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for every data row of a CSV file with a header line.

    ``line_number`` is the physical line on which the row ends (quoted fields may span lines).

    Raises:
        DataError: bytes that are not UTF-8, the header lacks columns of ``required`` (all listed,
            with the columns found), a row the csv module rejects (e.g. a field over its size limit), or a row with
            more or fewer fields than the header.
    """
    with open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
        missing = [col for col in required if col not in header]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; the header has {header}")
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text after line {reader.line_num} ({err.reason})") from None
            extra = row.pop(None, None) or []
            n_fields = sum(value is not None for value in row.values()) + len(extra)
            if n_fields != len(header):
                raise DataError(f"{path}:{reader.line_num}: row has {n_fields} fields, the header has {len(header)}")
            yield reader.line_num, row


def text_field(path: str | Path, line_no: int, row: dict, key: str) -> str:
    """``row[key]`` verbatim; a missing, non-string or blank (whitespace-only) value is a DataError."""
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{line_no}: field {key!r} is empty")
    return value
