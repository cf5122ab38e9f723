"""Datasets in trustrepair's conventions: loaders for the SFT and trust files, the seeded split,
tokenisation into ``{"input_ids", "labels"}`` examples and trust queries (batched by
:mod:`trustrepair.batching`).

    sft = load_hh_sft(max_examples=300)                      # SFTSet of (prompt, response)
    train, heldout = sft.split(0.8, seed=0)                  # held-out part: perplexity
    trust = load_aspect("truthfulness")                      # TrustSet of (prompt, proponent, opponent)
    query_half, eval_half = trust.split(0.8, seed=0)
    queries = query_half.tokenize(tokenizer, max_length=256) # [{"proponent": ex, "opponent": ex}, ...]
"""
from .aspects import ASPECTS, SOURCES, default_data_dir, load_aspect, load_hh_sft, load_trust_file
from .bias import CROWS_GROUPS, DT_COUNTERPARTS, load_crows_pairs, load_decodingtrust
from .ethics import load_ethics
from .trust_jsonl import load_trust_jsonl
from .reading import DataError
from .records import SFTRecord, TrustRecord, split, subsample
from .sets import SFTSet, TrustSet
from .sft_files import load_sft_jsonl, split_dialogue
from .tokenization import tokenize_sft, tokenize_trust
from .truthfulqa import load_truthfulqa

__all__ = [
    "ASPECTS", "CROWS_GROUPS", "DT_COUNTERPARTS", "DataError", "SFTRecord", "SFTSet", "SOURCES", "TrustRecord",
    "TrustSet", "default_data_dir", "load_aspect",
    "load_crows_pairs", "load_decodingtrust", "load_ethics", "load_hh_sft", "load_sft_jsonl",
    "load_trust_file", "load_trust_jsonl", "load_truthfulqa", "split", "split_dialogue",
    "subsample", "tokenize_sft", "tokenize_trust",
]
