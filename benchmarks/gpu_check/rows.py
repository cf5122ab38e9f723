"""gpu_check's row-alignment stage: the fit's two products on odd-width operands, by storage."""
from __future__ import annotations

import torch

from benchmarks.common import matmul_precision, time_call
from benchmarks.gpu_check.report import fmt

def row_alignment(device: torch.device, widths=(768, 769, 3072, 3073), tokens: int = 16 * 512) -> dict:
    """Milliseconds of the fit's two products on a bias-folded (odd-width) operand, with its rows stored
    contiguously (leading dimension = the odd width, as before :mod:`trustrepair.engine.layout`) and padded
    (what the library hands the products now), in TF32 and bfloat16: the covariance update ``x^T x`` (x:
    ``tokens`` x width) and the eigenvalue-correction projection ``Q_A^T a_b^T`` for 16 examples of 512
    tokens (width 768, already aligned, is the control). The fit's covariance update itself,
    ``add_gram_upper_`` (upper block triangle, about half the multiply-adds, one product per block row) is
    timed beside the full product in TF32 at blocks 256 and 1024 (the tunable ``gram_block``'s CPU and
    CUDA defaults), to check the block on a GPU. Both products are also timed on operands zero-padded to an
    even width (:func:`trustrepair.engine.layout.zero_padded`, the padding copies included: what the fit
    runs on a GPU by default, the tunable ``pad_widths``). :func:`benchmarks.common.time_call`
    medians; the layouts hold the same values."""
    from trustrepair.engine.layout import aligned, padded_width, zero_padded
    from trustrepair.engine.ops.gram import add_gram_upper_
    from trustrepair.kernels.projected_gradients import project_tokens

    gen = torch.Generator(device=device).manual_seed(2)
    out = {}
    for width in widths:
        x = torch.randn(tokens, width, generator=gen, device=device)
        q = torch.linalg.qr(torch.randn(width, width, generator=gen, device=device))[0]
        for precision, dtype in (("tf32", torch.float32), ("bf16", torch.bfloat16)):
            with matmul_precision("high"):
                row = {}
                for layout, make in (("contiguous", lambda t: t.to(dtype).contiguous()),
                                     ("aligned", lambda t: aligned(t, dtype))):
                    xs, qs = make(x), make(q)
                    batched = make(x.view(16, tokens // 16, width))
                    row[f"gram {layout}"] = time_call(lambda: xs.T @ xs, device)["ms"]
                    row[f"projection {layout}"] = time_call(lambda: torch.matmul(qs.T, batched.transpose(1, 2)),
                                                            device)["ms"]
                row["projection padded"] = time_call(
                    lambda: project_tokens(zero_padded(qs, dims=2), zero_padded(batched), dtype), device)["ms"]
                if dtype == torch.float32:  # the covariances accumulate in float32
                    acc = torch.zeros(width, width, device=device)
                    for block in (256, 1024):
                        row[f"gram upper {block}"] = time_call(lambda: add_gram_upper_(acc, xs, block), device)["ms"]
                    wide = torch.zeros(padded_width(width), padded_width(width), device=device)
                    row["gram upper 1024 padded"] = time_call(
                        lambda: add_gram_upper_(wide, zero_padded(xs), 1024), device)["ms"]
            out[f"{width} {precision}"] = row
            print(f"row alignment, width {width} {precision}: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
    return out


def row_alignment_summary(rows: dict | None) -> list[str]:
    if not rows:
        return ["(row alignment not measured)"]
    lines = ["Odd-width (bias-folded) operands: contiguous, row-padded (trustrepair.engine.layout) and zero-padded to an "
             "even width (the tunable pad_widths), ms:", "",
             "| width, precision | gram contiguous | gram aligned | gram upper, block 256 | gram upper, block 1024 | "
             "gram upper 1024, zero-padded | projection contiguous | projection aligned | projection zero-padded |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(fmt(row.get(k), '.3f') for k in (
            "gram contiguous", "gram aligned", "gram upper 256", "gram upper 1024", "gram upper 1024 padded",
            "projection contiguous", "projection aligned", "projection padded")) + " |")
    lines += ["", "(gram: full x^T x; gram upper: the fit's add_gram_upper_, aligned rows, about half the products, "
              "the tunable gram_block[\"cuda\"] sets the block. Zero-padded columns include the padding copies; "
              "pad_widths[\"cuda\"] (default on) picks them. Keep the faster of each.)"]
    return lines
