"""The command line: help of every subcommand, options -> DemoConfig, errors as one line with exit code 2,
dispatch to the stages (run_stages replaced by a recorder: the pipeline itself is tested elsewhere)."""
import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from trustrepair.app.cli import STAGES, build_config, build_parser, main
from trustrepair.data import DataError
from trustrepair.app.settings import DemoConfig
from trustrepair.app import pipeline
from trustrepair.app.rundir import RunDir

COMMANDS = (*STAGES, "demo")

# A valid non-default value for every DemoConfig field (a new field must be added here).
OTHER_VALUES = {
    "model": ("/models/tiny", "/models/tiny"),
    "data_dir": ("/data", "/data"),
    "planted": ("8", 8),
    "seeds": ("2", 2),
    "aspects": (["truthfulness", "bias"], ("truthfulness", "bias")),
    "n_sft": ("57", 57),
    "n_pairs": ("33", 33),
    "max_length": ("77", 77),
    "trained_blocks": ("3", 3),
    "sft_epochs": ("2", 2),
    "sft_lr": ("1e-3", 1e-3),
    "fisher": ("sampled", "sampled"),
    "damping": ("0.01", 0.01),
    "repair_damping": ("0.05", 0.05),
    "subset_size": ("8", 8),
    "eta": ("2.5", 2.5),
    "selection_scores": ("raw", "raw"),
    "tolerance": ("0.02", 0.02),
    "beta_probes": ("6", 6),
    "figure_target": ("bias", "bias"),
    "batch_size": ("5", 5),
    "seed": ("7", 7),
}


@pytest.fixture(autouse=True)
def restore_log_level():
    """main() sets the trustrepair logger's level (its job as the entry point); undo that after each test."""
    package = logging.getLogger("trustrepair")
    level = package.level
    yield
    package.setLevel(level)


def parse(argv):
    return build_parser().parse_args(argv)


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines}"
    return lines[0]


def test_one_subcommand_per_stage_in_the_order_they_run():
    assert tuple(STAGES) == pipeline.STAGE_ORDER


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(command, capsys):
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the wrapping follows the terminal width
    assert out.startswith(f"usage: trustrepair {command}")
    for field in dataclasses.fields(DemoConfig):
        assert f"--{field.name.replace('_', '-')}" in out
    assert "--out DIR" in out and "--quiet" in out and "--log-level" in out
    assert "trust aspects to analyse and repair" in out and "(default: truthfulness ethics bias)" in out
    assert "80% train" in out  # the metadata's %% renders as one percent sign


def test_top_level_help_lists_every_command_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "trustrepair", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert f"    {command} " in done.stdout


def test_options_map_onto_democonfig(tmp_path):
    args = parse(["fit", "--aspects", "truthfulness", "bias", "--subset-size", "8", "--damping", "0.01",
                  "--out", str(tmp_path / "run")])
    assert build_config(args) == DemoConfig(aspects=("truthfulness", "bias"), subset_size=8, damping=0.01)
    assert args.out == tmp_path / "run" and not args.quiet and args.log_level == "INFO"
    assert build_config(parse(["demo", "--damping", "None"])).damping is None
    assert build_config(parse(["demo", "--out", str(tmp_path / "new")])) == DemoConfig()


def test_every_field_has_an_option():
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(DemoConfig)}
    argv = ["select"]
    for name, (text, _) in OTHER_VALUES.items():
        argv += [f"--{name.replace('_', '-')}", *([text] if isinstance(text, str) else text)]
    config = build_config(parse(argv + ["--out", "/nonexistent/run"]))
    for name, (_, value) in OTHER_VALUES.items():
        assert getattr(config, name) == value, name
        assert value != getattr(DemoConfig(), name), f"{name}: pick a non-default test value"


def test_later_stages_read_the_saved_settings(tmp_path):
    saved = DemoConfig(aspects=("bias",), subset_size=4, damping=0.5)
    RunDir(tmp_path, saved)  # writes config.json
    assert build_config(parse(["report", "--out", str(tmp_path)])) == saved
    # A given option overrides the saved value, so that RunDir can refuse the mismatch.
    assert build_config(parse(["report", "--out", str(tmp_path), "--seed", "3"])).seed == 3


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--subset-size", "abc"], "argument --subset-size: invalid int value: 'abc'"),
    (["fit", "--damping", "abc"], "argument --damping: expected a finite number or 'none', got 'abc'"),
    (["fit", "--damping", "nan"], "argument --damping: expected a finite number or 'none', got 'nan'"),
    (["fit", "--tolerance", "nan"], "argument --tolerance: expected a finite number, got 'nan'"),
    (["repair", "--eta", "inf"], "argument --eta: expected a finite number, got 'inf'"),
    (["attribute", "--query-fraction", "inf"], "argument --query-fraction: expected a finite number, got 'inf'"),
    (["fit", "--subset-size", "0"], "subset_size must be >= 1, got 0"),
    (["fit", "--fisher", "exact"], "fisher must be 'empirical' or 'sampled'"),
    (["fit", "--aspects", "bias", "--figure-target", "common"], "figure_target must be one of the repair targets ['bias']"),
    (["fit", "--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
    (["fit", "--aspects"], "argument --aspects: expected at least one argument"),
    (["retrain"], "invalid choice: 'retrain'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_values_exit_2_with_one_line(argv, expected, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(argv + ["--out", str(out_dir)] if argv else argv) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("trustrepair") and expected in line, line
    assert captured.out == ""
    assert not out_dir.exists()  # nothing written for a rejected command


def test_config_mismatch_in_existing_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    RunDir(tmp_path, DemoConfig(subset_size=4, planted=0))
    (tmp_path / "selection.json").write_text("{}")  # a completed stage
    before = (tmp_path / "config.json").read_text()
    monkeypatch.setattr(pipeline, "run_stages", lambda run, last: pytest.fail("a refused run must not start a stage"))
    assert main(["fit", "--out", str(tmp_path), "--subset-size", "8", "--planted", "0"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("trustrepair fit: error: run directory") and "subset_size" in line and "(4, 8)" in line
    assert (tmp_path / "config.json").read_text() == before


def test_corrupt_saved_config_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["report", "--out", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "config.json is not valid JSON" in line


@pytest.mark.parametrize("command", STAGES)
@pytest.mark.parametrize("quiet", [False, True])
def test_each_subcommand_runs_its_stage(command, quiet, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_stages", lambda run, last: calls.append((last, run.progress, run.config)))
    out_dir = tmp_path / "run"
    argv = [command, "--out", str(out_dir), "--subset-size", "6", "--planted", "0"] + (["--quiet"] if quiet else [])
    assert main(argv) == 0
    assert calls == [(command, not quiet, DemoConfig(subset_size=6, planted=0))]
    assert one_line(capsys.readouterr().out) == f"trustrepair {command}: done; output in {out_dir / STAGES[command][0]}"
    assert json.loads((out_dir / "config.json").read_text()) == DemoConfig(subset_size=6, planted=0).to_json()


def test_demo_runs_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_demo(out_dir, config, *, progress):
        seen.update(out_dir=out_dir, config=config, progress=progress)
        return out_dir / "report.md"

    monkeypatch.setattr("trustrepair.app.pipeline.run_demo", fake_demo)
    assert main(["demo", "--out", str(tmp_path), "--aspects", "ethics", "--quiet"]) == 0
    assert seen == {"out_dir": tmp_path, "config": DemoConfig(aspects=("ethics",)), "progress": False}
    assert one_line(capsys.readouterr().out) == f"trustrepair demo: done; output in {tmp_path / 'report.md'}"


@pytest.mark.parametrize("error", [
    DataError("hh.jsonl line 3: missing keys ['chosen']\n  (and 2 more rows)"),
    FileNotFoundError(2, "No such file or directory", "/data/truthfulqa.csv"),
    ValueError("trained_blocks=40 but the model has 30 blocks"),
])
def test_stage_errors_are_one_line_without_traceback(error, tmp_path, monkeypatch, capsys, caplog):
    def fail(run, last):
        raise error

    monkeypatch.setattr(pipeline, "run_stages", fail)
    assert main(["score", "--out", str(tmp_path), "--planted", "0"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("trustrepair score: error: ")
    assert " ".join(str(error).split()) in line
    assert "Traceback" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="trustrepair"):
        assert main(["score", "--out", str(tmp_path), "--planted", "0", "--log-level", "DEBUG"]) == 2
    one_line(capsys.readouterr().err)
    assert "Traceback" in caplog.text and type(error).__name__ in caplog.text


def test_bugs_are_not_swallowed_and_interrupts_exit_130(tmp_path, monkeypatch, capsys):
    def bug(run, last):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(pipeline, "run_stages", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["select", "--out", str(tmp_path), "--planted", "0"])

    def interrupt(run, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stages", interrupt)
    assert main(["select", "--out", str(tmp_path), "--planted", "0"]) == 130
    assert "completed stages in" in one_line(capsys.readouterr().err)


def test_a_run_dir_without_results_takes_corrected_settings(tmp_path, capsys):
    """A first command that stopped on bad input (here a missing model) leaves no result, so the corrected
    command is not refused as 'made with other settings'."""
    assert main(["sft", "--out", str(tmp_path), "--model", str(tmp_path / "missing"), "--planted", "0", "--quiet"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    RunDir(tmp_path, DemoConfig(subset_size=4, planted=0))  # other settings: accepted, and saved
    assert json.loads((tmp_path / "config.json").read_text())["subset_size"] == 4


@pytest.mark.parametrize("kind, argv, expected", [
    ("attribute.json", ["fit"], "holds an attribute run (attribute.json); `fit` is a stage of the demo"),
    ("attribute.json", ["repair", "--n-sft", "5"], "is an attribute run; --n-sft belong to the demo"),
    ("config.json", ["attribute", "--model", "m", "--train", "t"], "holds a demo run (config.json)"),
    ("config.json", ["repair", "--save-model", "x"], "is not an attribute run (no attribute.json)"),
])
def test_demo_and_attribute_runs_are_never_mixed(tmp_path, capsys, kind, argv, expected):
    (tmp_path / kind).write_text("{}")
    assert main([*argv, "--out", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]
