"""benchmarks/gpu_check's plumbing on the CPU (--smoke): the script a lent GPU runs once must not fail
on a stage that could have been checked here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_smoke_runs_every_cpu_stage(tmp_path):
    pytest.importorskip("kronfluence")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = results["stages"]
    expected = {"row alignment", "pipeline inputs", "warm-up", "epoch floors", "trustrepair TF32", "kronfluence setup",
                "kronfluence fp32", "reference path fp32", "trustrepair bf16 autocast", "kronfluence aggregated",
                "eigh options", "eigh schedules", "trustrepair TF32, tuned", "trustrepair bf16 autocast, tuned"}
    assert expected <= set(stages), sorted(expected - set(stages))
    assert all(stage["status"] == "ok" for stage in stages.values()), stages
    for schedule in ("sequential", "stacked", "streams", "streams + host"):
        assert results["eigh_schedules"][schedule]["max_eigenvalue_diff"] < 1e-12
    section = (tmp_path / "RESULTS_section.md").read_text()
    assert results["spearman_tuned_vs_reference"] > 0.99 and results["planted_tuned"]["pairwise_ok"]
    assert results["spearman_bf16_tuned_vs_reference"] > 0.98
    for heading in ("| goal | measured | verdict |", "zero-padded to an even width", "by schedule", "eigh of one factor",
                    "Tunables chosen from this run's tables", "EK-FAC fit, trustrepair TF32, tuned tunables"):
        assert heading in section, heading


def test_only_runs_the_selected_groups_and_rejects_unknown_ones(tmp_path):
    script = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(script + ["--only", "eigh"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert {stages[name]["status"] for name in ("eigh options", "eigh schedules")} == {"ok"}
    assert stages["row alignment"]["status"] == "not selected (--only)"
    assert "pipeline inputs" not in stages  # neither our pipeline nor kronfluence's: no model is built
    proc = subprocess.run(script + ["--only", "eigh,pipelines"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--only takes a comma-separated subset" in proc.stderr
