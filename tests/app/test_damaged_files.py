"""Damaged files in a run directory (issue 16 item 14): a rerun either completes with the same results or
stops with one line, exit 2, naming the file to delete; never a traceback."""
import hashlib
import json
import shutil

import pytest
import torch

from trustrepair.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama directory, chat data, a user trust file, and a run directory after attribute + repair."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("damaged")
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                         max_position_embeddings=128))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
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
