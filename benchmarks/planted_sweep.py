"""Which repair-side defaults undo the most planted damage on the held-out halves (issue 17, "Use what it
teaches"): the defaults sweep over the seeds of a finished planted demo.

For every seed directory ``RUN/seed-N`` of ``trustrepair demo`` (planted), the post-SFT model, its EK-FAC
factors and its influence scores are loaded once (from a copy in ``WORK/seed-N``: the demo's directory is
only read), and then, for each setting below, only the demo's selection, repair and held-out evaluation are
re-run, per aspect, with the library's own functions: ``selection.select`` on the seed's scores,
``stages.repair_subset`` (the Newton direction and the beta search under the demo's perplexity tolerance,
which measures only the query half) and ``stages.repaired_evaluation`` on the held-out half. The numbers
are those of the planted report (:mod:`trustrepair.app.planted_report`): per seed ``seed_summary`` against
the seed's ``gold.json``, over the seeds ``aggregate``: the held-out fraction of the damage undone,
f = mean(post - repaired) / mean(post - gold), ± the pair-sampling SE of the mean over seeds (delta method),
the seed SE, and the perplexity change. ``vs default`` is each setting's f minus the default's, its SE
from the same held-out pairs (paired: ``fraction_undone`` of the difference of the repaired values).

One axis at a time from the first sweep's defaults (subset 32, eta 10, Newton, damping 0.1 x mean Lambda per
module), DPP subsets only, plus top-k at the defaults for reference:

* subset size 16 / 64 (and top-k at 16, the reference at the smaller size);
* DPP eta 0 / 1 / 100;
* repair method PBRF (``repair_step.pbrf_repair`` as ``repair(method="pbrf")`` runs it: 4 EK-FAC-preconditioned
  gradient steps from theta_post at lr 1, the first of which is the Newton step, the proximal weight the
  damping per module, the KL term on ``PBRF_KL_EXAMPLES`` seeded SFT examples), searched over beta like the
  Newton step; at the first sweep's defaults and at the demo's (normalised scores, DPP 16, eta 100);
* repair damping 10x and 0.1x the demo's ``repair_damping`` (the Newton direction only; the scores that
  chose the subsets keep their 0.1 x mean(Lambda); runs written before ``repair_damping`` existed read it as
  0.1, which the step then used); from the demo's defaults, 0.1x and 0.01x for the repair only, and for the
  scores, the self-influences and the repair alike ("rescored");
* selection scores normalised by the root of each example's self-influence
  (``scoring.normalized_influence``, RelatIF), DPP and top-k at subset 16;
* from the normalised DPP / top-k at subset 16: 8 beta probes instead of 4, DPP eta 100, subset 32.

Refits (trained blocks, empirical vs sampled Fisher) need a new SFT and fit per seed and are not run.

    python -m benchmarks.planted_sweep --run runs/demo --work /tmp/sweep [--settings NAME ...] [--seeds 0 1 2]

writes ``WORK/planted_sweep.json`` (per seed and setting, after each, so a rerun continues) and
``WORK/planted_sweep.md`` (the table over the seeds done so far).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trustrepair.app import stages
from trustrepair.app.pipeline import HIDDEN_STORE, seed_dir_name
from trustrepair.app.planted_report import over_seeds, aggregate, fraction_undone, seed_summary
from trustrepair.app.planted_stages import GOLD, RANKING, planted_by_aspect
from trustrepair.app.records import EvaluationRecord
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import DemoConfig, as_written
from trustrepair.engine.ekfac import DAMPING_SCALE, EKFACFactors
from trustrepair.engine.storage import read_json, write_json, write_text
from trustrepair.methods.repair_step import BetaPoint, RepairDelta, pbrf_repair, search_beta
from trustrepair.methods.ground_truth import ranking_metrics
from trustrepair.methods.scoring import self_influence
from trustrepair.methods.selection import select

from benchmarks.common import cpu_name

PBRF_KL_EXAMPLES = 64
PBRF_STEPS = 4  # repair(method="pbrf")'s default


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: the repair-side settings that differ from the demo's defaults."""

    name: str
    axis: str
    subset_size: int = 32
    eta: float = 10.0
    method: str = "newton"
    damping_scale: float = 1.0
    strategies: tuple[str, ...] = ("dpp",)
    normalized: bool = False  # select by the scores over sqrt(self-influence) (scoring.normalized_influence)
    beta_probes: int | None = None  # perplexity probes of the beta search (None: the demo's)
    against: str = "default"  # the setting whose same strategy the "vs" column subtracts
    rescore: bool = False  # the scores and self-influences that choose the subsets also at damping_scale


SETTINGS = (  # in the order they run: the default first, then by the brief's priority
    Setting("default", "default", strategies=("dpp", "topk")),
    Setting("subset 16", "subset size", subset_size=16),
    Setting("subset 64", "subset size", subset_size=64),
    Setting("top-k at subset 16", "subset size", subset_size=16, strategies=("topk",)),
    Setting("eta 0", "DPP eta", eta=0.0),
    Setting("eta 1", "DPP eta", eta=1.0),
    Setting("eta 100", "DPP eta", eta=100.0),
    Setting("PBRF", "method", method="pbrf"),
    Setting("damping 10x", "damping", damping_scale=10.0),
    Setting("damping 0.1x", "damping", damping_scale=0.1),
    Setting("normalized, dpp 16", "selection scores", subset_size=16, normalized=True, against="subset 16"),
    Setting("normalized, top-k 16", "selection scores", subset_size=16, strategies=("topk",), normalized=True,
            against="top-k at subset 16"),
    Setting("normalized, dpp 16, 8 probes", "beta probes", subset_size=16, normalized=True, beta_probes=8,
            against="normalized, dpp 16"),
    Setting("normalized, top-k 16, 8 probes", "beta probes", subset_size=16, strategies=("topk",),
            normalized=True, beta_probes=8, against="normalized, top-k 16"),
    Setting("normalized, dpp 16, eta 100", "DPP eta", subset_size=16, eta=100.0, normalized=True,
            against="normalized, dpp 16"),
    Setting("normalized, dpp 32", "subset size", subset_size=32, normalized=True, against="normalized, dpp 16"),
    Setting("normalized, dpp 16, eta 100, PBRF", "method", subset_size=16, eta=100.0, normalized=True,
            method="pbrf", against="normalized, dpp 16, eta 100"),
    Setting("normalized, dpp 16, eta 100, damping 0.1x rescored", "damping", subset_size=16, eta=100.0,
            normalized=True, damping_scale=0.1, rescore=True, against="normalized, dpp 16, eta 100"),
    Setting("normalized, dpp 16, eta 100, damping 0.01x rescored", "damping", subset_size=16, eta=100.0,
            normalized=True, damping_scale=0.01, rescore=True, against="normalized, dpp 16, eta 100"),
    Setting("normalized, dpp 16, eta 100, repair damping 0.1x", "damping", subset_size=16, eta=100.0,
            normalized=True, damping_scale=0.1, against="normalized, dpp 16, eta 100"),
    Setting("normalized, dpp 16, eta 100, repair damping 0.01x", "damping", subset_size=16, eta=100.0,
            normalized=True, damping_scale=0.01, against="normalized, dpp 16, eta 100"),
)


def difference_vs(post, repaired, reference, gold) -> tuple[float, float]:
    """``(f(repaired) - f(reference), se)`` of two repairs' fractions undone on the same held-out pairs, its
    SE paired over the pairs: ``fraction_undone`` with post - repaired replaced by reference - repaired."""
    post, repaired, reference = (np.asarray(x, dtype=np.float64) for x in (post, repaired, reference))
    return fraction_undone(post, post - (reference - repaired), gold)


def work_copy(source: Path, work: Path) -> Path:
    """``work`` holding a copy of the seed directory ``source`` without its saved repair deltas (the sweep
    writes only there); an existing copy is kept."""
    if not (work / RunDir.SETTINGS).is_file():
        shutil.copytree(source, work, ignore=shutil.ignore_patterns("repairs", "*.png"), dirs_exist_ok=True)
    return work


def _pbrf_search(ws, factors, subset, measure, baseline, cfg: DemoConfig, kl_examples):
    """A PBRF repair searched over beta like the Newton step (same first probe, same tolerance and probes);
    returns ``(delta, record, {relative change from the Newton step at the chosen beta, the solver's last
    learning rate (below 1: steps were refused), J})``."""
    from trustrepair.app.records import RepairRecord
    from trustrepair.engine.layers import find_modules
    from trustrepair.methods.repair_step import newton_direction

    start = time.perf_counter()
    direction = newton_direction(ws.tail, factors, ws.train, subset, task=ws.task, damping=cfg.damping,
                                 batch_size=ws.batch_size)
    layers = find_modules(ws.tail, list(factors.modules))

    @functools.lru_cache(maxsize=None)
    def at(beta: float) -> RepairDelta:
        return pbrf_repair(ws.tail, ws.train, subset, beta=beta, layers=layers, kl_examples=kl_examples,
                           task=ws.task, batch_size=ws.batch_size, proximal=None, steps=PBRF_STEPS, lr=1.0,
                           factors=factors, damping=cfg.damping)

    best, points, base = search_beta(at, ws.tail, lambda _m: ws.perplexity(), measure, tolerance=cfg.tolerance,
                                     beta0=stages.initial_beta(ws, direction), max_probes=cfg.beta_probes,
                                     baseline=baseline)
    delta = at(best.beta) if best.beta > 0 else direction.scaled(0.0)
    newton = direction.scaled(best.beta)
    moved = sum(float((delta.deltas[n] - newton.deltas[n]).double().pow(2).sum()) for n in newton.deltas) ** 0.5
    size = sum(float(v.double().pow(2).sum()) for v in newton.deltas.values()) ** 0.5
    record = RepairRecord(best.beta, subset, best.metric, best.perplexity, [base, *points],
                          time.perf_counter() - start)
    return delta, record, {"pbrf_change_from_newton": moved / size if size > 0 else 0.0,
                           "pbrf_final_lr": delta.metadata.get("final_lr"),
                           "pbrf_objective": delta.metadata.get("objective"),
                           "pbrf_trials": delta.metadata.get("trials")}


def seed_self_influence(run: RunDir, ws, factors: EKFACFactors) -> torch.Tensor:
    """The seed's self-influences (``scoring.self_influence`` at the demo's damping), saved in the work copy
    as ``self_influence.pt`` and read back on a rerun."""
    path = run.path("self_influence.pt")
    if not path.is_file():
        sigma = self_influence(ws.tail, factors, ws.train, damping=run.config.damping, task=ws.task,
                               batch_size=ws.batch_size, progress=False)
        torch.save(sigma.double(), path)
    return torch.load(path)


def rescored(run: RunDir, ws, factors: EKFACFactors, scores, scale: float) -> tuple:
    """``(scores, self-influences)`` at ``scale`` x the demo's damping (``factors`` already scaled): the query
    halves' aggregated influence (``scoring.influence``) and ``scoring.self_influence``, saved in the work
    copy as ``rescored-{scale}.pt`` and read back on a rerun; the embeddings are the demo's."""
    from trustrepair.methods.scoring import influence

    path = run.path(f"rescored-{scale:g}.pt")
    if not path.is_file():
        trust = {a: ws.trust[a]["query"] for a in run.config.aspects}
        values = influence(ws.tail, factors, ws.train, trust, damping=run.config.damping, task=ws.task,
                           batch_size=run.config.batch_size, progress=False)
        sigma = self_influence(ws.tail, factors, ws.train, damping=run.config.damping, task=ws.task,
                               batch_size=ws.batch_size, progress=False)
        torch.save({"scores": {a: v.double().cpu() for a, v in values.items()}, "sigma": sigma.double().cpu()}, path)
    saved = torch.load(path)
    return (dataclasses.replace(scores, per_aspect={a: saved["scores"][a].numpy() for a in run.config.aspects}),
            saved["sigma"])


def run_setting(run: RunDir, ws, factors: EKFACFactors, scores, sft, setting: Setting, kl_examples,
                sigma: torch.Tensor, planted: dict[str, list[int]]) -> dict:
    """One seed, one setting: per aspect and strategy the subset (chosen from the scores, or from the
    normalised scores with the self-influences ``sigma``, whose ranking of the ``planted`` indices then goes
    into ``extra``), its repair and its held-out evaluation; returns ``{"evaluation": EvaluationRecord json, "repairs": {...}, "extra": {...}}``."""
    from trustrepair.app.records import repairs_to_json

    cfg = dataclasses.replace(run.config, subset_size=setting.subset_size, eta=setting.eta,
                              beta_probes=setting.beta_probes or run.config.beta_probes)
    # the step damped as the demo's repair stage damps it (repair_damping), times the setting's scale
    repair_factors = factors.with_damping_scale(run.config.repair_damping * setting.damping_scale)
    repaired, repairs, extra = {}, {}, {}
    if setting.rescore:
        scores, sigma = rescored(run, ws, factors.with_damping_scale(DAMPING_SCALE * setting.damping_scale), scores,
                                 setting.damping_scale)
    chosen_by = dataclasses.replace(scores, self_influence=sigma.numpy()).for_selection(
        "normalized" if setting.normalized else "raw")
    for aspect in cfg.aspects:
        measure, post_objective = stages.objective(cfg.aspects, ws, aspect, sft.post)
        baseline = BetaPoint(0.0, post_objective, sft.post.perplexity)
        repaired[aspect], repairs[aspect], extra[aspect] = {}, {}, {}
        values = chosen_by[aspect]
        if setting.normalized:
            extra[aspect]["ranking"] = ranking_metrics(values, planted[aspect])
        for strategy in setting.strategies:
            subset = [int(i) for i in select(strategy, values, cfg.subset_size,
                                             embeddings=scores.embeddings, eta=cfg.eta, seed=cfg.seed)]
            if setting.method == "pbrf":
                delta, record, extra[aspect][strategy] = _pbrf_search(ws, repair_factors, subset, measure, baseline,
                                                                      cfg, kl_examples)
            else:
                delta, record = stages.repair_subset(ws, repair_factors, subset, measure, baseline,
                                                     damping=cfg.damping, tolerance=cfg.tolerance,
                                                     max_probes=cfg.beta_probes, trace_metric=False, target=aspect,
                                                     strategy=strategy)
            delta.apply(ws.tail)
            try:
                repaired[aspect][strategy] = stages.repaired_evaluation(run, ws, aspect, record)
            finally:
                delta.revert(ws.tail)
            repairs[aspect][strategy] = record
            print(f"  {setting.name} {aspect} {strategy}: beta {record.beta:.3g}, ppl {record.perplexity:.3f}, "
                  f"{record.seconds:.1f} s", flush=True)
    evaluation = EvaluationRecord(sft.pre, sft.post, repaired)
    return {"evaluation": evaluation.to_json(), "repairs": repairs_to_json(repairs), "extra": extra}


def sweep_seed(source: Path, work: Path, settings, results: dict, save) -> None:
    """Every setting of ``settings`` not yet in ``results[seed dir]`` on one seed (loaded once)."""
    from trustrepair.app.demo_workspace import demo_scenario, load_demo_workspace

    name = source.name
    todo = [s for s in settings if s.name not in results.setdefault(name, {})]
    if not todo:
        return
    work_copy(source, work / name)
    saved = as_written(read_json(work / name / RunDir.SETTINGS), DemoConfig)
    cfg = DemoConfig(**{k: tuple(v) if k == "aspects" else v for k, v in saved.items()})
    run = RunDir(work / name, cfg, progress=False)
    start = time.perf_counter()
    prepared = load_demo_workspace(run, work / HIDDEN_STORE)
    ws = prepared.workspace
    sft = stages.sft(run, ws)  # read back: restores the post-SFT parameters
    factors = stages.fit(run, ws)
    scores = stages.score(run, ws, factors, cfg.aspects)
    rng = np.random.default_rng(cfg.seed)
    kl_examples = [ws.train[int(i)] for i in rng.choice(len(ws.train), PBRF_KL_EXAMPLES, replace=False)]
    sigma = seed_self_influence(run, ws, factors)
    planted = planted_by_aspect(demo_scenario(cfg).planted, cfg.aspects)
    print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    for setting in todo:
        start = time.perf_counter()
        results[name][setting.name] = run_setting(run, ws, factors, scores, sft, setting, kl_examples, sigma, planted)
        results[name][setting.name]["seconds"] = time.perf_counter() - start
        save()
        print(f"{name}: {setting.name} in {time.perf_counter() - start:.1f} s", flush=True)


def summaries(run_dir: Path, results: dict, setting: Setting) -> list[dict]:
    """``seed_summary`` of every seed that has ``setting``."""
    from trustrepair.app.records import repairs_from_json

    out = []
    for name, by_setting in sorted(results.items()):
        if setting.name in by_setting:
            row = by_setting[setting.name]
            out.append(seed_summary(read_json(run_dir / name / GOLD), EvaluationRecord.from_json(row["evaluation"]),
                                    repairs_from_json(row["repairs"]), read_json(run_dir / name / RANKING)))
    return out


def differences(run_dir: Path, results: dict, setting: Setting, aspect: str) -> dict | None:
    """Over the seeds that have both: this setting's fraction minus that of ``setting.against`` (the
    default unless said), for the setting's first strategy (module docstring)."""
    values, ses = [], []
    strategy = setting.strategies[0]
    for name, by_setting in sorted(results.items()):
        if setting.name not in by_setting or setting.against not in by_setting \
                or strategy not in by_setting[setting.against]["evaluation"]["repaired"][aspect]:
            continue
        gold = read_json(run_dir / name / GOLD)
        pairs = [by_setting[s]["evaluation"]["repaired"][aspect][strategy]["aspects"][aspect]["heldout_pairs"]
                 for s in (setting.name, setting.against)]
        diff, se = difference_vs(gold["post"]["aspects"][aspect]["heldout"], *pairs,
                                 gold[aspect]["aspects"][aspect]["heldout"])
        values.append(diff)
        ses.append(se)
    return over_seeds(values, ses) if values else None


def table(run_dir: Path, results: dict, header: str) -> str:
    """The markdown table over the seeds done so far, one row per setting and aspect."""
    lines = [header, "", "| axis | setting | aspect | subset | seeds | fraction undone ± SE [seed SE] | "
             "vs default (or the named setting) ± SE [seed SE] | repaired - gold F | PPL change % | repair s |", "|" + "---|" * 10]
    for setting in SETTINGS:
        per_seed = summaries(run_dir, results, setting)
        if not per_seed:
            continue
        planted = aggregate(per_seed)
        for aspect, entry in planted.items():
            diff = differences(run_dir, results, setting, aspect) if setting.name != "default" else None
            for strategy, u in entry["undone"].items():
                seed_se = u["spread"]["seed_se"]
                vs = "" if diff is None or strategy != setting.strategies[0] else (
                    ("" if setting.against == "default" else f"vs {setting.against}: ") +
                    f"{diff['mean']:+.2f} ± {diff['se']:.2f}" + (f" [{diff['seed_se']:.2f}]" if diff["seed_se"] else ""))
                lines.append(f"| {setting.axis} | {setting.name} | {aspect} | {strategy} | {len(per_seed)} | "
                             f"{u['fraction']:+.2f} ± {u['se']:.2f}" + (f" [{seed_se:.2f}]" if seed_se else "") +
                             f" | {vs} | {u['repaired_minus_gold']['mean']:+.3f} ± {u['repaired_minus_gold']['se']:.3f} | "
                             f"{u['perplexity_change_pct']:+.2f} | {u['repair_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished planted demo (read only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sweep"), help="where the copies and results go")
    parser.add_argument("--settings", nargs="*", default=[s.name for s in SETTINGS],
                        help=f"settings to run, of: {', '.join(s.name for s in SETTINGS)}")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds to run (default: every RUN/seed-N)")
    args = parser.parse_args()
    unknown = set(args.settings) - {s.name for s in SETTINGS}
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}")
    settings = [s for s in SETTINGS if s.name in args.settings]
    sources = sorted(args.run.glob("seed-*")) if args.seeds is None else [args.run / seed_dir_name(s) for s in args.seeds]
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / HIDDEN_STORE
    if not store.is_file():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.run / HIDDEN_STORE, store)
    path = args.work / "planted_sweep.json"
    results = read_json(path) if path.is_file() else {}

    def save():
        write_json(path, results)
        write_text(args.work / "planted_sweep.md", table(args.run, results, f"{cpu_name()}, {time.strftime('%Y-%m-%d %H:%M')}"))

    for source in sources:
        sweep_seed(source, args.work, settings, results, save)
    save()
    print(table(args.run, results, ""))


if __name__ == "__main__":
    main()
