"""Fingerprints of a run's inputs: the SHA-256 of every file a run reads (a model directory's files, each
data file), so that a run directory is never reused with a model or data that changed since it was made.

The digests are kept in ``RUN/inputs.json`` (:meth:`trustrepair.app.rundir.RunDir.check_inputs`). Hashing
streams each file in 4 MiB blocks; a 540 MB fp32 SmolLM2 directory takes about half a second.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

BLOCK = 1 << 22


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def path_digests(path: str | os.PathLike) -> dict[str, str]:
    """``{file: digest}`` of a file, or of every file below a directory (hidden ones and ``__pycache__``
    left out), keyed by absolute path."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return {str(path): file_digest(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))
    return {str(p): file_digest(p) for p in files}


def fingerprint(inputs: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
    """``{label: {file: digest}}`` of labelled inputs (``{"--model": dir, "--train": file, ...}``)."""
    return {label: path_digests(path) for label, path in inputs.items()}


def changed_inputs(saved: Mapping[str, Mapping[str, str]], now: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Descriptions of what differs: ``"--train /data/a.jsonl (changed)"``, ``"... (added)"``, ``(removed)``."""
    out = []
    for label in sorted(set(saved) | set(now)):
        before, after = saved.get(label, {}), now.get(label, {})
        for file in sorted(set(before) | set(after)):
            if file not in after:
                out.append(f"{label} {file} (removed)")
            elif file not in before:
                out.append(f"{label} {file} (added)")
            elif before[file] != after[file]:
                out.append(f"{label} {file} (changed)")
    return out
