"""The planted demo's evidence: per seed, how much damage the planted examples did, how well each
attribution found them and how much of the damage each repair undid; over the seeds, their means and
spread (the ``"planted"`` block of ``OUT/report.json`` and the opening of ``OUT/report.md``).

Per aspect j, over its held-out pairs i (the query half chose the subsets and the step sizes, so the
headline numbers are held-out only; the query half is reported beside the damage):

* damage: g_i = post_i - gold_i, with gold the SFT without aspect j's planted examples
  (:func:`trustrepair.app.planted_stages.gold`); ``post_minus_gold`` = mean g, ``se`` = std(g) / sqrt(n);
* fraction undone by a repair: d_i = post_i - repaired_i, f = mean d / mean g. Its standard error is
  the delta method's for a ratio of paired means, sqrt(var(d - f g) / n) / |mean g|; f = 1 means the
  repaired model is as trustworthy as the retrain without the culprits, f > 1 more so;
* ``perplexity_change_pct``: 100 (post - repaired) / post, the report's convention (a perplexity increase is
  negative);
* ranking: precision at k, recall at 2k and rank AUC (:mod:`trustrepair.methods.ground_truth`).

Over S seeds a number x_s with within-seed standard error se_s becomes ``mean`` (of x_s), ``se`` =
sqrt(sum se_s^2) / S (the pair-sampling error of that mean), ``seed_se`` = std(x_s) / sqrt(S) (how much
it moves between seeds: splits, poison draw, SFT order; None for one seed), ``min``, ``max`` and the
per-seed values. The verdicts check the issue's criteria on the means, for every aspect whose mean
held-out damage exceeds its standard error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from trustrepair.app.planted_stages import EKFAC_METHODS, RANKING_METHODS, WITHOUT_ALL
from trustrepair.app.records import EvaluationRecord, Repairs
from trustrepair.engine.storage import write_json, write_text

STRATEGIES = ("oracle", "dpp", "topk", "random")
BASELINES = tuple(m for m in RANKING_METHODS if m not in EKFAC_METHODS)
PRECISION_GOAL = 0.8
SPEEDUP_GOAL = 10.0
PERPLEXITY_BUDGET_PCT = -1.0  # report convention: a perplexity rise of 1 % is -1 %


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def fraction_undone(post, repaired, gold) -> tuple[float, float]:
    """``(f, se)`` of the module docstring from per-pair post, repaired and gold values."""
    post, repaired, gold = (np.asarray(x, dtype=np.float64) for x in (post, repaired, gold))
    if not len(post) == len(repaired) == len(gold) >= 2:
        raise ValueError(f"fraction_undone needs >= 2 pairs in every input, got {len(post)}, {len(repaired)}, "
                         f"{len(gold)}")
    d, g = post - repaired, post - gold
    if g.mean() == 0:
        return float("nan"), float("nan")
    f = d.mean() / g.mean()
    return float(f), float((d - f * g).std(ddof=1) / math.sqrt(len(g)) / abs(g.mean()))


def seed_summary(gold: Mapping, evaluation: EvaluationRecord, repairs: Repairs, ranking: Mapping) -> dict:
    """One seed's numbers per aspect (module docstring), from its ``gold.json``, evaluation, repairs and
    ``ranking.json``."""
    out = {}
    post_ppl = evaluation.post.perplexity
    for aspect in evaluation.post.aspects:
        post_pairs = gold["post"]["aspects"][aspect]
        damage = {}
        for half in ("heldout", "query"):
            mean, se = _mean_se(np.subtract(post_pairs[half], gold[aspect]["aspects"][aspect][half]))
            damage[half] = {"post_minus_gold": mean, "se": se}
        mean, se = _mean_se(np.subtract(post_pairs["heldout"], gold[WITHOUT_ALL]["aspects"][aspect]["heldout"]))
        damage["heldout_without_all"] = {"post_minus_gold": mean, "se": se}
        levels = {"pre": evaluation.pre.aspects[aspect].heldout, "post": float(np.mean(post_pairs["heldout"])),
                  "gold": float(np.mean(gold[aspect]["aspects"][aspect]["heldout"]))}
        undone = {}
        for strategy, ev in evaluation.repaired[aspect].items():
            rep = ev.aspects[aspect].heldout_pairs
            f, se = fraction_undone(post_pairs["heldout"], rep, gold[aspect]["aspects"][aspect]["heldout"])
            rmg, rmg_se = _mean_se(np.subtract(rep, gold[aspect]["aspects"][aspect]["heldout"]))
            undone[strategy] = {"fraction": f, "se": se, "repaired": float(np.mean(rep)),
                                "repaired_minus_gold": rmg, "repaired_minus_gold_se": rmg_se,
                                "perplexity_change_pct": 100.0 * (post_ppl - ev.perplexity) / post_ppl,
                                "repair_s": repairs[aspect][strategy].seconds}
        out[aspect] = {"damage": damage, "levels": levels, "undone": undone,
                       "ranking": {m: dict(v) for m, v in ranking[aspect].items()},
                       "retrain_s": gold[aspect]["sft_s"]}
    return out


def over_seeds(values: Sequence[float], ses: Sequence[float] | None = None) -> dict:
    """One quantity over the seeds: its ``mean``, ``min``, ``max``, ``per_seed`` values and ``seed_se``
    (std / sqrt(seeds); None for one seed), and with each seed's pair-sampling ``ses`` the SE of the mean,
    sqrt(sum se_s^2) / seeds (the seeds' held-out pairs are independent)."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
           "seed_se": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None,
           "per_seed": [float(x) for x in v]}
    if ses is not None:
        out["se"] = float(math.sqrt(np.sum(np.square(ses))) / len(v))
    return out


def aggregate(per_seed: Sequence[Mapping]) -> dict:
    """The ``"planted"`` block: per aspect ``damage`` (held-out ``post_minus_gold`` and ``se`` first), ``ranking``
    per method, ``undone`` per strategy (``fraction``, ``se``, ``perplexity_change_pct`` first), seconds,
    and ``verdicts`` (module docstring)."""
    if not per_seed:
        raise ValueError("aggregate needs at least one seed")
    out = {}
    for aspect in per_seed[0]:
        seeds = [s[aspect] for s in per_seed]
        held = over_seeds([s["damage"]["heldout"]["post_minus_gold"] for s in seeds],
                        [s["damage"]["heldout"]["se"] for s in seeds])
        damage = {"post_minus_gold": held["mean"], "se": held["se"], "heldout": held,
                  "query": over_seeds([s["damage"]["query"]["post_minus_gold"] for s in seeds],
                                    [s["damage"]["query"]["se"] for s in seeds]),
                  "heldout_without_all": over_seeds([s["damage"]["heldout_without_all"]["post_minus_gold"] for s in seeds],
                                                  [s["damage"]["heldout_without_all"]["se"] for s in seeds]),
                  "levels": {k: float(np.mean([s["levels"][k] for s in seeds])) for k in ("pre", "post", "gold")}}
        ranking = {}
        for method in seeds[0]["ranking"]:
            rows = [s["ranking"][method] for s in seeds]
            ranking[method] = {m: float(np.mean([r[m] for r in rows])) for m in ("precision_at_k", "recall_at_2k", "auc")}
            ranking[method]["spread"] = {m: over_seeds([r[m] for r in rows]) for m in ("precision_at_k", "auc")}
            ranking[method]["other_planted_in_top_k"] = {
                b: float(np.mean([r["other_planted_in_top_k"][b] for r in rows])) for b in rows[0]["other_planted_in_top_k"]}
        undone = {}
        for strategy in (s for s in STRATEGIES if s in seeds[0]["undone"]):
            rows = [s["undone"][strategy] for s in seeds]
            fraction = over_seeds([r["fraction"] for r in rows], [r["se"] for r in rows])
            below = over_seeds([r["repaired_minus_gold"] for r in rows], [r["repaired_minus_gold_se"] for r in rows])
            undone[strategy] = {"fraction": fraction["mean"], "se": fraction["se"],
                                "perplexity_change_pct": float(np.mean([r["perplexity_change_pct"] for r in rows])),
                                "worst_perplexity_change_pct": float(min(r["perplexity_change_pct"] for r in rows)),
                                "spread": fraction, "repaired_minus_gold": below,
                                "repair_s": float(np.mean([r["repair_s"] for r in rows if r["repair_s"] is not None]
                                                          or [float("nan")]))}
        retrain_s = float(np.mean([s["retrain_s"] for s in seeds]))
        out[aspect] = {"damage": damage, "ranking": ranking, "undone": undone, "retrain_s": retrain_s}
        out[aspect]["verdicts"] = _verdicts(out[aspect])
    return out


def _verdicts(entry: Mapping) -> dict:
    """The issue's criteria on one aspect's means; ``damaged`` says whether they apply."""
    ranking, undone = entry["ranking"], entry["undone"]
    verdicts = {"damaged": entry["damage"]["post_minus_gold"] > entry["damage"]["se"]}
    for method in (m for m in EKFAC_METHODS if m in ranking):
        prefix = "" if method == "ekfac" else "normalized_"
        verdicts[f"{prefix}precision_at_k_at_least_0.8"] = ranking[method]["precision_at_k"] >= PRECISION_GOAL
        verdicts[f"{prefix}auc_above_every_baseline"] = all(ranking[method]["auc"] > ranking[m]["auc"]
                                                            for m in BASELINES if m in ranking)
    if "dpp" in undone:
        dpp = undone["dpp"]
        verdicts["dpp_undoes_all_damage_within_1pct"] = (dpp["fraction"] >= 1.0
                                                         and dpp["worst_perplexity_change_pct"] >= PERPLEXITY_BUDGET_PCT)
        verdicts["dpp_beats_topk_and_random"] = all(dpp["fraction"] > undone[s]["fraction"]
                                                    for s in ("topk", "random") if s in undone)
        verdicts["repair_10x_faster_than_retrain"] = entry["retrain_s"] >= SPEEDUP_GOAL * dpp["repair_s"]
    return verdicts


# -- report.md -----------------------------------------------------------------------------------------

def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}f}"


def _spread(entry: Mapping, digits=2) -> str:
    if entry.get("seed_se") is None:
        return ""
    return f" [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def render_markdown(planted: Mapping, n_seeds: int, seed_dirs: Sequence[str], timings: Mapping[str, float]) -> str:
    """The planted section of ``OUT/report.md`` (module docstring for every number)."""
    aspects = list(planted)
    lines = [f"# Planted-damage demo: {n_seeds} seed{'s' if n_seeds > 1 else ''}", "",
             "Known untrustworthy examples were mixed into the SFT data; the gold model is the same SFT without "
             "them. Held-out halves only unless marked (the query half chose the subsets and step sizes). "
             "Means over the seeds, ± the pair-sampling standard error of that mean, [min, max] over the seeds. "
             "F = log P(opponent) - log P(proponent): lower is more trustworthy.", "",
             "## 1. Damage: post-SFT F minus the gold retrain's", ""]
    rows = []
    for a in aspects:
        d = planted[a]["damage"]
        rows.append([a, _f(d["levels"]["pre"]), _f(d["levels"]["post"]), _f(d["levels"]["gold"]),
                     f"{_f(d['post_minus_gold'])} ± {d['se']:.3f}{_spread(d['heldout'], 3)}",
                     f"{_f(d['query']['mean'])} ± {d['query']['se']:.3f}",
                     f"{_f(d['heldout_without_all']['mean'])}", f"{planted[a]['retrain_s']:.1f}"])
    lines += _table(["Aspect", "pre F", "post F", "gold F", "post - gold (held-out)", "post - gold (query)",
                     "post - gold without all planted", "retrain s"], rows)
    lines += ["## 2. Finding the culprits: precision at k, recall at 2k, rank AUC of the aspect's planted examples",
              "", "k = the number planted per aspect; 'other' = the other aspects' planted examples in the top k.", ""]
    rows = []
    for a in aspects:
        for method, r in planted[a]["ranking"].items():
            others = ", ".join(f"{b} {n:.1f}" for b, n in r["other_planted_in_top_k"].items())
            rows.append([a, method, f"{r['precision_at_k']:.3f}{_spread(r['spread']['precision_at_k'])}",
                         f"{r['recall_at_2k']:.3f}", f"{r['auc']:.3f}{_spread(r['spread']['auc'])}", others])
    lines += _table(["Aspect", "Method", "precision@k", "recall@2k", "AUC", "other planted in top k"], rows)
    lines += ["## 3. Undoing the damage: fraction undone = (post - repaired) / (post - gold)", "",
              "Each subset repaired at the step size its perplexity search allowed (tolerance in the settings). "
              "1 = as trustworthy as the retrain without the culprits; above 1, more so. Where the damage is within "
              "its standard error (criteria below: damaged = no) the fraction divides by noise: read 'repaired - "
              "gold F' there instead.", ""]
    rows = []
    for a in aspects:
        for strategy, u in planted[a]["undone"].items():
            rows.append([a, strategy, f"{u['fraction']:+.2f} ± {u['se']:.2f}{_spread(u['spread'])}",
                         f"{_f(u['repaired_minus_gold']['mean'])} ± {u['repaired_minus_gold']['se']:.3f}",
                         f"{u['perplexity_change_pct']:+.2f} (worst {u['worst_perplexity_change_pct']:+.2f})",
                         f"{u['repair_s']:.1f}"])
    lines += _table(["Aspect", "Subset", "fraction undone", "repaired - gold F", "rel. change PPL (%)",
                     "repair s"], rows)
    lines += ["## Criteria (issue 17), on the means", ""]
    rows = [[a, *("yes" if v else "**no**" for v in planted[a]["verdicts"].values())] for a in aspects]
    lines += _table(["Aspect", *next(iter(planted.values()))["verdicts"]], rows)
    lines += ["## Per seed", "", *(f"- [{d}]({d}/report.md)" for d in seed_dirs), "",
              "## Wall time per stage, summed over the seeds (s; each seed's timings.json has its own)", ""]
    lines += _table(["Stage", "Seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]
                    + [["**total**", f"**{sum(timings.values()):.1f}**"]])
    return "\n".join(lines)


def write_planted_report(out_dir: Path, config: dict, per_seed: Sequence[Mapping], seed_dirs: Sequence[str],
                         timings: Mapping[str, float]) -> Path:
    """``OUT/report.json`` (``{"planted": ..., "per_seed": ..., "config": ...}``) and then ``OUT/report.md``."""
    planted = aggregate(per_seed)
    markdown = render_markdown(planted, len(per_seed), seed_dirs, timings) + "\n"
    write_json(Path(out_dir) / "report.json", {"planted": planted, "per_seed": list(per_seed), "config": config,
                                               "timings_s": dict(timings)})
    path = Path(out_dir) / "report.md"
    write_text(path, markdown)
    return path
