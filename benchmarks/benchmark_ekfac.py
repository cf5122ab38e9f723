"""EK-FAC influence on the CPU: trustrepair against kronfluence 1.0.1, and both against the floor.

The floor is one forward + backward pass over the training set with every weight frozen and gradients
taken to the analysed layers' outputs only: no EK-FAC fit or score can do less. Every phase is printed
in seconds (median over ``--repeats`` runs for trustrepair and the floor; kronfluence runs once, it is
the slow anchor) and as a multiple of the floor measured in the same run, with the peak extra resident
memory during the phase (sampled every 5 ms above the level at the phase's start).

Configuration (the issue's): GPT-NeoX (Pythia architecture) hidden 512, 8 layers, 8 heads,
intermediate 2048, vocab 1024, random init (seed 0); 256 training sequences of 64 tokens, the first
half prompt; 16 trust queries (32-token prompt, 32-token responses); every Linear in the blocks;
empirical Fisher on both sides (deterministic, so the scores are comparable); damping 0.1 x mean(Lambda)
per module on both sides; batch 16 on both sides (and for the floor). ``--quick`` shrinks everything
for a smoke run. ``--bf16`` adds one fit in bf16 matmul mode (``matmul_dtype=torch.bfloat16``).

Also measured: on tiny float64 models, how well EK-FAC pairwise scores correlate with exact
damped-Fisher influence computed from explicit per-example gradients (full Fisher and its per-layer
blocks, inverted through the Woodbury identity).

    python -m benchmarks.benchmark_ekfac --quick
    python -m benchmarks.benchmark_ekfac --write-results        # the full run (kronfluence takes minutes)
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys

import torch

import trustrepair
from benchmarks.common import (RESULTS, Timing, cpu_name, gpt_neox, pearson, prompt_and_response, replace_section,
                               spearman, timed)
from benchmarks.kronfluence_anchor import FIT_PHASES, KronfluenceAnchor
from trustrepair import fit_ekfac, influence, pairwise_influence
from trustrepair.engine.layers import find_modules
from trustrepair.task import CausalLMTask, pad_batch

HEADING = "## EK-FAC influence engine vs kronfluence (issue 3)"

FULL = dict(hidden=512, layers=8, heads=8, intermediate=2048, vocab=1024, n_train=256, seq_len=64, n_queries=16,
            batch_size=16)
QUICK = dict(hidden=128, layers=2, heads=4, intermediate=512, vocab=256, n_train=32, seq_len=32, n_queries=4,
             batch_size=8)


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------

def make_model(cfg, dtype=torch.float32):
    return gpt_neox(cfg, max_position_embeddings=2 * cfg["seq_len"], attn_implementation="eager").to(dtype)


def make_data(cfg, seed=1):
    """Training sequences (first half prompt, labelled -100) and queries sharing a prompt."""
    gen = torch.Generator().manual_seed(seed)
    half = cfg["seq_len"] // 2
    train = []
    for _ in range(cfg["n_train"]):
        ids = torch.randint(0, cfg["vocab"], (cfg["seq_len"],), generator=gen)
        train.append(prompt_and_response(ids[:half], ids[half:]))
    queries = []
    for _ in range(cfg["n_queries"]):
        prompt = torch.randint(0, cfg["vocab"], (half,), generator=gen)
        queries.append({side: prompt_and_response(
            prompt, torch.randint(0, cfg["vocab"], (cfg["seq_len"] - half,), generator=gen))
            for side in ("proponent", "opponent")})
    return train, queries


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------

def floor_pass(model, train, batch_size, modules=None, task=None):
    """One forward + backward over the training set, weights frozen, gradients to the analysed layers'
    outputs only (the graph starts at the first analysed outputs), nothing else computed. ``modules``: the
    analysed layers (names for ``find_modules``; default every block linear). ``task``: the loss (default
    :class:`CausalLMTask`, whose LM head runs at the labelled positions only, as in every trustrepair pass;
    ``CausalLMTask(labelled_logits_only=False)`` is the all-position loss a kronfluence task computes)."""
    layers = find_modules(model, modules)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = []

    def mark(module, inputs, output):
        if not output.requires_grad:
            output.requires_grad_(True)
            leaves.append(output)

    handles = [layer.module.register_forward_hook(mark) for layer in layers]
    task = task or CausalLMTask()
    try:
        for start in range(0, len(train), batch_size):
            leaves.clear()
            loss = task.train_loss(model, pad_batch(train[start:start + batch_size]))
            torch.autograd.grad(loss.sum(), leaves)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------------
# kronfluence 1.0.1 (the anchor); also used by tests/engine/test_kronfluence_agreement.py
# ----------------------------------------------------------------------------------------------------

def kronfluence_pairwise(model, train, queries, *, modules, damping=None, batch_size=8, fisher="empirical",
                         dtype=torch.float32, output_dir=None, labelled_logits_only=False):
    """kronfluence's EK-FAC pairwise scores (n_query, n_train) in *kronfluence's* sign (negative =
    detrimental) and, per phase, {"wall", "cpu"} seconds and peak extra "mib" (:class:`KronfluenceAnchor`:
    ``dtype`` sets every kronfluence accumulation dtype; ``damping=None`` is kronfluence's
    0.1 x mean(Lambda) heuristic, as trustrepair's default; ``labelled_logits_only``: see
    :func:`benchmarks.kronfluence_anchor.kronfluence_task`)."""
    with KronfluenceAnchor(model, train, queries, batch_size, modules=modules, fisher=fisher, damping=damping,
                           dtype=dtype, output_dir=output_dir, labelled_logits_only=labelled_logits_only) as anchor:
        phases = {**anchor.fit(), "pairwise": anchor.pairwise()}
    timings = {name: {"wall": t.seconds, "cpu": t.cpu_seconds, "mib": t.peak_mib} for name, t in phases.items()}
    return phases["pairwise"].value, timings


# ----------------------------------------------------------------------------------------------------
# EK-FAC against exact damped-Fisher influence (tiny float64 models)
# ----------------------------------------------------------------------------------------------------

def exact_influence_agreement(hidden=32, layers=2, n_train=48, n_queries=6, seed=0):
    """Pearson / Spearman of EK-FAC pairwise scores against exact damped empirical-Fisher influence
    -grad m^T (F + D)^{-1} grad L(z), F = (1/n) sum_z grad L(z) grad L(z)^T over all analysed parameters,
    D the same per-layer damping (0.1 x mean Lambda) EK-FAC uses; inverted via Woodbury:
    (D + J^T J / n)^{-1} = D^{-1} - D^{-1} J^T (n I + J D^{-1} J^T)^{-1} J D^{-1}, J (n, d) the gradients.
    Both the full Fisher and its per-layer blocks (what EK-FAC approximates) are reported."""
    cfg = dict(hidden=hidden, layers=layers, heads=4, intermediate=4 * hidden, vocab=97, n_train=n_train,
               seq_len=16, n_queries=n_queries)
    model = make_model(cfg, torch.float64)
    train, queries = make_data(cfg, seed=seed + 7)
    factors = fit_ekfac(model, train, fisher="empirical", progress=False)
    ekfac_scores = pairwise_influence(model, factors, train, queries, progress=False)
    layers_ = find_modules(model)
    task = CausalLMTask()

    def flat_grad(objective):
        model.zero_grad()
        objective().backward()
        parts = []
        for layer in layers_:
            w = layer.module.weight.grad
            parts.append(torch.cat([w, layer.module.bias.grad[:, None]], 1) if layer.has_bias else w)
        return torch.cat([p.reshape(-1) for p in parts])

    jac = torch.stack([flat_grad(lambda ex=ex: task.train_loss(model, pad_batch([ex]))[0]) for ex in train])
    query_grads = torch.stack([flat_grad(lambda q=q: task.measurement(model, pad_batch([q["proponent"], q["opponent"]]))[0])
                               for q in queries])
    damp = torch.cat([torch.full((l.d_out * l.folded_in,), factors.damping(l.name), dtype=torch.float64)
                      for l in layers_])
    sizes = [l.d_out * l.folded_in for l in layers_]

    def woodbury(j, d, v):
        n = j.shape[0]
        inner = n * torch.eye(n, dtype=torch.float64) + (j / d) @ j.T
        return v / d - ((torch.linalg.solve(inner, (j / d) @ v.T)).T @ j) / d

    full = -woodbury(jac, damp, query_grads) @ jac.T
    block = torch.zeros_like(full)
    offset = 0
    for size in sizes:
        sl = slice(offset, offset + size)
        block += -woodbury(jac[:, sl], damp[sl], query_grads[:, sl]) @ jac[:, sl].T
        offset += size
    model.zero_grad()
    return {"config": f"GPT-NeoX hidden {hidden}, {layers} layers, {n_train} examples, {n_queries} queries, float64",
            "full": (pearson(ekfac_scores, full), spearman(ekfac_scores, full)),
            "block": (pearson(ekfac_scores, block), spearman(ekfac_scores, block))}


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def run(args):
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    model = make_model(cfg)
    train, queries = make_data(cfg)
    modules = [layer.name for layer in find_modules(model)]
    bs = cfg["batch_size"]
    # With one thread, process CPU time measures the work done whatever else runs on the machine; with
    # several, idle threads spinning at barriers inflate it, so wall-clock time is the measure.
    metric = "cpu" if args.threads == 1 else "wall"
    print(f"config: {cfg}, threads {torch.get_num_threads()}, {len(modules)} modules, ratios on {metric} time",
          flush=True)

    floor_pass(model, train[:bs], bs)  # warm-up
    totals, stages = {}, {}

    def record(name, t: Timing):
        """Keeps ``t``'s measures under ``name``; returns its result."""
        entry = totals.setdefault(name, {"wall": [], "cpu": [], "mib": []})
        entry["wall"].append(t.seconds)
        entry["cpu"].append(t.cpu_seconds)
        entry["mib"].append(t.peak_mib)
        return t.value

    def record_stages(prefix, timings):
        for stage, seconds in timings.items():
            stages.setdefault(f"{prefix}{stage}", []).append(seconds)

    for repeat in range(args.repeats):
        record("floor", timed(lambda: floor_pass(model, train, bs)))
        factors = record("fit", timed(lambda: fit_ekfac(model, train, fisher="empirical", batch_size=bs,
                                                        progress=False)))
        record_stages("fit: ", factors.timings)
        pair_timings = {}
        ekfac_scores = record("pairwise", timed(lambda: pairwise_influence(
            model, factors, train, queries, batch_size=bs, progress=False, timings=pair_timings)))
        record_stages("pairwise: ", pair_timings)
        agg_timings = {}
        aggregated = record("aggregated", timed(lambda: influence(
            model, factors, train, {"all": queries}, batch_size=bs, progress=False, timings=agg_timings)["all"]))
        record_stages("aggregated: ", agg_timings)
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v['wall'][-1]:.1f}s wall / {v['cpu'][-1]:.1f}s CPU"
                                               for k, v in totals.items()), flush=True)
    if args.bf16:  # one run: on a CPU without bf16 hardware it is not expected to be faster
        bf16_fit = timed(lambda: fit_ekfac(model, train, fisher="empirical", batch_size=bs, progress=False,
                                           matmul_dtype=torch.bfloat16))
        bf16_factors = record("fit (bf16 matmul mode)", bf16_fit)
        bf16_scores = pairwise_influence(model, bf16_factors, train, queries, batch_size=bs, progress=False)
        print(f"bf16 fit {bf16_fit.seconds:.1f}s", flush=True)

    kron = None
    if not args.no_kronfluence:
        whole = timed(lambda: kronfluence_pairwise(model, train, queries, modules=modules, batch_size=bs))
        (kron_scores, kron_times) = whole.value
        kron = {"scores": kron_scores, "times": kron_times, "mib": whole.peak_mib}
        print(f"kronfluence: {kron_times}", flush=True)

    med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in totals.items()}
    peak = {k: max(v["mib"]) for k, v in totals.items()}
    floor = med["floor"][metric]
    kron_total = {}
    if kron:
        kt = kron["times"]
        kron_fit = {m: sum(kt[p][m] for p in FIT_PHASES) for m in ("wall", "cpu")}
        kron_total = {"fit": kron_fit, "fit (bf16 matmul mode)": kron_fit, "pairwise": kt["pairwise"],
                      "aggregated": kt["pairwise"]}
    lines = ["| phase | trustrepair wall s | CPU s | x floor | peak MiB | kronfluence wall s | CPU s | x floor | "
             "kronfluence / trustrepair |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ["floor", "fit", "fit (bf16 matmul mode)", "pairwise", "aggregated"]:
        if name not in med:
            continue
        ours = med[name]
        label = name + (" (vs kronfluence pairwise)" if name == "aggregated" else "")
        row = f"| {label} | {ours['wall']:.1f} | {ours['cpu']:.1f} | {ours[metric] / floor:.2f} | {peak[name]:.0f} |"
        k = kron_total.get(name)
        row += (f" {k['wall']:.1f} | {k['cpu']:.1f} | {k[metric] / floor:.2f} | {k[metric] / ours[metric]:.2f}x |"
                if k else " | | | |")
        lines.append(row)
    lines += ["", "Stages (wall-clock seconds, median; from the functions' own timings):", "",
              "| stage | trustrepair | kronfluence |", "|---|---|---|"]
    kron_stage = {f"fit: {p}": kron["times"][p]["wall"] for p in FIT_PHASES} \
        if kron else {}
    for name, values in stages.items():
        k = kron_stage.get(name)
        lines.append(f"| {name} | {statistics.median(values):.1f} | {'' if k is None else f'{k:.1f}'} |")

    summary = [f"x floor and kronfluence / trustrepair use {metric} time; floor = one forward + backward over the "
               f"training set with frozen weights, gradients to the analysed layers' outputs only. Peak MiB: "
               f"resident memory above the level at the phase's start (freed heap returned to the OS first)."]
    if kron:
        speed = {name: kron_total[name][metric] / med[name][metric] for name in kron_total if name in med}
        goals = [("fit >= 3x faster than kronfluence", speed["fit"], speed["fit"] >= 3),
                 ("pairwise >= 2.5x faster", speed["pairwise"], speed["pairwise"] >= 2.5),
                 ("aggregated >= 4x faster than kronfluence pairwise", speed["aggregated"], speed["aggregated"] >= 4),
                 ("aggregated within 1.3x of the floor", med["aggregated"][metric] / floor,
                  med["aggregated"][metric] / floor <= 1.3)]
        if "fit (bf16 matmul mode)" in speed:
            goals.append(("bf16 fit >= 5x faster", speed["fit (bf16 matmul mode)"], speed["fit (bf16 matmul mode)"] >= 5))
        summary.append("Goals (issue 3): " + "; ".join(f"{what}: {value:.2f} {'met' if ok else 'NOT met'}"
                                                       for what, value, ok in goals))
    if kron:
        ours_s, theirs = ekfac_scores, -kron["scores"]
        per_query = [spearman(ours_s[q], theirs[q]) for q in range(ours_s.shape[0])]
        summary.append(f"Spearman vs kronfluence pairwise (all {ours_s.numel()} scores): {spearman(ours_s, theirs):.5f}; "
                       f"per query min {min(per_query):.5f}; Pearson {pearson(ours_s, theirs):.5f}")
        summary.append(f"Spearman of aggregated scores vs the mean of kronfluence's pairwise scores: "
                       f"{spearman(aggregated, theirs.mean(0)):.5f}")
        summary.append(f"kronfluence peak extra memory (whole run): {kron['mib']:.0f} MiB")
    if args.bf16:
        summary.append(f"bf16 matmul mode (one run): Spearman of its pairwise scores vs the float32 fit's "
                       f"{spearman(bf16_scores, ekfac_scores):.5f}"
                       + (f", vs kronfluence {spearman(bf16_scores, -kron['scores']):.5f}" if kron else ""))
    summary.append(f"aggregated vs mean of our pairwise, max relative difference: "
                   f"{float((aggregated - ekfac_scores.mean(0)).abs().max() / ekfac_scores.mean(0).abs().max()):.2e}")
    exact = [exact_influence_agreement(), exact_influence_agreement(hidden=64, layers=3, n_train=64)]
    for e in exact:
        summary.append(f"EK-FAC vs exact damped-Fisher influence ({e['config']}): full Fisher Pearson "
                       f"{e['full'][0]:.4f} / Spearman {e['full'][1]:.4f}; per-layer blocks Pearson {e['block'][0]:.4f} "
                       f"/ Spearman {e['block'][1]:.4f}")
    report = "\n".join(lines + [""] + [f"- {s}" for s in summary])
    print(report)
    if args.write_results:
        write_results(cfg, args, report)


def write_results(cfg, args, report):
    import transformers

    try:
        import kronfluence
        kron_version = kronfluence.__version__
    except ImportError:
        kron_version = "not installed"
    cpu = cpu_name()
    section = "\n".join([
        HEADING, "",
        f"{datetime.date.today().isoformat()}; {cpu}, {args.threads} threads (a shared 2-core machine: other jobs ran "
        f"alongside, so absolute seconds are noisy; ratios are within one run); python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, kronfluence {kron_version}, "
        f"trustrepair {trustrepair.__version__}.",
        f"Config: GPT-NeoX hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, intermediate "
        f"{cfg['intermediate']}, vocab {cfg['vocab']}, float32; {cfg['n_train']} x {cfg['seq_len']} tokens (half prompt), "
        f"{cfg['n_queries']} queries, batch {cfg['batch_size']}, all block linears, empirical Fisher, damping "
        f"0.1 x mean(Lambda). trustrepair and floor: median of {args.repeats}; kronfluence: one run. "
        f"Command: `python -m benchmarks.benchmark_ekfac {' '.join(sys.argv[1:])}`.", "",
        report, ""])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(replace_section(text, HEADING, section))
    print(f"wrote {RESULTS}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small configuration for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trustrepair phase and the floor")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--bf16", action="store_true", help="also time the fit with bf16 matmul mode")
    parser.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence anchor")
    parser.add_argument("--write-results", action="store_true", help=f"write the table into {RESULTS.name}")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
