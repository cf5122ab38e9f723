"""Independent device computations side by side: a few host threads, each with its own CUDA stream.

Some library calls leave a large GPU mostly idle on one input. cuSOLVER's symmetric eigensolver is the
case here: its tridiagonal reduction is matrix-vector work with host synchronisations, so one 3072-wide
float64 ``eigh`` cannot fill a large GPU, and EK-FAC runs two per layer (benchmarks/RESULTS.md,
decisions: ``eigh_streams``). :func:`map_on_streams` keeps up to ``workers`` such calls in flight at
once. Each worker thread takes the next item from a shared queue (callers pass the most expensive first,
so the long ones do not end up last) and runs it on its own stream, which first waits for the caller's
stream (where the inputs were made); results are synchronised before they are returned and recorded on
the caller's stream, so the caching allocator cannot hand their memory to another stream too early.
Every item is computed exactly as it would be alone, so results do not depend on ``workers``.

Before the first worker starts, a CUDA caller's thread runs one tiny ``eigh``: torch loads its CUDA
linear-algebra library (cuSOLVER / MAGMA wrappers) lazily at the first such call, and two threads making
that first call at once fail with "lazy wrapper should be called at most once" (pytorch/pytorch#90613;
a fresh process whose first linalg call was a fit's eigendecomposition hit it). After one call on one
thread every thread is safe.

On a CPU the same threads run without streams (the tests use that to check ordering and errors); the
library itself uses one worker there, since LAPACK and BLAS already use every core for one call.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def map_on_streams(fn: Callable[[T], torch.Tensor], items: Sequence[T], device: torch.device, workers: int,
                   on_done: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """``[fn(item) for item in items]``, with up to ``workers`` items computed concurrently.

    Args:
        fn: the computation; returns one tensor on ``device``.
        items: its inputs, most expensive first for the best balance.
        device: where the computations run; a CUDA device gets one stream per worker.
        workers: the most items in flight at once; 1 (or one item) runs them in order on the caller's
            thread and stream.
        on_done: called once per finished item (e.g. a progress bar's update; from worker threads).
    Returns:
        The results in the order of ``items``. If ``fn`` raises, the workers stop taking new items and
        the first exception is raised once the items in flight have finished.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item))
            if on_done is not None:
                on_done()
        return results

    cuda = device.type == "cuda"
    if cuda:
        _load_cuda_linalg(device)
    caller = torch.cuda.current_stream(device) if cuda else None
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(items)):
        pending.put(index)
    failed = threading.Event()
    results: list[torch.Tensor | None] = [None] * len(items)

    def work() -> None:
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_stream(caller)
        try:
            while not failed.is_set():
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    if cuda:
                        with torch.cuda.device(device), torch.cuda.stream(stream):
                            results[index] = fn(items[index])
                    else:
                        results[index] = fn(items[index])
                except BaseException:
                    failed.set()
                    raise
                if on_done is not None:
                    on_done()
        finally:
            if cuda:
                stream.synchronize()

    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="trustrepair-stream") as pool:
        futures = [pool.submit(work) for _ in range(min(workers, len(items)))]
        for future in futures:
            future.exception()  # wait for every worker before raising, so none is left running
        for future in futures:
            future.result()
    if cuda:
        for result in results:
            result.record_stream(caller)
    return results


_cuda_linalg_loaded = False


def _load_cuda_linalg(device: torch.device) -> None:
    """Make torch load its lazily loaded CUDA linear-algebra library now, on this thread (once per process;
    see the module docstring)."""
    global _cuda_linalg_loaded
    if not _cuda_linalg_loaded:
        torch.linalg.eigh(torch.ones(1, 1, dtype=torch.float64, device=device))
        _cuda_linalg_loaded = True
