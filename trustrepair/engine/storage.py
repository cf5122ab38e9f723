"""Atomic files: every file trustrepair writes goes through :func:`atomic_write`.

A writer fills a temporary file with a unique name (``tempfile.mkstemp``) in the target's folder, then
``os.replace`` renames it over the target: a reader sees the old file or the complete new one, never a
partial one, and the temporary file is removed on any failure (also ``KeyboardInterrupt``), so a failed
write leaves the old file as it was and nothing beside it.

Permissions: every file gets the mode a plain ``open`` would give it (0666 less the process umask), not
``mkstemp``'s owner-only 0600, so others on a shared server can read a report as they read any file.

Tensors with their metadata (:func:`save_paired`, :func:`load_paired_metadata`,
:func:`load_paired_tensors`): ``<stem>.safetensors`` and ``<stem>.json`` in one folder, both carrying
the same random save id; the JSON is written last, so a complete pair has matching ids and an
interrupted save is detected instead of mixing two saves.

Reading back (:func:`read_json`, :func:`load_tensors`, :func:`load_numpy`, :func:`load_torch`): a file
that cannot be parsed (truncated, overwritten, edited) raises :class:`DamagedFileError`, a ``ValueError``
naming the file and what to do, never the parser's own traceback.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file


def _default_mode() -> int:
    """0666 less the umask: the mode ``open`` gives a new file (the umask is read by setting it, briefly
    to the strictest value so that a file another thread creates meanwhile is never too open)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary_path)`` then ``os.replace``; creates the parent folders.

    ``write`` receives the path of an existing, empty temporary file in the same folder and may
    overwrite it. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())  # after: a writer such as safetensors' may recreate the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, through dicts, lists and
    tuples (tuples become lists, as JSON has them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload) -> Path:
    """Standard JSON (indent 2, trailing newline), atomically: non-finite floats (a diverged
    beta probe) are written as null, since JSON has no NaN or infinity."""
    return write_text(path, json.dumps(finite_or_none(payload), indent=2, allow_nan=False) + "\n")


def save_torch(path: str | os.PathLike, obj) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (read back with ``torch.load(path, weights_only=True)``).
    Saved through a file object, so the archive's inner folder name does not depend on the temporary name."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (moved to the CPU, made contiguous) with the string ``metadata``
    in its header, atomically."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


class DamagedFileError(ValueError):
    """A file trustrepair wrote cannot be read back; the message names it and says to delete it."""


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn a parser's error while reading ``path`` into a :class:`DamagedFileError`.

    Parse errors only: a missing or unreadable file stays a ``FileNotFoundError`` / ``PermissionError``.
    ``RuntimeError`` and ``OSError`` (EINVAL) are torch's answers to a damaged archive; ``KeyError`` /
    ``TypeError`` come from a JSON record missing a field.
    """
    try:
        yield
    except (FileNotFoundError, PermissionError):
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, EOFError, OSError, RuntimeError, KeyError,
            TypeError, ValueError) as err:
        detail = " ".join(str(err).split())[:160]
        raise DamagedFileError(f"{path} is damaged and cannot be read ({type(err).__name__}: {detail}); delete it "
                               "and rerun the command, which recomputes it") from None


def read_json(path: str | os.PathLike, parse: Callable | None = None):
    """The JSON in ``path``, passed through ``parse`` when given (e.g. a record's ``from_json``)."""
    with reading(path):
        payload = json.loads(Path(path).read_text())
        return payload if parse is None else parse(payload)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read into memory (CPU): unlike ``safetensors.torch.load_file``,
    which memory-maps the file, the result does not depend on the file staying unchanged (a process
    whose mapped file is overwritten in place dies of SIGBUS)."""
    with reading(path):
        return safetensors_load(Path(path).read_bytes())


def load_numpy(path: str | os.PathLike) -> dict:
    """The arrays of a safetensors file, as numpy arrays in memory."""
    from safetensors.numpy import load

    with reading(path):
        return load(Path(path).read_bytes())


def load_torch(path: str | os.PathLike):
    """An object :func:`save_torch` wrote (tensors and containers only: ``weights_only=True``)."""
    with reading(path):
        return torch.load(path, weights_only=True)


def tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none)."""
    with reading(path), safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def save_paired(directory: str | os.PathLike, stem: str, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    """``<stem>.safetensors`` (``tensors``) and then ``<stem>.json`` (``metadata`` with ``"save_id"``
    inserted after its ``"format"`` key; JSON indent 1) in ``directory``.

    ``metadata["format"]`` (a string) is also stored in the tensor file's header, next to the save id.
    """
    save_id = uuid.uuid4().hex
    save_tensors(Path(directory) / f"{stem}.safetensors", tensors,
                 metadata={"format": metadata["format"], "save_id": save_id})
    meta = {"format": metadata["format"], "save_id": save_id, **metadata}
    atomic_write(Path(directory) / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def load_paired_metadata(directory: str | os.PathLike, stem: str) -> dict | None:
    """The JSON half of a :func:`save_paired` pair, or None unless both files exist."""
    directory = Path(directory)
    meta_path, tensor_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    return read_json(meta_path)


def load_paired_tensors(directory: str | os.PathLike, stem: str, metadata: dict) -> dict[str, torch.Tensor] | None:
    """The tensors of a :func:`save_paired` pair (on the CPU), or None when the tensor file's save id is
    not ``metadata``'s (the two files come from different saves: an interrupted save)."""
    path = Path(directory) / f"{stem}.safetensors"
    if tensor_metadata(path).get("save_id") != metadata.get("save_id"):
        return None
    return load_tensors(path)
