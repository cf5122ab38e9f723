"""Fault injection on the command line: ``attribute`` killed with SIGKILL at a random point, then a random
output file truncated; the rerun of ``attribute`` and ``repair`` either completes with results identical
to an uninterrupted run's, or stops with one line naming the file to delete. Never a traceback, never a
mixed result."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import save_tiny_model_dir

TRIALS = 4


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "trustrepair", *args, "--quiet"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("faults")
    save_tiny_model_dir(root / "model", smollm2_tokenizer)
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {i}.", "completion": " " + " ".join(
        str(j) for j in range(1, i + 2))}) + "\n" for i in range(20)))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Is {i} odd?", "proponent": ["No", "Yes"][i % 2],
                                                          "opponent": ["Yes", "No"][i % 2]}) + "\n" for i in range(10)))
    attribute = ["attribute", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--aspects",
                 str(root / "pairs.jsonl"), "--last-blocks", "1", "--score-chunk", "6"]
    start = time.perf_counter()
    reference = root / "reference"
    assert _cli([*attribute, "--out", str(reference)], root).returncode == 0
    duration = time.perf_counter() - start
    assert _cli(["repair", "--out", str(reference), "--subset-size", "3"], root).returncode == 0
    return root, attribute, reference, duration


def _results(run):
    repair = json.loads((run / "repair.json").read_text())
    record = {k: v for k, v in repair["record"].items() if k != "seconds"}  # wall time differs between runs
    return (run / "scores.jsonl").read_text(), record, repair["input"], repair["repaired"]


@pytest.mark.parametrize("trial", range(TRIALS))
def test_killed_and_damaged_runs_resume_identically_or_name_the_file(setup, trial):
    root, attribute, reference, duration = setup
    rng = random.Random(trial)
    run = root / f"trial-{trial}"
    process = subprocess.Popen([sys.executable, "-m", "trustrepair", *attribute, "--out", str(run), "--quiet"],
                               cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.2, duration))
    process.send_signal(signal.SIGKILL)
    process.wait()
    outputs = sorted(p for p in run.rglob("*") if p.is_file()) if run.exists() else []
    if outputs and rng.random() < 0.75:
        victim = rng.choice(outputs)
        data = victim.read_bytes()
        victim.write_bytes(data[: rng.randrange(len(data))] if data else b"x")
    again = _cli([*attribute, "--out", str(run)], root)
    repaired = _cli(["repair", "--out", str(run), "--subset-size", "3"], root) if again.returncode == 0 else again
    for done in (again, repaired):
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr  # --quiet: no bars at all
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        if done.returncode == 2:
            assert len(errors) == 1 and "delete" in errors[0], done.stderr[-2000:]
    if repaired.returncode == 0:
        assert _results(run) == _results(reference)
    os.sync()
