"""Datasets in trustrepair's conventions: loaders for the SFT and trust files, the seeded split,
tokenisation into ``{"input_ids", "labels"}`` examples and trust queries (batched by
:mod:`trustrepair.batching`).

    sft = load_hh_sft(max_examples=300)                      # SFTSet of (prompt, response)
    train, heldout = sft.split(0.8, seed=0)                  # held-out part: perplexity
    trust = load_aspect("truthfulness")                      # TrustSet of (prompt, proponent, opponent)
    query_half, eval_half = trust.split(0.8, seed=0)
    queries = query_half.tokenize(tokenizer, max_length=256) # [{"proponent": ex, "opponent": ex}, ...]

A user's own fine-tuning data, in the chat or plain format:

    records = load_training_files(["train.jsonl"])           # Conversations: chat, prompt/completion, HH, ...
    examples = tokenize_conversations(records, tokenizer, 512)  # loss on assistant turns only
    queries = tokenize_trust_pairs(query_half, tokenizer, 256)  # the trust pairs in the same format
"""
from .aspects import (ASPECTS, SOURCES, aspect_file, default_data_dir, hh_file, load_aspect, load_hh_sft,
                      load_trust_file)
from .bias import CROWS_GROUPS, DT_COUNTERPARTS, load_crows_pairs, load_decodingtrust
from .ethics import load_ethics
from .planted import PlantedScenario, planted_scenario
from .formats import FORMATS, format_trust, render_chat, resolve_format, tokenize_conversations, tokenize_trust_pairs
from .trust_jsonl import load_trust_jsonl
from .reading import DataError
from .records import Conversation, SFTRecord, TrustRecord, split, subsample
from .sets import SFTSet, TrustSet
from .sft_files import load_sft_jsonl, prompt_messages, split_dialogue
from .tokenization import tokenize_sft, tokenize_trust
from .training_files import load_training_file, load_training_files
from .truthfulqa import load_truthfulqa

__all__ = [
    "ASPECTS", "CROWS_GROUPS", "PlantedScenario", "aspect_file", "hh_file", "planted_scenario", "Conversation", "DT_COUNTERPARTS", "DataError", "FORMATS", "SFTRecord", "SFTSet",
    "SOURCES", "TrustRecord", "TrustSet", "default_data_dir", "format_trust", "load_aspect",
    "load_crows_pairs", "load_decodingtrust", "load_ethics", "load_hh_sft", "load_sft_jsonl",
    "load_training_file", "load_training_files", "load_trust_file", "load_trust_jsonl", "load_truthfulqa",
    "prompt_messages", "render_chat", "resolve_format", "split", "split_dialogue", "subsample",
    "tokenize_conversations", "tokenize_sft", "tokenize_trust", "tokenize_trust_pairs",
]
