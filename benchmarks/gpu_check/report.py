"""gpu_check's tables of the pipeline and of the issue's goals, and the number formatting every table uses."""
from __future__ import annotations

GOALS = {"fit_speedup": 4.0, "pairwise_speedup": 4.0, "aggregated_over_epoch": 1.2, "bf16_fit_speedup": 8.0,
         "spearman_fp32": 0.99, "spearman_bf16": 0.98, "tiles_of_tf32": 0.5}


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def verdict(value, goal, higher_is_better=True):
    if value is None:
        return "not measured"
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "NOT met"


def pipeline_table(res: dict) -> list[str]:
    ours, ref, bf16, kron, kagg, floor, tuned, bf16_tuned = (res.get(k) or {} for k in (
        "trustrepair_tf32", "reference_fp32", "trustrepair_bf16", "kronfluence_fp32", "kronfluence_aggregated",
        "floors", "trustrepair_tf32_tuned", "trustrepair_bf16_tuned"))
    sec = lambda run, key: (run.get(key) or {}).get("seconds")
    epoch_fp32 = (floor.get("fp32") or {}).get("seconds")
    rows = [("one fwd+bwd epoch fp32 / tf32 / bf16",
             " / ".join(fmt((floor.get(k) or {}).get("seconds")) for k in ("fp32", "tf32", "bf16")), "-", "-", "-")]
    stages = [("EK-FAC fit, trustrepair TF32", ours, "fit"),
              ("EK-FAC fit, trustrepair TF32, tuned tunables", tuned, "fit"),
              ("EK-FAC fit, trustrepair bf16 autocast", bf16, "fit"),
              ("EK-FAC fit, trustrepair bf16 autocast, tuned tunables", bf16_tuned, "fit"),
              ("EK-FAC fit, reference path fp32", ref, "fit"),
              ("pairwise 32 queries, trustrepair TF32", ours, "pairwise"),
              ("pairwise, trustrepair TF32, tuned tunables", tuned, "pairwise"),
              ("pairwise, trustrepair bf16 autocast", bf16, "pairwise"),
              ("pairwise, trustrepair bf16 autocast, tuned tunables", bf16_tuned, "pairwise"),
              ("pairwise, reference path fp32", ref, "pairwise"),
              ("aggregated (all 32 queries), trustrepair TF32", ours, "aggregated"),
              ("aggregated, trustrepair TF32, tuned tunables", tuned, "aggregated"),
              ("aggregated, trustrepair bf16 autocast", bf16, "aggregated"),
              ("aggregated, trustrepair bf16 autocast, tuned tunables", bf16_tuned, "aggregated")]
    for label, run, key in stages:
        k = sec(kron, "fit" if key == "fit" else "pairwise")
        rows.append((label, fmt(sec(run, key)), fmt(k), fmt(ratio(k, sec(run, key))),
                     fmt(ratio(sec(run, key), epoch_fp32))))
    rows.append(("kronfluence aggregate_query_gradients (speed reference)", fmt(sec(kagg, "pairwise")), "-", "-",
                 fmt(ratio(sec(kagg, "pairwise"), epoch_fp32))))
    lines = ["| stage | trustrepair s | kronfluence fp32 s | kronfluence / ours | / fp32 epoch |",
             "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "Fit stages, seconds (covariance / eigendecomposition / lambda / rest of the call):", ""]
    for label, run in [("trustrepair TF32", ours), ("trustrepair TF32, tuned tunables", tuned),
                       ("trustrepair bf16 autocast", bf16), ("trustrepair bf16 autocast, tuned tunables", bf16_tuned),
                       ("reference path fp32", ref), ("kronfluence fp32", kron)]:
        fit = run.get("fit") or {}
        parts = [(fit.get("stages") or {}).get(k) for k in ("covariance", "eigendecomposition", "lambda")]
        rest = fit["seconds"] - sum(parts) if "seconds" in fit and None not in parts else None
        lines.append(f"- {label}: {' / '.join(fmt(x) for x in [*parts, rest])}")
    return lines


def goals_table(res: dict) -> list[str]:
    ours, bf16, kron, floor, tuned, bf16_tuned = (res.get(k) or {} for k in (
        "trustrepair_tf32", "trustrepair_bf16", "kronfluence_fp32", "floors", "trustrepair_tf32_tuned",
        "trustrepair_bf16_tuned"))
    sec = lambda run, key: (run.get(key) or {}).get("seconds")
    kernel_share = res.get("tiles_of_tf32")
    epoch_fp32 = (floor.get("fp32") or {}).get("seconds")
    checks = [  # (goal, measured, threshold, higher is better)
        ("EK-FAC fit >= 4x faster than kronfluence (TF32)", ratio(sec(kron, "fit"), sec(ours, "fit")),
         GOALS["fit_speedup"], True),
        ("pairwise >= 4x faster than kronfluence (TF32)", ratio(sec(kron, "pairwise"), sec(ours, "pairwise")),
         GOALS["pairwise_speedup"], True),
        ("aggregated <= 1.2x one fp32 epoch", ratio(sec(ours, "aggregated"), epoch_fp32),
         GOALS["aggregated_over_epoch"], False),
        ("bf16 fit >= 8x faster than kronfluence", ratio(sec(kron, "fit"), sec(bf16, "fit")),
         GOALS["bf16_fit_speedup"], True),
        ("Spearman TF32 pairwise vs fp32 reference >= 0.99", res.get("spearman_tf32_vs_reference"),
         GOALS["spearman_fp32"], True),
        ("Spearman bf16 pairwise vs fp32 reference >= 0.98", res.get("spearman_bf16_vs_reference"),
         GOALS["spearman_bf16"], True),
        ("tile kernel >= 50 % of TF32 matmul (worst layer)", kernel_share, GOALS["tiles_of_tf32"], True),
    ]
    if tuned:  # the same goals with the tunables this run chose (commit them if these rows are better)
        checks += [
            ("EK-FAC fit >= 4x faster than kronfluence (TF32, tuned tunables)",
             ratio(sec(kron, "fit"), sec(tuned, "fit")), GOALS["fit_speedup"], True),
            ("pairwise >= 4x faster than kronfluence (TF32, tuned tunables)",
             ratio(sec(kron, "pairwise"), sec(tuned, "pairwise")), GOALS["pairwise_speedup"], True),
            ("aggregated <= 1.2x one fp32 epoch (tuned tunables)", ratio(sec(tuned, "aggregated"), epoch_fp32),
             GOALS["aggregated_over_epoch"], False),
            ("Spearman TF32 pairwise, tuned tunables, vs fp32 reference >= 0.99",
             res.get("spearman_tuned_vs_reference"), GOALS["spearman_fp32"], True),
        ]
    if bf16_tuned:
        checks += [
            ("bf16 fit >= 8x faster than kronfluence (tuned tunables)", ratio(sec(kron, "fit"), sec(bf16_tuned, "fit")),
             GOALS["bf16_fit_speedup"], True),
            ("Spearman bf16 pairwise, tuned tunables, vs fp32 reference >= 0.98",
             res.get("spearman_bf16_tuned_vs_reference"), GOALS["spearman_bf16"], True),
        ]
    lines = ["| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(value, '.3f')} | {verdict(value, goal, hib)} |" for name, value, goal, hib in checks]
    planted = res.get("planted")
    if planted:
        lines.append(f"| planted examples recovered (pairwise top-1 per query; aggregated top-4) | "
                     f"{planted.get('pairwise_top')} / {planted.get('aggregated_top')} | "
                     f"{'met' if planted.get('pairwise_ok') and planted.get('aggregated_ok') else 'NOT met'} |")
    return lines
