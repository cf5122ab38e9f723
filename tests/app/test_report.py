"""report.md / report.json / beta_sweep.png from synthetic run results (built as the JSON of the run
directory's files, then read into the typed records the report consumes)."""
import json
import math
import re

import numpy as np
import pytest

from trustrepair.app import report as report_module
from trustrepair.app.records import EvaluationRecord, RunResults, TopExample, repairs_from_json
from trustrepair.methods.selection import STRATEGIES
from trustrepair.methods.metrics import relative_change_pct
from trustrepair.app.report import FIGURE_NAME, SNIPPET_CHARS, TOP_N
from trustrepair.app.report import summarize as summarize_records
from trustrepair.app.report import write_report as write_records


def as_records(results):
    """The typed records of a synthetic results dict (evaluation.json / repairs.json shapes)."""
    return RunResults(config=results["config"], sizes=results["sizes"],
                      evaluation=EvaluationRecord.from_json(results["evaluation"]),
                      repairs=repairs_from_json(results["repairs"]),
                      top_examples={a: [TopExample(**ex) for ex in top] for a, top in results["top_examples"].items()},
                      timings_s=results["timings_s"])


def summarize(results):
    return summarize_records(as_records(results))


def write_report(results, out_dir):
    return write_records(as_records(results), out_dir)

ASPECTS = ("truthfulness", "bias")


def _eval(rng, ppl):
    return {"aspects": {a: {"query": float(rng.normal()), "heldout": float(rng.normal())} for a in ASPECTS},
            "perplexity": ppl}


def make_results(seed=0, common=True):
    rng = np.random.default_rng(seed)
    post = _eval(rng, float(rng.uniform(5, 8)))
    targets = list(ASPECTS) + (["common"] if common else [])
    repaired, repairs = {}, {}
    for target in targets:
        repaired[target], repairs[target] = {}, {}
        for strategy in STRATEGIES:
            repaired[target][strategy] = _eval(rng, post["perplexity"] * float(rng.uniform(1.0, 1.01)))
            betas = np.sort(rng.uniform(1e-3, 1.0, size=int(rng.integers(2, 7))))
            points = [{"beta": 0.0, "metric": 0.5, "perplexity": post["perplexity"]}] + [
                {"beta": float(b), "metric": float(0.5 - b * rng.uniform()),
                 "perplexity": float(post["perplexity"] * (1 + 0.02 * b))} for b in betas]
            repairs[target][strategy] = {"beta": float(betas[len(betas) // 2]),
                                         "subset": [int(i) for i in rng.choice(50, 5, replace=False)],
                                         "points": points}
    top = {a: [{"index": int(i), "score": float(10 - i),
                "prompt": f"Human: prompt {a} {i} | with a pipe\nsecond line <b>" + "x" * 300,
                "response": f"response {a} {i}"} for i in range(12)] for a in ASPECTS}
    return {
        "config": {"aspects": list(ASPECTS), "subset_size": 5, "tolerance": 0.01, "damping": None},
        "sizes": {"sft_train": 40, "sft_heldout": 10, "aspects": {a: {"query": 8, "heldout": 2} for a in ASPECTS}},
        "evaluation": {"pre": _eval(rng, float(rng.uniform(8, 9))), "post": post, "repaired": repaired},
        "repairs": repairs,
        "top_examples": top,
        "timings_s": {"load_model": 1.5, "sft": 12.25, "fit_ekfac": 3.0, "repair": 4.0},
    }


def rel(post, repaired):
    return 100.0 * (post - repaired) / abs(post)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_values(seed):
    results = make_results(seed)
    ev = results["evaluation"]
    summary = summarize(results)
    assert set(summary) >= {"aspects", "perplexity", "timings_s", "query_half", "strategies", "sizes", "config"}
    for aspect in ASPECTS:
        row, own = summary["aspects"][aspect], ev["repaired"][aspect]["dpp"]
        assert row["pre"]["log_odds"] == ev["pre"]["aspects"][aspect]["heldout"]
        assert row["post"]["log_odds"] == ev["post"]["aspects"][aspect]["heldout"]
        assert row["repaired"]["log_odds"] == own["aspects"][aspect]["heldout"]
        assert row["repaired"]["perplexity"] == own["perplexity"]
        assert row["repaired"]["strategy"] == "dpp"
        assert row["repaired"]["beta"] == results["repairs"][aspect]["dpp"]["beta"]
        assert math.isclose(row["relative_change_pct"],
                            rel(ev["post"]["aspects"][aspect]["heldout"], own["aspects"][aspect]["heldout"]),
                            rel_tol=1e-12)
        query = summary["query_half"]["aspects"][aspect]
        assert math.isclose(query["relative_change_pct"],
                            rel(ev["post"]["aspects"][aspect]["query"], own["aspects"][aspect]["query"]),
                            rel_tol=1e-12)
    worst = max(ev["repaired"][a]["dpp"]["perplexity"] for a in ASPECTS)
    assert summary["perplexity"] == {
        "pre": ev["pre"]["perplexity"], "post": ev["post"]["perplexity"], "repaired": worst,
        "repaired_worst_of": max(ASPECTS, key=lambda a: ev["repaired"][a]["dpp"]["perplexity"]),
        "relative_change_pct": pytest.approx(rel(ev["post"]["perplexity"], worst), rel=1e-12)}
    # The common subset's DPP perplexity is not part of the worst-of rule (it is its own Table 2 row).
    assert summary["strategies"]["common"]["dpp"]["perplexity"] == ev["repaired"]["common"]["dpp"]["perplexity"]
    for target in (*ASPECTS, "common"):
        for strategy in STRATEGIES:
            row = summary["strategies"][target][strategy]
            repaired = ev["repaired"][target][strategy]
            assert row["subset_size"] == 5
            assert math.isclose(row["perplexity_change_pct"],
                                rel(ev["post"]["perplexity"], repaired["perplexity"]), rel_tol=1e-12)
            for aspect in ASPECTS:
                for half in ("heldout", "query"):
                    assert math.isclose(row["aspects"][aspect][half]["relative_change_pct"],
                                        rel(ev["post"]["aspects"][aspect][half], repaired["aspects"][aspect][half]),
                                        rel_tol=1e-12)
    for strategy, aspects in summary["beats_random_heldout"].items():
        for aspect in ASPECTS:
            halves = {s: summary["strategies"][aspect][s]["aspects"][aspect]["heldout"]["relative_change_pct"]
                      for s in (strategy, "random")}
            assert (aspect in aspects) == (halves[strategy] > halves["random"])


def test_zero_post_value_gives_null_not_nan():
    results = make_results()
    results["evaluation"]["post"]["aspects"]["bias"]["heldout"] = 0.0
    summary = summarize(results)
    assert summary["aspects"]["bias"]["relative_change_pct"] is None
    json.dumps(summary, allow_nan=False)


def test_missing_repair_is_a_clear_error():
    results = make_results()
    del results["evaluation"]["repaired"]["bias"]["dpp"]
    with pytest.raises(ValueError, match=r"evaluation\['repaired'\]\['bias'\].*'dpp'"):
        summarize(results)


def test_write_report_files(tmp_path):
    import matplotlib.image

    results = make_results(3)
    path = write_report(results, tmp_path / "run")
    assert path == tmp_path / "run" / "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["report.md", "report.json", FIGURE_NAME])

    saved = json.loads((path.parent / "report.json").read_text())
    assert saved == json.loads(json.dumps(summarize(results)))
    assert saved["timings_s"] == results["timings_s"]

    png = path.parent / FIGURE_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300

    md = path.read_text()
    for heading in ("## Table 1", "## Table 4", "## Table 2", "## Figure 2", "most detrimental", "## Wall time",
                    "## Sizes and settings", "lower is better", "detrimental"):
        assert heading in md, heading
    assert f"]({FIGURE_NAME})" in md
    table1 = md.split("## Table 1")[1].split("## Table 4")[0]
    for aspect in ASPECTS:
        row = next(line for line in table1.splitlines() if line.startswith(f"| {aspect} |"))
        assert f"{saved['aspects'][aspect]['relative_change_pct']:+.1f}" in row
        assert f"{saved['aspects'][aspect]['post']['log_odds']:.4f}" in row
    table4 = md.split("## Table 4")[1].split("## Table 2")[0]
    for aspect in ASPECTS:
        for strategy in STRATEGIES:
            row = next(line for line in table4.splitlines() if line.startswith(f"| {aspect} | {strategy} |"))
            halves = saved["strategies"][aspect][strategy]["aspects"][aspect]
            assert f"{halves['query']['relative_change_pct']:+.1f}" in row
            assert f"{halves['heldout']['relative_change_pct']:+.1f}" in row
    table2 = md.split("## Table 2")[1].split("## Figure 2")[0]
    assert "| perplexity |" in table2 and all(f"| {a} |" in table2 for a in ASPECTS)
    # Top examples: ten per aspect, scores shown, texts escaped and truncated to one table cell.
    top = md.split("most detrimental")[1].split("## Wall time")[0]
    for aspect in ASPECTS:
        section = top.split(f"### {aspect}")[1].split("###")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == TOP_N
        assert "| 1 | 0 | 10 |" in rows[0]
        assert "\\n" in rows[0] and "\\|" in rows[0] and "<b>" not in rows[0]
        prompt_cell = rows[0].split(" | ")[3]
        assert len(prompt_cell.replace("\\|", "|").replace("&lt;", "<")) <= SNIPPET_CHARS
    assert "**total**" in md and "20.8" in md
    assert_tables_well_formed(md)


@pytest.mark.parametrize("post,repaired,words", [(13.573, 13.705, "0.97% higher"), (13.705, 13.573, "0.96% lower"),
                                                  (13.5, 13.5, "unchanged")])
def test_repaired_perplexity_sentence_says_which_way(tmp_path, post, repaired, words):
    """The relative-change convention makes a perplexity rise negative; the sentence says it in words."""
    summary = summarize(make_results(3))
    summary["perplexity"].update(post=post, repaired=repaired,
                                 relative_change_pct=relative_change_pct(post, repaired))
    sentence = next(line for line in report_module._table1(summary) if line.startswith("Repaired perplexity"))
    assert f"{repaired:.3f} vs {post:.3f} post-SFT, {words} (relative change" in sentence


def assert_tables_well_formed(md):
    """Every markdown table row has as many cells as its header (no unescaped '|' inside a cell)."""
    widths = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            widths.append(len(re.split(r"(?<!\\)\|", line)))
        elif widths:
            assert len(set(widths)) == 1, f"ragged table before {line!r}: {widths}"
            widths = []


def test_report_without_common_target_and_a_diverged_point(tmp_path):
    results = make_results(4, common=False)
    results["repairs"]["bias"]["random"]["points"].append({"beta": 5.0, "metric": math.nan, "perplexity": math.inf})
    # As read back from repairs.json: objectives not measured at most probes, a diverged probe all null.
    for record in results["repairs"]["truthfulness"].values():
        for point in record["points"][1:]:
            if point["beta"] != record["beta"]:
                point["metric"] = None
        record["points"].append({"beta": 7.0, "metric": None, "perplexity": None})
    path = write_report(results, tmp_path)
    md = path.read_text()
    assert_tables_well_formed(md)
    assert "## Table 2" not in md and "## Table 1" in md and "## Table 4" in md


def test_atomic_overwrite_leaves_no_temporary_files(tmp_path, monkeypatch):
    from trustrepair.app import report
    from trustrepair.engine import storage

    write_report(make_results(5, common=False), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    # A failure while rendering leaves the previous report whole.
    monkeypatch.setattr(report, "render_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(make_results(6, common=False), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    # A failure at the rename of every writer leaves the old file and no temporary file.
    monkeypatch.setattr(storage.os, "replace", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(make_results(6, common=False), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    write_report(make_results(6, common=False), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(before)
    assert (tmp_path / "report.md").read_bytes() != before["report.md"]


def test_heldout_standard_errors_from_the_pairs(tmp_path):
    """With per-pair held-out values the summary and the tables carry the paired standard error."""
    rng = np.random.default_rng(11)
    results = make_results(7)
    ev = results["evaluation"]
    post_pairs = {a: rng.normal(2.0, 1.0, size=9).tolist() for a in ASPECTS}
    ev["post_heldout_pairs"] = post_pairs
    for target, by_strategy in ev["repaired"].items():
        for strategy, rep in by_strategy.items():
            for aspect, halves in rep["aspects"].items():
                pairs = [v - rng.normal(0.1, 0.05) for v in post_pairs[aspect]]
                halves["heldout_pairs"], halves["heldout"] = pairs, float(np.mean(pairs))
    ev["post"]["aspects"] = {a: {**ev["post"]["aspects"][a], "heldout": float(np.mean(post_pairs[a]))}
                             for a in ASPECTS}
    summary = summarize(results)
    for aspect in ASPECTS:
        diffs = np.subtract(post_pairs[aspect], ev["repaired"][aspect]["dpp"]["aspects"][aspect]["heldout_pairs"])
        want = 100 * diffs.std(ddof=1) / 3.0 / abs(np.mean(post_pairs[aspect]))
        assert summary["aspects"][aspect]["relative_change_se_pct"] == pytest.approx(want, rel=1e-12)
        for strategy in STRATEGIES:
            assert summary["strategies"][aspect][strategy]["aspects"][aspect]["heldout"]["relative_change_se_pct"] > 0
    md = write_report(results, tmp_path).read_text()
    assert_tables_well_formed(md)
    table1 = md.split("## Table 1")[1].split("## Table 4")[0]
    assert sum(" ± " in line for line in table1.splitlines() if line.startswith("| ")) == len(ASPECTS)
    # Without the pairs (an older evaluation.json) there is no standard error and no ±.
    plain = summarize(make_results(7))
    assert all(row["relative_change_se_pct"] is None for row in plain["aspects"].values())
