"""What a run directory refuses to mix: damaged files (a rerun completes with the same results or stops
with one line, exit 2, naming the file to delete; never a traceback) and inputs that changed since its
results were computed (the model's files, each data file)."""
import hashlib
import json
import shutil

import pytest

from conftest import save_tiny_model_dir
from trustrepair.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama directory, chat data, a user trust file, and a run directory after attribute + repair."""
    root = tmp_path_factory.mktemp("damaged")
    save_tiny_model_dir(root / "model", smollm2_tokenizer)
    (root / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name a colour number {i}."},
        {"role": "assistant", "content": ["Red.", "Blue.", "Green."][i % 3]}]}) + "\n" for i in range(16)))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Is {i} odd?", "proponent": ["No", "Yes"][i % 2],
                                                          "opponent": ["Yes", "No"][i % 2]}) + "\n" for i in range(10)))
    run = root / "run"
    args = ["--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--aspects",
            str(root / "pairs.jsonl"), "--last-blocks", "1", "--out", str(run), "--quiet"]
    assert main(["attribute", *args]) == 0
    assert main(["repair", "--out", str(run), "--subset-size", "3", "--quiet"]) == 0
    return run, args


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["attribute.json", "timings.json", "scores.safetensors", "factors/factors.json",
                                  "factors/factors.safetensors", "cache/hidden.pt", "repair.json",
                                  "repair/delta.safetensors"])
def test_a_truncated_file_is_one_line_naming_it(finished_run, tmp_path, capsys, name):
    source, args = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    damaged = run / name
    assert damaged.is_file(), sorted(p.name for p in run.rglob("*"))
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    codes = [main(["attribute", *args[:-3], "--out", str(run), "--quiet"]),
             main(["repair", "--out", str(run), "--subset-size", "3", "--quiet"]),
             main(["report", "--out", str(run), "--quiet"])]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert set(codes) <= {0, 2} and "Traceback" not in err, (codes, err[-2000:])
    failing = [line for line in lines if "error:" in line]
    assert all(name.split("/")[-1] in line and "delete it" in line for line in failing), lines
    if 2 not in codes:  # the commands that read it rewrote it
        assert damaged.read_bytes() != data[: len(data) // 2]


def test_an_intact_rerun_reuses_every_result(finished_run, tmp_path):
    source, args = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = {p.relative_to(run): _digest(p) for p in run.rglob("*") if p.is_file() and p.name != "timings.json"}
    assert main(["attribute", *args[:-3], "--out", str(run), "--quiet"]) == 0
    after = {p.relative_to(run): _digest(p) for p in run.rglob("*") if p.is_file() and p.name != "timings.json"}
    assert after == before


def _rerun_refused(args, run, capsys, what):
    capsys.readouterr()
    assert main(["attribute", *args[:-3], "--out", str(run), "--quiet"]) == 2
    line = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(line) == 1 and "changed since its results were computed" in line[0] and what in line[0], line
    assert main(["repair", "--out", str(run), "--quiet"]) == 2


def _copied_run(finished_run, tmp_path):
    """A copy of the fixture's model, data and run directory, its settings and fingerprints naming the copy."""
    source, args = finished_run
    root = tmp_path / "copy"
    shutil.copytree(source.parent, root)
    for file in ("attribute.json", "inputs.json"):
        path = root / "run" / file
        path.write_text(path.read_text().replace(str(source.parent), str(root)))
    args = [a.replace(str(source.parent), str(root)) for a in args]
    assert main(["attribute", *args]) == 0  # the same bytes: every result reused
    return root, args


def test_an_edited_training_file_is_refused_by_name(finished_run, tmp_path, capsys):
    root, args = _copied_run(finished_run, tmp_path)
    with open(root / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")
    _rerun_refused(args, root / "run", capsys, f"{root / 'train.jsonl'} (changed)")


def test_a_model_changed_in_place_is_refused_by_name(finished_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, args = _copied_run(finished_run, tmp_path)
    weights = root / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if "layers.1.mlp" in n)
    tensors[name] = tensors[name] * 1.5  # "re-fine-tuned in place"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    _rerun_refused(args, root / "run", capsys, f"{weights} (changed)")


def test_inputs_of_a_run_without_results_may_change(tmp_path, finished_run, capsys):
    source, args = finished_run
    run = tmp_path / "fresh"
    bad = [a for a in args]
    bad[bad.index("--last-blocks") + 1] = "9"  # refused before any result: a corrected command may follow
    bad[bad.index("--out") + 1] = str(run)
    assert main(["attribute", *bad]) == 2
    fixed = [str(run) if a == str(source) else a for a in args]
    assert main(["attribute", *fixed]) == 0
    assert (run / "scores.jsonl").is_file()


def test_a_model_with_a_nan_weight_is_refused_by_parameter_name(finished_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, args = _copied_run(finished_run, tmp_path)
    weights = root / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    fresh = [str(tmp_path / "fresh") if a == str(root / "run") else a for a in args]
    capsys.readouterr()
    assert main(["attribute", *fresh]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "non-finite weights: model.layers.0.mlp.down_proj.weight (1 of" in line, line
    assert not (tmp_path / "fresh" / "scores.jsonl").exists()


@pytest.mark.parametrize("key, used, other", [("selection_scores", "raw", "normalized"), ("repair_damping", 0.1, 0.02)])
def test_settings_newer_than_a_run_directory_are_read_as_what_it_used(tmp_path, key, used, other):
    """A run directory written before a setting existed (its config.json lacks the key) did what that
    setting's first value does (selection by raw scores, repairs damped by 0.1 x mean(Lambda)): it is reused
    for that value and refused for another."""
    from trustrepair.app.rundir import RunDir
    from trustrepair.app.settings import DemoConfig
    from trustrepair.engine.storage import read_json, write_json

    run = RunDir(tmp_path / "run", DemoConfig(), progress=False)
    saved = read_json(run.path(RunDir.SETTINGS))
    del saved[key]
    write_json(run.path(RunDir.SETTINGS), saved)
    write_json(run.path(RunDir.SELECTION), {})  # a result: the settings can no longer be replaced
    RunDir(tmp_path / "run", DemoConfig(**{key: used}), progress=False)
    with pytest.raises(ValueError, match=f"made with other settings .*{key}"):
        RunDir(tmp_path / "run", DemoConfig(**{key: other}), progress=False)


def test_an_attribute_run_older_than_selection_scores_repairs_by_raw_scores(tmp_path):
    """attribute.json written before AttributeConfig.selection_scores existed: `repair` reads the run as
    'raw' (its scores have no self-influences), a rerun of `attribute` at the new default is refused."""
    from trustrepair.app.rundir import RunDir
    from trustrepair.app.settings import AttributeConfig
    from trustrepair.app.workflow import load_settings, open_run
    from trustrepair.engine.storage import read_json, write_json

    cfg = AttributeConfig(model=str(tmp_path / "model"), train=(str(tmp_path / "train.jsonl"),))
    run = open_run(tmp_path / "run", cfg, progress=False)
    saved = read_json(run.path(RunDir.ATTRIBUTE_SETTINGS))
    del saved["selection_scores"]
    write_json(run.path(RunDir.ATTRIBUTE_SETTINGS), saved)
    assert load_settings(tmp_path / "run").selection_scores == "raw"
    run.path(RunDir.SCORES).write_bytes(b"")  # a result: the settings can no longer be replaced
    with pytest.raises(ValueError, match="made with other settings .*selection_scores"):
        open_run(tmp_path / "run", cfg, progress=False)
