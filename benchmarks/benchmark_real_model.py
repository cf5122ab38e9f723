"""EK-FAC on the real default model, side by side in one process: trustrepair, kronfluence 1.0.1 and
dattri-llm 0.1.0, against the floor (issue 18, part 2).

Setup (the issue's): SmolLM2-135M-Instruct from the default-model loader (float32); 64 HH harmless
dialogues (seeded subsample, plain format, at most 128 tokens, loss on the final assistant turn);
8 TruthfulQA + 8 DecodingTrust-bias trust pairs (seeded, plain format); empirical Fisher; damping
0.1 x mean(Lambda) per layer everywhere; batch 8. Layer sets: ``--layers last2`` (the linears of blocks
28-29) or ``--layers all`` (every block linear). Every library runs the full model's forward and
backward, as :func:`trustrepair.fit_ekfac` does on a user's model, with the same summed token
cross-entropy. trustrepair's default :class:`~trustrepair.task.CausalLMTask` runs the LM head at the
labelled positions only; kronfluence and dattri-llm get the all-position logits (``model(...).logits``)
a user of theirs writes, and the row "kronfluence, labelled-logit task" gives kronfluence trustrepair's
task, so that the engines also meet on the same loss code. The row "trustrepair, prefix cache"
instead runs the frozen blocks before the first analysed one once (``trustrepair.app.prefix_cache``:
hidden states cached, then only the tail runs), its caching counted
in its fit and pairwise rows; the row "trustrepair, prefix store" is the full-model path with one
:class:`trustrepair.PrefixStore` given to ``fit_ekfac`` and then to ``pairwise_influence``, so that the
scoring pass over the training set replays the frozen blocks the fit recorded.

The floor is one forward + backward over the training set with every weight frozen and gradients taken
to the analysed layers' outputs only (the graph starts at the first analysed outputs), LM head at the
labelled positions; the all-position floor is reported beside it. Times are process
CPU seconds (both of the machine's cores are used by torch, so CPU seconds count the work done whatever
else ran) and wall seconds, per phase and per stage (each library's own stages: trustrepair's timings,
kronfluence's three factor calls, dattri-llm's fit with its eigendecompositions timed inside).

dattri-llm silently drops a second forward pass of a hooked module, so each trust pair enters it as two
signed test items (+log P(opponent | prompt), -log P(proponent | prompt)) whose scores are summed per pair.

    PYTHONPATH=. python -m benchmarks.benchmark_real_model --layers last2 [--json out.json]
    PYTHONPATH=. python -m benchmarks.benchmark_real_model --layers all
    PYTHONPATH=. python -m benchmarks.benchmark_real_model --quick     # 8 dialogues, 2 + 2 pairs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from benchmarks.benchmark_ekfac import floor_pass
from benchmarks.common import Timing, cpu_name, pearson, spearman, timed
from benchmarks.kronfluence_anchor import FIT_PHASES, KronfluenceAnchor
from trustrepair.task import IGNORE_INDEX, CausalLMTask, pad_batch, sequence_log_probs

HEADING = "## EK-FAC on the real default model vs kronfluence and dattri-llm (issue 18)"
LIBRARIES = ("trustrepair", "store", "prefix", "kronfluence", "kronfluence-labelled", "dattri")


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------

def load(n_train: int, n_pairs: int, max_length: int):
    """(model, training examples, trust queries: n_pairs TruthfulQA then n_pairs bias)."""
    from trustrepair.app.models import load_causal_lm
    from trustrepair.data.aspects import load_aspect, load_hh_sft

    model, tokenizer = load_causal_lm()
    train = load_hh_sft(max_examples=n_train, seed=0).tokenize(tokenizer, max_length)
    queries = []
    for aspect in ("truthfulness", "bias"):
        queries += load_aspect(aspect, max_pairs=n_pairs, seed=0).tokenize(tokenizer, max_length)[:n_pairs]
    return model, train, queries


def module_names(model, layers: str) -> list[str]:
    from trustrepair.engine.layers import find_modules

    names = [layer.name for layer in find_modules(model)]
    if layers == "all":
        return names
    n_blocks = model.config.num_hidden_layers
    return [n for n in names if any(n.startswith(f"model.layers.{b}.") for b in range(n_blocks - 2, n_blocks))]


def first_block(names: list[str]) -> int:
    return min(int(n.split(".")[2]) for n in names)


# ----------------------------------------------------------------------------------------------------
# The floor and trustrepair
# ----------------------------------------------------------------------------------------------------

def trustrepair_phases(model, train, queries, names, batch_size, store=None) -> dict:
    """``fit_ekfac`` then ``pairwise_influence`` on the full model, both given ``store`` (a PrefixStore)."""
    from trustrepair import fit_ekfac, pairwise_influence

    fit = timed(lambda: fit_ekfac(model, train, modules=names, fisher="empirical", batch_size=batch_size,
                                  progress=False, prefix_store=store))
    stages = {}
    pairwise = timed(lambda: pairwise_influence(model, fit.value, train, queries, batch_size=batch_size,
                                                progress=False, timings=stages, prefix_store=store))
    return {"fit": fit, "fit stages": fit.value.timings, "pairwise": pairwise, "pairwise stages": stages,
            "scores": pairwise.value}


def store_phases(model, train, queries, names, batch_size) -> dict:
    from trustrepair import PrefixStore

    store = PrefixStore()
    phases = trustrepair_phases(model, train, queries, names, batch_size, store)
    if store.replayed < 2 * len(store):
        raise RuntimeError(f"the prefix store replayed {store.replayed} of {2 * len(store)} batches ({store.reason})")
    return phases


def prefix_phases(model, train, queries, names, batch_size) -> dict:
    """trustrepair on the tail of the model from cached hidden states: the frozen prefix runs once per
    sequence (the caching is timed into the fit for the training set and into pairwise for the queries)."""
    from trustrepair import fit_ekfac, pairwise_influence
    from trustrepair.app.prefix_cache import TailLM, TailTask, cache_prefix_hidden

    block = first_block(names)
    tail, task = TailLM(model, block), TailTask()
    tail_names = [f"body.layers.{int(n.split('.')[2]) - block}." + n.split(".", 3)[3] for n in names]

    def cached(examples):
        return cache_prefix_hidden(model, examples, block, batch_size=batch_size, progress=False)

    def fit_tail():
        rows = cached(train)
        return rows, fit_ekfac(tail, rows, modules=tail_names, task=task, fisher="empirical",
                               batch_size=batch_size, progress=False)

    fit = timed(fit_tail)
    rows, factors = fit.value
    stages = {}

    def pairwise_tail():
        sides = cached([q[side] for q in queries for side in ("proponent", "opponent")])
        tail_queries = [{"proponent": sides[2 * i], "opponent": sides[2 * i + 1]} for i in range(len(queries))]
        return pairwise_influence(tail, factors, rows, tail_queries, task=task, batch_size=batch_size,
                                  progress=False, timings=stages)

    pairwise = timed(pairwise_tail)
    fit.value = factors
    return {"fit": fit, "fit stages": factors.timings, "pairwise": pairwise, "pairwise stages": stages,
            "scores": pairwise.value}


# ----------------------------------------------------------------------------------------------------
# kronfluence 1.0.1 and dattri-llm 0.1.0
# ----------------------------------------------------------------------------------------------------

def kronfluence_phases(model, train, queries, names, batch_size, labelled_logits_only=False) -> dict:
    """kronfluence's fit and pairwise; ``labelled_logits_only``: its task computes the losses with
    trustrepair's :class:`CausalLMTask` (LM head at the labelled positions), the engines then compared on
    the same loss code (row "kronfluence, labelled-logit task")."""
    with KronfluenceAnchor(model, train, queries, batch_size, modules=names,
                           labelled_logits_only=labelled_logits_only) as anchor:
        stages = anchor.fit()
        pairwise = anchor.pairwise()
    fit = Timing(None, sum(t.seconds for t in stages.values()), sum(t.cpu_seconds for t in stages.values()),
                 max(t.peak_mib for t in stages.values()))
    return {"fit": fit, "fit stages": {p: stages[p].seconds for p in FIT_PHASES},
            "fit cpu stages": {p: stages[p].cpu_seconds for p in FIT_PHASES}, "pairwise": pairwise,
            "pairwise stages": {}, "scores": -pairwise.value}  # kronfluence's sign: negative = detrimental


def dattri_phases(model, train, queries, names, batch_size) -> dict:
    """dattri-llm's EK-FAC (``EKFACAttributor.attribute``, live capture, ``relative_damping`` 0.1) on the
    same data: the fit is its ``fit_raw`` (covariance sweep, eigendecompositions, Lambda sweep), timed
    from inside; pairwise is the rest of the call (the query and training sweeps of the scoring)."""
    import re
    import time

    from dattri_llm import AttributionArguments, AttributionTask, EKFACAttributor, HookManagerConfig
    from dattri_llm.gradient import ops

    train_rows = _padded_rows(train)
    items = []
    for q in queries:  # + log P(o | m) and - log P(p | m): their summed scores are the pair's
        items += [dict(row, sign=torch.tensor(sign)) for row, sign in
                  zip(_padded_rows([q["opponent"], q["proponent"]]), (1.0, -1.0))]
    width = max(r["input_ids"].shape[0] for r in items)
    items = [{k: (torch.nn.functional.pad(v, (0, width - v.shape[0]), value=IGNORE_INDEX if k == "labels" else 0)
                  if v.dim() else v) for k, v in r.items()} for r in items]

    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return -sequence_log_probs(logits, batch["labels"]).sum()

    def target(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (batch["sign"] * sequence_log_probs(logits, batch["labels"])).sum()

    clock = {"fit": [0.0, 0.0], "eigendecomposition": [0.0, 0.0]}

    def clocked(name, fn):
        def run(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[name][0] += time.perf_counter() - wall
                clock[name][1] += time.process_time() - cpu
        return run

    with tempfile.TemporaryDirectory() as out:
        args = AttributionArguments(output_dir=out, per_device_train_batch_size=batch_size,
                                    per_device_eval_batch_size=batch_size, use_cpu=True)
        attributor = EKFACAttributor(args, task=AttributionTask(loss, model, target_func=target))
        attributor.fit_raw = clocked("fit", attributor.fit_raw)
        config = HookManagerConfig(linear_io=[f"^{re.escape(n)}$" for n in names])
        eigh = ops.kfac_eigh
        ops.kfac_eigh = clocked("eigendecomposition", eigh)
        try:
            whole = timed(lambda: attributor.attribute(train_rows, items, hook_config=config, damping=0.1,
                                                       relative_damping=True))
        finally:
            ops.kfac_eigh = eigh
        _, matrix = whole.value.agnostic_matrix()  # (n_train, 2 n_queries)
    matrix = torch.as_tensor(matrix).double()
    scores = (matrix[:, 0::2] + matrix[:, 1::2]).T
    fit = Timing(None, clock["fit"][0], clock["fit"][1], whole.peak_mib)
    pairwise = Timing(None, whole.seconds - clock["fit"][0], whole.cpu_seconds - clock["fit"][1], whole.peak_mib)
    return {"fit": fit, "fit stages": {"eigendecomposition": clock["eigendecomposition"][0],
                                       "sweeps (covariance + lambda)": clock["fit"][0] - clock["eigendecomposition"][0]},
            "fit cpu stages": {"eigendecomposition": clock["eigendecomposition"][1],
                               "sweeps (covariance + lambda)": clock["fit"][1] - clock["eigendecomposition"][1]},
            "pairwise": pairwise, "pairwise stages": {}, "scores": -scores}


def _padded_rows(examples):
    batch = pad_batch(examples)
    return [{key: batch[key][i] for key in batch} for i in range(len(examples))]


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

PHASES = {"trustrepair": trustrepair_phases, "store": store_phases, "prefix": prefix_phases,
          "kronfluence": kronfluence_phases, "dattri": dattri_phases,
          "kronfluence-labelled": partial(kronfluence_phases, labelled_logits_only=True)}
LABELS = {"trustrepair": "trustrepair", "store": "trustrepair, prefix store", "prefix": "trustrepair, prefix cache",
          "kronfluence": "kronfluence 1.0.1", "dattri": "dattri-llm 0.1.0",
          "kronfluence-labelled": "kronfluence 1.0.1, labelled-logit task"}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args) -> str:
    model, train, queries = load(args.n_train, args.n_pairs, args.max_length)
    names = module_names(model, args.layers)
    n_tokens = sum(int(ex["input_ids"].shape[0]) for ex in train)
    print(f"{len(train)} examples, {n_tokens} tokens, {len(queries)} queries, {len(names)} modules, "
          f"threads {torch.get_num_threads()}, loadavg {loadavg()}", flush=True)
    load_before = loadavg()
    floor_pass(model, train[:args.batch_size], args.batch_size, names)  # warm-up
    floor = timed(lambda: floor_pass(model, train, args.batch_size, names))
    all_positions = timed(lambda: floor_pass(model, train, args.batch_size, names,
                                             CausalLMTask(labelled_logits_only=False)))
    print(f"floor {floor.seconds:.1f} s wall / {floor.cpu_seconds:.1f} s CPU (all-position logits "
          f"{all_positions.seconds:.1f} / {all_positions.cpu_seconds:.1f})", flush=True)
    results = {}
    for lib in args.libraries:
        if lib in ("prefix", "store") and first_block(names) == 0:
            continue  # no frozen prefix to cache
        results[lib] = PHASES[lib](model, train, queries, names, args.batch_size)
        r = results[lib]
        print(f"{lib}: fit {r['fit'].seconds:.1f} / {r['fit'].cpu_seconds:.1f} s, pairwise "
              f"{r['pairwise'].seconds:.1f} / {r['pairwise'].cpu_seconds:.1f} s; stages {r['fit stages']} "
              f"{r['pairwise stages']}; loadavg {loadavg()}", flush=True)
    return report(args, results, floor, all_positions, len(train), n_tokens, len(queries), names, load_before)


def report(args, results, floor, all_positions, n_train, n_tokens, n_queries, names, load_before) -> str:
    lines = [f"### {'last 2 blocks' if args.layers == 'last2' else 'all 30 blocks'} ({len(names)} linear layers)", "",
             "| library | fit CPU s | fit wall s | fit x floor (CPU) | pairwise CPU s | pairwise wall s | "
             "kronfluence / this, fit (CPU) | kronfluence / this, pairwise (CPU) |", "|---|---|---|---|---|---|---|---|",
             f"| floor (one forward + backward, LM head at the labelled positions) | {floor.cpu_seconds:.1f} | "
             f"{floor.seconds:.1f} | 1.00 | | | | |",
             f"| floor with all-position logits | {all_positions.cpu_seconds:.1f} | {all_positions.seconds:.1f} | "
             f"{all_positions.cpu_seconds / floor.cpu_seconds:.2f} | | | | |"]
    kron = results.get("kronfluence")
    for lib, r in results.items():
        ratio = (lambda phase: f"{kron[phase].cpu_seconds / r[phase].cpu_seconds:.2f}x") if kron else (lambda _: "")
        lines.append(f"| {LABELS[lib]} | {r['fit'].cpu_seconds:.1f} | {r['fit'].seconds:.1f} | "
                     f"{r['fit'].cpu_seconds / floor.cpu_seconds:.2f} | {r['pairwise'].cpu_seconds:.1f} | "
                     f"{r['pairwise'].seconds:.1f} | {ratio('fit')} | {ratio('pairwise')} |")
    lines += ["", "Stages (wall s; CPU s where the library's own timing is a process-time one):", "",
              "| library | stage | wall s | CPU s |", "|---|---|---|---|"]
    for lib, r in results.items():
        for part in ("fit", "pairwise"):
            cpu = r.get(f"{part} cpu stages", {})
            for stage, seconds in r[f"{part} stages"].items():
                lines.append(f"| {LABELS[lib]} | {part}: {stage} | {seconds:.1f} | "
                             f"{'' if stage not in cpu else f'{cpu[stage]:.1f}'} |")
    notes = [f"{n_train} training examples ({n_tokens} tokens), {n_queries} queries, batch {args.batch_size}; "
             f"loadavg (1/5/15 min) before {load_before}, after {loadavg()}."]
    if "trustrepair" in results:
        ours = results["trustrepair"]["scores"]
        for lib, r in results.items():
            if lib != "trustrepair":
                theirs = r["scores"].to(ours.dtype)
                per_query = min(spearman(ours[q], theirs[q]) for q in range(ours.shape[0]))
                notes.append(f"Scores of {LABELS[lib]} against trustrepair's: Spearman {spearman(ours, theirs):.5f} "
                             f"(worst query {per_query:.5f}), Pearson {pearson(ours, theirs):.5f}.")
    if kron and "trustrepair" in results:
        ours = results["trustrepair"]
        speed = {p: kron[p].cpu_seconds / ours[p].cpu_seconds for p in ("fit", "pairwise")}
        goals = [("fit >= 1.5x faster than kronfluence", f"{speed['fit']:.2f}x", speed["fit"] >= 1.5),
                 ("pairwise >= 1.5x kronfluence", f"{speed['pairwise']:.2f}x", speed["pairwise"] >= 1.5),
                 ("fit within 2.5 floors", f"{ours['fit'].cpu_seconds / floor.cpu_seconds:.2f}",
                  ours["fit"].cpu_seconds <= 2.5 * floor.cpu_seconds)]
        if "dattri" in results:
            d = results["dattri"]["fit"].cpu_seconds
            goals.append(("fit faster than dattri-llm", f"{d / ours['fit'].cpu_seconds:.2f}x",
                          ours["fit"].cpu_seconds < d))
        if "store" in results:
            stored = kron["pairwise"].cpu_seconds / results["store"]["pairwise"].cpu_seconds
            goals.append(("pairwise >= 1.5x kronfluence with a prefix store", f"{stored:.2f}x", stored >= 1.5))
        notes.append("Goals (CPU s, trustrepair's full-model rows): " + "; ".join(
            f"{what}: {value} {'met' if ok else 'NOT met'}" for what, value, ok in goals))
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
    print(text, flush=True)
    return text


def versions() -> str:
    import importlib.metadata as md
    import transformers

    import trustrepair

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"kronfluence {version('kronfluence')}, dattri-llm {version('dattri-llm')}, trustrepair "
            f"{trustrepair.__version__}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", choices=("last2", "all"), default="last2")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-pairs", type=int, default=8, help="trust pairs per aspect (truthfulness, bias)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="8 dialogues and 2 + 2 pairs (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_pairs = 8, 2
    text = run(args)
    header = (f"{datetime.date.today().isoformat()}; {cpu_name()}, {os.cpu_count()} cores, torch threads "
              f"{torch.get_num_threads()}; {versions()}. Command: `python -m benchmarks.benchmark_real_model "
              f"{' '.join(sys.argv[1:])}`.")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "table": text}))


if __name__ == "__main__":
    main()
