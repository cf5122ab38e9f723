"""The planted demo end to end on a tiny model with the real (sliced) datasets: two seeds in OUT/seed-N
sharing one prefix store, the gold retrains, the rankings read back from scores.jsonl, the oracle subsets,
and the report over the seeds."""
import json
import math

import numpy as np
import pytest

from trustrepair.app.cli import main
from trustrepair.app.pipeline import HIDDEN_STORE, run_demo
from trustrepair.app.planted_stages import RANKING_METHODS
from trustrepair.app.settings import DemoConfig
from trustrepair.methods.ground_truth import ranking_metrics

ASPECTS = ("truthfulness", "bias")


def planted_config(model_dir, data_dir, **overrides):
    # 105 pairs: the bias pool then holds 4 stereotype topics (one poison source, three to split 80/20)
    settings = dict(model=str(model_dir), data_dir=str(data_dir), aspects=ASPECTS, planted=4, seeds=2, n_sft=30,
                    n_pairs=105, max_length=48, trained_blocks=2, subset_size=4, batch_size=8, sft_lr=1e-3,
                    beta_probes=3)
    settings.update(overrides)
    return DemoConfig(**settings)


@pytest.fixture(scope="module")
def planted_run(tiny_model_dir, shared_data, tmp_path_factory):
    from trustrepair.app import prefix_cache

    computed = []  # sequences per prefix computation: one per seed
    original = prefix_cache.cache_prefix_hidden

    def counting(model, examples, *args, **kwargs):
        computed.append(len(examples))
        return original(model, examples, *args, **kwargs)

    prefix_cache.cache_prefix_hidden = counting
    try:
        out = tmp_path_factory.mktemp("planted")
        config = planted_config(tiny_model_dir, shared_data)
        run_demo(out, config, progress=False)
    finally:
        prefix_cache.cache_prefix_hidden = original
    return out, config, computed


def _planted_indices(seed_dir, aspect):
    rows = [json.loads(line) for line in (seed_dir / "scores.jsonl").read_text().splitlines()]
    return rows, [i for i, row in enumerate(rows) if row["source"].startswith(f"planted {aspect}:")]


def test_every_seed_has_its_run_and_the_report_averages_them(planted_run):
    out, config, _ = planted_run
    report = json.loads((out / "report.json").read_text())
    assert [s for s in sorted(p.name for p in out.glob("seed-*"))] == ["seed-0", "seed-1"]
    assert len(report["per_seed"]) == 2 and (out / "report.md").read_text().startswith("# Planted-damage demo: 2 seeds")
    planted = report["planted"]
    assert set(planted) == set(ASPECTS)
    for aspect, entry in planted.items():
        assert math.isfinite(entry["damage"]["post_minus_gold"]) and entry["damage"]["se"] > 0
        assert set(entry["ranking"]) == set(RANKING_METHODS)
        assert set(entry["undone"]) == {"oracle", "dpp", "topk", "random"}
        for strategy, row in entry["undone"].items():
            assert {"fraction", "se", "perplexity_change_pct"} <= set(row)
            assert row["worst_perplexity_change_pct"] >= -100 * config.tolerance - 1e-6, (aspect, strategy)
        damage = [s[aspect]["damage"]["heldout"]["post_minus_gold"] for s in report["per_seed"]]
        assert entry["damage"]["post_minus_gold"] == pytest.approx(np.mean(damage))


def test_gold_retrains_drop_exactly_the_planted_examples(planted_run):
    out, config, _ = planted_run
    for seed_dir in out.glob("seed-*"):
        gold = json.loads((seed_dir / "gold.json").read_text())
        rows, _ = _planted_indices(seed_dir, ASPECTS[0])
        for aspect in ASPECTS:
            assert gold[aspect]["n_train"] == len(rows) - config.planted
            assert len(gold[aspect]["aspects"][aspect]["heldout"]) == len(gold["post"]["aspects"][aspect]["heldout"])
        assert gold["all"]["n_train"] == len(rows) - config.planted * len(ASPECTS)
        evaluation = json.loads((seed_dir / "evaluation.json").read_text())
        for aspect in ASPECTS:  # the post-SFT model was restored after the retrains
            assert gold["post"]["aspects"][aspect]["heldout"] == pytest.approx(
                evaluation["post_heldout_pairs"][aspect], rel=1e-5, abs=1e-6)


def test_oracle_subsets_and_ekfac_ranking_come_from_the_planted_labels_in_scores_jsonl(planted_run):
    out, config, _ = planted_run
    for seed_dir in out.glob("seed-*"):
        selection = json.loads((seed_dir / "selection.json").read_text())
        ranking = json.loads((seed_dir / "ranking.json").read_text())
        for aspect in ASPECTS:
            rows, planted = _planted_indices(seed_dir, aspect)
            assert len(planted) == config.planted and selection[aspect]["oracle"] == planted
            want = ranking_metrics([row[aspect] for row in rows], planted)
            got = ranking[aspect]["ekfac"]
            assert {k: got[k] for k in want} == pytest.approx(want)
            others = {b: sum(rows[i]["source"].startswith(f"planted {b}:")
                             for i in np.argsort([-row[aspect] for row in rows], kind="stable")[:config.planted])
                      for b in ASPECTS if b != aspect}
            assert got["other_planted_in_top_k"] == others


def test_seeds_share_the_prefix_store(planted_run):
    out, _, computed = planted_run
    assert (out / HIDDEN_STORE).is_file() and not list(out.glob("seed-*/cache/hidden.pt"))
    assert len(computed) == 2 and 0 < computed[1] < computed[0], computed


def test_a_rerun_reuses_every_seed_and_stage_commands_refuse_the_multi_seed_root(planted_run, capsys):
    out, config, _ = planted_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/*.json")}
    run_demo(out, config, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.name not in ("report.json", "timings.json"))
    assert main(["fit", "--out", str(out), "--quiet"]) == 2
    assert "seed-N" in capsys.readouterr().err
