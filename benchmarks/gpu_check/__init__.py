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
2. tests (:mod:`.environment`): ``pytest tests/kernels tests/engine/test_streams.py`` on CUDA (every kernel compiled, against
   its reference, the ``gpu``-marked bfloat16 / TF32 / inductor / dispatch tests included, and eigh on
   concurrent CUDA streams); log in ``$OUT/pytest.log``;
3. ``torch.matmul`` TFLOP/s in fp32, TF32 and bf16 (8192^3), the denominators of every rate below, each
   after a second of warm-up and with the SM clock read under load (see
   :func:`benchmarks.benchmark_kernels.matmul_rates`);
4. the covariance and projection products on odd-width operands, contiguous, row-padded and zero-padded
   (:mod:`.rows`); kernels (:mod:`.kernels`): :mod:`benchmarks.benchmark_kernels` at the Pythia-160M layer
   shapes (B = 16, T = 512) against the reference, which on CUDA issues batched cuBLAS products
   (``trustrepair.engine.ops.blocking.cache_blocked``);
5. eigh schedules (:mod:`.eigh`) of a fit's many factors (sequential, stacked by width, concurrent CUDA streams, streams
   with the narrow factors on the host), one of the tunables of stage 6;
6. pipeline (:mod:`.pipeline`; kronfluence through :mod:`benchmarks.kronfluence_anchor`) on a
   Pythia-160M-shaped GPT-NeoX (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab
   50304, random init, seed 0; 512 training sequences of 512 tokens, the first half prompt; 32 queries
   with 256-token prompts and responses; every linear layer in the blocks; empirical Fisher; damping
   0.1 x mean(Lambda); batch 16 everywhere). Four training examples are replaced by copies of queries
   0-3's (prompt, opponent): each must be its query's top pairwise example and the four the top of the
   aggregated scores. Runs: one forward+backward epoch (fp32, TF32, bf16 autocast; the floor);
   trustrepair with TF32 matmuls (fit, pairwise, aggregated); kronfluence 1.0.1 in fp32 (fit, pairwise);
   the PyTorch reference path in exact fp32 (``TRUSTREPAIR_DISABLE_TRITON=1``: fit and pairwise, the
   "fp32 reference scores"); trustrepair under bf16 autocast; then the library's tunables chosen from the
   tables above (:mod:`benchmarks.knobs`: Gram block, zero-padded widths, eigh streams and host, whether
   the eigenvalue correction goes to Triton) and, where a choice differs from today's default, our TF32 and bf16
   runs again with the choices applied (their own rows in the pipeline and goals tables, against the
   same kronfluence run): commit the "CHANGE" lines whose rows win; last kronfluence's
   aggregate_query_gradients mode (a speed reference only);
7. eigh options per factor width (cuSOLVER float64 / float32, MAGMA, CPU LAPACK), for a later change;
8. the ``gpu``-marked tests of the other test files (today the distributed engine on two gloo ranks
   sharing the GPU: three processes, each compiling and autotuning the kernels), with whatever budget is
   left (estimated at two minutes, not yet measured; 45 s was not enough), appended to ``$OUT/pytest.log``;
9. a table last (:mod:`.report`), with the issue's goals and whether each was met; every number in ``$OUT/gpu_check.json``
   and a ready-to-append section in ``$OUT/RESULTS_section.md`` (for benchmarks/RESULTS.md).

``__main__`` holds the argument parsing, the stage order and the writing of the results; :mod:`.runner`
the budget, the ``--only`` groups and the failure-tolerant stage runner. On the CPU,
``python -m benchmarks.gpu_check --smoke`` runs every stage that needs no CUDA at toy sizes
(tests/benchmarks/test_gpu_check.py).

A rerun after a fix need not repeat everything: ``--only`` names the groups of stages to run (see
:data:`.runner.GROUPS`), e.g. ``bash benchmarks/gpu_check.sh --only pipeline,kronfluence`` (the goals' ratios
need kronfluence from the same run) or ``--only tests`` for the compiled kernel tests alone. If the tuned
runs of stage 6 were skipped for time, ``--only rows,eigh,pipeline,kronfluence`` (about 5 minutes) reruns
what they need (without the kernel table, the Triton routing keeps its default).
"""
