"""What several benchmarks measure the same way: wall / CPU time and peak memory of a call, medians and
quantiles of repeated calls (``triton.testing.do_bench`` on CUDA, with the GPU's clock kept up), rank
correlation, the float32 matmul precision of a block, the benchmark model and examples, the machine's
name, and the replacement of one section of benchmarks/RESULTS.md.

Memory: on the host, the resident set (Linux ``/proc``; glibc's allocator asked to hand freed pages back
first, so an earlier phase's leftovers do not hide a later peak); on a CUDA device, PyTorch's allocator.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# ----------------------------------------------------------------------------------------------------
# Time and memory
# ----------------------------------------------------------------------------------------------------

def resident_bytes() -> int:
    """The process's resident set now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the OS (no-op where unavailable)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unmap_large_frees() -> None:
    """glibc keeps freed blocks of up to 32 MiB resident once its mmap threshold has adapted, which would
    hide later calls' allocations from a peak-RSS measurement: pin the threshold at 128 KiB (allocations
    above it are mmapped and unmapped on free)."""
    m_mmap_threshold = -3
    if ctypes.CDLL(None).mallopt(m_mmap_threshold, 128 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak memory would be misreported")


class PeakMemory:
    """Context manager: peak resident memory above the level at entry, sampled every 10 ms; ``mib`` after
    the block. Sampling sees what any allocator holds (C++ and BLAS included) but may miss a peak shorter
    than 10 ms; :func:`peak_rss_rise_mib` reads the kernel's exact high-water mark instead."""

    def __enter__(self):
        trim_heap()  # hand memory freed by earlier phases back, so that their leftovers do not hide this peak
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.mib = (self.peak - self.start) / 2**20


def peak_rss_rise_mib(fn: Callable[[], Any]) -> float:
    """MiB by which the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) rises
    while ``fn()`` runs."""
    def status(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = status("VmRSS")
    fn()
    return (status("VmHWM") - before) / 1024


@dataclass
class Timing:
    """One timed call: its result, wall-clock and process CPU seconds, and its peak extra memory (MiB):
    the device allocator's on CUDA, the resident set's (:class:`PeakMemory`) on the host."""

    value: Any
    seconds: float
    cpu_seconds: float
    peak_mib: float


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Timing:
    """Times one call of ``fn``; on a CUDA ``device`` the device is synchronised around it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return Timing(value, wall, cpu, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    with PeakMemory() as mem:
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(value, wall, cpu, mem.mib)


def wall_times(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[Any]]:
    """Wall-clock seconds of ``repeats`` back-to-back calls of ``fn``, sorted, and the calls' results."""
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return sorted(times), results


def quantiles(times: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of sorted ``times`` (the p20 / p80 as the nearest lower sample)."""
    return {"median": statistics.median(times), "p20": times[len(times) // 5], "p80": times[(4 * len(times)) // 5]}


def time_call(fn, device: torch.device, repeats: int = 5) -> dict:
    """Median and p20 / p80 milliseconds of ``fn()`` and its peak extra device memory (MiB, CUDA only).
    On CUDA the first call compiles / autotunes outside the timing, then :func:`warm_up` brings the clock
    back up (compilation leaves the card idle) before ``do_bench``."""
    if device.type == "cuda":
        import triton

        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        warm_up(device, 0.1)
        median, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "p20": p20, "p80": p80, "peak_mib": peak}
    fn()
    times = quantiles(wall_times(fn, repeats)[0])
    return {"ms": times["median"] * 1e3, "p20": times["p20"] * 1e3, "p80": times["p80"] * 1e3, "peak_mib": float("nan")}


def synchronize(device: torch.device) -> None:
    """Waits for ``device``'s queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_for(fn, seconds: float, device: torch.device) -> tuple[int, float]:
    """Calls ``fn`` back to back, four at a time between synchronisations, until ``seconds`` have passed;
    returns (calls, seconds taken)."""
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        for _ in range(4):
            fn()
        calls += 4
        synchronize(device)
    return calls, time.perf_counter() - start


def warm_up(device: torch.device, seconds: float) -> None:
    """Keeps ``device`` busy with 4096^3 bfloat16 products for ``seconds``, so that its clock is up when a
    timing starts (an idle H100 sat at 345 MHz of its 1980)."""
    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    run_for(lambda: x @ x, seconds, device)


# ----------------------------------------------------------------------------------------------------
# Correlation, precision, machine
# ----------------------------------------------------------------------------------------------------

def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x.double().flatten(), y.double().flatten()]))[0, 1])


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation of the flattened tensors (ties ranked by position)."""
    rank = lambda v: torch.argsort(torch.argsort(v.double().flatten())).double()
    return pearson(rank(x), rank(y))


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the block, restored after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------

def gpt_neox(cfg: dict, **config):
    """A GPT-NeoX of ``cfg``'s sizes ("vocab", "hidden", "layers", "heads", "intermediate"), randomly
    initialised after ``torch.manual_seed(0)``, in eval mode; ``config``: further ``GPTNeoXConfig`` fields."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"], **config)).eval()


def prompt_and_response(prompt: torch.Tensor, response: torch.Tensor) -> dict:
    """An example of token ids ``prompt`` then ``response``, labelled on the response only (the prompt's
    labels are ``IGNORE_INDEX``)."""
    from trustrepair.task import IGNORE_INDEX

    ids = torch.cat([prompt, response])
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------------------------------
# benchmarks/RESULTS.md
# ----------------------------------------------------------------------------------------------------

def section_span(text: str, heading: str, level: int = 2) -> tuple[int, int] | None:
    """(start, end) of the section of ``text`` that starts at ``heading`` (a Markdown heading of ``level``)
    and ends before the next heading of level 2 to ``level``, or None when there is none."""
    if heading not in text:
        return None
    start = text.index(heading)
    ends = [text.find("\n" + "#" * n + " ", start + len(heading)) for n in range(2, level + 1)]
    ends = [end + 1 for end in ends if end != -1]
    return start, min(ends, default=len(text))


def replace_section(text: str, heading: str, body: str, level: int = 2) -> str:
    """``text`` with its section ``heading`` (:func:`section_span`) replaced by ``body`` (which starts with
    the heading), or with ``body`` appended when there is none."""
    span = section_span(text, heading, level)
    if span is None:
        return text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    rest = text[span[1]:]
    return text[:span[0]] + body.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
