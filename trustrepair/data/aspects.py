"""Where the data lives, and one call per built-in trust aspect and for the HH SFT set.

Built-in aspects and their sources (paths relative to the data directory; the first is the default):

* ``truthfulness``: ``truthfulqa`` (TruthfulQA.csv, 2025 edition), ``truthfulqa_v1`` (v1/TruthfulQA.csv)
* ``ethics``: ``cm_test`` (ETHICS commonsense cm_test.csv), ``cm_test_hard``
* ``bias``: ``decodingtrust`` (stereotype user_prompts.csv), ``crows_pairs``

Any other aspect comes from a JSON-lines file through :func:`load_trust_file`.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from .bias import load_crows_pairs, load_decodingtrust
from .ethics import load_ethics
from .trust_jsonl import load_trust_jsonl
from .sets import SFTSet, TrustSet
from .sft_files import load_sft_jsonl
from .truthfulqa import load_truthfulqa

ENV_DATA_DIR = "TRUSTREPAIR_DATA_DIR"
HH_STATIC = "hh_rlhf/harmless-base_test_static.jsonl.gz"

SOURCES = {
    "truthfulness": {"truthfulqa": ("truthfulqa/TruthfulQA.csv", load_truthfulqa),
                     "truthfulqa_v1": ("truthfulqa/v1/TruthfulQA.csv", load_truthfulqa)},
    "ethics": {"cm_test": ("ethics_commonsense/cm_test.csv", load_ethics),
               "cm_test_hard": ("ethics_commonsense/cm_test_hard.csv", load_ethics)},
    "bias": {"decodingtrust": ("decodingtrust_stereotype/user_prompts.csv", load_decodingtrust),
             "crows_pairs": ("crows_pairs/crows_pairs_anonymized.csv", load_crows_pairs)},
}
"""aspect -> source name -> (path relative to the data directory, loader); the first source is the default."""

ASPECTS = tuple(SOURCES)


def default_data_dir() -> Path:
    """The datasets folder: ``$TRUSTREPAIR_DATA_DIR`` if set, else the first existing ``../shared/data``
    seen from the working directory or from the repository that holds this package.

    Raises:
        FileNotFoundError: the variable names a missing folder, or no candidate exists.
    """
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_DATA_DIR}={env} is not a directory; point it at the datasets folder")
        return path
    candidates = [Path.cwd() / ".." / "shared" / "data",
                  Path(__file__).resolve().parents[2] / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError("no datasets folder found (looked for " + ", ".join(str(c) for c in candidates)
                            + f"); pass --data-dir / data_dir=... or set {ENV_DATA_DIR}")


def _resolve(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist")
    return path


def _source(name: str, data_dir: str | Path | None, source: str | None):
    if name not in SOURCES:
        raise ValueError(f"unknown aspect {name!r}; built-in aspects are {list(SOURCES)} (bring others with "
                         "load_trust_file)")
    sources = SOURCES[name]
    source = next(iter(sources)) if source is None else source
    if source not in sources:
        raise ValueError(f"unknown source {source!r} for aspect {name!r}; choose from {list(sources)}")
    relative, loader = sources[source]
    return _resolve(data_dir) / relative, loader


def aspect_file(name: str, data_dir: str | Path | None = None, source: str | None = None) -> Path:
    """The file :func:`load_aspect` reads for aspect ``name`` (and ``source``, default the first)."""
    return _source(name, data_dir, source)[0]


def hh_file(data_dir: str | Path | None = None, file: str = HH_STATIC) -> Path:
    """The file :func:`load_hh_sft` reads."""
    return _resolve(data_dir) / file


def load_aspect(name: str, data_dir: str | Path | None = None, *, source: str | None = None,
                max_pairs: int | None = None, seed: int = 0, **options) -> TrustSet:
    """The trust set of a built-in aspect.

    Args:
        name: "truthfulness", "ethics" or "bias".
        data_dir: datasets folder; default :func:`default_data_dir`.
        source: which file (see the module doc); default the aspect's first source.
        max_pairs: keep a seeded random ``max_pairs`` groups of records (see ``TrustSet.subsample``).
        seed: seed of that subsample.
        **options: passed to the loader (``pairs_per_question`` for TruthfulQA, ``min_similarity``
            for ETHICS, ``counterparts`` for DecodingTrust).
    """
    path, loader = _source(name, data_dir, source)
    accepted = [p for p in inspect.signature(loader).parameters if p != "path"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to source {source!r}; it accepts {accepted}")
    trust = TrustSet(name, loader(path, **options))
    return trust if max_pairs is None else trust.subsample(max_pairs, seed)


def load_trust_file(path: str | Path, name: str | None = None) -> TrustSet:
    """A trust set of any aspect from a JSON-lines file (see :mod:`trustrepair.data.trust_jsonl`); the
    name defaults to the file's stem."""
    path = Path(path)
    return TrustSet(name or path.name.split(".")[0], load_trust_jsonl(path))


def load_hh_sft(data_dir: str | Path | None = None, *, file: str = HH_STATIC, max_examples: int | None = None,
                seed: int = 0) -> SFTSet:
    """The HH SFT set (``file`` relative to the data directory, static or raw-dialogue layout).

    ``max_examples`` keeps a seeded random subset in file order.
    """
    sft = SFTSet("sft", load_sft_jsonl(hh_file(data_dir, file)))
    return sft if max_examples is None else sft.subsample(max_examples, seed)
