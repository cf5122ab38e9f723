"""The demo's inputs: the default model (or ``config.model``), HH dialogues for SFT (80 % trained, scored and
repaired; 20 % for perplexity) and the built-in trust sets, in the plain HH format, with the last
``trained_blocks`` blocks fine-tuned, analysed and repaired. With ``config.planted`` > 0 the SFT data and the
trust halves are those of :func:`demo_scenario` (the planted scenario: ``planted`` poison examples per
aspect mixed into the trained dialogues; the query and held-out halves never include a poison source). The demo is then its own SFT step
(:func:`trustrepair.app.stages.sft`) followed by the stages a user's ``attribute`` / ``repair`` run uses,
on a workspace prepared by the same :func:`~trustrepair.app.inputs.prepare_workspace`.
"""
from __future__ import annotations

from trustrepair.app.inputs import PreparedRun, RunInputs, prepare_workspace
from trustrepair.app.rundir import RunDir


DATA_SEED = 0
"""The planted demo's pool of texts (:func:`~trustrepair.data.planted.planted_scenario`'s ``data_seed``): one
for every seed, which only re-partitions it, so the seeds of a run share their prefix hidden states."""


def demo_scenario(config):
    """The planted scenario of a demo ``config`` (``planted`` > 0): ``round(0.8 n_sft)`` trained and the rest
    perplexity HH dialogues, ``n_pairs`` pairs per aspect besides the poison source, split 80/20 into query
    and held-out halves, partitioned by ``config.seed`` from the pool of :data:`DATA_SEED`."""
    from trustrepair.data.planted import planted_scenario

    n_hh = round(0.8 * config.n_sft)
    return planted_scenario(config.data_dir, seed=config.seed, data_seed=DATA_SEED, n_planted=config.planted,
                            n_hh=n_hh, n_perplexity=config.n_sft - n_hh, aspects=config.aspects,
                            max_pairs=config.n_pairs, query_fraction=0.8)


def demo_inputs(config) -> dict:
    """Label -> file of everything a demo ``config`` reads (:meth:`~trustrepair.app.rundir.RunDir.check_inputs`)."""
    from trustrepair.app.models import default_model_dir
    from trustrepair.data import aspect_file, hh_file

    return {"model": default_model_dir() if config.model is None else config.model, "SFT data": hh_file(config.data_dir),
            **{f"aspect {a}": aspect_file(a, config.data_dir) for a in config.aspects}}


def load_demo_workspace(run: RunDir, hidden_store=None, scenario=None) -> PreparedRun:
    """The demo's prepared run; timed as ``load_model``, ``load_data``, ``tokenize`` and ``cache_hidden_states``
    (``hidden_store``: see :func:`~trustrepair.app.workspace.cache_hidden_states`). A planted run reads its
    data from ``scenario`` (:func:`demo_scenario` of the run's config when ``None``)."""
    from trustrepair.app.models import block_layer_names, freeze_all_but_last_blocks, load_causal_lm, transformer_blocks
    from trustrepair.data import Conversation, load_aspect, load_hh_sft, split
    from trustrepair.data.training_files import text_messages

    cfg = run.config
    inputs = demo_inputs(cfg)
    model_dir = inputs["model"]
    run.check_inputs(inputs)
    with run.timed("load_model"):
        model, tokenizer = load_causal_lm(model_dir)
    n_blocks = len(transformer_blocks(model))
    if cfg.trained_blocks > n_blocks:
        raise ValueError(f"trained_blocks={cfg.trained_blocks} but the model has {n_blocks} blocks")
    module_names = block_layer_names(model, cfg.trained_blocks)
    trained_params = freeze_all_but_last_blocks(model, cfg.trained_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    def conversations(records):
        return [(i, Conversation(text_messages(r.prompt, r.response), source=r.source,
                                 context=len(text_messages(r.prompt, r.response)) - 1, text=(r.prompt, r.response)))
                for i, r in enumerate(records)]

    with run.timed("load_data"):
        if cfg.planted:
            scenario = demo_scenario(cfg) if scenario is None else scenario
            train, heldout = conversations(scenario.sft), conversations(scenario.perplexity)
            trust = {a: (list(parts["query"].records), list(parts["heldout"].records))
                     for a, parts in scenario.parts.items()}
            perplexity_source = f"HH dialogues kept out of the planted SFT set ({len(heldout)})"
        else:
            train, heldout = split(conversations(load_hh_sft(cfg.data_dir, max_examples=cfg.n_sft, seed=cfg.seed)),
                                   0.8, seed=cfg.seed)
            trust = {}
            for aspect in cfg.aspects:
                query, held = load_aspect(aspect, cfg.data_dir, max_pairs=cfg.n_pairs, seed=cfg.seed).split(0.8,
                                                                                                          cfg.seed)
                trust[aspect] = (list(query.records), list(held.records))
            perplexity_source = f"the held-out 20% of the HH dialogues ({len(heldout)})"
    return prepare_workspace(run, RunInputs(model, tokenizer, "plain", train, heldout, perplexity_source, trust,
                                            module_names, trained_params, cfg.max_length, cfg.batch_size,
                                            hidden_store))
