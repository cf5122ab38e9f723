"""A new user's run, timed: ``trustrepair attribute`` then ``repair --save-model`` then ``report`` on the
default model (SmolLM2-135M-Instruct, the cached fp32 directory) with HH dialogues converted to chat
``messages``, for two layer sets (the last 2 blocks, and all 30 blocks), each command a fresh process
under ``/usr/bin/time -v`` (wall seconds and peak resident memory), with the stages' own timings.

The repaired directory is then checked independently of the library, with plain transformers: the
held-out log-odds from the token ids in ``splits/<aspect>.heldout.jsonl`` and the perplexity of
``splits/perplexity.jsonl`` tokenised here with the chat template (loss on each assistant turn's tokens
through its "<|im_end|>", the sequence left-truncated to ``--max-length``), against ``report.json``.

    python -m benchmarks.benchmark_workflow [--n-train 32] [--max-pairs 20] [--write]

``--write`` replaces the "Workflow on the default model" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, replace_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "Workflow on the default model (CPU)"
LAYER_SETS = {"last 2 blocks": ["--last-blocks", "2"], "all 30 blocks": []}


def hh_as_chat(data_dir: Path, n: int, path: Path) -> None:
    """The first ``n`` HH harmless dialogues as chat ``messages`` (every turn kept)."""
    rows = []
    with gzip.open(data_dir / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as f:
        for line in f:
            turns = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])[1:]
            messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                        for who, text in zip(turns[::2], turns[1::2])]
            if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"]:
                rows.append({"messages": messages})
            if len(rows) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed_command(args: list[str], cwd: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of one ``python -m trustrepair`` process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "trustrepair", *args, "--quiet"], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"trustrepair {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak_kib / 1024)}


def response_log_prob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, len(prompt_ids):]
    return float(log_probs[len(prompt_ids) - 1:].gather(1, targets[:, None]).sum())


def chat_perplexity(model, tokenizer, rows: list[dict], max_length: int) -> float:
    """Token-weighted perplexity of chat examples: the loss on every assistant turn's tokens through the
    end-of-turn token, the sequence left-truncated to ``max_length`` tokens."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    nll, count = 0.0, 0
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        labels = [-100] * len(ids)
        for i, m in enumerate(messages[: last + 1]):
            if m["role"] != "assistant":
                continue
            start = len(tokenizer(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False).input_ids)
            end = len(tokenizer(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False),
                                add_special_tokens=False).input_ids)
            span = ids[start:end]
            end = start + len(span) - span[::-1].index(eos) if eos in span else end
            labels[start:end] = ids[start:end]
        ids, labels = ids[-max_length:], labels[-max_length:]
        tensor = torch.tensor([ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(tensor).logits[0, :-1].double(), dim=-1)
        targets = torch.tensor(labels[1:])
        keep = targets != -100
        nll -= float(log_probs[keep].gather(1, targets[keep][:, None]).sum())
        count += int(keep.sum())
    return math.exp(nll / count)


def independent_check(run: Path, saved: Path, max_length: int) -> dict:
    """Relative differences between report.json and plain transformers on the saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((run / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved)
    out = {}
    for aspect, row in report["aspects"].items():
        pairs = [json.loads(line) for line in (run / "splits" / f"{aspect}.heldout.jsonl").read_text().splitlines()]
        values = [response_log_prob(model, p["prompt_ids"], p["opponent_ids"])
                  - response_log_prob(model, p["prompt_ids"], p["proponent_ids"]) for p in pairs]
        mine = sum(values) / len(values)
        out[aspect] = abs(mine - row["heldout"]["repaired"]) / abs(row["heldout"]["repaired"])
    rows = [json.loads(line) for line in (run / "splits" / "perplexity.jsonl").read_text().splitlines()]
    ppl = chat_perplexity(model, tokenizer, rows, max_length)
    out["perplexity"] = abs(ppl - report["perplexity"]["repaired"]) / report["perplexity"]["repaired"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--subset-size", type=int, default=16)
    parser.add_argument("--max-pairs", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--aspects", nargs="+", default=["truthfulness", "bias"])
    parser.add_argument("--only", choices=list(LAYER_SETS), default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from trustrepair.app.models import default_model_dir
    from trustrepair.data import default_data_dir

    model_dir, data_dir = default_model_dir(), default_data_dir().resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hh_as_chat(data_dir, args.n_train, tmp / "train.jsonl")
        for label, layer_args in LAYER_SETS.items():
            if args.only and label != args.only:
                continue
            run, saved = tmp / f"run-{len(rows)}", tmp / f"repaired-{len(rows)}"
            common = ["--out", str(run)]
            attribute = timed_command(["attribute", "--model", str(model_dir), "--train", str(tmp / "train.jsonl"),
                                       "--aspects", *args.aspects, "--data-dir", str(data_dir), "--max-pairs",
                                       str(args.max_pairs), "--max-length", str(args.max_length), *layer_args,
                                       *common], tmp)
            repair = timed_command(["repair", "--subset-size", str(args.subset_size), "--save-model", str(saved),
                                    *common], tmp)
            report = timed_command(["report", *common], tmp)
            timings = json.loads((run / "timings.json").read_text())
            check = independent_check(run, saved, args.max_length)
            summary = json.loads((run / "report.json").read_text())
            probes = json.loads((run / "repair.json").read_text())["record"]["points"]
            rows.append({"layers": label, "attribute": attribute, "repair": repair, "report": report,
                         "stages_s": timings, "check_rel": check,
                         "n_scored": sum(1 for _ in (run / "scores.jsonl").open()),
                         "heldout": {a: (r["heldout"]["input"], r["heldout"]["repaired"])
                                     for a, r in summary["aspects"].items()},
                         "perplexity": (summary["perplexity"]["input"], summary["perplexity"]["repaired"]),
                         "beta": summary["repair"]["beta"],
                         "probes": [(p["beta"], p["perplexity"]) for p in probes]})
            print(json.dumps(rows[-1], indent=1), flush=True)
    if args.write:
        write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    lines = [f"## {SECTION}", "", f"`python -m benchmarks.benchmark_workflow` ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} "
             f"cores, torch {torch.__version__}). A new user's run: SmolLM2-135M-Instruct (the cached fp32 directory), "
             f"{args.n_train} HH harmless dialogues converted to chat `messages` (a seeded 10% held out for "
             f"perplexity), chat format, max length {args.max_length}, aspects {', '.join(args.aspects)} with "
             f"{args.max_pairs} pairs each (80% query), batch 8, one DPP repair of {args.subset_size} examples for the common target "
             "with `--save-model`. Each command is a fresh process (`/usr/bin/time -v`: wall and peak RSS); "
             "stage seconds from `timings.json`.", "",
             "| layers | attribute wall s (peak MiB) | repair wall s (peak MiB) | report wall s | load model | "
             "cache hidden | fit | score | repair stage | independent check, max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stages_s"]
        lines.append(f"| {r['layers']} | {r['attribute']['wall_s']} ({r['attribute']['peak_rss_mib']}) | "
                     f"{r['repair']['wall_s']} ({r['repair']['peak_rss_mib']}) | {r['report']['wall_s']} | "
                     f"{s.get('load_model', 0)} | {s.get('cache_hidden_states', '-')} | {s.get('fit_ekfac')} | "
                     f"{s.get('score')} | {s.get('repair')} | {max(r['check_rel'].values()):.1e} |")
    lines += ["", "Held-out F (input -> repaired) and perplexity, per row: " + "; ".join(
        f"{r['layers']}: " + ", ".join(f"{a} {i:.4f} -> {o:.4f}" for a, (i, o) in r["heldout"].items())
        + f", perplexity {r['perplexity'][0]:.3f} -> {r['perplexity'][1]:.3f} (beta {r['beta']:.3g})" for r in rows), ""]
    RESULTS.write_text(replace_section(RESULTS.read_text(), SECTION, "\n".join(lines)))


if __name__ == "__main__":
    main()
