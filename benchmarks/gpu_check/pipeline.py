"""gpu_check's pipeline stages: the Pythia-160M-shaped model and data with planted examples, the epoch
floors, trustrepair's runs (TF32, exact-fp32 reference path, bf16 autocast, and with the tunables chosen
from this run's tables), kronfluence's, and the comparisons of their scores."""
from __future__ import annotations

import os
import time

import torch

from benchmarks import knobs
from benchmarks.common import Timing, gpt_neox, matmul_precision, prompt_and_response, spearman, timed
from benchmarks.gpu_check.runner import Run
from benchmarks.kronfluence_anchor import KronfluenceAnchor

PYTHIA = dict(vocab=50304, hidden=768, layers=12, heads=12, intermediate=3072, n_train=512, seq_len=512,
              n_queries=32, batch_size=16)
SMOKE = dict(vocab=97, hidden=32, layers=2, heads=4, intermediate=64, n_train=24, seq_len=12, n_queries=4,
             batch_size=8)  # --smoke: the script's plumbing on the CPU, in seconds (no meaningful numbers)


def planted_positions(n_train: int) -> dict[int, int]:
    """query -> training index that holds a copy of the query's (prompt, opponent): queries 0-3."""
    return {q: (2 * q + 1) * n_train // 8 for q in range(4)}


def build_pipeline_inputs(cfg: dict, device: torch.device):
    """The issue's model and data: random-init GPT-NeoX, training sequences with four planted copies of
    queries' (prompt, opponent), and the queries."""
    model = gpt_neox(cfg, max_position_embeddings=2048, rotary_pct=0.25).to(device)
    gen = torch.Generator().manual_seed(1)
    half, length = cfg["seq_len"] // 2, cfg["seq_len"]

    train = [prompt_and_response(torch.randint(0, cfg["vocab"], (half,), generator=gen),
                                 torch.randint(0, cfg["vocab"], (length - half,), generator=gen))
             for _ in range(cfg["n_train"])]
    queries = []
    for _ in range(cfg["n_queries"]):
        prompt = torch.randint(0, cfg["vocab"], (half,), generator=gen)
        queries.append({side: prompt_and_response(prompt, torch.randint(0, cfg["vocab"], (length - half,), generator=gen))
                        for side in ("proponent", "opponent")})
    for q, index in planted_positions(len(train)).items():
        train[index] = {k: v.clone() for k, v in queries[q]["opponent"].items()}
    return model, train, queries


def warm_libraries(model, bs: int, tokens: int) -> dict:
    """Outside every timing: one float64 eigh per factor width (cuSOLVER's handle and lazily loaded
    kernels), and the eigenvalue-correction contraction at every layer shape in TF32 and bfloat16 at the
    pipeline's batch and length (the Triton autotuner keys on the shape, so a kernel stage that ran first
    has already tuned these and this costs milliseconds; if it was skipped, the tuning happens here, at
    the real sizes, instead of inside the first fit). Returns seconds per part."""
    from trustrepair.engine.layers import find_modules
    from trustrepair.engine.ops.projected_gradients import projected_gradient_squares

    device = next(model.parameters()).device
    shapes = sorted({layer.shape for layer in find_modules(model)})
    out = {}
    start = time.perf_counter()
    for n in sorted({w for shape in shapes for w in shape}):
        torch.linalg.eigh(torch.eye(n, dtype=torch.float64, device=device))
    out["eigh_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for d_out, d_in in shapes:
        a = torch.randn(bs, tokens, d_in, device=device)
        g = torch.randn(bs, tokens, d_out, device=device)
        q_a, q_s = torch.eye(d_in, device=device), torch.eye(d_out, device=device)
        with matmul_precision("high"):
            projected_gradient_squares(a, g, q_a, q_s)
            projected_gradient_squares(a.bfloat16(), g.bfloat16(), q_a, q_s)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["squares_s"] = time.perf_counter() - start
    print(f"warm-up outside the timings: {out}", flush=True)
    return out


def epoch(model, train, batch_size, autocast: bool) -> None:
    """One training epoch without the optimizer: forward, summed loss, backward into every weight."""
    from trustrepair.task import CausalLMTask, pad_batch

    task = CausalLMTask()
    device_type = next(model.parameters()).device.type
    for start in range(0, len(train), batch_size):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = task.train_loss(model, pad_batch(train[start:start + batch_size])).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)


def seconds_and_peak(t: Timing, **extra) -> dict:
    """A timing as the results store it: seconds and peak extra GiB (the device's on CUDA, else the host's)."""
    return {"seconds": t.seconds, "peak_gib": t.peak_mib / 2**10, **extra}


def floors(model, train, bs) -> dict:
    epoch(model, train[:bs], bs, autocast=False)  # warm-up
    epoch(model, train[:bs], bs, autocast=True)
    device = next(model.parameters()).device
    out = {}
    for label, precision, autocast in [("fp32", "highest", False), ("tf32", "high", False), ("bf16", "highest", True)]:
        with matmul_precision(precision):
            out[label] = seconds_and_peak(timed(lambda: epoch(model, train, bs, autocast), device))
        print(f"epoch {label}: {out[label]['seconds']:.2f} s", flush=True)
    return out


def trustrepair_run(model, train, queries, bs, *, precision: str, autocast: bool, aggregated: bool) -> dict:
    """fit_ekfac, pairwise_influence and (optionally) influence, timed; scores kept for the comparisons."""
    from trustrepair.engine.ekfac import fit_ekfac
    from trustrepair.methods.scoring import influence, pairwise_influence

    matmul_dtype = torch.bfloat16 if autocast else None
    device = next(model.parameters()).device
    result = {}
    with matmul_precision(precision), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        fit = timed(lambda: fit_ekfac(model, train, fisher="empirical", batch_size=bs, progress=False,
                                      matmul_dtype=matmul_dtype), device)
        factors = fit.value
        result["fit"] = seconds_and_peak(fit, stages=dict(factors.timings))
        print(f"fit: {fit.seconds:.2f} s {factors.timings}", flush=True)
        stages = {}
        pairwise = timed(lambda: pairwise_influence(model, factors, train, queries, batch_size=bs, progress=False,
                                                    timings=stages), device)
        result["pairwise"] = seconds_and_peak(pairwise, stages=stages)
        result["pairwise_scores"] = pairwise.value.float().cpu()
        print(f"pairwise: {pairwise.seconds:.2f} s {stages}", flush=True)
        if aggregated:
            stages = {}
            scores = timed(lambda: influence(model, factors, train, {"all": queries}, batch_size=bs, progress=False,
                                             timings=stages)["all"], device)
            result["aggregated"] = seconds_and_peak(scores, stages=stages)
            result["aggregated_scores"] = scores.value.float().cpu()
            print(f"aggregated: {scores.seconds:.2f} s {stages}", flush=True)
    return result


def kronfluence_fit_and_pairwise(anchor: KronfluenceAnchor) -> dict:
    """kronfluence's fit (seconds per phase) and pairwise scores (float32), timed."""
    stages = {phase: t.seconds for phase, t in anchor.fit().items()}
    print(f"kronfluence fit: {stages}", flush=True)
    pairwise = kronfluence_scores(anchor)
    return {"fit": {"seconds": sum(stages.values()), "stages": stages}, "pairwise": seconds_and_peak(pairwise),
            "pairwise_scores": pairwise.value.float()}


def kronfluence_scores(anchor: KronfluenceAnchor, aggregate: bool = False) -> Timing:
    """:meth:`KronfluenceAnchor.pairwise`, its time printed."""
    scores = anchor.pairwise(aggregate)
    print(f"kronfluence {'aggregated' if aggregate else 'pairwise'}: {scores.seconds:.2f} s", flush=True)
    return scores


def planted_recovery(pairwise: torch.Tensor, aggregated: torch.Tensor | None) -> dict:
    planted = planted_positions(pairwise.shape[1])
    out = {"planted": planted, "pairwise_top": {q: int(pairwise[q].argmax()) for q in planted}}
    out["pairwise_ok"] = all(out["pairwise_top"][q] == i for q, i in planted.items())
    if aggregated is not None:
        top = sorted(int(i) for i in aggregated.topk(len(planted)).indices)
        out["aggregated_top"] = top
        out["aggregated_ok"] = top == sorted(planted.values())
    return out


def pipeline(run: Run, cfg: dict, device: torch.device, tune_even_unchanged: bool = False) -> None:
    """Stage 6 of :mod:`benchmarks.gpu_check` (see its docstring), the tuned runs after the goals' runs and
    before the speed reference; results into ``run.results``. Our runs are the group ``pipeline``,
    kronfluence's the group ``kronfluence`` (see :data:`benchmarks.gpu_check.runner.GROUPS`)."""
    res = run.results
    if not (run.selected("pipeline") or run.selected("kronfluence")):
        return
    inputs = run.stage("pipeline inputs", lambda: build_pipeline_inputs(cfg, device), needs_s=150)
    if inputs is not None:
        model, train, queries = inputs
        bs = cfg["batch_size"]
        res["warm_up"] = run.stage("warm-up", lambda: warm_libraries(model, bs, cfg["seq_len"]), needs_s=120,
                                   group="pipeline")
        res["floors"] = run.stage("epoch floors", lambda: floors(model, train, bs), needs_s=120)
        res["trustrepair_tf32"] = run.stage("trustrepair TF32", lambda: trustrepair_run(
            model, train, queries, bs, precision="high", autocast=False, aggregated=True), needs_s=100,
            group="pipeline")
        anchor = run.stage("kronfluence setup", lambda: KronfluenceAnchor(model, train, queries, bs), needs_s=90,
                           group="kronfluence")
        if anchor is not None:
            res["kronfluence_fp32"] = run.stage("kronfluence fp32", lambda: kronfluence_fit_and_pairwise(anchor),
                                                needs_s=90)

        def reference():
            os.environ["TRUSTREPAIR_DISABLE_TRITON"] = "1"
            try:
                return trustrepair_run(model, train, queries, bs, precision="highest", autocast=False, aggregated=False)
            finally:
                del os.environ["TRUSTREPAIR_DISABLE_TRITON"]

        res["reference_fp32"] = run.stage("reference path fp32", reference, needs_s=50, group="pipeline")
        res["trustrepair_bf16"] = run.stage("trustrepair bf16 autocast", lambda: trustrepair_run(
            model, train, queries, bs, precision="high", autocast=True, aggregated=True), needs_s=35,
            group="pipeline")
        tuned_pipeline(run, cfg, inputs, tune_even_unchanged)
        if res.get("kronfluence_fp32"):
            res["kronfluence_aggregated"] = run.stage("kronfluence aggregated", lambda: {
                "pairwise": seconds_and_peak(kronfluence_scores(anchor, aggregate=True))}, needs_s=20)
        if anchor is not None:
            anchor.cleanup()
        compare(res)


def tuned_pipeline(run: Run, cfg: dict, inputs, even_unchanged: bool = False) -> None:
    """Chooses the library's tunables from this run's tables (:mod:`knobs`) and, where a choice differs
    from today's default, runs our TF32 pipeline again with the choices applied (their kernels tuned and
    warmed first, outside the timing), so the defaults and the choices are timed against the same
    kronfluence run. ``even_unchanged`` runs it anyway (the CPU smoke run checks the plumbing)."""
    res = run.results
    choices = knobs.choose(res)
    res["knobs"] = choices
    values = knobs.changed(choices)
    print("tunables from this run's tables:\n" + "\n".join(knobs.describe(choices) or ["(none measured)"]), flush=True)
    if not (values or even_unchanged):
        return
    model, train, queries = inputs
    bs = cfg["batch_size"]

    def tuned(autocast: bool):
        with knobs.applied(values):
            if not autocast:  # the first tuned run tunes and warms the changed kernels for both
                warm_libraries(model, bs, cfg["seq_len"])
            result = trustrepair_run(model, train, queries, bs, precision="high", autocast=autocast, aggregated=True)
        result["knobs"] = values
        return result

    res["trustrepair_tf32_tuned"] = run.stage("trustrepair TF32, tuned", lambda: tuned(False), needs_s=40,
                                              group="pipeline")
    res["trustrepair_bf16_tuned"] = run.stage("trustrepair bf16 autocast, tuned", lambda: tuned(True), needs_s=25,
                                              group="pipeline")


def compare(res: dict) -> None:
    """Spearman correlations and planted-example recovery from the stored scores."""
    ours, ref, bf16, kron, tuned, bf16_tuned = (res.get(k) or {} for k in (
        "trustrepair_tf32", "reference_fp32", "trustrepair_bf16", "kronfluence_fp32", "trustrepair_tf32_tuned",
        "trustrepair_bf16_tuned"))
    if "pairwise_scores" in ref:
        if "pairwise_scores" in ours:
            res["spearman_tf32_vs_reference"] = spearman(ours["pairwise_scores"], ref["pairwise_scores"])
        if "pairwise_scores" in bf16:
            res["spearman_bf16_vs_reference"] = spearman(bf16["pairwise_scores"], ref["pairwise_scores"])
        if "pairwise_scores" in tuned:
            res["spearman_tuned_vs_reference"] = spearman(tuned["pairwise_scores"], ref["pairwise_scores"])
        if "pairwise_scores" in bf16_tuned:
            res["spearman_bf16_tuned_vs_reference"] = spearman(bf16_tuned["pairwise_scores"], ref["pairwise_scores"])
        if "pairwise_scores" in kron:
            res["spearman_kronfluence_vs_reference"] = spearman(-kron["pairwise_scores"], ref["pairwise_scores"])
    if "pairwise_scores" in ours and "pairwise_scores" in kron:
        res["spearman_tf32_vs_kronfluence"] = spearman(ours["pairwise_scores"], -kron["pairwise_scores"])
    if "pairwise_scores" in ours:
        res["planted"] = planted_recovery(ours["pairwise_scores"], ours.get("aggregated_scores"))
    if "pairwise_scores" in bf16:
        res["planted_bf16"] = planted_recovery(bf16["pairwise_scores"], bf16.get("aggregated_scores"))
    if "pairwise_scores" in tuned:
        res["planted_tuned"] = planted_recovery(tuned["pairwise_scores"], tuned.get("aggregated_scores"))
