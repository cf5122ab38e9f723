"""Stage bookkeeping for gpu_check: the wall-clock budget, the groups ``--only`` selects, the results
and their JSON file; a stage that raises is reported and the run goes on."""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

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
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=describe_for_json))


def describe_for_json(value):
    """JSON stand-in for what json cannot store (score tensors go to scores.pt instead)."""
    return f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else str(value)
