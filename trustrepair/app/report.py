"""The evidence of a run: ``report.md``, ``report.json`` and ``beta_sweep.png`` (paper Tables 1, 2, 4, Fig. 2).

Input: a :class:`trustrepair.app.records.RunResults` (built by :func:`trustrepair.app.stages.report`):
the settings, sizes, the :class:`~trustrepair.app.records.EvaluationRecord` (pre, post and every repair;
per-pair held-out values where measured, for standard errors), the
:class:`~trustrepair.app.records.RepairRecord` of every repair (its beta search's probes), the top
examples per aspect and the wall time per stage.

A target is an aspect (its subset was chosen by that aspect's scores) or ``"common"`` (one subset for
every aspect, paper Table 2); strategies are ``dpp``, ``topk`` and ``random`` (Table 4), and in a planted
demo ``oracle`` (exactly the planted examples).

Conventions (the paper's):

* F^j = mean over trust pairs of log P(opponent | prompt) - log P(proponent | prompt): lower is better.
* Relative change = 100 * (post - repaired) / |post| for log-odds and perplexity alike
  (:func:`trustrepair.methods.metrics.relative_change_pct`): positive is an improvement, so a perplexity
  increase shows as a negative number.
* "log_odds" in the headline numbers is the held-out half of each trust set: the query half chose the
  subset and the step size, so only the held-out half says whether the repair generalises. The
  query-half numbers are reported beside it.
* Headline repair of an aspect: the DPP subset chosen for that aspect. Headline repaired perplexity: the
  worst (highest) perplexity among those per-aspect DPP repairs.
* "± x" after a held-out relative change: its standard error over the held-out trust pairs (from the
  per-pair differences post - repaired, :func:`trustrepair.methods.metrics.relative_change_se_pct`), i.e. how
  much the number would move with another draw of held-out pairs.
* Influence scores: positive = detrimental (raising that example's loss is predicted to lower F).

Every file is written atomically (temporary file in the run directory, then ``os.replace``); the
markdown is written last, so an existing ``report.md`` means the whole report is there.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from trustrepair.app.records import COMMON, Evaluation, EvaluationRecord, Repairs, RunResults, TopExample
from trustrepair.methods.metrics import relative_change_pct, relative_change_se_pct
from trustrepair.engine.storage import write_bytes, write_json, write_text

HEADLINE_STRATEGY = "dpp"
TOP_N = 10
SNIPPET_CHARS = 160
FIGURE_NAME = "beta_sweep.png"
_COLORS = {"dpp": "tab:blue", "topk": "tab:orange", "random": "tab:gray", "oracle": "tab:green"}
_HALF_LABEL = {"heldout": "held-out", "query": "query-half"}


# -- report.json ---------------------------------------------------------------------------------------

def _require(mapping: Mapping, key: str, where: str):
    if key not in mapping:
        raise ValueError(f"report input {where} has no {key!r} (it has {sorted(mapping)}); the stage output "
                         "that holds it is stale or incomplete: delete it and rerun `trustrepair report`")
    return mapping[key]


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf: a relative change against a zero post-SFT value is written as null."""
    return value if math.isfinite(value) else None


def _heldout_se(evaluation: EvaluationRecord, ev: Evaluation, aspect: str) -> float | None:
    """Standard error (percentage points) of a held-out relative change, from the per-pair values when
    the evaluation has them (``post_heldout_pairs`` and the repair's ``heldout_pairs``), else None."""
    post = evaluation.post_heldout_pairs.get(aspect)
    repaired = ev.aspects[aspect].heldout_pairs
    if post is None or repaired is None:
        return None
    return _finite(relative_change_se_pct(post, repaired))


def _aspect_summary(evaluation: EvaluationRecord, repairs: Repairs, aspects: list[str], half: str) -> dict:
    pre, post, repaired = evaluation.pre, evaluation.post, evaluation.repaired
    out = {}
    for aspect in aspects:
        own = _require(_require(repaired, aspect, "evaluation['repaired']"), HEADLINE_STRATEGY,
                       f"evaluation['repaired'][{aspect!r}]")
        before, after = getattr(post.aspects[aspect], half), getattr(own.aspects[aspect], half)
        out[aspect] = {
            "pre": {"log_odds": getattr(pre.aspects[aspect], half)},
            "post": {"log_odds": before},
            "repaired": {"log_odds": after, "perplexity": own.perplexity,
                         "perplexity_change_pct": _finite(relative_change_pct(post.perplexity, own.perplexity)),
                         "strategy": HEADLINE_STRATEGY,
                         "beta": _require(_require(repairs, aspect, "repairs"), HEADLINE_STRATEGY,
                                          f"repairs[{aspect!r}]").beta},
            "relative_change_pct": _finite(relative_change_pct(before, after)),
        }
        if half == "heldout":
            out[aspect]["relative_change_se_pct"] = _heldout_se(evaluation, own, aspect)
    return out


def _strategy_table(evaluation: EvaluationRecord, repairs: Repairs, aspects: list[str]) -> dict:
    """target -> strategy -> beta, |S|, perplexity and its change, both halves of every aspect the
    repair was evaluated on (its own aspect; every aspect for the common subset)."""
    post = evaluation.post
    table = {}
    for target, by_strategy in evaluation.repaired.items():
        table[target] = {}
        for strategy, ev in by_strategy.items():
            record = _require(_require(repairs, target, "repairs"), strategy, f"repairs[{target!r}]")
            table[target][strategy] = {
                "beta": record.beta,
                "subset_size": len(record.subset),
                "perplexity": ev.perplexity,
                "perplexity_change_pct": _finite(relative_change_pct(post.perplexity, ev.perplexity)),
                "aspects": {a: {"heldout": {"log_odds": ev.aspects[a].heldout,
                                            "relative_change_pct": _finite(relative_change_pct(
                                                post.aspects[a].heldout, ev.aspects[a].heldout)),
                                            "relative_change_se_pct": _heldout_se(evaluation, ev, a)},
                                "query": {"log_odds": ev.aspects[a].query,
                                          "relative_change_pct": _finite(relative_change_pct(
                                              post.aspects[a].query, ev.aspects[a].query))}}
                            for a in aspects if a in ev.aspects},
            }
    return table


def summarize(results: RunResults) -> dict:
    """The ``report.json`` payload (see the module docstring for the conventions)."""
    evaluation, repairs = results.evaluation, results.repairs
    aspects = list(evaluation.post.aspects)
    headline = _aspect_summary(evaluation, repairs, aspects, "heldout")
    worst = max(aspects, key=lambda a: headline[a]["repaired"]["perplexity"])
    post_ppl = evaluation.post.perplexity
    worst_ppl = headline[worst]["repaired"]["perplexity"]
    strategies = _strategy_table(evaluation, repairs, aspects)
    beats_random = {
        strategy: [a for a in aspects if strategy in strategies[a] and "random" in strategies[a]
                   and _gain(strategies[a][strategy], a) > _gain(strategies[a]["random"], a)]
        for strategy in ("dpp", "topk")}
    return {
        "aspects": headline,
        "perplexity": {"pre": evaluation.pre.perplexity, "post": post_ppl, "repaired": worst_ppl,
                       "repaired_worst_of": worst,
                       "relative_change_pct": _finite(relative_change_pct(post_ppl, worst_ppl))},
        "query_half": {"aspects": _aspect_summary(evaluation, repairs, aspects, "query")},
        "strategies": strategies,
        "beats_random_heldout": beats_random,
        "timings_s": dict(results.timings_s),
        "sizes": results.sizes,
        "config": results.config,
        "figures": [FIGURE_NAME],
    }


def _gain(row: Mapping, aspect: str) -> float:
    value = row["aspects"][aspect]["heldout"]["relative_change_pct"]
    return -math.inf if value is None else value


# -- beta_sweep.png ------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    """A finite float (a probe's JSON value is null where it was not measured or not finite)."""
    return value is not None and math.isfinite(value)


def plot_beta_sweep(repairs: Repairs, tolerance: float) -> bytes:
    """Figure 2 analogue as PNG bytes: per target, the query-half objective and the held-out perplexity
    against beta (log axis), one line per strategy; the post-SFT value (beta = 0) and the perplexity
    tolerance post * (1 + tolerance) as horizontal lines; the chosen beta starred; a beta whose model
    diverged (non-finite or missing perplexity: JSON stores non-finite numbers as null) as a vertical
    dash-dot line. The objective is drawn where it was measured: at every probe of the figure target,
    at the chosen beta of the others."""
    targets = list(repairs)
    height = 3.6 * len(targets)
    fig = Figure(figsize=(11, height))
    FigureCanvasAgg(fig)
    # Fixed margins: a layout engine would measure every tick label twice and dominate the drawing time.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.55 / height, top=1 - 0.35 / height, wspace=0.22,
                        hspace=0.45)
    axes = fig.subplots(len(targets), 2, squeeze=False, sharex="row")
    for (ax_metric, ax_ppl), target in zip(axes, targets):
        by_strategy = repairs[target]
        base = next(iter(by_strategy.values())).points[0]
        for strategy, record in by_strategy.items():
            points = sorted((p for p in record.points if p.beta > 0), key=lambda p: p.beta)
            color = _COLORS.get(strategy)
            measured = [p for p in points if _is_number(p.metric)]
            ax_metric.plot([p.beta for p in measured], [p.metric for p in measured], "o-", ms=3, color=color,
                           label=strategy)
            finite = [p for p in points if _is_number(p.perplexity)]
            ax_ppl.plot([p.beta for p in finite], [p.perplexity for p in finite], "o-", ms=3, color=color,
                        label=strategy)
            for beta in (p.beta for p in points if not _is_number(p.perplexity)):
                ax_ppl.axvline(beta, ls="-.", lw=1, color=color, label=f"{strategy}: diverged (non-finite)")
            chosen = [p for p in points if p.beta == record.beta]
            if chosen and _is_number(chosen[0].metric):
                ax_metric.plot([chosen[0].beta], [chosen[0].metric], "*", ms=12, color=color)
                ax_ppl.plot([chosen[0].beta], [chosen[0].perplexity], "*", ms=12, color=color)
        ax_metric.axhline(base.metric, ls=":", color="black", lw=1, label="post-SFT (beta = 0)")
        ax_ppl.axhline(base.perplexity, ls=":", color="black", lw=1, label="post-SFT (beta = 0)")
        ax_ppl.axhline(base.perplexity * (1 + tolerance), ls="--", color="tab:red", lw=1,
                       label=f"tolerance (+{100 * tolerance:g}%)")
        objective = ("sum_j F_j / |F_j post| (query half)" if target == COMMON else "log-odds F (query half)")
        ax_metric.set(title=f"{target}: trust objective (lower is better)", xlabel="beta", ylabel=objective,
                      xscale="log")
        ax_ppl.set(title=f"{target}: held-out SFT perplexity", xlabel="beta", ylabel="perplexity", xscale="log")
        for ax in (ax_metric, ax_ppl):
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# -- report.md -----------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _pct_se(row: Mapping) -> str:
    """A held-out relative change with its standard error where known: '+3.3 ± 0.4'."""
    se = row.get("relative_change_se_pct")
    return _pct(row["relative_change_pct"]) + ("" if se is None else f" ± {se:.1f}")


def _ppl_pct(value: float | None) -> str:
    """A perplexity change, to two decimals: it sits next to a tolerance such as 1%."""
    return _pct(value, 2)


def _ppl_direction(change_pct: float | None) -> str:
    """A perplexity change in words ("1.23% higher"): the relative-change sign convention makes a rise
    negative, which reads like a fall without them."""
    if not _is_number(change_pct):
        return "change unknown"
    if round(change_pct, 2) == 0:
        return "unchanged"
    return f"{abs(change_pct):.2f}% {'higher' if change_pct < 0 else 'lower'}"


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """One table cell: newlines escaped as \\n, pipes and '<' escaped, cut to ``limit`` characters."""
    flat = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(flat) > limit:
        flat = flat[:limit - 1] + "…"
    return flat.replace("|", "\\|").replace("<", "&lt;")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _table1(summary: dict) -> list[str]:
    ppl = summary["perplexity"]
    header = ["Aspect", "Pre-SFT F", "Post-SFT F", "Repaired F", "Rel. change F (%)", "Pre-SFT PPL",
              "Post-SFT PPL", "Repaired PPL", "Rel. change PPL (%)", "beta"]
    rows = []
    for aspect, row in summary["aspects"].items():
        rep = row["repaired"]
        rows.append([aspect, _num(row["pre"]["log_odds"]), _num(row["post"]["log_odds"]),
                     _num(rep["log_odds"]), _pct_se(row), _num(ppl["pre"], 3),
                     _num(ppl["post"], 3), _num(rep["perplexity"], 3), _ppl_pct(rep["perplexity_change_pct"]),
                     f"{rep['beta']:.3g}"])
    return [
        "## Table 1: pre-SFT, post-SFT and repaired (held-out half)",
        "",
        "F is the mean log-odds on the held-out trust pairs; the repair of each aspect is its own DPP subset "
        "with the beta chosen on the query half under the perplexity tolerance; ± is the standard error over "
        "the held-out pairs.",
        "",
        *_table(header, rows),
        f"Repaired perplexity (worst of the per-aspect DPP repairs, `{ppl['repaired_worst_of']}`): "
        f"{_num(ppl['repaired'], 3)} vs {_num(ppl['post'], 3)} post-SFT, "
        f"{_ppl_direction(ppl['relative_change_pct'])} (relative change {_ppl_pct(ppl['relative_change_pct'])}%).",
        "",
    ]


def _table4(summary: dict) -> list[str]:
    header = ["Aspect", "Strategy", "Subset size", "beta", "Query-half rel. change F (%)", "Held-out rel. change F (%)",
              "Rel. change PPL (%)", "Repaired PPL"]
    rows = []
    for aspect in summary["aspects"]:
        by_strategy = summary["strategies"][aspect]
        best = max(by_strategy, key=lambda s: _gain(by_strategy[s], aspect))
        for strategy, row in by_strategy.items():
            halves = row["aspects"][aspect]
            held = _pct_se(halves["heldout"])
            rows.append([aspect, strategy, str(row["subset_size"]), f"{row['beta']:.3g}",
                         _pct(halves["query"]["relative_change_pct"]),
                         f"**{held}**" if strategy == best else held,
                         _ppl_pct(row["perplexity_change_pct"]), _num(row["perplexity"], 3)])
    beats = summary["beats_random_heldout"]
    n = len(summary["aspects"])
    verdict = "; ".join(f"{s} beats random on {len(beats[s])} of {n} aspects"
                        + (f" ({', '.join(beats[s])})" if beats[s] else "") for s in beats)
    return [
        "## Table 4: random vs top-k vs DPP subsets of the same size",
        "",
        "Each aspect's own subsets, repaired with the beta each one's search chose. The query half chose the "
        "subset and beta; the held-out half did not, so a query-half gain that vanishes on the held-out half "
        "did not generalise. Best held-out change per aspect in bold.",
        "",
        *_table(header, rows),
        f"Held-out: {verdict}.",
        "",
    ]


def _table2(summary: dict) -> list[str]:
    by_strategy = summary["strategies"][COMMON]
    header = ["Metric"] + [f"{s} {_HALF_LABEL[h]} (%)" for s in by_strategy for h in ("heldout", "query")]
    rows = [[aspect] + [_pct_se(row["aspects"][aspect][h]) for row in by_strategy.values() for h in ("heldout", "query")]
            for aspect in summary["aspects"]]
    rows.append(["perplexity"] + [_ppl_pct(row["perplexity_change_pct"]) for row in by_strategy.values()
                                  for _ in ("heldout", "query")])
    betas = ", ".join(f"{s}: beta {row['beta']:.3g}, |S| = {row['subset_size']}" for s, row in by_strategy.items())
    return [
        "## Table 2: one common subset for all aspects",
        "",
        "Subset chosen by the sum of the per-aspect normalised scores; relative changes over the post-SFT "
        f"model ({betas}). Perplexity is the held-out SFT split in both columns.",
        "",
        *_table(header, rows),
    ]


def _top_examples(top: Mapping[str, list[TopExample]]) -> list[str]:
    lines = [f"## The {TOP_N} most detrimental training examples per aspect", "",
             f"Highest influence score first (query halves, EK-FAC); texts cut to {SNIPPET_CHARS} characters, "
             "newlines shown as \\n.", ""]
    for aspect, examples in top.items():
        rows = [[str(rank), str(ex.index), f"{ex.score:.4g}", _snippet(ex.prompt), _snippet(ex.response)]
                for rank, ex in enumerate(examples[:TOP_N], start=1)]
        lines += [f"### {aspect}", "", *_table(["Rank", "Train index", "Score", "Prompt", "Response"], rows)]
    return lines


def _flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        items += _flatten(value, name + ".") if isinstance(value, Mapping) else [(name, value)]
    return items


def render_markdown(summary: dict, top_examples: Mapping[str, list[TopExample]]) -> str:
    """``report.md`` from the :func:`summarize` payload and the top examples."""
    timings = summary["timings_s"]
    lines = [
        "# Trust repair report",
        "",
        "Sign conventions: F (log-odds) = mean log P(opponent) - log P(proponent) over trust pairs, so lower is "
        "better; relative change = 100 x (post - repaired) / |post| for F and perplexity alike, so positive is "
        "an improvement and a perplexity increase is negative; an influence score is positive when the "
        "training example is detrimental (raising its loss is predicted to lower F).",
        "",
        *_table1(summary),
        *_table4(summary),
        *(_table2(summary) if COMMON in summary["strategies"] else []),
        "## Figure 2: the beta sweep, with and without DPP",
        "",
        "Query-half objective and held-out perplexity against beta for every strategy; the dotted line is the "
        "post-SFT model, the dashed line the perplexity tolerance, a star the chosen beta. The beta searches "
        "probe the perplexity and measure the objective only at the chosen beta, except the DPP and top-k "
        f"searches of the figure target (`{summary['config'].get('figure_target') or next(iter(summary['aspects']))}`), "
        "which measure it at every probe. The search grows "
        "beta from a per-subset starting point, so the axes of different strategies are comparable only "
        "through the perplexity they cost.",
        "",
        f"![beta sweep]({FIGURE_NAME})",
        "",
        *_top_examples(top_examples),
        "## Wall time per stage",
        "",
        *_table(["Stage", "Seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]
                + [["**total**", f"**{sum(timings.values()):.1f}**"]]),
        "Stages reused from an earlier invocation keep the time of the run that computed them.",
        "",
        "## Sizes and settings",
        "",
        *_table(["Size", "Value"], [[k, str(v)] for k, v in _flatten(summary["sizes"])]),
        *_table(["Setting", "Value"], [[k, f"`{v}`"] for k, v in _flatten(summary["config"])]),
    ]
    return "\n".join(lines)


def write_report(results: RunResults, out_dir: Path) -> Path:
    """Write ``beta_sweep.png``, ``report.json`` and (last) ``report.md`` into ``out_dir``; return the
    path of ``report.md``. Everything is rendered in memory first, so a bad input or a plotting error
    leaves an earlier report untouched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    tolerance = float(_require(summary["config"], "tolerance", "results.config"))
    figure = plot_beta_sweep(results.repairs, tolerance)
    markdown = render_markdown(summary, results.top_examples) + "\n"
    write_bytes(out_dir / FIGURE_NAME, figure)
    write_json(out_dir / "report.json", summary)
    path = out_dir / "report.md"
    write_text(path, markdown)
    return path
