"""GPU check of the Triton kernels (issue 5): compiled tests, kernel speed, the pipeline against kronfluence.

Run by a session that has a lent GPU, as ONE device-tool call (about 8 minutes; the script watches its own
budget and skips what would not fit, saying so):

    run(kind="nvidia-h100-x1", timeout_s=590, carry=[".whl"], command="bash benchmarks/gpu_check.sh")

``.whl/`` (ignored by git) must hold kronfluence 1.0.1 and its one dependency missing on the device image,
einconv 0.1.0, both pure-Python wheels; fetch them here once with the device README's recipe:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl kronfluence==1.0.1 einconv==0.1.0

Stages, in order (a stage that raises is reported and the next one runs; the kernel numbers stand alone):

1. environment: card, driver, versions, multiprocessors;
2. tests: ``pytest tests/test_kernels.py tests/test_streams.py`` on CUDA (every kernel compiled, against
   its reference, the ``gpu``-marked bfloat16 / TF32 / inductor / dispatch tests included, and eigh on
   concurrent CUDA streams); log in ``$OUT/pytest.log``;
3. ``torch.matmul`` TFLOP/s in fp32, TF32 and bf16 (8192^3), the denominators of every rate below, each
   after a second of warm-up and with the SM clock read under load (see
   :func:`benchmark_kernels.matmul_rates`);
4. the covariance and projection products on odd-width operands, contiguous, row-padded and zero-padded
   (:func:`row_alignment`); kernels: :mod:`benchmark_kernels` at the Pythia-160M layer shapes (B = 16, T = 512, Q = 32) against
   the references, which on CUDA issue batched cuBLAS products (``trustrepair.engine.contractions.cache_blocked``);
5. eigh schedules of a fit's many factors (sequential, stacked by width, concurrent CUDA streams, streams
   with the narrow factors on the host), one of the tunables of stage 6;
6. pipeline on a Pythia-160M-shaped GPT-NeoX (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab
   50304, random init, seed 0; 512 training sequences of 512 tokens, the first half prompt; 32 queries
   with 256-token prompts and responses; every linear layer in the blocks; empirical Fisher; damping
   0.1 x mean(Lambda); batch 16 everywhere). Four training examples are replaced by copies of queries
   0-3's (prompt, opponent): each must be its query's top pairwise example and the four the top of the
   aggregated scores. Runs: one forward+backward epoch (fp32, TF32, bf16 autocast; the floor);
   trustrepair with TF32 matmuls (fit, pairwise, aggregated); kronfluence 1.0.1 in fp32 (fit, pairwise);
   the PyTorch reference path in exact fp32 (``TRUSTREPAIR_DISABLE_TRITON=1``: fit and pairwise, the
   "fp32 reference scores"); trustrepair under bf16 autocast; then the library's tunables chosen from the
   tables above (:mod:`knobs`: TF32 rounding place, projection form, Gram block, eigh streams and host,
   which contractions go to Triton) and, where a choice differs from today's default, our TF32 and bf16
   runs again with the choices applied (their own rows in the pipeline and goals tables, against the
   same kronfluence run): commit the "CHANGE" lines whose rows win; last kronfluence's
   aggregate_query_gradients mode (a speed reference only);
7. eigh options per factor width (cuSOLVER float64 / float32, MAGMA, CPU LAPACK), for a later change;
8. the ``gpu``-marked tests of the other test files (today the distributed engine on two gloo ranks
   sharing the GPU: three processes, each compiling and autotuning the kernels), with whatever budget is
   left (estimated at two minutes, not yet measured; 45 s was not enough), appended to ``$OUT/pytest.log``;
9. a table last, with the issue's goals and whether each was met; every number in ``$OUT/gpu_check.json``
   and a ready-to-append section in ``$OUT/RESULTS_section.md`` (for benchmarks/RESULTS.md).

A rerun after a fix need not repeat everything: ``--only`` names the groups of stages to run (see
:data:`GROUPS`), e.g. ``bash benchmarks/gpu_check.sh --only pipeline,kronfluence`` (the goals' ratios
need kronfluence from the same run) or ``--only tests`` for the compiled kernel tests alone. If the tuned
runs of stage 6 were skipped for time, ``--only rows,eigh,pipeline,kronfluence`` (about 5 minutes) reruns
what they need (without the kernel table, TF32 rounding and Triton routing keep their defaults).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

PYTHIA = dict(vocab=50304, hidden=768, layers=12, heads=12, intermediate=3072, n_train=512, seq_len=512,
              n_queries=32, batch_size=16)
SMOKE = dict(vocab=97, hidden=32, layers=2, heads=4, intermediate=64, n_train=24, seq_len=12, n_queries=4,
             batch_size=8)  # --smoke: the script's plumbing on the CPU, in seconds (no meaningful numbers)
GOALS = {"fit_speedup": 4.0, "pairwise_speedup": 4.0, "aggregated_over_epoch": 1.2, "bf16_fit_speedup": 8.0,
         "spearman_fp32": 0.99, "spearman_bf16": 0.98, "tiles_of_tf32": 0.5}


GROUPS = ("tests", "kernels", "rows", "pipeline", "kronfluence", "eigh", "other-tests")
"""What ``--only`` selects from (the environment and the matmul rates always run): the first kernel tests,
the kernel benchmarks, the row-alignment products, our pipeline runs, kronfluence's runs inside the
pipeline, the eigh stages, the other ``gpu``-marked tests."""


class Run:
    """Stage bookkeeping: wall-clock budget, results, stages that fail without stopping the run, and the
    groups of stages selected (:data:`GROUPS`)."""

    def __init__(self, out: Path, budget_s: float, groups=GROUPS):
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.groups = frozenset(groups)
        self.results: dict = {"stages": {}, "groups": sorted(self.groups)}

    def selected(self, group: str) -> bool:
        return group in self.groups

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def stage(self, name: str, fn, needs_s: float = 0.0, group: str | None = None):
        if group is not None and not self.selected(group):
            self.results["stages"][name] = {"status": "not selected (--only)"}
            return None
        if self.left() < needs_s:
            msg = (f"skipped: {self.left():.0f} s of the {self.budget_s:.0f} s budget left, it needs about "
                   f"{needs_s:.0f} s")
            print(f"[{name}] {msg}", flush=True)
            self.results["stages"][name] = {"status": msg}
            return None
        print(f"[{name}] start at {time.perf_counter() - self.start:.0f} s", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
            status = "ok"
        except Exception as exc:  # a failed stage is reported; the run goes on
            value = None
            status = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds = time.perf_counter() - t0
        print(f"[{name}] {status} ({seconds:.1f} s)", flush=True)
        self.results["stages"][name] = {"status": status, "seconds": seconds}
        self.save()
        return value

    def save(self):
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=_describe))


def _describe(value):
    """JSON stand-in for what json cannot store (score tensors go to scores.pt instead)."""
    return f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else str(value)


# ----------------------------------------------------------------------------------------------------
# 1-3 and 6: environment, tests, matmul rates, eigh options
# ----------------------------------------------------------------------------------------------------

def environment() -> dict:
    import triton
    import transformers

    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "card": torch.cuda.get_device_name(0),
           "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
           "nvidia_smi": smi, "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "transformers": transformers.__version__}
    try:
        import kronfluence
        env["kronfluence"] = kronfluence.__version__
    except ImportError as exc:
        env["kronfluence"] = f"not importable: {exc}"
    print(json.dumps(env, indent=1), flush=True)
    return env


def kernels_importable() -> None:
    """``trustrepair.kernels`` comes from the editable install (package_dir maps kernels/ to it); when that
    install failed, map it here and, for the pytest subprocesses, through a sitecustomize on PYTHONPATH."""
    try:
        import trustrepair.kernels  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp()) / "sitecustomize.py"
    shim.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport trustrepair\n"
                    f"trustrepair.__path__.append({str(REPO)!r})\n")
    os.environ["PYTHONPATH"] = f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    sys.path.insert(0, str(REPO))
    import trustrepair

    trustrepair.__path__.append(str(REPO))
    import trustrepair.kernels  # noqa: F401

    print("trustrepair.kernels mapped from the checkout (the editable install was not there)", flush=True)


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
    """Seconds of one eigh of ``matrix``: :func:`benchmark_kernels.time_call`'s median."""
    from benchmark_kernels import time_call

    return time_call(lambda: torch.linalg.eigh(matrix), matrix.device, repeats)["ms"] / 1e3


def row_alignment(device: torch.device, widths=(768, 769, 3072, 3073), tokens: int = 16 * 512) -> dict:
    """Milliseconds of the fit's two products on a bias-folded (odd-width) operand, with its rows stored
    contiguously (leading dimension = the odd width, as before :mod:`trustrepair.engine.layout`) and padded
    (what the library hands the products now), in TF32 and bfloat16: the covariance update ``x^T x`` (x:
    ``tokens`` x width) and the eigenvalue-correction projection ``Q_A^T a_b^T`` for 16 examples of 512
    tokens, the latter also in its single-GEMM form (``projected_gradients.PROJECTION = "gemm"``; width 768,
    already aligned, is the control). The fit's covariance update itself, ``add_gram_upper_`` (upper block
    triangle, about half the multiply-adds, one product per block row) is timed beside the full product in
    TF32 at blocks 256 (the CPU's :data:`trustrepair.engine.contractions.GRAM_BLOCK`) and 1024 (the GPU's since the
    first H100 run of this stage), to check the block on a GPU. Both products are also timed on operands
    zero-padded to an even width (:func:`trustrepair.engine.layout.zero_padded`, the padding copies included:
    what the fit runs on a GPU by default, :data:`trustrepair.engine.layout.PAD_WIDTHS`). The second H100 run
    found odd widths 2.4-6x slower than even ones in either storage. :func:`benchmark_kernels.time_call`
    medians; the layouts hold the same values."""
    from benchmark_kernels import time_call

    from trustrepair.engine.layout import aligned, padded_width, zero_padded
    from trustrepair.engine.contractions import add_gram_upper_
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
                row["projection gemm aligned"] = time_call(
                    lambda: project_tokens(qs, batched, dtype, "gemm", pad=False), device)["ms"]
                row["projection padded"] = time_call(
                    lambda: project_tokens(qs, batched, dtype, "batched", pad=True), device)["ms"]
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
             "even width (alignment.PAD_WIDTHS), ms:", "",
             "| width, precision | gram contiguous | gram aligned | gram upper, block 256 | gram upper, block 1024 | "
             "gram upper 1024, zero-padded | projection contiguous | projection aligned | projection one GEMM, aligned | "
             "projection zero-padded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(fmt(row.get(k), '.3f') for k in (
            "gram contiguous", "gram aligned", "gram upper 256", "gram upper 1024", "gram upper 1024 padded",
            "projection contiguous", "projection aligned", "projection gemm aligned", "projection padded")) + " |")
    lines += ["", "(gram: full x^T x; gram upper: the fit's add_gram_upper_, aligned rows, about half the products, "
              "contractions.GRAM_BLOCK[\"cuda\"] sets the block. projection aligned: PROJECTION = \"batched\", the default; "
              "one GEMM: \"gemm\". Zero-padded columns include the padding copies; PAD_WIDTHS[\"cuda\"] (default on) "
              "picks them. Keep the faster of each.)"]
    return lines


PYTHIA_BLOCK_FACTOR_WIDTHS = (769, 769, 769, 3073, 2304, 768, 3072, 768)
"""Widths of one Pythia-160M block's eight Kronecker factors (A of query_key_value, dense, dense_h_to_4h,
dense_4h_to_h, then their S): ``fit_ekfac`` eigendecomposes twelve such sets."""


def eigh_schedules(device: torch.device, widths=PYTHIA_BLOCK_FACTOR_WIDTHS, blocks: int = 2, workers: int = 4,
                   repeats: int = 3) -> dict:
    """Seconds (:func:`benchmark_kernels.time_call`'s median; ``repeats`` on the CPU) to eigendecompose the
    float64 factors of ``blocks`` blocks, by four schedules, to choose how the fit's 2.7 s eigendecomposition stage (96
    matrices on the first H100 run) should run:

    * ``sequential``: one ``torch.linalg.eigh`` after another on ``device``, as ``fit_ekfac`` did before
      :data:`trustrepair.engine.ekfac.EIGH_STREAMS`;
    * ``stacked``: one batched eigh per width (PyTorch picks the cuSOLVER driver for the batch);
    * ``streams``: ``workers`` at once, each on its own CUDA stream, widest first, by the library's
      :func:`trustrepair.engine.streams.map_on_streams` (what ``fit_ekfac`` runs now, with ``EIGH_STREAMS``);
    * ``streams + host``: as ``streams``, with the factors narrower than 1024 eigendecomposed on the host's
      LAPACK by the worker that takes them (copies included): the library's
      :data:`trustrepair.engine.ekfac.EIGH_HOST_BELOW` at 1024.

    Every schedule's eigenvalues are compared with the sequential ones (``max_eigenvalue_diff``): they run
    the same solver per matrix, so they must agree to rounding."""
    import knobs
    from benchmark_kernels import time_call

    from trustrepair.engine.ekfac import eigh_float64
    from trustrepair.engine.streams import map_on_streams

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
        with knobs.applied({"EIGH_HOST_BELOW": knobs.EIGH_HOST_WIDTH}):
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


OTHER_GPU_TESTS_S = 120
"""About what the other files' ``gpu`` tests need (collection, then three processes that each compile and
autotune the kernels); the stage is skipped below it and otherwise gets every second left."""


def pytest_run(out: Path, label: str, args: list[str], timeout_s: float) -> str:
    """Runs pytest with ``args`` in the repository, appends its output to ``$OUT/pytest.log``; returns a
    one-line summary (its last line, or the time-out)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s)
        text = proc.stdout
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        summary = f"exit {proc.returncode}: {last[0]}"
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        summary = f"timed out after {exc.timeout:.0f} s"
    with open(out / "pytest.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{text}\n({time.perf_counter() - t0:.0f} s)\n\n")
    print(f"tests, {label}: {summary}", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------
# 5: the pipeline
# ----------------------------------------------------------------------------------------------------

def planted_positions(n_train: int) -> dict[int, int]:
    """query -> training index that holds a copy of the query's (prompt, opponent): queries 0-3."""
    return {q: (2 * q + 1) * n_train // 8 for q in range(4)}


def build_pipeline_inputs(cfg: dict, device: torch.device):
    """The issue's model and data: random-init GPT-NeoX, training sequences with four planted copies of
    queries' (prompt, opponent), and the queries."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from trustrepair.task import IGNORE_INDEX

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                           num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"],
                           max_position_embeddings=2048, rotary_pct=0.25)
    model = GPTNeoXForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    half, length = cfg["seq_len"] // 2, cfg["seq_len"]

    def example(prompt, response):
        ids = torch.cat([prompt, response])
        labels = ids.clone()
        labels[:half] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    train = [example(torch.randint(0, cfg["vocab"], (half,), generator=gen),
                     torch.randint(0, cfg["vocab"], (length - half,), generator=gen)) for _ in range(cfg["n_train"])]
    queries = []
    for _ in range(cfg["n_queries"]):
        prompt = torch.randint(0, cfg["vocab"], (half,), generator=gen)
        queries.append({side: example(prompt, torch.randint(0, cfg["vocab"], (length - half,), generator=gen))
                        for side in ("proponent", "opponent")})
    for q, index in planted_positions(len(train)).items():
        train[index] = {k: v.clone() for k, v in queries[q]["opponent"].items()}
    return model, train, queries


def warm_libraries(model, bs: int, tokens: int, n_queries: int | None = None) -> dict:
    """Outside every timing: one float64 eigh per factor width (cuSOLVER's handle and lazily loaded
    kernels), and the eigenvalue-correction contraction at every layer shape in TF32 and bfloat16 at the
    pipeline's batch and length (the Triton autotuner keys on the shape, so a kernel stage that ran first
    has already tuned these and this costs milliseconds; if it was skipped, the tuning happens here, at
    the real sizes, instead of inside the first fit). With ``n_queries``, also the scoring contractions
    that :data:`trustrepair.engine.contractions.TRITON_OPS` sends to Triton, with that many matrices and with
    one. Returns seconds per part."""
    from trustrepair.engine.contractions import ghost_dots, projected_gradient_scores, projected_gradient_squares, uses_triton
    from trustrepair.engine.layers import find_modules

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
            for count in ((n_queries, 1) if n_queries else ()):
                mats = torch.randn(count, d_out, d_in, device=device)
                if uses_triton("ghost_dots", a):
                    ghost_dots(a, g, mats)
                if uses_triton("projected_gradient_scores", a):
                    projected_gradient_scores(a, g, q_a, q_s, mats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["squares_s"] = time.perf_counter() - start
    print(f"warm-up outside the timings: {out}", flush=True)
    return out


def timed(fn):
    """(result, seconds, peak extra GiB) of one call, the device synchronised around it (CPU: no memory)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t0, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**30


class matmul_precision:
    """Context manager: torch.set_float32_matmul_precision for the block."""

    def __init__(self, precision: str):
        self.precision = precision

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous)


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


def floors(model, train, bs) -> dict:
    epoch(model, train[:bs], bs, autocast=False)  # warm-up
    epoch(model, train[:bs], bs, autocast=True)
    out = {}
    for label, precision, autocast in [("fp32", "highest", False), ("tf32", "high", False), ("bf16", "highest", True)]:
        with matmul_precision(precision):
            _, seconds, gib = timed(lambda: epoch(model, train, bs, autocast))
        out[label] = {"seconds": seconds, "peak_gib": gib}
        print(f"epoch {label}: {seconds:.2f} s", flush=True)
    return out


def trustrepair_run(model, train, queries, bs, *, precision: str, autocast: bool, aggregated: bool) -> dict:
    """fit_ekfac, pairwise_influence and (optionally) influence, timed; scores kept for the comparisons."""
    from trustrepair.engine.ekfac import fit_ekfac
    from trustrepair.methods.scoring import influence, pairwise_influence

    matmul_dtype = torch.bfloat16 if autocast else None
    device_type = next(model.parameters()).device.type
    result = {}
    with matmul_precision(precision), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        factors, seconds, gib = timed(lambda: fit_ekfac(model, train, fisher="empirical", batch_size=bs,
                                                                     progress=False, matmul_dtype=matmul_dtype))
        result["fit"] = {"seconds": seconds, "peak_gib": gib, "stages": dict(factors.timings)}
        print(f"fit: {seconds:.2f} s {factors.timings}", flush=True)
        stages = {}
        scores, seconds, gib = timed(lambda: pairwise_influence(model, factors, train, queries,
                                                                            batch_size=bs, progress=False,
                                                                            timings=stages))
        result["pairwise"] = {"seconds": seconds, "peak_gib": gib, "stages": stages}
        result["pairwise_scores"] = scores.float().cpu()
        print(f"pairwise: {seconds:.2f} s {stages}", flush=True)
        if aggregated:
            stages = {}
            scores, seconds, gib = timed(lambda: influence(model, factors, train, {"all": queries},
                                                                       batch_size=bs, progress=False,
                                                                       timings=stages)["all"])
            result["aggregated"] = {"seconds": seconds, "peak_gib": gib, "stages": stages}
            result["aggregated_scores"] = scores.float().cpu()
            print(f"aggregated: {seconds:.2f} s {stages}", flush=True)
    return result


class KronfluenceAnchor:
    """kronfluence 1.0.1 EK-FAC in exact fp32 on the same model and data, its factors kept on disk between
    stages: :meth:`fit`, then :meth:`pairwise` (one score per query and training example) or
    :meth:`pairwise` with ``aggregate=True`` (all queries' gradients summed first). Scores are in
    kronfluence's sign (negative = detrimental). The measurement runs the model twice (opponent,
    proponent), so ``has_shared_parameters=True``: kronfluence takes one row per query and silently
    mis-scores the two-pass form without it. Damping: ``damping_factor=None``, kronfluence's
    0.1 x mean(Lambda), the same as trustrepair's default (kronfluence's own default is an absolute 1e-8:
    the first GPU run used it by mistake and got Spearman 0.83 against our scores)."""

    def __init__(self, model, train, queries, batch_size):
        import copy

        from benchmark_ekfac import kronfluence_rows, kronfluence_task
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        from trustrepair.engine.layers import find_modules

        modules = [layer.name for layer in find_modules(model)]
        self.train_rows, self.query_rows = kronfluence_rows(train, queries)
        self.batch_size = batch_size
        self.factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, has_shared_parameters=True)
        self.tmp = tempfile.TemporaryDirectory()
        self.analyzer = Analyzer("gpu_check", prepare_model(copy.deepcopy(model), kronfluence_task(modules)),
                                 kronfluence_task(modules),
                                 cpu=not torch.cuda.is_available(), disable_tqdm=True, output_dir=self.tmp.name)

    def fit(self) -> dict:
        common = dict(factors_name="ekfac", factor_args=self.factor_args, overwrite_output_dir=True)
        data = dict(dataset=self.train_rows, per_device_batch_size=self.batch_size)
        stages = {}
        with matmul_precision("highest"):
            for stage, call in [("covariance", lambda: self.analyzer.fit_covariance_matrices(**data, **common)),
                                ("eigendecomposition", lambda: self.analyzer.perform_eigendecomposition(**common)),
                                ("lambda", lambda: self.analyzer.fit_lambda_matrices(**data, **common))]:
                _, stages[stage], _ = timed(call)
        print(f"kronfluence fit: {stages}", flush=True)
        return {"seconds": sum(stages.values()), "stages": stages}

    def pairwise(self, aggregate: bool = False) -> dict:
        from kronfluence.arguments import ScoreArguments

        name = "aggregated" if aggregate else "pairwise"
        with matmul_precision("highest"):
            _, seconds, gib = timed(lambda: self.analyzer.compute_pairwise_scores(
                scores_name=name, factors_name="ekfac", query_dataset=self.query_rows,
                train_dataset=self.train_rows, per_device_query_batch_size=len(self.query_rows),
                per_device_train_batch_size=self.batch_size,
                score_args=ScoreArguments(aggregate_query_gradients=aggregate, damping_factor=None),
                overwrite_output_dir=True))
        print(f"kronfluence {name}: {seconds:.2f} s", flush=True)
        return {"seconds": seconds, "peak_gib": gib,
                "scores": self.analyzer.load_pairwise_scores(name)["all_modules"].float().cpu()}


def kronfluence_fit_and_pairwise(anchor: KronfluenceAnchor) -> dict:
    fit = anchor.fit()
    pairwise = anchor.pairwise()
    return {"fit": fit, "pairwise": {k: v for k, v in pairwise.items() if k != "scores"},
            "pairwise_scores": pairwise["scores"]}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rank = lambda v: torch.argsort(torch.argsort(v.double().flatten())).double()
    return float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])


def planted_recovery(pairwise: torch.Tensor, aggregated: torch.Tensor | None) -> dict:
    planted = planted_positions(pairwise.shape[1])
    out = {"planted": planted, "pairwise_top": {q: int(pairwise[q].argmax()) for q in planted}}
    out["pairwise_ok"] = all(out["pairwise_top"][q] == i for q, i in planted.items())
    if aggregated is not None:
        top = sorted(int(i) for i in aggregated.topk(len(planted)).indices)
        out["aggregated_top"] = top
        out["aggregated_ok"] = top == sorted(planted.values())
    return out


# ----------------------------------------------------------------------------------------------------
# 7: report
# ----------------------------------------------------------------------------------------------------

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


def kernel_summary(kernels: dict | None) -> list[str]:
    if not kernels:
        return ["(kernel benchmarks not run)"]
    lines = ["| op | layer | prec | ours ms | reference ms | speed-up | TFLOP/s | of matmul |",
             "|---|---|---|---|---|---|---|---|"]
    for r in kernels["records"]:
        o = r.get("trustrepair") or {}
        lines.append(f"| {r['op']} | {r['layer']} | {r['precision']} | {fmt(o.get('ms'), '.3f')} | "
                     f"{r['reference']['ms']:.3f} | {fmt(r.get('speedup'))}x | {fmt(o.get('tflops'), '.1f')} | "
                     f"{fmt(100 * o['of_matmul'] if 'of_matmul' in o else None, '.0f')} % |")
    traffic = [r for r in kernels["records"] if "tile" in (r.get("trustrepair") or {})]
    if traffic:
        lines += ["", "Tile kernel operand traffic (squares_tiles; projected tokens loaded per output tile and "
                  "example, benchmark_kernels.tile_operand_bytes, over the median; 128 x 128 TF32 tiles do 32 FLOP "
                  "per byte, so a rate R needs R / 32 of operand bandwidth from L2):", "",
                  "| layer | prec | tile picked | GB loaded | FLOP/byte | TFLOP/s | operand TB/s |", "|---|---|---|---|---|---|---|"]
        for r in traffic:
            o = r["trustrepair"]
            lines.append(f"| {r['layer']} | {r['precision']} | {o['tile']} | {o['operand_gb']:.2f} | "
                         f"{o['flop_per_byte']:.1f} | {o['tflops']:.1f} | {o['operand_tb_s']:.2f} |")
    return lines


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(tempfile.gettempdir(), "gpu_check_out")),
                        help="folder for logs and JSON (the device tool sets $OUT)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="wall-clock budget of the whole script (the issue asks for 8 minutes)")
    parser.add_argument("--test-timeout-s", type=float, default=180, help="limit of the kernel test run")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups of stages to run, of {','.join(GROUPS)} (default: all); "
                             "for a short rerun after a fix, e.g. --only pipeline,kronfluence")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script's plumbing on the CPU: a tiny model, every stage that runs without "
                             "CUDA (row alignment, pipeline, eigh)")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        parser.error(f"--only takes a comma-separated subset of {','.join(GROUPS)}; got {args.only!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_check needs a CUDA device; on the CPU run `python -m pytest tests/test_kernels.py` "
                 "(Triton interpreter), `python benchmarks/benchmark_kernels.py --quick`, or this script with --smoke")
    run = Run(out, args.budget_s, groups)
    res = run.results
    if args.smoke:  # every stage that can run on the CPU, at toy sizes
        cpu = torch.device("cpu")
        res["row_alignment"] = run.stage("row alignment", lambda: row_alignment(cpu, widths=(17, 33), tokens=128),
                                         group="rows")
        res["eigh_schedules"] = run.stage("eigh schedules", lambda: eigh_schedules(cpu, widths=(33, 65, 17), repeats=1),
                                          group="eigh")
        pipeline(run, SMOKE, cpu, tune_even_unchanged=True)  # the tuned runs' plumbing, whatever the tables say
        res["eigh"] = run.stage("eigh options", lambda: eigh_options(cpu, widths=(33, 65)), group="eigh")
        report(res, out)
        return
    res["environment"] = run.stage("environment", environment)
    run.stage("import", kernels_importable)
    (out / "pytest.log").write_text("")
    first_tests = ["tests/test_kernels.py", "tests/test_streams.py"]  # the kernels, and eigh on CUDA streams
    res["tests"] = {"kernels": run.stage("tests", lambda: pytest_run(out, "kernels", first_tests, args.test_timeout_s),
                                         needs_s=60, group="tests")}

    import benchmark_kernels as bk

    res["matmul_tflops"] = run.stage("matmul rates", lambda: bk.matmul_rates(torch.device("cuda")), needs_s=20)
    if res["matmul_tflops"]:
        print("torch.matmul TFLOP/s: " + bk.format_rates(res["matmul_tflops"]), flush=True)
    res["row_alignment"] = run.stage("row alignment", lambda: row_alignment(torch.device("cuda")), needs_s=260,
                                     group="rows")
    # No exact fp32: on CUDA the launchers now run the reference for it (the kernels' FMA loops lost to
    # cuBLAS on the first run; see trustrepair.kernels._launch.runs_reference).
    # What the goals and the tunables (knobs.py) read comes first, in case the stage is cut short.
    plan = [(("squares_tiles", "squares"), ("tf32",)),
            (("squares_round_pass", "squares_round_kernel"), ("tf32",)),  # where to round: TF32_ROUNDING
            (("ghost", "ghost_k1", "scores"), ("tf32",)),  # which scoring contractions go to Triton
            (("squares_tiles", "squares", "ghost", "ghost_k1"), ("bf16",)),
            (("low_rank",), ("tf32",))]

    def kernels():
        records = []
        for ops, precisions in plan:
            for op in ops:
                for layer, shape in bk.PYTHIA_LAYERS.items():
                    for precision in precisions:
                        if run.left() < 225:  # keep time for the eigh schedules and the pipeline
                            print(f"kernel benchmarks cut short at {op} {layer} {precision}", flush=True)
                            return {"records": records, "cut_short": True}
                        r = bk.run_op(op, layer, shape, precision, 16, 512, 32, 8, torch.device("cuda"),
                                      res.get("matmul_tflops"))
                        records.append(r)
                        o = r["trustrepair"]
                        print(f"{op} {layer} {precision}: ours {o['ms']:.3f} ms ({o['tflops']:.1f} TFLOP/s), "
                              f"reference {r['reference']['ms']:.3f} ms, rel err {r['rel_err']:.1e}", flush=True)
        return {"records": records}

    res["kernels"] = run.stage("kernels", kernels, needs_s=240, group="kernels")
    tiles = [r["trustrepair"].get("of_matmul") for r in (res.get("kernels") or {}).get("records", [])
             if r["op"] == "squares_tiles" and r["precision"] == "tf32"]
    res["tiles_of_tf32"] = min(tiles) if tiles and None not in tiles else None

    from trustrepair.engine.ekfac import EIGH_STREAMS

    # The eigh schedules feed one of the tunables that the pipeline's tuned runs apply.
    res["eigh_schedules"] = run.stage("eigh schedules", lambda: eigh_schedules(torch.device("cuda"), workers=EIGH_STREAMS),
                                      needs_s=230, group="eigh")
    pipeline(run, PYTHIA, torch.device("cuda"))
    # The per-width eigh options only inform a later change.
    res["eigh"] = run.stage("eigh options", lambda: eigh_options(torch.device("cuda")), needs_s=40, group="eigh")
    res["tests"]["other gpu tests"] = run.stage(
        "other gpu tests", lambda: pytest_run(out, "other gpu tests", ["-m", "gpu", "tests"]
                                              + [f"--ignore={path}" for path in first_tests], run.left() - 10),
        needs_s=OTHER_GPU_TESTS_S, group="other-tests")
    report(res, out)


def pipeline(run: Run, cfg: dict, device: torch.device, tune_even_unchanged: bool = False) -> None:
    """Stage 5 (see the module docstring), with stage 7's tuned runs after the goals' runs and before the
    speed reference; results into ``run.results``. Our runs are the group ``pipeline``, kronfluence's the
    group ``kronfluence`` (see :data:`GROUPS`)."""
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
                "pairwise": {k: v for k, v in anchor.pairwise(aggregate=True).items() if k != "scores"}}, needs_s=20)
        if anchor is not None:
            anchor.tmp.cleanup()
        compare(res)


def tuned_pipeline(run: Run, cfg: dict, inputs, even_unchanged: bool = False) -> None:
    """Chooses the library's tunables from this run's tables (:mod:`knobs`) and, where a choice differs
    from today's default, runs our TF32 pipeline again with the choices applied (their kernels tuned and
    warmed first, outside the timing), so the defaults and the choices are timed against the same
    kronfluence run. ``even_unchanged`` runs it anyway (the CPU smoke run checks the plumbing)."""
    import knobs

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
                warm_libraries(model, bs, cfg["seq_len"], n_queries=len(queries))
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


def report(res: dict, out: Path) -> None:
    from benchmark_kernels import format_rates

    env = res.get("environment") or {}
    rates = res.get("matmul_tflops") or {}
    head = [f"{env.get('date', '?')}; {env.get('card', '?')} ({env.get('multiprocessors', '?')} SMs; "
            f"{env.get('nvidia_smi', '')}); python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
            f"triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}, kronfluence "
            f"{env.get('kronfluence', '?')}.",
            "torch.matmul TFLOP/s (8192^3 after 1 s of warm-up, median of 15 windows, same run): "
            + (format_rates(rates) if rates else "not measured"),
            f"Tests: {res.get('tests')}",
            "Correlations: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k.startswith("spearman")),
            f"Planted (TF32): {res.get('planted')}; planted (bf16): {res.get('planted_bf16')}; planted (TF32, tuned "
            f"tunables): {res.get('planted_tuned')}",
            "Stages: " + "; ".join(f"{k}: {v.get('status')}" for k, v in res["stages"].items())]
    kernels = kernel_summary(res.get("kernels")) + ["", *row_alignment_summary(res.get("row_alignment")), "",
                                                    *eigh_summary(res.get("eigh")), "",
                                                    *eigh_schedules_summary(res.get("eigh_schedules"))]
    pipeline = pipeline_table(res)
    goals = goals_table(res)
    if res.get("knobs") is not None:
        import knobs

        goals += ["", "Tunables chosen from this run's tables (benchmarks/knobs.py; the tuned rows above ran with the "
                  "changed ones):", "", *(knobs.describe(res["knobs"]) or ["- (none measured)"])]
    section = ["## Triton kernels on a GPU (issue 5)", "", *head, "",
               "Kernels: B = 16 examples x T = 512 tokens per call, Pythia-160M layer shapes (d_out, d_in incl. bias), "
               "Q = 32, rank 8; do_bench medians; FLOP formulas in benchmarks/benchmark_kernels.py.", "", *kernels, "",
               "Pipeline (Pythia-160M-shaped GPT-NeoX, 512 x 512 tokens, 32 queries, batch 16, empirical Fisher; "
               "kronfluence 1.0.1 in exact fp32, as its anchors):", "", *pipeline, "", *goals, "",
               "Command: `bash benchmarks/gpu_check.sh` (one device call; see benchmarks/gpu_check.py)."]
    (out / "RESULTS_section.md").write_text("\n".join(section) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=_describe))
    scores = {f"{run}/{key}": res[run][key] for run in res if isinstance(res[run], dict)
              for key in ("pairwise_scores", "aggregated_scores") if isinstance(res[run].get(key), torch.Tensor)}
    torch.save(scores, out / "scores.pt")
    print("\n".join(["", "=" * 100, *head, "", *kernels, "", *pipeline, "", *goals]), flush=True)


if __name__ == "__main__":
    main()
