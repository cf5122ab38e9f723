"""A user's workflow end to end: ``attribute``, ``repair --save-model`` and ``report`` on tiny model
directories (Llama with tied embeddings; GPT-2 with Conv1D) and the default model's real tokenizer, in
every data layout; the saved model checked with plain transformers; bad input as one line and exit 2."""
import hashlib
import json

import pytest
import torch

from conftest import save_tiny_model_dir
from transformers import AutoTokenizer
from trustrepair.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(24)]


def _rows(layout):
    if layout == "chat":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    if layout == "prompt_completion":
        return [{"prompt": q, "completion": " " + a} for q, a in QUESTIONS]
    return [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}"} for q, a in QUESTIONS]  # hh


def write_train(root, layout):
    """The training data in ``layout`` (chat, prompt_completion, hh, or a saved ``datasets`` dataset)."""
    if layout == "dataset":
        import datasets

        path = root / "train_dataset"
        datasets.Dataset.from_list(_rows("chat")).save_to_disk(str(path))
        return path
    path = root / f"train_{layout}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(layout)))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("workflow")
    for kind in ("llama", "gpt2"):
        save_tiny_model_dir(root / kind, smollm2_tokenizer, kind)
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Is {i} an even number?", "proponent": " Yes." if i % 2 == 0 else " No.",
                    "opponent": " No." if i % 2 == 0 else " Yes."}) + "\n" for i in range(14)))
    return root


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _response_log_prob(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(log_probs[len(prompt_ids) - 1:].gather(1, ids[0, len(prompt_ids):, None]).sum())


def _heldout_log_odds(model, split_file):
    pairs = [json.loads(line) for line in split_file.read_text().splitlines()]
    values = [_response_log_prob(model, p["prompt_ids"], p["opponent_ids"])
              - _response_log_prob(model, p["prompt_ids"], p["proponent_ids"]) for p in pairs]
    return sum(values) / len(values)


def _close(a, b, rel=1e-4, floor=1e-6):
    return abs(a - b) <= rel * max(abs(b), floor / rel)


@pytest.mark.parametrize("kind, layout", [("llama", "chat"), ("llama", "prompt_completion"), ("llama", "hh"),
                                          ("llama", "dataset"), ("gpt2", "chat"), ("gpt2", "hh")])
def test_attribute_repair_report_end_to_end(workdir, tmp_path, smollm2_tokenizer, kind, layout):
    from transformers import AutoModelForCausalLM

    model_dir, train = workdir / kind, write_train(tmp_path, layout)
    run, saved = tmp_path / "run", tmp_path / "repaired"
    before = _digests(model_dir)
    assert main(["attribute", "--model", str(model_dir), "--train", str(train), "--aspects",
                 str(workdir / "pairs.jsonl"), "--batch-size", "8", "--out", str(run), "--quiet"]) == 0
    assert main(["repair", "--out", str(run), "--subset-size", "4", "--save-model", str(saved), "--quiet"]) == 0
    assert main(["report", "--out", str(run), "--quiet"]) == 0

    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    held = (run / "splits" / "perplexity.jsonl").read_text().splitlines()
    assert len(rows) + len(held) == len(QUESTIONS) and len(held) >= 1
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    assert sorted(r["pairs_rank"] for r in rows) == list(range(1, len(rows) + 1))
    assert max(rows, key=lambda r: r["pairs"])["pairs_rank"] == 1
    assert all(str(train) in r["source"] for r in rows)
    query = (run / "splits" / "pairs.query.jsonl").read_text().splitlines()
    heldout = (run / "splits" / "pairs.heldout.jsonl").read_text().splitlines()
    assert len(query) + len(heldout) == 14 and query and heldout
    for line in query + heldout:
        pair = json.loads(line)
        text = smollm2_tokenizer.decode(pair["prompt_ids"] + pair["proponent_ids"])
        assert pair["proponent"].strip() in text and pair["opponent_ids"] != pair["proponent_ids"]

    report = json.loads((run / "report.json").read_text())
    aspect, ppl = report["aspects"]["pairs"], report["perplexity"]
    assert ppl["repaired"] <= ppl["input"] * 1.01 + 1e-9
    assert "pairs" in (run / "report.md").read_text() and (run / "beta_sweep.png").stat().st_size > 0
    assert report["repair"]["saved_model"] == str(saved.resolve())

    # the input model is untouched; the saved one loads with plain transformers, differs only in the
    # analysed layers (every linear layer of the blocks), and reproduces the report's held-out log-odds
    assert _digests(model_dir) == before
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    repaired = AutoModelForCausalLM.from_pretrained(saved).eval()
    changed = {n for (n, p), (_, q) in zip(original.named_parameters(), repaired.named_parameters())
               if not torch.equal(p, q)}
    blocks = "model.layers." if kind == "llama" else "transformer.h."
    assert all(n.startswith(blocks) and ("norm" not in n and "ln_" not in n) for n in changed), changed
    if report["repair"]["beta"] > 0:
        assert changed
    split = run / "splits" / "pairs.heldout.jsonl"
    assert _close(_heldout_log_odds(repaired, split), aspect["heldout"]["repaired"])
    assert _close(_heldout_log_odds(original, split), aspect["heldout"]["input"])


def test_rerun_reuses_and_chunked_scores_match(workdir, tmp_path):
    train = write_train(tmp_path, "chat")
    base = ["--model", str(workdir / "llama"), "--train", str(train), "--aspects", str(workdir / "pairs.jsonl"),
            "--quiet"]
    assert main(["attribute", *base, "--out", str(tmp_path / "whole")]) == 0
    scores = (tmp_path / "whole" / "scores.jsonl").read_bytes()
    assert main(["attribute", *base, "--out", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "scores.jsonl").read_bytes() == scores
    assert main(["attribute", *base, "--score-chunk", "7", "--out", str(tmp_path / "chunked")]) == 0
    assert not (tmp_path / "chunked" / "scores.partial").exists()
    whole = [json.loads(line)["pairs"] for line in scores.decode().splitlines()]
    chunked = [json.loads(line)["pairs"] for line in (tmp_path / "chunked" / "scores.jsonl").read_text().splitlines()]
    assert len(whole) == len(chunked)
    scale = max(abs(v) for v in whole)
    assert max(abs(a - b) for a, b in zip(whole, chunked)) <= 1e-5 * scale


def test_last_blocks_analyses_only_the_last_block(workdir, tmp_path):
    from trustrepair.engine.ekfac import EKFACFactors

    run = tmp_path / "run"
    assert main(["attribute", "--model", str(workdir / "llama"), "--train", str(write_train(tmp_path, "chat")),
                 "--aspects", str(workdir / "pairs.jsonl"), "--last-blocks", "1", "--out", str(run), "--quiet"]) == 0
    names = list(EKFACFactors.load(run / "factors").modules)
    assert len(names) == 7  # q, k, v, o, gate, up, down of one block
    assert len({n.split(".mlp")[0].split(".self_attn")[0] for n in names}) == 1


@pytest.mark.parametrize("case, expected", [
    ("unknown_layout", "unknown layout"),
    ("no_assistant", "no assistant turn"),
    ("blank_completions", "no training examples"),
    ("layers_none", "matches no linear layer"),
    ("unknown_aspect", "unknown aspect 'honesty'"),
    ("no_tokenizer", "has no tokenizer"),
    ("both_layer_options", "--layers or --last-blocks, not both"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys, case, expected):
    model, train = workdir / "llama", write_train(tmp_path, "chat")
    extra = []
    if case == "unknown_layout":
        train = tmp_path / "text.jsonl"
        train.write_text(json.dumps({"text": "hello"}) + "\n")
    elif case == "no_assistant":
        train = tmp_path / "users.jsonl"
        train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    elif case == "blank_completions":
        train = tmp_path / "blank.jsonl"
        train.write_text("".join(json.dumps({"prompt": "q", "completion": "  "}) + "\n" for _ in range(3)))
    elif case == "layers_none":
        extra = ["--layers", "nothing.*"]
    elif case == "unknown_aspect":
        extra = ["--aspects", "honesty"]
    elif case == "no_tokenizer":
        from transformers import AutoModelForCausalLM

        model = tmp_path / "bare"
        AutoModelForCausalLM.from_pretrained(workdir / "llama").save_pretrained(model)
    elif case == "both_layer_options":
        extra = ["--last-blocks", "1", "--layers", "x"]
    aspects = [] if case == "unknown_aspect" else ["--aspects", str(workdir / "pairs.jsonl")]
    capsys.readouterr()
    code = main(["attribute", "--model", str(model), "--train", str(train), *aspects, *extra,
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("trustrepair attribute: error:") and expected in err[0], err[0]


def test_save_model_never_writes_into_the_input_model(workdir, tmp_path, capsys):
    model = workdir / "llama"
    run = tmp_path / "run"
    assert main(["attribute", "--model", str(model), "--train", str(write_train(tmp_path, "chat")),
                 "--aspects", str(workdir / "pairs.jsonl"), "--out", str(run), "--quiet"]) == 0
    before = _digests(model)
    for target in (model, model / "inside"):
        capsys.readouterr()
        assert main(["repair", "--out", str(run), "--save-model", str(target), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "would write into the input model" in err, err
    assert _digests(model) == before and not (model / "inside").exists()
    assert not (run / "repair.json").exists()


def test_base_model_eval_file_builtin_aspect_globs_and_plain_format(workdir, tmp_path, shared_data):
    """--base-model (the report adds the fine-tuning shift and how much the repair undid), --eval (no
    training example is held out), a built-in aspect next to a user file, --layers globs, --format plain."""
    from trustrepair.engine.ekfac import EKFACFactors

    base = save_tiny_model_dir(tmp_path / "base", AutoTokenizer.from_pretrained(workdir / "llama"), seed=1)
    train, evaluation = write_train(tmp_path, "prompt_completion"), tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps({"prompt": f"What is {i} times two?", "completion": f" {2 * i}."}) + "\n"
                                  for i in range(6)))
    run = tmp_path / "run"
    assert main(["attribute", "--model", str(workdir / "llama"), "--base-model", str(base), "--train", str(train),
                 "--eval", str(evaluation), "--aspects", "truthfulness", str(workdir / "pairs.jsonl"),
                 "--data-dir", str(shared_data), "--max-pairs", "10", "--layers", "*.mlp.*", "--format", "plain",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["repair", "--out", str(run), "--target", "truthfulness", "--strategy", "topk", "--subset-size", "3",
                 "--quiet"]) == 0
    assert main(["report", "--out", str(run), "--quiet"]) == 0
    assert len((run / "scores.jsonl").read_text().splitlines()) == len(QUESTIONS)  # --eval: nothing held out
    held = [json.loads(line) for line in (run / "splits" / "perplexity.jsonl").read_text().splitlines()]
    assert len(held) == 6 and all("times two" in row["prompt"] for row in held)
    modules = list(EKFACFactors.load(run / "factors").modules)
    assert len(modules) == 6 and all(".mlp." in m for m in modules)
    pair = json.loads((run / "splits" / "truthfulness.query.jsonl").read_text().splitlines()[0])
    assert "<|im_start|>" not in pair["prompt"] and pair["prompt"].endswith("Answer:")  # plain: no chat template
    report = json.loads((run / "report.json").read_text())
    assert report["repair"]["target"] == "truthfulness" and report["repair"]["strategy"] == "topk"
    assert "--eval" in report["perplexity"]["measured_on"] and "base" in report["perplexity"]
    for aspect in ("truthfulness", "pairs"):
        row = report["aspects"][aspect]
        shift = row["heldout"]["input"] - row["heldout"]["base"]
        assert row["fine_tuning_shift"] == pytest.approx(shift, rel=1e-12, abs=1e-12)
        assert row["undone_pct"] == pytest.approx(100 * (row["heldout"]["input"] - row["heldout"]["repaired"]) / shift)
    assert "Fine-tuning shift" in (run / "report.md").read_text()


def test_bfloat16_model(workdir, tmp_path):
    run = tmp_path / "run"
    assert main(["attribute", "--model", str(workdir / "llama"), "--train", str(write_train(tmp_path, "chat")),
                 "--aspects", str(workdir / "pairs.jsonl"), "--dtype", "bfloat16", "--out", str(run), "--quiet"]) == 0
    assert main(["repair", "--out", str(run), "--subset-size", "4", "--quiet"]) == 0
    report = json.loads((run / "repair.json").read_text())
    assert report["repaired"]["perplexity"] <= report["input"]["perplexity"] * 1.01 + 1e-9
    values = [json.loads(line)["pairs"] for line in (run / "scores.jsonl").read_text().splitlines()]
    assert all(v == v and abs(v) < float("inf") for v in values) and any(v != 0 for v in values)


@pytest.mark.parametrize("selection", ["normalized", "raw"])
def test_repair_chooses_its_subset_by_the_selection_scores(workdir, tmp_path, selection):
    """Default (normalized): scores.jsonl carries each example's self-influence sigma and `repair`'s top-k
    subset is the top of score / sqrt(sigma); raw: no sigma is computed and the subset is the raw top."""
    run = tmp_path / "run"
    assert main(["attribute", "--model", str(workdir / "llama"), "--train", str(write_train(tmp_path, "chat")),
                 "--aspects", str(workdir / "pairs.jsonl"), "--selection-scores", selection, "--out", str(run),
                 "--quiet"]) == 0
    assert main(["repair", "--out", str(run), "--strategy", "topk", "--subset-size", "6", "--beta-probes", "1",
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    scores = torch.tensor([r["pairs"] for r in rows], dtype=torch.float64)
    if selection == "normalized":
        sigma = torch.tensor([r["self_influence"] for r in rows], dtype=torch.float64)
        assert bool((sigma > 0).all())
        chosen_by = scores / sigma.sqrt()
    else:
        assert all("self_influence" not in r for r in rows)
        chosen_by = scores
    expected = sorted(int(i) for i in torch.argsort(-chosen_by, stable=True)[:6])
    if selection == "normalized":  # the two orders disagree here, so the check can tell them apart
        assert expected != sorted(int(i) for i in torch.argsort(-scores, stable=True)[:6])
    record = json.loads((run / "repair.json").read_text())["record"]
    assert sorted(record["subset"]) == expected
