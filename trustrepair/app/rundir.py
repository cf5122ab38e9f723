"""The run directory: where each stage's output lives, the settings it was made with, and the wall time
per stage.

A run directory holds the outputs of one set of settings (``config.json``, or ``attribute.json`` for a
user's run) and one set of inputs (``inputs.json``: the SHA-256 of every model and data file the run
reads): opening it with other settings or changed inputs is refused (``ValueError``), never mixed. Every write goes through :meth:`RunDir.publish`:
rank 0 writes (atomically, :mod:`trustrepair.engine.storage`) while under ``torchrun`` the other ranks,
which computed the same result, wait; an error on rank 0 is raised on every rank.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from trustrepair.app.settings import AttributeConfig, DemoConfig, as_written
from trustrepair.engine.distributed import fail_together, is_main_process, progress_enabled
from trustrepair.engine.storage import read_json, write_json

logger = logging.getLogger(__name__)


class RunDir:
    """A run directory opened with ``config`` (written to ``settings_file`` when new, checked against it
    otherwise; other settings replace the saved ones while the directory holds no result yet, so a
    command that stopped on bad input can be corrected) and the timings of its stages so
    far (``timings.json``)."""

    # Each stage's output, relative to the run directory.
    SFT_PARAMS = Path("sft") / "params.safetensors"
    SFT_EVALUATIONS = Path("sft") / "evaluations.json"
    HIDDEN_CACHE = Path("cache") / "hidden.pt"
    FACTORS = Path("factors")
    FACTORS_PARTIAL = Path("factors.partial")
    SCORES = Path("scores.safetensors")
    SCORE_CHUNKS = Path("scores.partial")
    SELECTION = Path("selection.json")
    REPAIRS = Path("repairs.json")
    EVALUATION = Path("evaluation.json")
    REPORT = Path("report.md")

    SETTINGS = "config.json"
    """The demo's settings file; a user's ``attribute`` run keeps its settings in :data:`ATTRIBUTE_SETTINGS`."""
    ATTRIBUTE_SETTINGS = "attribute.json"
    INPUTS = "inputs.json"

    def __init__(self, out_dir: str | os.PathLike, config: DemoConfig | AttributeConfig, *, progress: bool = True,
                 settings_file: str = SETTINGS):
        self.dir = Path(out_dir)
        self.config = config
        self.progress = progress_enabled(progress)
        self.timings: dict[str, float] = {}
        self.settings_file = settings_file
        path = self.dir / settings_file
        wanted = config.to_json()
        if path.is_file():
            saved = as_written(read_json(path), type(config))
            changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if changed and not self._has_results(settings_file):
                logger.info("run directory %s has no results yet; replacing its settings %s", self.dir, changed)
                self._forget_splits()
                self.publish(lambda: write_json(path, wanted))
            elif changed:
                raise ValueError(
                    f"run directory {self.dir} was made with other settings {changed} (saved, requested); "
                    "use a new --out directory or delete that one")
        else:
            self.publish(lambda: write_json(path, wanted))
        timings = self.dir / "timings.json"
        if timings.is_file():
            self.timings = read_json(timings)

    def check_inputs(self, inputs: dict) -> None:
        """Record the fingerprints of the files this run reads (``inputs``: label -> file or directory,
        :mod:`trustrepair.app.fingerprints`) in ``inputs.json``, or check them against the recorded ones.

        Raises:
            ValueError: an input changed since the directory's results were computed, naming the file.
        """
        from trustrepair.app.fingerprints import changed_inputs, fingerprint

        path = self.dir / self.INPUTS
        now = fingerprint(inputs)
        if path.is_file():
            changed = changed_inputs(read_json(path), now)
            if not changed:
                return
            if self._has_results(self.settings_file):
                shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
                raise ValueError(f"the inputs of run directory {self.dir} changed since its results were computed "
                                 f"({shown}); use a new --out directory, or delete {self.dir} to start over")
            self._forget_splits()
        self.publish(lambda: write_json(path, now))

    def _forget_splits(self) -> None:
        self.publish(lambda: shutil.rmtree(self.dir / "splits", ignore_errors=True))

    def _has_results(self, settings_file: str) -> bool:
        """Whether anything but the settings, the timings and the data splits (rewritten by every run) is here."""
        return any(p.name not in (settings_file, "timings.json", "splits", self.INPUTS) for p in self.dir.iterdir())

    def path(self, relative: str | os.PathLike) -> Path:
        return self.dir / relative

    def repair_path(self, target: str, strategy: str) -> Path:
        """The saved :class:`~trustrepair.methods.repair_step.RepairDelta` of one repair."""
        return self.dir / "repairs" / f"{target}_{strategy}.safetensors"

    @staticmethod
    def publish(write: Callable[[], object]) -> None:
        """Run ``write`` (a write into the run directory) on rank 0 only; the other ranks wait here, and
        an error on rank 0 is raised on every rank."""
        with fail_together("writing the run directory"):
            if is_main_process():
                write()

    @contextmanager
    def timed(self, stage: str):
        """Record the wall time of the enclosed block as ``stage`` in ``timings.json``."""
        start = time.perf_counter()
        yield
        self.timings[stage] = round(time.perf_counter() - start, 2)
        self.publish(lambda: write_json(self.dir / "timings.json", self.timings))
        logger.info("%s: %.1f s", stage, self.timings[stage])
