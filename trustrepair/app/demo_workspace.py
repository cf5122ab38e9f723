"""The demo's inputs: the default model (or ``config.model``), HH dialogues for SFT (80 % trained, scored and
repaired; 20 % for perplexity) and the built-in trust sets, in the plain HH format, with the last
``trained_blocks`` blocks fine-tuned, analysed and repaired. The demo is then its own SFT step
(:func:`trustrepair.app.stages.sft`) followed by the stages a user's ``attribute`` / ``repair`` run uses,
on a workspace prepared by the same :func:`~trustrepair.app.inputs.prepare_workspace`.
"""
from __future__ import annotations

from trustrepair.app.inputs import PreparedRun, RunInputs, prepare_workspace
from trustrepair.app.rundir import RunDir


def load_demo_workspace(run: RunDir) -> PreparedRun:
    """The demo's prepared run; timed as ``load_model``, ``load_data``, ``tokenize`` and ``cache_hidden_states``."""
    from trustrepair.app.models import (block_layer_names, default_model_dir, freeze_all_but_last_blocks, load_causal_lm,
                                        transformer_blocks)
    from trustrepair.data import Conversation, aspect_file, hh_file, load_aspect, load_hh_sft, split
    from trustrepair.data.training_files import text_messages

    cfg = run.config
    model_dir = default_model_dir() if cfg.model is None else cfg.model
    run.check_inputs({"model": model_dir, "SFT data": hh_file(cfg.data_dir),
                      **{f"aspect {a}": aspect_file(a, cfg.data_dir) for a in cfg.aspects}})
    with run.timed("load_model"):
        model, tokenizer = load_causal_lm(model_dir)
    n_blocks = len(transformer_blocks(model))
    if cfg.trained_blocks > n_blocks:
        raise ValueError(f"trained_blocks={cfg.trained_blocks} but the model has {n_blocks} blocks")
    module_names = block_layer_names(model, cfg.trained_blocks)
    trained_params = freeze_all_but_last_blocks(model, cfg.trained_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    with run.timed("load_data"):
        sft = load_hh_sft(cfg.data_dir, max_examples=cfg.n_sft, seed=cfg.seed)
        indexed = [(i, Conversation(text_messages(r.prompt, r.response), source=r.source,
                                    context=len(text_messages(r.prompt, r.response)) - 1, text=(r.prompt, r.response)))
                   for i, r in enumerate(sft)]
        train, heldout = split(indexed, 0.8, seed=cfg.seed)
        trust = {}
        for aspect in cfg.aspects:
            query, held = load_aspect(aspect, cfg.data_dir, max_pairs=cfg.n_pairs, seed=cfg.seed).split(0.8, cfg.seed)
            trust[aspect] = (list(query.records), list(held.records))
    perplexity_source = f"the held-out 20% of the HH dialogues ({len(heldout)})"
    return prepare_workspace(run, RunInputs(model, tokenizer, "plain", train, heldout, perplexity_source, trust,
                                            module_names, trained_params, cfg.max_length, cfg.batch_size))
