"""The report of a user's attribute run and its last repair: ``report.md``, ``report.json`` and
``beta_sweep.png`` (conventions as in :mod:`trustrepair.app.report`).

``report.json``::

    {"aspects": {aspect: {"heldout": {"input": F, "repaired": F, "relative_change_pct": x,
                                      "relative_change_se_pct": se, ["base": F]},
                          "query": {"input": F, "repaired": F, "relative_change_pct": x, ["base": F]},
                          ["fine_tuning_shift": F_input - F_base (held-out), "undone_pct": 100 (F_input -
                           F_repaired) / (F_input - F_base)]}},
     "perplexity": {"input": p, "repaired": p, "relative_change_pct": x, "measured_on": text, ["base": p]},
     "repair": {"target", "strategy", "subset_size", "beta", "tolerance", "saved_model"},
     "top_examples": {aspect: [{"index", "source", "score", "prompt", "response"}, ...]},
     "sizes": {...}, "timings_s": {...}}

F is the mean over an aspect's pairs of log P(opponent | prompt) - log P(proponent | prompt), summed
over response tokens: lower is better; a relative change is 100 (input - repaired) / |input|, so positive
is an improvement (and a perplexity rise is negative). The held-out part chose neither the subset nor
the step size.
"""
from __future__ import annotations

import json
from pathlib import Path

from trustrepair.app.records import Evaluation
from trustrepair.app.report import (FIGURE_NAME, _num, _pct, _ppl_direction, _snippet, _table, plot_beta_sweep)
from trustrepair.app.rundir import RunDir
from trustrepair.app.settings import AttributeConfig
from trustrepair.app.inputs import display_record
from trustrepair.app.user_workspace import aspect_names
from trustrepair.app.workflow import BASE, SCORES_JSONL, RepairResult
from trustrepair.engine.storage import read_json, write_bytes, write_json, write_text
from trustrepair.methods.metrics import relative_change_pct, relative_change_se_pct

TOP_N = 10


def _perplexity_source(run_dir: Path, cfg: AttributeConfig) -> str:
    if cfg.eval is not None:
        return f"--eval {cfg.eval}"
    held = (run_dir / "splits" / "perplexity.jsonl").read_text().count("\n")
    return f"a seeded {cfg.perplexity_fraction:.0%} of the training data ({held} examples, splits/perplexity.jsonl)"


def _top_examples(run_dir: Path, cfg: AttributeConfig, aspects: list[str]) -> dict[str, list[dict]]:
    """The :data:`TOP_N` most detrimental analysed examples per aspect, with their text."""
    from trustrepair.data import load_training_files

    rows = [json.loads(line) for line in (run_dir / SCORES_JSONL).read_text().splitlines()]
    records = load_training_files(cfg.train)
    top = {}
    for aspect in aspects:
        order = sorted(rows, key=lambda r: r[f"{aspect}_rank"])[:TOP_N]
        top[aspect] = []
        for row in order:
            shown = display_record(records[row["index"]])
            top[aspect].append({"index": row["index"], "source": row["source"], "score": row[aspect],
                                "prompt": shown.prompt, "response": shown.response})
    return top


def summarize(run_dir: Path, cfg: AttributeConfig, result: RepairResult, base: Evaluation | None,
              timings: dict) -> dict:
    """``report.json``'s content (module docstring)."""
    aspects = {}
    for aspect in aspect_names(cfg):
        before, after = result.input.aspects[aspect], result.repaired.aspects[aspect]
        row = {"heldout": {"input": before.heldout, "repaired": after.heldout,
                           "relative_change_pct": relative_change_pct(before.heldout, after.heldout),
                           "relative_change_se_pct": relative_change_se_pct(before.heldout_pairs,
                                                                            after.heldout_pairs)},
               "query": {"input": before.query, "repaired": after.query,
                         "relative_change_pct": relative_change_pct(before.query, after.query)}}
        if base is not None:
            row["heldout"]["base"] = base.aspects[aspect].heldout
            row["query"]["base"] = base.aspects[aspect].query
            shift = before.heldout - base.aspects[aspect].heldout
            row["fine_tuning_shift"] = shift
            row["undone_pct"] = 100.0 * (before.heldout - after.heldout) / shift if shift else None
        aspects[aspect] = row
    perplexity = {"input": result.input.perplexity, "repaired": result.repaired.perplexity,
                  "relative_change_pct": relative_change_pct(result.input.perplexity, result.repaired.perplexity),
                  "measured_on": _perplexity_source(run_dir, cfg)}
    if base is not None:
        perplexity["base"] = base.perplexity
    options = result.options
    return {"aspects": aspects, "perplexity": perplexity,
            "repair": {"target": result.target, "strategy": options["strategy"], "subset_size": len(result.record.subset),
                       "beta": result.record.beta, "tolerance": options["tolerance"],
                       "saved_model": result.saved_model},
            "top_examples": _top_examples(run_dir, cfg, list(aspects)),
            "model": cfg.model, "base_model": cfg.base_model, "timings_s": timings}


def render_markdown(summary: dict) -> str:
    rep, ppl = summary["repair"], summary["perplexity"]
    with_base = "base" in ppl
    lines = ["# Trust attribution and repair report", "",
             f"Model `{summary['model']}`; repair: the {rep['strategy']} subset of {rep['subset_size']} training "
             f"examples for target `{rep['target']}`, one Newton step of beta = {rep['beta']:.3g} chosen on the "
             f"query pairs under a {100 * rep['tolerance']:g}% perplexity tolerance"
             + (f"; saved to `{rep['saved_model']}`." if rep["saved_model"] else "; not saved (`--save-model`)."),
             "", "F = mean log P(opponent | prompt) - log P(proponent | prompt) over an aspect's pairs: lower is "
             "better. Relative change = 100 (input - repaired) / |input|: positive is better. The held-out pairs "
             "chose neither the subset nor beta; ± is the standard error over them.", "",
             "## Log-odds and perplexity", ""]
    header = ["Aspect", *(["Base F"] if with_base else []), "Input F (held-out)", "Repaired F (held-out)",
              "Rel. change (%)", "Input F (query)", "Repaired F (query)", "Rel. change query (%)",
              *(["Fine-tuning shift", "Undone (%)"] if with_base else [])]
    rows = []
    for aspect, row in summary["aspects"].items():
        held, query = row["heldout"], row["query"]
        se = held["relative_change_se_pct"]
        rows.append([aspect, *([_num(held["base"])] if with_base else []), _num(held["input"]),
                     _num(held["repaired"]), _pct(held["relative_change_pct"]) + ("" if se is None else f" ± {se:.1f}"),
                     _num(query["input"]), _num(query["repaired"]), _pct(query["relative_change_pct"]),
                     *([_num(row["fine_tuning_shift"]), _pct(row["undone_pct"])] if with_base else [])])
    lines += _table(header, rows)
    lines += [f"Perplexity on {ppl['measured_on']}: {_num(ppl['input'], 3)} -> {_num(ppl['repaired'], 3)} "
              f"({_ppl_direction(ppl['relative_change_pct'])})"
              + (f"; base model {_num(ppl['base'], 3)}." if with_base else "."), "",
              f"![beta sweep]({FIGURE_NAME})", "", "## Most detrimental training examples", "",
              "Score: predicted drop of the aspect's log-odds per unit step against the example "
              "(positive = detrimental).", ""]
    for aspect, examples in summary["top_examples"].items():
        lines += [f"### {aspect}", ""]
        lines += _table(["Rank", "Source", "Score", "Prompt", "Response"],
                        [[str(r + 1), f"`{e['source']}`", f"{e['score']:.4g}", _snippet(e["prompt"]),
                          _snippet(e["response"])] for r, e in enumerate(examples)])
    return "\n".join(lines)


def write_user_report(run_dir: Path, cfg: AttributeConfig, result: RepairResult) -> Path:
    """``beta_sweep.png``, ``report.json`` and (last) ``report.md``; returns the path of ``report.md``."""
    base_path = run_dir / BASE
    base = read_json(base_path, Evaluation.from_json) if base_path.is_file() else None
    timings_path = run_dir / "timings.json"
    timings = read_json(timings_path) if timings_path.is_file() else {}
    summary = summarize(run_dir, cfg, result, base, timings)
    figure = plot_beta_sweep({result.target: {result.options["strategy"]: result.record}}, result.options["tolerance"])
    markdown = render_markdown(summary) + "\n"
    write_bytes(run_dir / FIGURE_NAME, figure)
    write_json(run_dir / "report.json", summary)
    path = run_dir / RunDir.REPORT
    write_text(path, markdown)
    return path
