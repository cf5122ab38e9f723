"""How well each attribution finds the planted examples of one seed of the planted scenario (issue 17).

SmolLM2-135M-Instruct, last 2 blocks fine-tuned (the demo's SFT settings) on
``planted_scenario(seed, n_planted=32, n_hh=320, n_perplexity=80, max_pairs=300)``; its 80 other HH dialogues for perplexity.
Rankings of the 416 training examples per aspect (query halves): EK-FAC influence (the demo's fit and
score stages), gradient dot, gradient cosine (:mod:`trustrepair.methods.baselines`) and random, scored
by :func:`~trustrepair.methods.ground_truth.ranking_metrics` against that aspect's planted indices, with
the count of the other aspects' planted examples in each top 32.

    python -m benchmarks.planted_ranking SEED OUT_DIR      # writes OUT_DIR/planted_ranking.json
"""
import json, sys, time
import numpy as np
from trustrepair.app import stages
from trustrepair.app.inputs import RunInputs, prepare_workspace
from trustrepair.app.models import (block_layer_names, default_model_dir, freeze_all_but_last_blocks, load_causal_lm)
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import DemoConfig
from trustrepair.data import Conversation
from trustrepair.data.planted import planted_scenario
from trustrepair.data.training_files import text_messages
from trustrepair.methods.baselines import gradient_similarity
from trustrepair.methods.ground_truth import ranking_metrics
from trustrepair.engine.storage import write_json


def planted_workspace(cfg: DemoConfig, out: str):
    """``(run, scenario, prepared run)`` of one seed of the planted scenario on SmolLM2 with its last 2
    blocks trained (the workspace of this benchmark and :mod:`benchmarks.planted_dose`)."""
    run = RunDir(out, cfg, progress=False)
    sc = planted_scenario(seed=cfg.seed, n_planted=32, n_hh=320, n_perplexity=80, max_pairs=300)
    model, tok = load_causal_lm(default_model_dir())
    names = block_layer_names(model, 2); trained = freeze_all_but_last_blocks(model, 2)
    for p in model.parameters(): p.requires_grad_(False)
    conv = lambda r: Conversation(text_messages(r.prompt, r.response), source=r.source, context=1, text=(r.prompt, r.response))
    train = [(i, conv(r)) for i, r in enumerate(sc.sft)]
    held = [(i, conv(r)) for i, r in enumerate(sc.perplexity)]
    trust = {a: (list(p["query"].records), list(p["heldout"].records)) for a, p in sc.parts.items()}
    return run, sc, prepare_workspace(run, RunInputs(model, tok, "plain", train, held, "HH", trust, names, trained, 128, 16))


def main() -> None:
    seed, out = int(sys.argv[1]), sys.argv[2]
    t0 = time.time()
    cfg = DemoConfig(seed=seed, sft_lr=1e-4)  # the demo's SFT rate when RESULTS recorded this benchmark
    run, sc, prep = planted_workspace(cfg, out)
    ws = prep.workspace
    sft = stages.sft(run, ws)
    factors = stages.fit(run, ws)
    scores = stages.score(run, ws, factors, cfg.aspects)
    t_score = time.time()
    base = gradient_similarity(ws.tail, ws.train, {a: ws.trust[a]["query"] for a in cfg.aspects},
                               modules=ws.tail_module_names(), task=ws.task, batch_size=16)
    t_base = time.time() - t_score
    rng = np.random.default_rng(seed)
    res = {"seed": seed, "baseline_s": t_base, "ranking": {}}
    for a in cfg.aspects:
        planted = [i for i, asp in sc.planted.items() if asp == a]
        methods = {"ekfac": scores.per_aspect[a], "gradient_dot": base["gradient_dot"][a].double().numpy(),
                   "gradient_cosine": base["gradient_cosine"][a].double().numpy(), "random": rng.random(len(sc.sft))}
        res["ranking"][a] = {m: ranking_metrics(s, planted) for m, s in methods.items()}
        others = {m: {b: int(sum(sc.planted.get(int(i)) == b for i in np.argsort(-s, kind="stable")[:32])) for b in cfg.aspects if b != a} for m, s in methods.items()}
        res["ranking"][a]["other_poison_in_topk"] = others
    res["sft"] = {"pre": {a: [sft.pre.aspects[a].query, sft.pre.aspects[a].heldout] for a in cfg.aspects},
                  "post": {a: [sft.post.aspects[a].query, sft.post.aspects[a].heldout] for a in cfg.aspects}}
    res["timings"] = run.timings; res["wall_s"] = time.time() - t0
    write_json(f"{out}/planted_ranking.json", res)
    print(json.dumps(res["ranking"], indent=1))


if __name__ == "__main__":
    main()
