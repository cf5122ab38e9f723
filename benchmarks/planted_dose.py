"""How much held-out damage the planted examples do at several SFT doses (issue 17): the dose study
that chose the planted demo's SFT settings, by held-out post - gold only.

One seed of ``planted_scenario(seed, n_planted=32, n_hh=320)`` on SmolLM2-135M-Instruct with the last 2
blocks fine-tuned (the workspace of :mod:`benchmarks.planted_ranking`). For each ``(epochs, lr)`` dose:
one SFT on all 416 examples and one gold SFT per aspect without that aspect's 32 planted examples, each
from the pre-SFT weights; the damage is the mean over held-out pairs of post - gold log-odds, with its
paired standard error.

    python -m benchmarks.planted_dose SEED OUT_DIR EPOCHS:LR [EPOCHS:LR ...]   # OUT_DIR/planted_dose.json
"""
import sys, time
import numpy as np
import torch
from benchmarks.planted_ranking import planted_workspace
from trustrepair.app.settings import DemoConfig
from trustrepair.app.sft import supervised_finetune
from trustrepair.engine.storage import write_json


def main() -> None:
    seed, out, doses = int(sys.argv[1]), sys.argv[2], [tuple(map(float, d.split(":"))) for d in sys.argv[3:]]
    cfg = DemoConfig(seed=seed)
    _, sc, prepared = planted_workspace(cfg, out)
    ws = prepared.workspace
    params = dict(ws.model.named_parameters())
    pre = {n: params[n].detach().clone() for n in ws.trained_params}

    def trained_on(examples, epochs, lr):
        with torch.no_grad():
            for n, v in pre.items(): params[n].copy_(v)
        for n in ws.trained_params: params[n].requires_grad_(True)
        t = time.time()
        supervised_finetune(ws.tail, examples, task=ws.task, epochs=int(epochs), lr=lr, batch_size=16, grad_accum=1,
                            trainable=2, seed=seed, progress=False)
        for n in ws.trained_params: params[n].requires_grad_(False)
        return {"sft_s": time.time() - t, "perplexity": ws.perplexity(),
                **{a: {h: ws.log_odds_pairs(a, h) for h in ("query", "heldout")} for a in cfg.aspects}}

    results = {"seed": seed, "doses": []}
    for epochs, lr in doses:
        post = trained_on(ws.train, epochs, lr)
        row = {"epochs": epochs, "lr": lr, "post_perplexity": post["perplexity"], "sft_s": post["sft_s"], "aspects": {}}
        for a in cfg.aspects:
            gold = trained_on([e for i, e in enumerate(ws.train) if sc.planted.get(i) != a], epochs, lr)
            row["aspects"][a] = {}
            for h in ("query", "heldout"):
                d = np.asarray(post[a][h]) - np.asarray(gold[a][h])
                row["aspects"][a][h] = {"post": float(np.mean(post[a][h])), "gold": float(np.mean(gold[a][h])),
                                        "post_minus_gold": float(d.mean()), "se": float(d.std(ddof=1) / len(d) ** 0.5)}
            print(epochs, lr, a, row["aspects"][a]["heldout"], flush=True)
        results["doses"].append(row)
        write_json(f"{out}/planted_dose.json", results)


if __name__ == "__main__":
    main()
