"""Named, immutable collections of text records with the split / subsample / tokenize steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .reading import DataError
from .records import SFTRecord, TrustRecord, split, subsample
from .tokenization import tokenize_sft, tokenize_trust


@dataclass(frozen=True)
class _RecordSet:
    name: str
    records: tuple

    def __post_init__(self):
        object.__setattr__(self, "records", tuple(self.records))
        if not self.records:
            raise DataError(f"{self.name!r} has no records after loading and filtering; check the file and the "
                            "filter options")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator:
        return iter(self.records)

    def __getitem__(self, index: int):
        return self.records[index]

    def split(self, frac: float = 0.8, seed: int = 0):
        """(first part, rest) as sets of the same kind and name; see :func:`trustrepair.data.split`."""
        first, rest = split(self.records, frac, seed)
        return type(self)(self.name, first), type(self)(self.name, rest)

    def subsample(self, n: int, seed: int = 0):
        """A seeded random ``n`` groups of records (all of them if ``n >= len``), in order."""
        return type(self)(self.name, subsample(self.records, n, seed))


@dataclass(frozen=True)
class TrustSet(_RecordSet):
    """The trust triples of one aspect (``records``: tuple of :class:`TrustRecord`)."""

    records: tuple[TrustRecord, ...]

    def tokenize(self, tokenizer, max_length: int, *, add_bos: bool = False) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Trust queries; see :func:`trustrepair.data.tokenization.tokenize_trust`."""
        return tokenize_trust(self.records, tokenizer, max_length, add_bos=add_bos)


@dataclass(frozen=True)
class SFTSet(_RecordSet):
    """Supervised fine-tuning pairs (``records``: tuple of :class:`SFTRecord`)."""

    records: tuple[SFTRecord, ...]

    def tokenize(self, tokenizer, max_length: int, *, add_bos: bool = False,
                 add_eos: bool = True) -> list[dict[str, torch.Tensor]]:
        """Training examples; see :func:`trustrepair.data.tokenization.tokenize_sft`."""
        return tokenize_sft(self.records, tokenizer, max_length, add_bos=add_bos, add_eos=add_eos)
