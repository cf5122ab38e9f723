"""What the stages hand to each other and to the report, as typed records.

Each record reads and writes exactly the JSON of its file in the run directory (``to_json`` /
``from_json``), so run directories made before these records existed load unchanged:

    sft/evaluations.json   :class:`SFTResult`
    selection.json         :class:`Selection`
    repairs.json           ``{target: {strategy: RepairRecord}}``  (:func:`repairs_to_json`)
    evaluation.json        :class:`EvaluationRecord`
    scores.safetensors     :class:`Scores`

A target is an aspect (its subset was chosen by that aspect's scores) or ``"common"`` (one subset for
every aspect); strategies are ``dpp``, ``topk`` and ``random``. Log-odds F = mean over trust pairs of
log P(opponent | prompt) - log P(proponent | prompt): lower is better. JSON has no NaN: a non-finite
float is written as null and read back as None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from trustrepair.methods.repair_step import BetaPoint

COMMON = "common"
HALVES = ("query", "heldout")


@dataclass
class AspectLogOdds:
    """One aspect's mean log-odds on both halves of its trust pairs; ``heldout_pairs``: the held-out
    values per pair in the split's order (for standard errors), where measured."""

    query: float
    heldout: float
    heldout_pairs: list[float] | None = None

    def to_json(self) -> dict:
        out = {"query": self.query, "heldout": self.heldout}
        if self.heldout_pairs is not None:
            out["heldout_pairs"] = self.heldout_pairs
        return out

    @classmethod
    def from_json(cls, data: dict) -> "AspectLogOdds":
        return cls(data["query"], data["heldout"], data.get("heldout_pairs"))


@dataclass
class Evaluation:
    """A model's log-odds per aspect and its held-out SFT perplexity."""

    aspects: dict[str, AspectLogOdds]
    perplexity: float

    def to_json(self) -> dict:
        return {"aspects": {a: v.to_json() for a, v in self.aspects.items()}, "perplexity": self.perplexity}

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        return cls({a: AspectLogOdds.from_json(v) for a, v in data["aspects"].items()}, data["perplexity"])


@dataclass
class SFTResult:
    """The sft stage: the model before and after fine-tuning, and the mean token loss per epoch."""

    pre: Evaluation
    post: Evaluation
    epoch_losses: list[float]

    def to_json(self) -> dict:
        return {"pre": self.pre.to_json(), "post": self.post.to_json(), "sft_epoch_loss": self.epoch_losses}

    @classmethod
    def from_json(cls, data: dict) -> "SFTResult":
        return cls(Evaluation.from_json(data["pre"]), Evaluation.from_json(data["post"]), data["sft_epoch_loss"])


@dataclass
class Scores:
    """The score stage: aggregated influence of every SFT train example per aspect, (N,) float64
    (positive = detrimental), the response embeddings, (N, H) float32, and each example's self-influence
    (N,) float64 (``None`` in runs scored before it was added)."""

    per_aspect: dict[str, np.ndarray]
    embeddings: np.ndarray
    self_influence: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        extra = {} if self.self_influence is None else {"self_influence": self.self_influence}
        return {**{f"score/{a}": v for a, v in self.per_aspect.items()}, "embeddings": self.embeddings, **extra}

    def for_selection(self, kind: str) -> dict[str, np.ndarray]:
        """The per-aspect scores subsets are chosen by: ``"raw"``, or ``"normalized"`` (each divided by the
        root of its example's self-influence, :func:`trustrepair.methods.scoring.normalized_influence`)."""
        if kind == "raw":
            return dict(self.per_aspect)
        if self.self_influence is None:
            raise ValueError("these scores have no self-influences (scored by an older version); delete the run's "
                             "scores.safetensors to rescore, or use --selection-scores raw")
        from trustrepair.methods.scoring import normalized_influence

        sigma = torch.from_numpy(self.self_influence)
        return {a: normalized_influence(torch.from_numpy(v), sigma).numpy() for a, v in self.per_aspect.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], aspects: Sequence[str]) -> "Scores":
        """From :meth:`to_arrays`' output, the aspects in the order given (a safetensors file does not keep
        the order, and the common scores sum the aspects in the settings' order)."""
        return cls({a: arrays[f"score/{a}"] for a in aspects}, arrays["embeddings"], arrays.get("self_influence"))


@dataclass
class Selection:
    """The select stage: ``subsets[target][strategy]`` = training-example indices."""

    subsets: dict[str, dict[str, list[int]]]

    def to_json(self) -> dict:
        return self.subsets

    @classmethod
    def from_json(cls, data: dict) -> "Selection":
        return cls({t: {s: [int(i) for i in subset] for s, subset in by.items()} for t, by in data.items()})


@dataclass
class RepairRecord:
    """One repair: the chosen beta, the subset, the query-half objective and the held-out perplexity at
    that beta, and every probe of its search (``points[0]`` is the post-SFT model, beta = 0; a probe's
    metric is None where the search did not measure it, and a value read back from JSON is None where
    it was not finite); ``seconds``: the repair's wall time (its Newton direction and beta search), None in
    an older ``repairs.json``."""

    beta: float
    subset: list[int]
    metric: float | None
    perplexity: float | None
    points: list[BetaPoint]
    seconds: float | None = None

    def to_json(self) -> dict:
        return {"beta": self.beta, "subset": self.subset, "metric": self.metric, "perplexity": self.perplexity,
                "points": [dataclasses.asdict(p) for p in self.points], "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> "RepairRecord":
        return cls(data["beta"], data["subset"], data.get("metric"), data.get("perplexity"),
                   [BetaPoint(p["beta"], p["metric"], p["perplexity"]) for p in data["points"]], data.get("seconds"))


Repairs = dict[str, dict[str, RepairRecord]]


def repairs_to_json(repairs: Repairs) -> dict:
    return {t: {s: r.to_json() for s, r in by.items()} for t, by in repairs.items()}


def repairs_from_json(data: dict) -> Repairs:
    return {t: {s: RepairRecord.from_json(r) for s, r in by.items()} for t, by in data.items()}


@dataclass
class EvaluationRecord:
    """The evaluate stage: pre- and post-SFT, and each repair on the aspects it targets (every aspect
    for the common subset); ``post_heldout_pairs``: the post-SFT held-out values per pair (empty in an
    older ``evaluation.json``)."""

    pre: Evaluation
    post: Evaluation
    repaired: dict[str, dict[str, Evaluation]]
    post_heldout_pairs: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"pre": self.pre.to_json(), "post": self.post.to_json(),
                "repaired": {t: {s: e.to_json() for s, e in by.items()} for t, by in self.repaired.items()},
                "post_heldout_pairs": self.post_heldout_pairs}

    @classmethod
    def from_json(cls, data: dict) -> "EvaluationRecord":
        return cls(Evaluation.from_json(data["pre"]), Evaluation.from_json(data["post"]),
                   {t: {s: Evaluation.from_json(e) for s, e in by.items()} for t, by in data["repaired"].items()},
                   data.get("post_heldout_pairs", {}))


@dataclass
class TopExample:
    """A training example ranked by its influence score (most detrimental first)."""

    index: int
    score: float
    prompt: str
    response: str


@dataclass
class RunResults:
    """Everything the report shows: the settings, sizes, the evaluation, the repairs, the top examples
    per aspect and the wall time per stage (seconds)."""

    config: dict
    sizes: dict
    evaluation: EvaluationRecord
    repairs: Repairs
    top_examples: dict[str, list[TopExample]]
    timings_s: dict[str, float]
