"""gpu_check's eigh stages: the schedules of a fit's many eigendecompositions, and the options for one."""
from __future__ import annotations

import torch

from benchmarks import knobs
from benchmarks.common import time_call
from benchmarks.gpu_check.report import fmt

EIGH_WIDTHS = (769, 2304, 3072)
"""The Pythia-160M factor widths (768 and 3073 time like 769 and 3072)."""


def eigh_options(device: torch.device, widths=EIGH_WIDTHS) -> dict:
    """Seconds of one ``torch.linalg.eigh`` per factor width and option, to choose how the fit's
    eigendecomposition (2.7 s of the 10.9 s fit on the first H100 run: 48 layers x 2 factors) should run:
    cuSOLVER float64 (what ``fit_ekfac`` runs), float32, MAGMA float64 where the build has it, and the
    CPU's LAPACK float64 with all its threads (once after a warm-up; on CUDA ``do_bench`` medians). The
    matrices are covariances of Gaussian data, n x 4n samples. (``device`` is the CPU only in ``--smoke``.)"""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for n in widths:
        x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64, device=device)
        cov = x.T @ x / (4 * n)
        row = {"cuda_float64": _time_eigh(cov), "cuda_float32": _time_eigh(cov.float())}
        previous = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            row["cuda_float64_magma"] = _time_eigh(cov)
        except Exception as exc:  # builds without MAGMA refuse it
            row["cuda_float64_magma"] = f"{type(exc).__name__}: {exc}"[:120]
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)
        row["cpu_float64"] = _time_eigh(cov.cpu(), repeats=1)
        out[n] = row
        print(f"eigh n={n}: " + ", ".join(f"{k} {v:.3f} s" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()), flush=True)
    return out


def _time_eigh(matrix: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of one eigh of ``matrix``: :func:`benchmarks.common.time_call`'s median."""
    return time_call(lambda: torch.linalg.eigh(matrix), matrix.device, repeats)["ms"] / 1e3


PYTHIA_BLOCK_FACTOR_WIDTHS = (769, 769, 769, 3073, 2304, 768, 3072, 768)
"""Widths of one Pythia-160M block's eight Kronecker factors (A of query_key_value, dense, dense_h_to_4h,
dense_4h_to_h, then their S): ``fit_ekfac`` eigendecomposes twelve such sets."""


def eigh_schedules(device: torch.device, widths=PYTHIA_BLOCK_FACTOR_WIDTHS, blocks: int = 2, workers: int = 4,
                   repeats: int = 3) -> dict:
    """Seconds (:func:`benchmarks.common.time_call`'s median; ``repeats`` on the CPU) to eigendecompose the
    float64 factors of ``blocks`` blocks, by four schedules, to choose how the fit's 2.7 s eigendecomposition stage (96
    matrices on the first H100 run) should run:

    * ``sequential``: one ``torch.linalg.eigh`` after another on ``device``, as ``fit_ekfac`` did before
      the tunable ``eigh_streams`` (:mod:`trustrepair.engine.tunables`);
    * ``stacked``: one batched eigh per width (PyTorch picks the cuSOLVER driver for the batch);
    * ``streams``: ``workers`` at once, each on its own CUDA stream, widest first, by the library's
      :func:`trustrepair.engine.streams.map_on_streams` (what ``fit_ekfac`` runs now, with ``eigh_streams``);
    * ``streams + host``: as ``streams``, with the factors narrower than 1024 eigendecomposed on the host's
      LAPACK by the worker that takes them (copies included): the library's
      tunable ``eigh_host_below`` at 1024.

    Every schedule's eigenvalues are compared with the sequential ones (``max_eigenvalue_diff``): they run
    the same solver per matrix, so they must agree to rounding."""
    from trustrepair.engine.ekfac import eigh_float64
    from trustrepair.engine.streams import map_on_streams
    from trustrepair.engine.tunables import override

    gen = torch.Generator(device=device).manual_seed(1)
    mats = []
    for n in sorted(list(widths) * blocks, reverse=True):  # widest first, as fit_ekfac orders them
        x = torch.randn(2 * n, n, generator=gen, dtype=torch.float64, device=device)
        mats.append(x.T @ x / (2 * n))

    def sequential():
        return map_on_streams(lambda m: torch.linalg.eigh(m)[0], mats, device, 1)

    def stacked():
        values = [None] * len(mats)
        for n in sorted(set(m.shape[0] for m in mats)):
            picks = [i for i, m in enumerate(mats) if m.shape[0] == n]
            for i, v in zip(picks, torch.linalg.eigh(torch.stack([mats[i] for i in picks]))[0]):
                values[i] = v
        return values

    def streams_schedule():
        return map_on_streams(lambda m: torch.linalg.eigh(m)[0], mats, device, workers)

    def streams_and_host():
        with override(eigh_host_below=knobs.EIGH_HOST_WIDTH):
            return map_on_streams(lambda m: eigh_float64(m)[0], mats, device, workers)

    out = {"matrices": len(mats), "blocks": blocks, "workers": workers}
    baseline = None
    for name, schedule in (("sequential", sequential), ("stacked", stacked), ("streams", streams_schedule),
                           ("streams + host", streams_and_host)):
        try:
            values = schedule()
            if baseline is None:
                baseline = values
            diff = max(float((v - b).abs().max() / b.abs().max()) for v, b in zip(values, baseline))
            out[name] = {"seconds": time_call(schedule, device, repeats)["ms"] / 1e3, "max_eigenvalue_diff": diff}
        except Exception as exc:  # a schedule the build cannot run is reported, not fatal
            out[name] = f"{type(exc).__name__}: {exc}"[:160]
        print(f"eigh schedule {name}: {out[name]}", flush=True)
    return out


def eigh_summary(eigh: dict | None) -> list[str]:
    if not eigh:
        return ["(eigh options not measured)"]
    options = list(next(iter(eigh.values())))
    lines = ["eigh of one factor, seconds:", "", f"| width | {' | '.join(options)} |",
             "|---|" + "---|" * len(options)]
    lines += [f"| {n} | " + " | ".join(fmt(v, '.3f') if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for n, row in eigh.items()]
    return lines


def eigh_schedules_summary(schedules: dict | None) -> list[str]:
    if not schedules:
        return ["(eigh schedules not measured)"]
    lines = [f"eigh of {schedules['matrices']} factors ({schedules['blocks']} Pythia-160M blocks), float64, by "
             f"schedule ({schedules['workers']} workers for streams; see gpu_check.eigh_schedules):", "",
             "| schedule | seconds | max relative eigenvalue difference vs sequential |", "|---|---|---|"]
    for name, row in schedules.items():
        if name in ("matrices", "blocks", "workers"):
            continue
        lines.append(f"| {name} | {fmt(row['seconds'], '.3f')} | {row['max_eigenvalue_diff']:.1e} |"
                     if isinstance(row, dict) else f"| {name} | {row} | |")
    return lines
